//! A DestinationRule that crossgate refuses, by field: shared by the traffic policy and its locality settings.

/// A traffic policy istiod would refuse, or one a passthrough gateway cannot honour; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    pub field: &'static str,
    pub reason: String,
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> PolicyError {
    PolicyError { field, reason: reason.into() }
}
