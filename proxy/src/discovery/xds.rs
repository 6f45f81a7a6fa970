//! The gateway's xDS client: Envoy's delta Aggregated Discovery Service, as Envoy subscribes to it (wildcard
//! LDS and CDS, EDS by the names of the EDS clusters), against crossgate-control or istiod. Each response is
//! decoded whole (one that does not decode is NACKed and nothing of it applied); its resources are applied one
//! by one through the [`ConfigStore`], and the refused ones are NACKed by name with the reason while the others
//! take effect. Through control-plane outages the gateway keeps its configuration, reconnects with capped
//! exponential backoff and jitter, and tells the server the versions it holds, so that only what changed is
//! sent again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crossgate_istio::node::GatewayNode;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::rpc::Status;
use metrics::{Counter, Gauge};
use prost::{Message, Name};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::{ConfigStore, Rejected, Update};
use crate::drain::{Drain, Phase};
use crate::resources;

/// No response size a real mesh can reach is refused (a 100,000-endpoint push is tens of MB).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// google.rpc.Code INVALID_ARGUMENT, what a NACK carries.
const INVALID_ARGUMENT: i32 = 3;

/// Where the control service is and how to reach it.
#[derive(Debug, Clone)]
pub struct XdsSettings {
    /// `http://host:port`, or `https://host:port` for TLS.
    pub url: String,
    pub node: GatewayNode,
    pub tls: Option<XdsTls>,
    pub backoff: Backoff,
}

/// PEM files for mTLS to the control service.
#[derive(Debug, Clone)]
pub struct XdsTls {
    pub ca: Vec<u8>,
    /// The gateway's client certificate and key; without them the TLS is one-way.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify the server's certificate against, when not the URL's host.
    pub server_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("--xds {url:?} is not a usable URL: {error}")]
    Url { url: String, error: String },
    #[error("control service TLS configuration: {0}")]
    Tls(String),
}

/// Capped exponential backoff with jitter: each wait is between half and all of the current step, which
/// doubles from `initial` up to `max`, and starts over once a response arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(15) }
    }
}

impl Backoff {
    fn wait(&self, failures: u32, rng: &mut impl Rng) -> Duration {
        let step = self.initial.saturating_mul(1 << failures.min(20)).min(self.max);
        let half = step / 2;
        half + half.mul_f64(rng.random::<f64>())
    }
}

struct XdsMetrics {
    connected: Gauge,
    connects: Counter,
    acks: Counter,
    nacks: Counter,
}

impl XdsMetrics {
    fn new() -> Self {
        XdsMetrics {
            connected: metrics::gauge!("crossgate_xds_connected"),
            connects: metrics::counter!("crossgate_xds_connects_total"),
            acks: metrics::counter!("crossgate_xds_responses_total", "result" => "ack"),
            nacks: metrics::counter!("crossgate_xds_responses_total", "result" => "nack"),
        }
    }
}

/// The three resource types a passthrough gateway subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Cluster,
    Assignment,
    Listener,
}

impl Kind {
    fn type_url(self) -> String {
        match self {
            Kind::Cluster => Cluster::type_url(),
            Kind::Assignment => ClusterLoadAssignment::type_url(),
            Kind::Listener => Listener::type_url(),
        }
    }

    fn of(type_url: &str) -> Option<Kind> {
        [Kind::Cluster, Kind::Assignment, Kind::Listener].into_iter().find(|k| k.type_url() == type_url)
    }
}

/// The discovery client of one gateway.
pub struct XdsClient {
    endpoint: Endpoint,
    settings: XdsSettings,
    store: Arc<ConfigStore>,
    metrics: XdsMetrics,
    /// Per type, the versions of the resources in force (what a reconnect reports).
    versions: BTreeMap<Kind, HashMap<String, String>>,
    /// The assignments subscribed to: the EDS clusters' service names.
    eds_names: BTreeSet<String>,
}

impl std::fmt::Debug for XdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClient").field("url", &self.settings.url).finish_non_exhaustive()
    }
}

impl XdsClient {
    /// Checks the URL and TLS files; metric handles are registered on the current recorder.
    pub fn new(settings: XdsSettings, store: Arc<ConfigStore>) -> Result<Self, XdsError> {
        let url_error = |error: String| XdsError::Url { url: settings.url.clone(), error };
        let mut endpoint = Endpoint::from_shared(settings.url.clone())
            .map_err(|e| url_error(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if let Some(tls) = &settings.tls {
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(config).map_err(|e| XdsError::Tls(e.to_string()))?;
        }
        Ok(XdsClient {
            endpoint,
            settings,
            store,
            metrics: XdsMetrics::new(),
            versions: BTreeMap::new(),
            eds_names: BTreeSet::new(),
        })
    }

    /// Follows the control plane until the gateway terminates.
    pub async fn run(mut self, drain: Drain) {
        let terminated = drain.reached(Phase::Terminated);
        tokio::pin!(terminated);
        let mut failures = 0u32;
        loop {
            let session = self.session(&mut failures);
            tokio::select! {
                () = &mut terminated => return,
                error = session => {
                    self.metrics.connected.set(0.0);
                    tracing::warn!(url = %self.settings.url, %error, "control plane stream ended; keeping the last configuration");
                }
            }
            let wait = self.settings.backoff.wait(failures, &mut rand::rng());
            failures = failures.saturating_add(1);
            tokio::select! {
                () = &mut terminated => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The first request of a type on a (re)connected stream: its subscription and the versions held.
    fn subscribe(&self, kind: Kind, node: Option<&GatewayNode>) -> DeltaDiscoveryRequest {
        let names = match kind {
            // Wildcard, written explicitly.
            Kind::Cluster | Kind::Listener => vec!["*".to_owned()],
            Kind::Assignment => self.eds_names.iter().cloned().collect(),
        };
        DeltaDiscoveryRequest {
            node: node.map(GatewayNode::to_envoy),
            type_url: kind.type_url(),
            resource_names_subscribe: names,
            initial_resource_versions: self.versions.get(&kind).cloned().unwrap_or_default(),
            ..Default::default()
        }
    }

    /// One stream, from connect to its end; returns why it ended. `failures` is reset by any response.
    async fn session(&mut self, failures: &mut u32) -> tonic::Status {
        let channel = match self.endpoint.connect().await {
            Ok(channel) => channel,
            Err(error) => return tonic::Status::unavailable(format!("connect: {error}")),
        };
        let (requests, outbound) = mpsc::channel(16);
        // Envoy's order: clusters, then their assignments, then listeners; the node goes in the first request.
        let mut first = vec![self.subscribe(Kind::Cluster, Some(&self.settings.node))];
        if !self.eds_names.is_empty() {
            first.push(self.subscribe(Kind::Assignment, None));
        }
        first.push(self.subscribe(Kind::Listener, None));
        for request in first {
            // The channel has room: 16 slots, at most 3 requests.
            let _ = requests.try_send(request);
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut responses = match client.delta_aggregated_resources(ReceiverStream::new(outbound)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return status,
        };
        self.metrics.connects.increment(1);
        self.metrics.connected.set(1.0);
        tracing::info!(url = %self.settings.url, "connected to the control plane");
        loop {
            let response = match responses.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return tonic::Status::unavailable("the control plane closed the stream"),
                Err(status) => return status,
            };
            *failures = 0;
            for request in self.apply(response) {
                if requests.send(request).await.is_err() {
                    return tonic::Status::unavailable("request stream closed");
                }
            }
        }
    }

    /// Applies one response; returns its ACK or NACK, then any subscription change it causes.
    fn apply(&mut self, mut response: DeltaDiscoveryResponse) -> Vec<DeltaDiscoveryRequest> {
        let Some(kind) = Kind::of(&response.type_url) else {
            // A type this gateway never asked for: ACK it, use nothing.
            return vec![ack(&response.type_url, response.nonce, None)];
        };
        let outcome = match kind {
            Kind::Cluster => decode::<Cluster, _>(&mut response.resources, |c| c).map(|update| {
                let eds: BTreeSet<String> = update.iter().filter_map(|(_, c)| eds_service_name(c)).collect();
                let rejected = self.store.apply_clusters(self.update(&response, update));
                (rejected, Some(eds))
            }),
            // Read as decoded: a mesh's first push holds every endpoint, and its decoded form is several times the
            // size of what the gateway keeps of it.
            Kind::Assignment => {
                decode::<ClusterLoadAssignment, _>(&mut response.resources, |a| resources::read_assignment(&a))
                    .map(|update| (self.store.apply_read_assignments(self.update(&response, update)), None))
            }
            Kind::Listener => decode::<Listener, _>(&mut response.resources, |l| l)
                .map(|update| (self.store.apply_listeners(self.update(&response, update)), None)),
        };
        let (rejected, eds) = match outcome {
            Ok(applied) => applied,
            Err(message) => {
                self.metrics.nacks.increment(1);
                tracing::error!(type_url = %response.type_url, %message, "response refused whole; nothing of it applied");
                return vec![ack(&response.type_url, response.nonce, Some(message))];
            }
        };
        let versions = self.versions.entry(kind).or_default();
        for resource in &response.resources {
            if !rejected.iter().any(|r| r.name == resource.name) {
                versions.insert(resource.name.clone(), resource.version.clone());
            }
        }
        for name in &response.removed_resources {
            versions.remove(name);
        }
        let mut requests = Vec::with_capacity(2);
        if rejected.is_empty() {
            self.metrics.acks.increment(1);
            tracing::info!(
                type_url = %response.type_url,
                version = %response.system_version_info,
                resources = response.resources.len(),
                removed = response.removed_resources.len(),
                "applied"
            );
            requests.push(ack(&response.type_url, response.nonce.clone(), None));
        } else {
            self.metrics.nacks.increment(1);
            let message = rejected.iter().map(Rejected::to_string).collect::<Vec<_>>().join("; ");
            tracing::error!(type_url = %response.type_url, %message, "resources refused; they keep their last good version");
            requests.push(ack(
                &response.type_url,
                response.nonce.clone(),
                Some(format!("Error adding/updating {message}")),
            ));
        }
        if let Some(eds) = eds {
            requests.extend(self.follow_clusters(&response, eds));
        }
        requests
    }

    fn update<T>(&self, response: &DeltaDiscoveryResponse, resources: Vec<(String, T)>) -> Update<T> {
        Update { resources, removed: response.removed_resources.clone(), complete: false }
    }

    /// Subscribes to the assignments of new EDS clusters, and unsubscribes from those of clusters gone.
    fn follow_clusters(
        &mut self,
        response: &DeltaDiscoveryResponse,
        eds: BTreeSet<String>,
    ) -> Option<DeltaDiscoveryRequest> {
        let mut unsubscribe: Vec<String> =
            response.removed_resources.iter().filter(|n| self.eds_names.remove(*n)).cloned().collect();
        // A cluster that stopped being EDS no longer has an assignment either.
        for resource in &response.resources {
            if !eds.contains(&resource.name) && self.eds_names.remove(&resource.name) {
                unsubscribe.push(resource.name.clone());
            }
        }
        let subscribe: Vec<String> = eds.into_iter().filter(|name| self.eds_names.insert(name.clone())).collect();
        if subscribe.is_empty() && unsubscribe.is_empty() {
            return None;
        }
        let assignments = self.versions.entry(Kind::Assignment).or_default();
        for name in &unsubscribe {
            assignments.remove(name);
        }
        Some(DeltaDiscoveryRequest {
            type_url: Kind::Assignment.type_url(),
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            ..Default::default()
        })
    }
}

/// The assignment name an EDS cluster subscribes to: its `service_name`, else its own name.
fn eds_service_name(cluster: &Cluster) -> Option<String> {
    let eds =
        matches!(cluster.cluster_discovery_type, Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32);
    eds.then(|| {
        cluster
            .eds_cluster_config
            .as_ref()
            .map(|c| c.service_name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| cluster.name.clone())
    })
}

/// Decodes every resource of a response and gives each to `read`, or says why the response is refused whole.
/// Each resource's encoded bytes are freed once decoded.
fn decode<T: Message + Name + Default, R>(
    resources: &mut [Resource],
    read: impl Fn(T) -> R,
) -> Result<Vec<(String, R)>, String> {
    resources
        .iter_mut()
        .map(|resource| {
            let any = resource.resource.as_mut().ok_or_else(|| format!("{}: no resource", resource.name))?;
            if any.type_url != T::type_url() {
                return Err(format!("{}: a {} where a {} was expected", resource.name, any.type_url, T::type_url()));
            }
            let value = T::decode(std::mem::take(&mut any.value).as_slice())
                .map_err(|e| format!("{}: does not decode: {e}", resource.name))?;
            Ok((resource.name.clone(), read(value)))
        })
        .collect()
}

/// An ACK, or with `error` a NACK, of one response.
fn ack(type_url: &str, nonce: String, error: Option<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_owned(),
        response_nonce: nonce,
        error_detail: error.map(|message| Status { code: INVALID_ARGUMENT, message, details: Vec::new() }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(10) };
        let mut rng = SmallRng::seed_from_u64(1);
        for (failures, step) in [(0, 100), (1, 200), (3, 800), (7, 10_000), (40, 10_000)] {
            let wait = backoff.wait(failures, &mut rng);
            let step = Duration::from_millis(step);
            assert!(
                wait >= step / 2 && wait <= step,
                "{failures} failures: {wait:?} not in [{:?}, {step:?}]",
                step / 2
            );
        }
    }
}
