//! Concern `identities`: each distinct security label set → one cluster-scoped `Identity`.
//!
//! [`labels`] decides which labels count, [`index`] numbers identities and decides garbage
//! collection (pure values).

pub mod index;
pub mod labels;
