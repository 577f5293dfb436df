//! The reconciler harness.
