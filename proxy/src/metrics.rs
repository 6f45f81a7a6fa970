//! Metric handles, one struct per concern, created once (at start or when a snapshot is built) and only
//! incremented on the hot path. Every handle is registered on the gateway's own Prometheus recorder
//! ([`Telemetry`]), so that several gateways in one process (tests) keep separate figures.

use metrics::{Counter, Gauge, Label};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::tls::hello::HelloError;

/// The gateway's metric registry and its Prometheus rendering.
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry")
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        Telemetry { recorder, handle }
    }
}

impl Telemetry {
    /// Runs `f` with this registry as the `metrics` recorder: handles created by the `metrics` macros inside
    /// it belong to this gateway.
    pub fn register<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

/// Why a downstream connection was closed without being tunnelled. The label values are stable: dashboards
/// and alerts use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The first bytes are not a TLS handshake record (plaintext, HTTP, SSLv2).
    NotTls,
    /// A TLS handshake that does not start with a ClientHello.
    NotClientHello,
    MalformedHello,
    /// The ClientHello did not fit in the peek cap.
    HelloTooLarge,
    /// The ClientHello did not arrive in time.
    HelloTimeout,
    /// The client closed (or reset) before its ClientHello was complete.
    ClosedBeforeHello,
    NoSni,
    /// The SNI is not a cluster this gateway routes (Envoy: no_filter_chain_match).
    UnknownSni,
    /// None of the client's ALPN protocols is one of Istio's mTLS protocols.
    AlpnMismatch,
    /// The gateway-wide downstream connection limit was reached.
    DownstreamOverflow,
    /// The cluster's connection limit (DestinationRule tcp.maxConnections) was reached (Envoy: UO).
    UpstreamOverflow,
    /// The cluster has no endpoint that may take a connection (Envoy: UH).
    NoHealthyUpstream,
    /// Every attempted endpoint refused or timed out (Envoy: UF).
    UpstreamConnectFailed,
    /// The gateway itself ran out of descriptors, memory, buffers or local ports while connecting upstream: its
    /// own fault, never blamed on an endpoint.
    LocalResources,
}

impl From<&HelloError> for RejectReason {
    fn from(error: &HelloError) -> Self {
        match error {
            HelloError::NotTls => RejectReason::NotTls,
            HelloError::NotClientHello => RejectReason::NotClientHello,
            HelloError::TooLarge => RejectReason::HelloTooLarge,
            HelloError::Malformed(_) => RejectReason::MalformedHello,
        }
    }
}

impl RejectReason {
    /// Every reason, in declaration order (`reason as usize` indexes per-reason arrays).
    pub const ALL: [RejectReason; 14] = [
        RejectReason::NotTls,
        RejectReason::NotClientHello,
        RejectReason::MalformedHello,
        RejectReason::HelloTooLarge,
        RejectReason::HelloTimeout,
        RejectReason::ClosedBeforeHello,
        RejectReason::NoSni,
        RejectReason::UnknownSni,
        RejectReason::AlpnMismatch,
        RejectReason::DownstreamOverflow,
        RejectReason::UpstreamOverflow,
        RejectReason::NoHealthyUpstream,
        RejectReason::UpstreamConnectFailed,
        RejectReason::LocalResources,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RejectReason::NotTls => "not_tls",
            RejectReason::NotClientHello => "not_client_hello",
            RejectReason::MalformedHello => "malformed_hello",
            RejectReason::HelloTooLarge => "hello_too_large",
            RejectReason::HelloTimeout => "hello_timeout",
            RejectReason::ClosedBeforeHello => "closed_before_hello",
            RejectReason::NoSni => "no_sni",
            RejectReason::UnknownSni => "unknown_sni",
            RejectReason::AlpnMismatch => "alpn_mismatch",
            RejectReason::DownstreamOverflow => "downstream_overflow",
            RejectReason::UpstreamOverflow => "upstream_overflow",
            RejectReason::NoHealthyUpstream => "no_healthy_upstream",
            RejectReason::UpstreamConnectFailed => "upstream_connect_failed",
            RejectReason::LocalResources => "local_resources",
        }
    }

    /// Envoy's response flag for the istio_tcp_connections_closed_total of a connection that matched a cluster.
    pub fn response_flag(self) -> &'static str {
        match self {
            RejectReason::UpstreamOverflow => "UO",
            RejectReason::NoHealthyUpstream => "UH",
            RejectReason::UpstreamConnectFailed => "UF",
            _ => "NR",
        }
    }
}

/// Listener-level counters (Envoy's `listener.<addr>.*`).
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    rejected: [Counter; RejectReason::ALL.len()],
}

impl ListenerMetrics {
    /// `listener` is Envoy's listener name form, e.g. `0.0.0.0_15443`.
    pub fn new(listener: &str) -> Self {
        let listener = listener.to_owned();
        ListenerMetrics {
            downstream_cx_total: metrics::counter!("crossgate_downstream_cx_total", "listener" => listener.clone()),
            downstream_cx_active: metrics::gauge!("crossgate_downstream_cx_active", "listener" => listener.clone()),
            rejected: RejectReason::ALL.map(|reason| {
                metrics::counter!("crossgate_downstream_cx_rejected_total", "listener" => listener.clone(), "reason" => reason.label())
            }),
        }
    }

    pub fn rejected(&self, reason: RejectReason) -> &Counter {
        &self.rejected[reason as usize]
    }
}

/// A cluster's membership (Envoy's `cluster.<name>.membership_*`), registered with the cluster.
#[derive(Debug, Clone)]
pub struct ClusterMembership {
    pub healthy: Gauge,
    pub total: Gauge,
}

impl ClusterMembership {
    pub fn new(cluster: &str) -> Self {
        let gauge = |name: &'static str| metrics::gauge!(name, "cluster" => cluster.to_owned());
        ClusterMembership {
            healthy: gauge("crossgate_cluster_membership_healthy"),
            total: gauge("crossgate_cluster_membership_total"),
        }
    }
}

/// A cluster's upstream counters (Envoy's `cluster.<name>.upstream_cx_*`), registered on its first connection:
/// a large mesh's idle clusters add no series.
#[derive(Debug, Clone)]
pub struct ClusterTraffic {
    pub upstream_cx_total: Counter,
    pub upstream_cx_active: Gauge,
    pub upstream_cx_connect_fail: Counter,
    pub upstream_cx_connect_timeout: Counter,
    pub upstream_cx_none_healthy: Counter,
    pub upstream_cx_overflow: Counter,
    pub upstream_cx_idle_timeout: Counter,
    pub upstream_cx_max_duration_reached: Counter,
}

impl ClusterTraffic {
    pub fn new(cluster: &str) -> Self {
        let counter = |name: &'static str| metrics::counter!(name, "cluster" => cluster.to_owned());
        ClusterTraffic {
            upstream_cx_total: counter("crossgate_upstream_cx_total"),
            upstream_cx_active: metrics::gauge!("crossgate_upstream_cx_active", "cluster" => cluster.to_owned()),
            upstream_cx_connect_fail: counter("crossgate_upstream_cx_connect_fail_total"),
            upstream_cx_connect_timeout: counter("crossgate_upstream_cx_connect_timeout_total"),
            upstream_cx_none_healthy: counter("crossgate_upstream_cx_none_healthy_total"),
            upstream_cx_overflow: counter("crossgate_upstream_cx_overflow_total"),
            upstream_cx_idle_timeout: counter("crossgate_upstream_cx_idle_timeout_total"),
            upstream_cx_max_duration_reached: counter("crossgate_upstream_cx_max_duration_reached_total"),
        }
    }
}

/// What Istio's standard metrics say about the destination of a tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destination<'a> {
    /// The service host, e.g. `helloworld.sample.svc.cluster.local`.
    pub service: &'a str,
    pub service_name: &'a str,
    pub service_namespace: &'a str,
    pub cluster: &'a str,
    pub workload: &'a str,
    /// From Istio's `istio.workload` endpoint metadata; they also stand for the app and version, as Istio's
    /// stats do for a peer known only by that metadata.
    pub canonical_service: &'a str,
    pub canonical_revision: &'a str,
}

/// Istio's standard TCP metrics for one destination (reporter="source", as a gateway reports). With TLS
/// passed through there is no metadata exchange, so the source side is "unknown", as it is for Envoy.
#[derive(Debug, Clone)]
pub struct IstioTcpMetrics {
    pub connections_opened: Counter,
    /// Closed connections that were tunnelled (response_flags "-").
    pub connections_closed: Counter,
    /// Bytes the destination sent back to the client (the response direction).
    pub sent_bytes: Counter,
    /// Bytes the client sent to the destination (the request direction).
    pub received_bytes: Counter,
}

impl IstioTcpMetrics {
    pub fn new(destination: &Destination<'_>) -> Self {
        let labels = istio_labels(destination, "-");
        IstioTcpMetrics {
            connections_opened: metrics::counter!("istio_tcp_connections_opened_total", labels.clone()),
            connections_closed: metrics::counter!("istio_tcp_connections_closed_total", labels.clone()),
            sent_bytes: metrics::counter!("istio_tcp_sent_bytes_total", labels.clone()),
            received_bytes: metrics::counter!("istio_tcp_received_bytes_total", labels),
        }
    }

    /// Opened and closed counters for a connection that matched a cluster but was never tunnelled.
    pub fn refused(destination: &Destination<'_>, reason: RejectReason) -> (Counter, Counter) {
        let labels = istio_labels(destination, reason.response_flag());
        (
            metrics::counter!("istio_tcp_connections_opened_total", labels.clone()),
            metrics::counter!("istio_tcp_connections_closed_total", labels),
        )
    }
}

fn istio_labels(destination: &Destination<'_>, response_flags: &'static str) -> Vec<Label> {
    fn or_unknown(value: &str) -> String {
        if value.is_empty() { "unknown".to_owned() } else { value.to_owned() }
    }
    let canonical_service = destination.canonical_service;
    let canonical_revision =
        if destination.canonical_revision.is_empty() { "latest" } else { destination.canonical_revision };
    let (app, version) = (canonical_service, destination.canonical_revision);
    let unknown = || "unknown".to_owned();
    vec![
        Label::new("reporter", "source"),
        Label::new("source_workload", unknown()),
        Label::new("source_workload_namespace", unknown()),
        Label::new("source_principal", unknown()),
        Label::new("source_app", unknown()),
        Label::new("source_version", unknown()),
        Label::new("source_canonical_service", unknown()),
        Label::new("source_canonical_revision", unknown()),
        Label::new("source_cluster", unknown()),
        Label::new("destination_workload", or_unknown(destination.workload)),
        Label::new("destination_workload_namespace", or_unknown(destination.service_namespace)),
        Label::new("destination_principal", unknown()),
        Label::new("destination_app", or_unknown(app)),
        Label::new("destination_version", or_unknown(version)),
        Label::new("destination_service", or_unknown(destination.service)),
        Label::new("destination_service_name", or_unknown(destination.service_name)),
        Label::new("destination_service_namespace", or_unknown(destination.service_namespace)),
        Label::new("destination_canonical_service", or_unknown(canonical_service)),
        Label::new("destination_canonical_revision", canonical_revision.to_owned()),
        Label::new("destination_cluster", or_unknown(destination.cluster)),
        Label::new("request_protocol", "tcp"),
        Label::new("response_flags", response_flags),
        Label::new("connection_security_policy", "unknown"),
    ]
}

/// Configuration updates.
#[derive(Debug, Clone)]
pub struct ConfigMetrics {
    pub accepted: Counter,
    pub rejected: Counter,
    pub clusters: Gauge,
    pub endpoints: Gauge,
}

impl ConfigMetrics {
    pub fn new(source: &'static str) -> Self {
        ConfigMetrics {
            accepted: metrics::counter!("crossgate_config_updates_total", "source" => source, "result" => "accepted"),
            rejected: metrics::counter!("crossgate_config_updates_total", "source" => source, "result" => "rejected"),
            clusters: metrics::gauge!("crossgate_config_clusters"),
            endpoints: metrics::gauge!("crossgate_config_endpoints"),
        }
    }
}

/// Increments a gauge for as long as it lives.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.increment(1.0);
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_sits_at_its_own_index_with_its_own_label() {
        for (index, reason) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{reason:?}");
        }
        let labels: std::collections::HashSet<_> = RejectReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), RejectReason::ALL.len());
    }
}
