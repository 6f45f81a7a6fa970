//! crossgate-proxy: an east-west gateway for Istio multi-network meshes. It reads the SNI of each workload's
//! mTLS ClientHello on :15443 and passes the still-encrypted connection to a local endpoint of that service.

pub mod lb;
pub mod tls;
