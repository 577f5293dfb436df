//! Concern `policy`.
pub mod resolve;
pub mod selector;
