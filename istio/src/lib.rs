//! Istio's vocabulary and rules for an east-west gateway, in one home for both binaries: the SNI key and ALPNs
//! ([`sni`]), topology labels and localities ([`labels`]), the locality load balancer's priorities and weights
//! ([`locality_lb`]), a DestinationRule's traffic policy as Envoy fields ([`policy`]), and the Envoy resources
//! istiod builds for one sni-dnat cluster ([`gateway`]).

pub mod gateway;
pub mod labels;
pub mod locality_lb;
pub mod node;
pub mod policy;
mod policy_error;
pub mod sni;
