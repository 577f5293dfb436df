pub mod allocator;
pub mod plan;
