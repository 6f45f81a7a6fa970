//! crossgate's wire contract: the resources a gateway serves and the delta discovery service that carries
//! them. The same messages have a YAML/JSON form (proto3 JSON mapping via pbjson), which is what the
//! gateway's static resources file and the simulator's traffic policies are written in.

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
