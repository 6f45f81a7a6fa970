//! The route table: which cluster an SNI reaches, and everything needed to forward to it. A [`RouteTable`] is an
//! immutable snapshot, built off the hot path from the Envoy configuration in force ([`EnvoyState`]) and swapped
//! in whole; a change rebuilds only the clusters it touches, and every other cluster is shared with the previous
//! snapshot.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crossgate_istio::gateway::WorkloadMetadata;
pub use crossgate_istio::sni::{ISTIO_MTLS_ALPNS, KeyError, SniKey, is_istio_alpn};

use crate::config::{Keepalive, non_zero};
use crate::lb::ClusterLb;
use crate::metrics::{ClusterMetrics, Destination, IstioTcpMetrics, RejectReason, Telemetry};
use crate::resources::{AssignmentSpec, ChainSpec, ClusterSpec, EnvoyState};

/// Gateway-wide settings that shape every cluster: defaults the cluster or its filter chain may override.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterDefaults {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
    pub keepalive: Keepalive,
    /// A registered pick policy replacing every cluster's algorithm (experiments).
    pub lb_policy: Option<String>,
}

impl Default for ClusterDefaults {
    /// Istio's: 10 s connect timeout, Envoy's 1 h tcp_proxy idle timeout, no duration limit; the gateway's
    /// keepalive defaults.
    fn default() -> Self {
        ClusterDefaults {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connection_duration: None,
            keepalive: Keepalive { time: Duration::from_secs(300), interval: Duration::from_secs(75), probes: 9 },
            lb_policy: None,
        }
    }
}

/// The connection settings of one cluster, after its DestinationRule's `connectionPool.tcp`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusterSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
    /// Tunnels open at once to this cluster (Istio's default is 2^32-1, effectively unlimited).
    pub max_connections: usize,
    pub keepalive: Keepalive,
}

/// Per-endpoint data the forwarder needs beside the lb's view of it.
#[derive(Debug)]
pub struct EndpointInfo {
    /// Istio's `istio.workload` metadata: the destination labels.
    pub workload: WorkloadMetadata,
    /// Registered on the endpoint's first connection, so that series follow traffic, not the mesh.
    metrics: OnceLock<IstioTcpMetrics>,
}

/// One routable cluster, with the filter chain that reaches it.
#[derive(Debug)]
pub struct RouteCluster {
    pub name: Arc<str>,
    pub host: String,
    pub port: u16,
    pub subset: String,
    pub service_name: String,
    pub service_namespace: String,
    pub lb: ClusterLb,
    /// Parallel to `lb.hosts()`.
    pub endpoints: Vec<EndpointInfo>,
    pub settings: ClusterSettings,
    /// The ALPNs the filter chain matches; empty: any.
    alpns: Vec<Box<[u8]>>,
    pub metrics: ClusterMetrics,
    /// Istio opened/closed counters for connections refused with UO, UH or UF.
    refused: [(metrics::Counter, metrics::Counter); 3],
    /// Tunnels open to this cluster; shared with the previous snapshot's cluster of the same name so that a
    /// rebuild does not reset the connection limit.
    pub active: Arc<AtomicUsize>,
    telemetry: Arc<Telemetry>,
    /// What it was built from: a rebuild with the same inputs keeps this cluster.
    inputs: Inputs,
}

#[derive(Debug, Clone)]
struct Inputs {
    chain: ChainSpec,
    cluster: Arc<ClusterSpec>,
    assignment: Option<Arc<AssignmentSpec>>,
}

impl Inputs {
    fn same(&self, other: &Inputs) -> bool {
        self.chain == other.chain
            && Arc::ptr_eq(&self.cluster, &other.cluster)
            && match (&self.assignment, &other.assignment) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl RouteCluster {
    /// Counts a connection that matched this cluster but could not be tunnelled, in Istio's metrics.
    pub fn record_refused(&self, reason: RejectReason) {
        let index = match reason {
            RejectReason::UpstreamOverflow => 0,
            RejectReason::NoHealthyUpstream => 1,
            _ => 2,
        };
        let (opened, closed) = &self.refused[index];
        opened.increment(1);
        closed.increment(1);
    }

    /// Istio's TCP metrics of `hosts()[index]`, registered on first use.
    pub fn endpoint_metrics(&self, index: usize) -> &IstioTcpMetrics {
        let endpoint = &self.endpoints[index];
        endpoint.metrics.get_or_init(|| {
            let workload = &endpoint.workload;
            self.telemetry.register(|| {
                IstioTcpMetrics::new(&Destination {
                    service: &self.host,
                    service_name: &self.service_name,
                    service_namespace: &self.service_namespace,
                    cluster: &workload.cluster,
                    workload: &workload.name,
                    canonical_service: &workload.canonical_service,
                    canonical_revision: &workload.canonical_revision,
                })
            })
        })
    }

    /// Whether the filter chain matches a client offering `offered` (Envoy's `application_protocols`).
    pub fn accepts_alpn<'a>(&self, mut offered: impl Iterator<Item = &'a [u8]>) -> bool {
        self.alpns.is_empty() || offered.any(|alpn| self.alpns.iter().any(|wanted| **wanted == *alpn))
    }
}

/// The immutable route snapshot: SNI -> cluster.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: HashMap<Box<str>, Arc<RouteCluster>>,
}

impl RouteTable {
    /// The snapshot for `state`: routes whose cluster is in `changed`, or whose chain or inputs differ from
    /// `previous`'s, are built anew (keeping the live state of hosts that `previous` had); the rest are shared.
    /// A chain whose cluster is unknown routes nowhere (Envoy's tcp_proxy closes such connections).
    pub fn rebuild(
        previous: &RouteTable,
        state: &EnvoyState,
        changed: &HashSet<String>,
        defaults: &ClusterDefaults,
        telemetry: &Arc<Telemetry>,
    ) -> RouteTable {
        let mut routes = HashMap::with_capacity(state.chains.len());
        let mut built: HashMap<&str, Arc<RouteCluster>> = HashMap::new();
        for chain in state.chains.iter() {
            let Some(cluster) = state.clusters.get(&chain.cluster) else { continue };
            let inputs = Inputs {
                chain: chain.clone(),
                cluster: Arc::clone(cluster),
                assignment: state.assignments.get(&chain.cluster).cloned(),
            };
            let old = chain.server_names.iter().find_map(|name| previous.routes.get(name.as_str()));
            let route = match old {
                Some(old) if !changed.contains(&chain.cluster) && old.inputs.same(&inputs) => Arc::clone(old),
                _ => match built.get(chain.cluster.as_str()) {
                    Some(same) if same.inputs.same(&inputs) => Arc::clone(same),
                    _ => {
                        let previous_cluster = old.filter(|o| *o.name == *chain.cluster);
                        let route = Arc::new(build_cluster(inputs, previous_cluster, defaults, telemetry));
                        built.insert(&chain.cluster, Arc::clone(&route));
                        route
                    }
                },
            };
            for name in &chain.server_names {
                routes.entry(Box::from(name.as_str())).or_insert_with(|| Arc::clone(&route));
            }
        }
        RouteTable { routes }
    }

    /// The cluster an SNI names; SNI is matched case-insensitively, as DNS names are.
    pub fn get(&self, sni: &str) -> Option<&Arc<RouteCluster>> {
        match self.routes.get(sni) {
            Some(cluster) => Some(cluster),
            None if sni.bytes().any(|b| b.is_ascii_uppercase()) => self.routes.get(sni.to_ascii_lowercase().as_str()),
            None => None,
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn endpoint_count(&self) -> usize {
        self.routes.values().map(|c| c.lb.hosts().len()).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<RouteCluster>> {
        self.routes.values()
    }

    /// Clusters in name order, each once (for dumps).
    pub fn clusters(&self) -> Vec<&Arc<RouteCluster>> {
        let mut clusters: Vec<_> = self.routes.values().collect();
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        clusters.dedup_by(|a, b| Arc::ptr_eq(a, b));
        clusters
    }
}

fn build_cluster(
    inputs: Inputs,
    previous: Option<&Arc<RouteCluster>>,
    defaults: &ClusterDefaults,
    telemetry: &Arc<Telemetry>,
) -> RouteCluster {
    let name = inputs.chain.cluster.as_str();
    let spec = &inputs.cluster;
    let (host, port, subset) = match SniKey::parse(name) {
        Ok(key) => (key.host.to_owned(), key.port, key.subset.to_owned()),
        Err(_) => (spec.service.host.clone(), 0, String::new()),
    };
    let mut labels = host.split('.');
    let pick = |configured: &str, derived: Option<&str>| {
        if configured.is_empty() { derived.unwrap_or_default().to_owned() } else { configured.to_owned() }
    };
    let service_name = pick(&spec.service.name, labels.next());
    let service_namespace = pick(&spec.service.namespace, labels.next());
    let mut lb_settings = spec.lb.clone();
    if let Some(policy) = &defaults.lb_policy {
        // Validated at start: the name is registered.
        lb_settings = lb_settings.clone().with_policy(policy).unwrap_or(lb_settings);
    }
    let empty = AssignmentSpec {
        endpoints: Vec::new(),
        workloads: Vec::new(),
        priorities: Vec::new(),
        overprovisioning_factor: crate::lb::load::DEFAULT_OVERPROVISIONING_FACTOR,
    };
    let assignment = inputs.assignment.as_deref().unwrap_or(&empty);
    let (lb, metrics, refused) = telemetry.register(|| {
        let lb = ClusterLb::new(
            assignment.endpoints.clone(),
            assignment.topology(spec.locality_weighted),
            lb_settings,
            previous.map(|p| &p.lb),
            name,
        );
        let unrouted = Destination {
            service: &host,
            service_name: &service_name,
            service_namespace: &service_namespace,
            ..Default::default()
        };
        let refused =
            [RejectReason::UpstreamOverflow, RejectReason::NoHealthyUpstream, RejectReason::UpstreamConnectFailed]
                .map(|reason| IstioTcpMetrics::refused(&unrouted, reason));
        let metrics = ClusterMetrics::new(name);
        metrics.membership_total.set(lb.hosts().len() as f64);
        metrics.membership_healthy.set(lb.healthy_count() as f64);
        (lb, metrics, refused)
    });
    let endpoints = assignment
        .workloads
        .iter()
        .map(|workload| EndpointInfo { workload: workload.clone(), metrics: OnceLock::new() })
        .collect();
    let chain = &inputs.chain;
    let settings = ClusterSettings {
        connect_timeout: spec.connect_timeout.unwrap_or(defaults.connect_timeout),
        // An explicit 0s disables the timeout; unset falls back to the gateway default.
        idle_timeout: chain.idle_timeout.map_or(defaults.idle_timeout, non_zero),
        max_connection_duration: chain.max_connection_duration.map_or(defaults.max_connection_duration, non_zero),
        max_connections: spec.max_connections,
        keepalive: Keepalive {
            time: spec.keepalive.time.unwrap_or(defaults.keepalive.time),
            interval: spec.keepalive.interval.unwrap_or(defaults.keepalive.interval),
            probes: spec.keepalive.probes.filter(|p| *p > 0).unwrap_or(defaults.keepalive.probes),
        },
    };
    RouteCluster {
        name: Arc::from(name),
        host,
        port,
        subset,
        service_name,
        service_namespace,
        lb,
        endpoints,
        settings,
        alpns: chain.alpns.iter().map(|a| Box::from(a.as_bytes())).collect(),
        metrics,
        refused,
        active: previous.map(|p| Arc::clone(&p.active)).unwrap_or_default(),
        telemetry: Arc::clone(telemetry),
        inputs,
    }
}
