//! crossgate-proxy: an east-west gateway for Istio multi-network meshes. It reads the SNI of each workload's
//! mTLS ClientHello on :15443 and passes the still-encrypted connection to a local endpoint of that service.

pub mod admin;
pub mod balance;
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod drain;
pub mod forward;
pub mod gateway;
pub mod lb;
pub mod listener;
pub mod metrics;
pub mod resources;
pub mod route;
pub mod simulate;
pub mod tls;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
