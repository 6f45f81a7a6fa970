//! Where the mesh model comes from.

pub mod file;
