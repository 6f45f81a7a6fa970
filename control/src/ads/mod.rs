//! Envoy's xDS v3 over ADS, as istiod serves an east-west gateway (delta, what Istio's gateways use, and
//! state of the world): LDS and CDS by wildcard, EDS by the names the gateway subscribes after CDS. Each
//! compact cluster of the gateway's view becomes, through `crossgate_istio::gateway::build`, an EDS Cluster,
//! its ClusterLoadAssignment (priorities computed for this gateway) and a filter chain of the sni-dnat
//! listener. Each gateway is sent only what differs from what it holds; one response per type is in flight.

mod resources;
mod status;
mod stream;
mod subscription;
mod wire;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crossgate_istio::node::GatewayNode;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use resources::{AdsOptions, Kind, listener_name};
pub use status::{AdsGatewayStatus, NackStatus, NodeStatus};

use crate::server::MeshVersion;
use crate::views::ViewOptions;
use resources::InvalidClusters;
use stream::Session;
use subscription::Mode;
use wire::{Delta, Sotw, Wire};

/// The largest message either way: far above what a real mesh's full push reaches (tonic's default, 4 MiB,
/// is not).
pub const MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;

struct AdsMetrics {
    connected_delta: Gauge,
    connected_sotw: Gauge,
    /// By [`Kind::index`].
    pushes: [Counter; 3],
    acks: [Counter; 3],
    nacks: [Counter; 3],
    push_resources: Histogram,
    push_bytes: Histogram,
    ack_seconds: Histogram,
}

impl AdsMetrics {
    fn new() -> Self {
        let by_kind = |name: &'static str, result: Option<&'static str>| {
            Kind::ALL.map(|kind| match result {
                Some(result) => metrics::counter!(name, "type" => kind.short(), "result" => result),
                None => metrics::counter!(name, "type" => kind.short()),
            })
        };
        AdsMetrics {
            connected_delta: metrics::gauge!("crossgate_control_xds_connected_gateways", "protocol" => "delta"),
            connected_sotw: metrics::gauge!("crossgate_control_xds_connected_gateways", "protocol" => "sotw"),
            pushes: by_kind("crossgate_control_xds_pushes_total", None),
            acks: by_kind("crossgate_control_xds_responses_total", Some("ack")),
            nacks: by_kind("crossgate_control_xds_responses_total", Some("nack")),
            push_resources: metrics::histogram!("crossgate_control_xds_push_resources"),
            push_bytes: metrics::histogram!("crossgate_control_xds_push_bytes"),
            ack_seconds: metrics::histogram!("crossgate_control_xds_change_to_ack_seconds"),
        }
    }

    fn connected(&self, mode: Mode) -> &Gauge {
        match mode {
            Mode::Delta => &self.connected_delta,
            Mode::StateOfTheWorld => &self.connected_sotw,
        }
    }
}

struct Shared {
    mesh: watch::Receiver<Arc<MeshVersion>>,
    view: ViewOptions,
    options: AdsOptions,
    invalid: InvalidClusters,
    gateways: Mutex<BTreeMap<u64, AdsGatewayStatus>>,
    next_stream: AtomicU64,
    metrics: AdsMetrics,
}

/// The ADS service. Cheap to clone.
#[derive(Clone)]
pub struct AdsServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsServer").field("options", &self.shared.options).finish_non_exhaustive()
    }
}

impl AdsServer {
    /// Serves the mesh versions of `mesh` (see [`crate::server::debounce`]); metric handles go to the current
    /// recorder.
    pub fn new(mesh: watch::Receiver<Arc<MeshVersion>>, view: ViewOptions, options: AdsOptions) -> Self {
        AdsServer {
            shared: Arc::new(Shared {
                mesh,
                view,
                options,
                invalid: InvalidClusters::new(),
                gateways: Mutex::default(),
                next_stream: AtomicU64::new(0),
                metrics: AdsMetrics::new(),
            }),
        }
    }

    /// The tonic service, with message size limits no real mesh reaches.
    pub fn service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// Every connected gateway, in connection order.
    pub fn gateways(&self) -> Vec<AdsGatewayStatus> {
        self.shared.gateways.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Reads the first request, refuses a stream whose node cannot be served, and serves the rest in a task.
    async fn open<W: Wire>(
        &self,
        request: Request<Streaming<W::Request>>,
    ) -> Result<Response<ReceiverStream<Result<W::Response, Status>>>, Status> {
        let mut requests = request.into_inner();
        let first = requests.message().await?.ok_or_else(|| Status::invalid_argument("empty request stream"))?;
        let node = W::node(&first).ok_or_else(|| Status::invalid_argument("the first request must carry the node"))?;
        let node = GatewayNode::from_envoy(node).map_err(|error| Status::invalid_argument(error.to_string()))?;
        let (responses, outbound) = mpsc::channel(Kind::ALL.len());
        let session = Session::<W>::open(Arc::clone(&self.shared), node);
        tokio::spawn(session.serve(first, requests, responses));
        Ok(Response::new(ReceiverStream::new(outbound)))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.open::<Sotw>(request).await
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.open::<Delta>(request).await
    }
}

#[cfg(test)]
mod tests;
