//! Where the mesh comes from: every source produces `ClusterModel`s (see `crate::model`).

pub mod file;
pub mod kube;
