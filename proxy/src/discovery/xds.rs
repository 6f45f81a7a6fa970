//! The client of crossgate-control's delta discovery stream. It subscribes to every cluster, applies each
//! response as a whole through the [`ConfigStore`] and ACKs it, or NACKs it with the reason and keeps serving
//! what it had. Through control-plane outages it keeps its last good configuration, reconnects with capped
//! exponential backoff and jitter, and on reconnect tells the server the versions it holds, so that only
//! what changed is sent again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crossgate_proto::gateway_discovery_client::GatewayDiscoveryClient;
use crossgate_proto::{Cluster, DeltaDiscoveryRequest, DeltaDiscoveryResponse, ErrorDetail, Node, Resources};
use metrics::{Counter, Gauge};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::ConfigStore;
use crate::drain::{Drain, Phase};

/// google.rpc.Code INVALID_ARGUMENT, what a NACK carries.
const INVALID_ARGUMENT: i32 = 3;

/// Where the control service is and how to reach it.
#[derive(Debug, Clone)]
pub struct XdsSettings {
    /// `http://host:port`, or `https://host:port` for TLS.
    pub url: String,
    pub node: Node,
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

/// The discovery client of one gateway.
pub struct XdsClient {
    endpoint: Endpoint,
    settings: XdsSettings,
    store: Arc<ConfigStore>,
    metrics: XdsMetrics,
    /// The clusters of the configuration in force, with their versions.
    known: BTreeMap<String, (String, Cluster)>,
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
        Ok(XdsClient { endpoint, settings, store, metrics: XdsMetrics::new(), known: BTreeMap::new() })
    }

    /// Follows the control service until the gateway terminates.
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
                    tracing::warn!(url = %self.settings.url, %error, "control service stream ended; keeping the last configuration");
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

    /// One stream, from connect to its end; returns why it ended. `failures` is reset by any response.
    async fn session(&mut self, failures: &mut u32) -> tonic::Status {
        let channel = match self.endpoint.connect().await {
            Ok(channel) => channel,
            Err(error) => return tonic::Status::unavailable(format!("connect: {error}")),
        };
        let (requests, outbound) = mpsc::channel(4);
        let first = DeltaDiscoveryRequest {
            node: Some(self.settings.node.clone()),
            resource_names_subscribe: vec!["*".to_owned()],
            initial_resource_versions: self
                .known
                .iter()
                .map(|(name, (version, _))| (name.clone(), version.clone()))
                .collect(),
            ..Default::default()
        };
        // The channel has room: the receiver is not polled yet, but capacity is 4.
        let _ = requests.try_send(first);
        let mut responses =
            match GatewayDiscoveryClient::new(channel).delta_clusters(ReceiverStream::new(outbound)).await {
                Ok(response) => response.into_inner(),
                Err(status) => return status,
            };
        self.metrics.connects.increment(1);
        self.metrics.connected.set(1.0);
        tracing::info!(url = %self.settings.url, "connected to the control service");
        loop {
            let response = match responses.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return tonic::Status::unavailable("the control service closed the stream"),
                Err(status) => return status,
            };
            *failures = 0;
            let reply = self.apply(response);
            if requests.send(reply).await.is_err() {
                return tonic::Status::unavailable("request stream closed");
            }
        }
    }

    /// Applies one response as a whole and returns its ACK or NACK.
    fn apply(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let mut next = self.known.clone();
        let mut missing = Vec::new();
        for resource in response.resources {
            match resource.cluster {
                Some(cluster) if cluster.name == resource.name => {
                    next.insert(resource.name, (resource.version, cluster));
                }
                _ => missing.push(resource.name),
            }
        }
        for name in &response.removed_resources {
            next.remove(name);
        }
        let outcome = if missing.is_empty() {
            let resources = Resources { clusters: next.values().map(|(_, cluster)| cluster.clone()).collect() };
            self.store.apply(&resources).map_err(|invalid| (invalid.to_string(), invalid.rejected_clusters()))
        } else {
            Err(("resources without a cluster of the same name".to_owned(), missing))
        };
        match outcome {
            Ok(()) => {
                self.metrics.acks.increment(1);
                tracing::info!(
                    version = %response.system_version_info,
                    clusters = next.len(),
                    "configuration from the control service accepted"
                );
                self.known = next;
                DeltaDiscoveryRequest { response_nonce: response.nonce, ..Default::default() }
            }
            Err((message, rejected_names)) => {
                self.metrics.nacks.increment(1);
                tracing::error!(version = %response.system_version_info, %message, "configuration refused; keeping the previous one");
                DeltaDiscoveryRequest {
                    response_nonce: response.nonce,
                    error_detail: Some(ErrorDetail { code: INVALID_ARGUMENT, message, rejected_names }),
                    ..Default::default()
                }
            }
        }
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
