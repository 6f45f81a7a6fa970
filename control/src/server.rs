//! The delta discovery server: one stream per gateway, each with its own view of the mesh (its network, its
//! cluster's DestinationRules) and its own record of what it has ACKed, so that every push is the difference
//! between the two. One response is in flight per stream; a NACK is logged, counted and remembered, the
//! gateway keeps its last ACKed state, and the same mesh version is not pushed to it again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossgate_proto::gateway_discovery_server::GatewayDiscovery;
use crossgate_proto::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource};
use metrics::{Counter, Gauge, Histogram};
use prost::Message;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::model::MeshModel;
use crate::views::{self, Delta, ViewOptions};

/// The version before the source has a mesh worth serving: a gateway that connects then waits (a reconnecting
/// one keeps what it has) rather than being told the mesh is empty.
pub(crate) const UNPRIMED: u64 = 0;

/// One state of the mesh, as pushed: numbered, and stamped with when its first change was seen.
#[derive(Debug)]
pub struct MeshVersion {
    pub mesh: MeshModel,
    pub version: u64,
    /// When the first change folded into this version arrived (for the event-to-ACK latency).
    pub changed_at: Instant,
}

/// Turns every mesh change into versions at most one per `quiet` period of calm (or per `max_delay` under a
/// steady stream of changes), so that a burst of watch events becomes one push. Version 0, the empty mesh, is
/// never served: version 1 is the mesh at the moment `primed` turns true.
pub fn debounce(
    mut input: watch::Receiver<MeshModel>,
    mut primed: watch::Receiver<bool>,
    quiet: Duration,
    max_delay: Duration,
) -> watch::Receiver<Arc<MeshVersion>> {
    let unprimed = MeshVersion { mesh: MeshModel::default(), version: UNPRIMED, changed_at: Instant::now() };
    let (versions, receiver) = watch::channel(Arc::new(unprimed));
    tokio::spawn(async move {
        if primed.wait_for(|primed| *primed).await.is_err() {
            return;
        }
        let mut version = 1;
        let first = MeshVersion { mesh: input.borrow_and_update().clone(), version, changed_at: Instant::now() };
        if versions.send(Arc::new(first)).is_err() {
            return;
        }
        while input.changed().await.is_ok() {
            let changed_at = Instant::now();
            let deadline = tokio::time::Instant::now() + max_delay;
            loop {
                tokio::select! {
                    changed = input.changed() => if changed.is_err() { break },
                    () = tokio::time::sleep(quiet) => break,
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            version += 1;
            let mesh = input.borrow_and_update().clone();
            if versions.send(Arc::new(MeshVersion { mesh, version, changed_at })).is_err() {
                return;
            }
        }
    });
    receiver
}

struct ServerMetrics {
    connected: Gauge,
    pushes: Counter,
    push_resources: Histogram,
    push_bytes: Histogram,
    ack_seconds: Histogram,
    acks: Counter,
    nacks: Counter,
}

impl ServerMetrics {
    fn new() -> Self {
        ServerMetrics {
            connected: metrics::gauge!("crossgate_control_connected_gateways"),
            pushes: metrics::counter!("crossgate_control_pushes_total"),
            push_resources: metrics::histogram!("crossgate_control_push_resources"),
            push_bytes: metrics::histogram!("crossgate_control_push_bytes"),
            ack_seconds: metrics::histogram!("crossgate_control_change_to_ack_seconds"),
            acks: metrics::counter!("crossgate_control_responses_total", "result" => "ack"),
            nacks: metrics::counter!("crossgate_control_responses_total", "result" => "nack"),
        }
    }
}

/// What the debug endpoint shows of one connected gateway.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayStatus {
    pub node_id: String,
    pub cluster_id: String,
    pub network: String,
    pub requested_network_view: Vec<String>,
    pub connected_at_unix: u64,
    /// Cluster name -> version, as ACKed.
    pub acked: BTreeMap<String, String>,
    pub acked_mesh_version: u64,
    pub pushes: u64,
    /// The last NACK: the gateway's message and the mesh version it refused.
    pub last_nack: Option<(u64, String)>,
}

struct Shared {
    mesh: watch::Receiver<Arc<MeshVersion>>,
    options: ViewOptions,
    gateways: Mutex<BTreeMap<u64, GatewayStatus>>,
    next_stream: AtomicU64,
    metrics: ServerMetrics,
}

/// The tonic service. Cheap to clone.
#[derive(Clone)]
pub struct DiscoveryServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DiscoveryServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryServer").finish_non_exhaustive()
    }
}

impl DiscoveryServer {
    /// Serves the mesh versions of `mesh` (see [`debounce`]); metric handles go to the current recorder.
    pub fn new(mesh: watch::Receiver<Arc<MeshVersion>>, options: ViewOptions) -> Self {
        DiscoveryServer {
            shared: Arc::new(Shared {
                mesh,
                options,
                gateways: Mutex::default(),
                next_stream: AtomicU64::new(0),
                metrics: ServerMetrics::new(),
            }),
        }
    }

    /// Every connected gateway, in connection order.
    pub fn gateways(&self) -> Vec<GatewayStatus> {
        self.shared.gateways.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}

#[tonic::async_trait]
impl GatewayDiscovery for DiscoveryServer {
    type DeltaClustersStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_clusters(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaClustersStream>, Status> {
        let mut requests = request.into_inner();
        let first = requests.message().await?.ok_or_else(|| Status::invalid_argument("empty request stream"))?;
        let node =
            first.node.clone().ok_or_else(|| Status::invalid_argument("the first request must carry the node"))?;
        if node.cluster_id.is_empty() {
            return Err(Status::invalid_argument("node.cluster_id is empty: set ISTIO_META_CLUSTER_ID on the gateway"));
        }
        let (responses, outbound) = mpsc::channel(2);
        let stream = GatewayStream::open(Arc::clone(&self.shared), node, &first);
        tokio::spawn(stream.serve(requests, responses));
        Ok(Response::new(ReceiverStream::new(outbound)))
    }
}

/// A response sent and not yet answered.
struct InFlight {
    nonce: String,
    /// What the gateway holds once it ACKs.
    acked_after: BTreeMap<String, String>,
    mesh_version: u64,
    changed_at: Instant,
}

/// The state of one gateway's stream.
struct GatewayStream {
    shared: Arc<Shared>,
    id: u64,
    node: Node,
    /// Cluster name -> version, as ACKed (seeded by the versions a reconnecting gateway says it holds).
    acked: BTreeMap<String, String>,
    in_flight: Option<InFlight>,
    /// A mesh version this gateway refused: not pushed again.
    refused_version: Option<u64>,
    sent_any: bool,
    nonces: u64,
}

impl GatewayStream {
    fn open(shared: Arc<Shared>, node: Node, first: &DeltaDiscoveryRequest) -> Self {
        let id = shared.next_stream.fetch_add(1, Ordering::Relaxed);
        let acked: BTreeMap<String, String> =
            first.initial_resource_versions.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let status = GatewayStatus {
            node_id: node.id.clone(),
            cluster_id: node.cluster_id.clone(),
            network: node.network.clone(),
            requested_network_view: node.requested_network_view.clone(),
            connected_at_unix: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            acked: acked.clone(),
            acked_mesh_version: 0,
            pushes: 0,
            last_nack: None,
        };
        shared.gateways.lock().unwrap_or_else(|e| e.into_inner()).insert(id, status);
        shared.metrics.connected.increment(1.0);
        tracing::info!(node = %node.id, cluster = %node.cluster_id, network = %node.network, "gateway connected");
        GatewayStream { shared, id, node, acked, in_flight: None, refused_version: None, sent_any: false, nonces: 0 }
    }

    async fn serve(
        mut self,
        mut requests: Streaming<DeltaDiscoveryRequest>,
        responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) {
        let mut mesh = self.shared.mesh.clone();
        let mut dirty = true;
        loop {
            if dirty && self.in_flight.is_none() {
                dirty = false;
                let snapshot = Arc::clone(&mesh.borrow_and_update());
                if let Some(response) = self.next_response(&snapshot)
                    && responses.send(Ok(response)).await.is_err()
                {
                    break;
                }
            }
            tokio::select! {
                changed = mesh.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    dirty = true;
                }
                request = requests.message() => match request {
                    Ok(Some(request)) => self.answer(request),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node = %self.node.id, %status, "gateway stream failed");
                        break;
                    }
                },
            }
        }
        tracing::info!(node = %self.node.id, "gateway disconnected");
    }

    /// The push that brings the gateway to `snapshot`, if it lacks anything (the first response after priming is
    /// sent even when empty: it is what makes a gateway with nothing to route ready).
    fn next_response(&mut self, snapshot: &MeshVersion) -> Option<DeltaDiscoveryResponse> {
        if snapshot.version == UNPRIMED || self.refused_version == Some(snapshot.version) {
            return None;
        }
        let view = views::gateway_view(&snapshot.mesh, &self.node, &self.shared.options);
        let Delta { changed, removed } = views::diff(&self.acked, &view);
        if changed.is_empty() && removed.is_empty() && self.sent_any {
            return None;
        }
        self.sent_any = true;
        self.nonces += 1;
        let nonce = format!("{}-{}", snapshot.version, self.nonces);
        let mut acked_after = self.acked.clone();
        for name in &removed {
            acked_after.remove(name);
        }
        let resources: Vec<Resource> = changed
            .into_iter()
            .map(|(name, version, cluster)| {
                acked_after.insert(name.clone(), version.clone());
                Resource { name, version, cluster: Some(cluster) }
            })
            .collect();
        let response = DeltaDiscoveryResponse {
            system_version_info: snapshot.version.to_string(),
            resources,
            removed_resources: removed,
            nonce: nonce.clone(),
        };
        let metrics = &self.shared.metrics;
        metrics.pushes.increment(1);
        metrics.push_resources.record((response.resources.len() + response.removed_resources.len()) as f64);
        metrics.push_bytes.record(response.encoded_len() as f64);
        self.update_status(|status| status.pushes += 1);
        self.in_flight =
            Some(InFlight { nonce, acked_after, mesh_version: snapshot.version, changed_at: snapshot.changed_at });
        Some(response)
    }

    fn answer(&mut self, request: DeltaDiscoveryRequest) {
        let answers_in_flight = self.in_flight.as_ref().is_some_and(|f| f.nonce == request.response_nonce);
        if !answers_in_flight {
            // A stale nonce, or a request that only changes subscriptions: every gateway subscribes to all.
            return;
        }
        let Some(in_flight) = self.in_flight.take() else { return };
        match request.error_detail {
            None => {
                self.shared.metrics.acks.increment(1);
                self.shared.metrics.ack_seconds.record(in_flight.changed_at.elapsed().as_secs_f64());
                self.acked = in_flight.acked_after;
                let acked = self.acked.clone();
                self.update_status(|status| {
                    status.acked = acked;
                    status.acked_mesh_version = in_flight.mesh_version;
                });
            }
            Some(error) => {
                self.shared.metrics.nacks.increment(1);
                tracing::warn!(
                    node = %self.node.id,
                    version = in_flight.mesh_version,
                    rejected = ?error.rejected_names,
                    message = %error.message,
                    "gateway refused an update; it keeps its last ACKed configuration"
                );
                self.refused_version = Some(in_flight.mesh_version);
                self.update_status(|status| status.last_nack = Some((in_flight.mesh_version, error.message)));
            }
        }
    }

    fn update_status(&self, update: impl FnOnce(&mut GatewayStatus)) {
        if let Some(status) = self.shared.gateways.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&self.id) {
            update(status);
        }
    }
}

impl Drop for GatewayStream {
    fn drop(&mut self) {
        self.shared.gateways.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        self.shared.metrics.connected.decrement(1.0);
    }
}
