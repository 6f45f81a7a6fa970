//! crossgate-control: the control service. It watches every cluster of the mesh and pushes to each gateway
//! the endpoints it may route to.

pub mod ads;
pub mod bootstrap;
pub mod certs;
pub mod model;
pub mod server;
pub mod service;
pub mod sources;
pub mod views;

#[cfg(any(test, feature = "testing"))]
pub mod fake_kube;
