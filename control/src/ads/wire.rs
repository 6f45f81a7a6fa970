//! The two ADS variants as messages: how a request changes a type's state, and how a push is written.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};

use super::subscription::{Mode, Outcome, Push, TypeState};

/// One ADS variant.
pub trait Wire: Send + 'static {
    type Request: prost::Message + Send + 'static;
    type Response: prost::Message + Send + 'static;
    const MODE: Mode;
    /// For the debug view and logs.
    const PROTOCOL: &'static str;

    fn node(request: &Self::Request) -> Option<&Node>;
    fn type_url(request: &Self::Request) -> &str;
    /// Applies the request's subscription changes and returns its answer to the response in flight, if any.
    fn apply(request: &Self::Request, state: &mut TypeState) -> Option<Outcome>;
    fn response(type_url: String, push: Push, system_version: u64) -> Self::Response;
}

/// Incremental ADS (`DeltaAggregatedResources`), what Istio's gateways use.
pub enum Delta {}

impl Wire for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const MODE: Mode = Mode::Delta;
    const PROTOCOL: &'static str = "delta";

    fn node(request: &Self::Request) -> Option<&Node> {
        request.node.as_ref()
    }

    fn type_url(request: &Self::Request) -> &str {
        &request.type_url
    }

    /// Subscription changes count in any request, an ACK included; the answer only if the nonce is the one
    /// in flight (a change of subscription alone may carry no nonce, or an old one).
    fn apply(request: &Self::Request, state: &mut TypeState) -> Option<Outcome> {
        state.delta_subscribe(
            &request.resource_names_subscribe,
            &request.resource_names_unsubscribe,
            &request.initial_resource_versions,
        );
        state.answer(&request.response_nonce, request.error_detail.as_ref().map(|e| e.message.clone()))
    }

    fn response(type_url: String, push: Push, system_version: u64) -> Self::Response {
        DeltaDiscoveryResponse {
            system_version_info: system_version.to_string(),
            resources: push
                .resources
                .into_iter()
                .map(|(name, versioned)| Resource {
                    name,
                    version: versioned.version,
                    resource: Some((*versioned.resource).clone()),
                    ..Default::default()
                })
                .collect(),
            type_url,
            removed_resources: push.removed,
            nonce: push.nonce,
            ..Default::default()
        }
    }
}

/// State-of-the-world ADS (`StreamAggregatedResources`).
pub enum Sotw {}

impl Wire for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const MODE: Mode = Mode::StateOfTheWorld;
    const PROTOCOL: &'static str = "state-of-the-world";

    fn node(request: &Self::Request) -> Option<&Node> {
        request.node.as_ref()
    }

    fn type_url(request: &Self::Request) -> &str {
        &request.type_url
    }

    /// A request naming an older nonce than the last response of its type is stale and ignored whole;
    /// otherwise its names replace the subscription, and its nonce answers the response in flight.
    fn apply(request: &Self::Request, state: &mut TypeState) -> Option<Outcome> {
        if !state.sotw_is_current(&request.response_nonce) {
            return None;
        }
        let outcome = state.answer(&request.response_nonce, request.error_detail.as_ref().map(|e| e.message.clone()));
        state.sotw_subscribe(&request.resource_names);
        outcome
    }

    fn response(type_url: String, push: Push, _system_version: u64) -> Self::Response {
        DiscoveryResponse {
            // Opaque to the gateway, which echoes it back; the nonce is unique per response.
            version_info: push.nonce.clone(),
            resources: push.resources.into_iter().map(|(_, versioned)| (*versioned.resource).clone()).collect(),
            type_url,
            nonce: push.nonce,
            ..Default::default()
        }
    }
}
