//! crossgate's compact form of what a gateway serves: one entry per sni-dnat cluster, with its DestinationRule
//! traffic policy and endpoints. Its YAML/JSON form (proto3 JSON mapping via pbjson) is the gateway's static
//! resources file and the simulator's traffic policies; the control service's views produce it. On the wire,
//! both sides speak Envoy's xDS v3 (`crossgate-istio` builds it from this form).

pub mod duration;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod discovery {
    pub mod v1 {
        tonic::include_proto!("crossgate.discovery.v1");
        include!(concat!(env!("OUT_DIR"), "/crossgate.discovery.v1.serde.rs"));
    }
}

pub use discovery::v1::*;
pub use duration::Duration;
