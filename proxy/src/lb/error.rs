//! Why a cluster's balancing settings are refused: the leaf every reader of them shares.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LbConfigError {
    #[error(
        "lb_policy {0} is not supported by an sni-dnat gateway (LEAST_REQUEST, ROUND_ROBIN, RANDOM, RING_HASH, MAGLEV)"
    )]
    UnsupportedPolicy(i32),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("unknown lb policy {0:?}; known: LEAST_REQUEST, ROUND_ROBIN, RANDOM, RING_HASH, MAGLEV")]
    UnknownPolicy(String),
}

pub(super) fn invalid(field: &'static str, reason: impl Into<String>) -> LbConfigError {
    LbConfigError::Invalid { field, reason: reason.into() }
}

/// An Envoy duration as a `std` one; negative durations are refused by name.
pub(super) fn duration(
    value: Option<&envoy_types::pb::google::protobuf::Duration>,
    field: &'static str,
    default: Duration,
) -> Result<Duration, LbConfigError> {
    let Some(d) = value else { return Ok(default) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(invalid(field, "must not be negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}
