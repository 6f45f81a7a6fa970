//! Istio's SNI grammar and the route table: which cluster an SNI names, and everything needed to forward
//! to it. A [`RouteTable`] is an immutable snapshot, built and validated off the hot path from
//! [`Resources`] and swapped in whole.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use crossgate_proto::{Cluster, Endpoint, Resources, TrafficPolicy, connection_pool_settings::TcpSettings, endpoint};

use crate::config::{Keepalive, non_zero};
use crate::lb::{ClusterLb, EndpointSpec, GatewayIdentity, Health, LbSettings, Locality};
use crate::metrics::{ClusterMetrics, Destination, IstioTcpMetrics, RejectReason};

/// The ALPN protocols an Istio sidecar offers on its mTLS connections (`allIstioMtlsALPNs`). Envoy's
/// AUTO_PASSTHROUGH filter chains match only these.
pub const ISTIO_MTLS_ALPNS: [&[u8]; 5] =
    [b"istio", b"istio-peer-exchange", b"istio-http/1.0", b"istio-http/1.1", b"istio-h2"];

pub fn is_istio_alpn(protocol: &[u8]) -> bool {
    ISTIO_MTLS_ALPNS.contains(&protocol)
}

/// A parsed `outbound_.<port>_.<subset>_.<host>` key (`model.ParseSubsetKey`). The empty subset is written
/// as nothing between its separators: `outbound_.9080_._.reviews.default.svc.cluster.local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SniKey<'a> {
    pub port: u16,
    pub subset: &'a str,
    pub host: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("does not start with \"outbound_.\" (an Istio key is outbound_.<port>_.<subset>_.<host>)")]
    NotOutbound,
    #[error("has no port and subset fields (an Istio key is outbound_.<port>_.<subset>_.<host>)")]
    MissingFields,
    #[error("has a port that is not a number from 1 to 65535")]
    BadPort,
    #[error("has an empty or malformed host")]
    BadHost,
}

impl<'a> SniKey<'a> {
    pub fn parse(sni: &'a str) -> Result<Self, KeyError> {
        const SEPARATOR: &str = "_.";
        let rest = sni.strip_prefix("outbound_.").ok_or(KeyError::NotOutbound)?;
        let (port, rest) = rest.split_once(SEPARATOR).ok_or(KeyError::MissingFields)?;
        let (subset, host) = rest.split_once(SEPARATOR).ok_or(KeyError::MissingFields)?;
        let port: u16 = port.parse().map_err(|_| KeyError::BadPort)?;
        if port == 0 {
            return Err(KeyError::BadPort);
        }
        // Like ParseSubsetKey: a host that still holds the separator cannot be told apart from the fields.
        if host.is_empty() || host.contains(SEPARATOR) || host.starts_with('.') || host.ends_with('.') {
            return Err(KeyError::BadHost);
        }
        Ok(SniKey { port, subset, host })
    }
}

impl fmt::Display for SniKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "outbound_.{}_.{}_.{}", self.port, self.subset, self.host)
    }
}

/// Gateway-wide settings that shape every cluster: defaults a DestinationRule may override, and who the
/// gateway is (priorities are relative to its locality and labels).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterDefaults {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
    pub keepalive: Keepalive,
    pub gateway: GatewayIdentity,
    /// A registered pick policy replacing every cluster's algorithm (experiments).
    pub lb_policy: Option<String>,
}

impl Default for ClusterDefaults {
    /// Istio's: 10 s connect timeout, Envoy's 1 h tcp_proxy idle timeout, no duration limit; the gateway's
    /// keepalive defaults; no locality.
    fn default() -> Self {
        ClusterDefaults {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connection_duration: None,
            keepalive: Keepalive { time: Duration::from_secs(300), interval: Duration::from_secs(75), probes: 9 },
            gateway: GatewayIdentity::default(),
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
    pub cluster_id: String,
    pub workload_name: String,
    pub metrics: IstioTcpMetrics,
}

/// One routable cluster.
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
    pub metrics: ClusterMetrics,
    /// Istio opened/closed counters for connections refused with UO, UH or UF.
    refused: [(metrics::Counter, metrics::Counter); 3],
    /// Tunnels open to this cluster; shared with the previous snapshot's cluster of the same name so that a
    /// reload does not reset the connection limit.
    pub active: Arc<AtomicUsize>,
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
}

/// The immutable route snapshot: SNI -> cluster.
#[derive(Debug, Default)]
pub struct RouteTable {
    clusters: HashMap<Box<str>, Arc<RouteCluster>>,
}

/// One problem in a resources update, located precisely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {problem}")]
pub struct ResourceError {
    /// e.g. `clusters[2] "outbound_.80_._.a.b.svc.cluster.local": endpoints[0].address`.
    pub location: String,
    pub problem: String,
    /// The cluster at fault, when there is one (what a NACK names).
    pub cluster: Option<String>,
}

/// A refused update: every problem found, not only the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} problem(s): {}", .errors.len(), .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidResources {
    pub errors: Vec<ResourceError>,
}

impl InvalidResources {
    /// The names of the clusters at fault.
    pub fn rejected_clusters(&self) -> Vec<String> {
        let mut names: Vec<String> = self.errors.iter().filter_map(|e| e.cluster.clone()).collect();
        names.dedup();
        names
    }
}

impl RouteTable {
    /// Validates `resources` as a whole and builds the snapshot; clusters and hosts that `previous` already
    /// had keep their live state (open connection counts, outlier detection). Metric handles are registered
    /// on the current `metrics` recorder.
    pub fn build(
        resources: &Resources,
        defaults: &ClusterDefaults,
        previous: &RouteTable,
    ) -> Result<RouteTable, InvalidResources> {
        let mut errors = Vec::new();
        let mut clusters = HashMap::with_capacity(resources.clusters.len());
        let mut seen = HashSet::with_capacity(resources.clusters.len());
        for (index, cluster) in resources.clusters.iter().enumerate() {
            let location = format!("clusters[{index}] {:?}", cluster.name);
            let mut problems = Problems { location, cluster: &cluster.name, errors: &mut errors };
            if !seen.insert(cluster.name.as_str()) {
                problems.push("name", "is defined twice".to_owned());
                continue;
            }
            let previous_cluster = previous.clusters.get(cluster.name.as_str());
            if let Some(built) = build_cluster(cluster, defaults, previous_cluster, &mut problems) {
                clusters.insert(Box::from(cluster.name.as_str()), Arc::new(built));
            }
        }
        if errors.is_empty() { Ok(RouteTable { clusters }) } else { Err(InvalidResources { errors }) }
    }

    /// The cluster an SNI names; SNI is matched case-insensitively, as DNS names are.
    pub fn get(&self, sni: &str) -> Option<&Arc<RouteCluster>> {
        match self.clusters.get(sni) {
            Some(cluster) => Some(cluster),
            None if sni.bytes().any(|b| b.is_ascii_uppercase()) => self.clusters.get(sni.to_ascii_lowercase().as_str()),
            None => None,
        }
    }

    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    pub fn endpoint_count(&self) -> usize {
        self.clusters.values().map(|c| c.lb.hosts().len()).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<RouteCluster>> {
        self.clusters.values()
    }

    /// Clusters in name order (for dumps).
    pub fn clusters(&self) -> Vec<&Arc<RouteCluster>> {
        let mut clusters: Vec<_> = self.clusters.values().collect();
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        clusters
    }
}

struct Problems<'a> {
    location: String,
    cluster: &'a str,
    errors: &'a mut Vec<ResourceError>,
}

impl Problems<'_> {
    fn push(&mut self, field: &str, problem: String) {
        self.errors.push(ResourceError {
            location: format!("{}: {field}", self.location),
            problem,
            cluster: (!self.cluster.is_empty()).then(|| self.cluster.to_owned()),
        });
    }

    fn count(&self) -> usize {
        self.errors.len()
    }
}

fn build_cluster(
    cluster: &Cluster,
    defaults: &ClusterDefaults,
    previous: Option<&Arc<RouteCluster>>,
    problems: &mut Problems<'_>,
) -> Option<RouteCluster> {
    let before = problems.count();
    let key = match SniKey::parse(&cluster.name) {
        Ok(key) => Some(key),
        Err(e) => {
            problems.push("name", format!("{e}"));
            None
        }
    };
    if cluster.name.bytes().any(|b| b.is_ascii_uppercase()) {
        problems.push("name", "must be lower case (SNI is matched case-insensitively)".to_owned());
    }
    let policy = cluster.traffic_policy.as_ref();
    let lb_settings =
        LbSettings::from_policy(policy).map_err(|e| problems.push("trafficPolicy.loadBalancer", e.to_string())).ok();
    let settings = cluster_settings(policy, defaults, problems);
    let specs: Vec<EndpointSpec> =
        cluster.endpoints.iter().enumerate().filter_map(|(i, endpoint)| endpoint_spec(endpoint, i, problems)).collect();
    if problems.count() > before {
        return None;
    }
    let (key, lb_settings, settings) = (key?, lb_settings?, settings?);

    let (service_name, service_namespace) = service_identity(cluster, key.host);
    let lb = ClusterLb::new(specs, lb_settings, previous.map(|p| &p.lb), &defaults.gateway, &cluster.name);
    let endpoints = cluster
        .endpoints
        .iter()
        .zip(lb.hosts())
        .map(|(endpoint, host)| EndpointInfo {
            cluster_id: endpoint.cluster_id.clone(),
            workload_name: endpoint.workload_name.clone(),
            metrics: IstioTcpMetrics::new(&Destination {
                service: key.host,
                service_name: &service_name,
                service_namespace: &service_namespace,
                cluster: &endpoint.cluster_id,
                workload: &endpoint.workload_name,
                labels: Some(&host.spec.labels),
            }),
        })
        .collect();
    let unrouted = Destination {
        service: key.host,
        service_name: &service_name,
        service_namespace: &service_namespace,
        ..Default::default()
    };
    let refused =
        [RejectReason::UpstreamOverflow, RejectReason::NoHealthyUpstream, RejectReason::UpstreamConnectFailed]
            .map(|reason| IstioTcpMetrics::refused(&unrouted, reason));
    let metrics = ClusterMetrics::new(&cluster.name);
    metrics.membership_total.set(lb.hosts().len() as f64);
    metrics.membership_healthy.set(lb.healthy_count() as f64);
    Some(RouteCluster {
        name: Arc::from(cluster.name.as_str()),
        host: key.host.to_owned(),
        port: key.port,
        subset: key.subset.to_owned(),
        service_name,
        service_namespace,
        lb,
        endpoints,
        settings,
        metrics,
        refused,
        active: previous.map(|p| Arc::clone(&p.active)).unwrap_or_default(),
    })
}

/// The Service name and namespace: as configured, else from `<name>.<namespace>.svc...`.
fn service_identity(cluster: &Cluster, host: &str) -> (String, String) {
    let mut labels = host.split('.');
    let name = labels.next().unwrap_or_default();
    let namespace = labels.next().unwrap_or_default();
    let pick = |configured: &str, derived: &str| {
        if configured.is_empty() { derived.to_owned() } else { configured.to_owned() }
    };
    (pick(&cluster.service_name, name), pick(&cluster.service_namespace, namespace))
}

fn endpoint_spec(endpoint: &Endpoint, index: usize, problems: &mut Problems<'_>) -> Option<EndpointSpec> {
    let field = |name: &str| format!("endpoints[{index}].{name}");
    let address = match endpoint.address.parse::<SocketAddr>() {
        Ok(address) if address.port() == 0 => {
            problems.push(&field("address"), format!("{:?} has port 0", endpoint.address));
            None
        }
        Ok(address) => Some(address),
        Err(_) => {
            problems.push(&field("address"), format!("{:?} is not an ip:port socket address", endpoint.address));
            None
        }
    };
    let locality =
        endpoint.locality.parse::<Locality>().map_err(|e| problems.push(&field("locality"), e.to_string())).ok();
    let health = match endpoint::Health::try_from(endpoint.health) {
        Ok(endpoint::Health::Unknown | endpoint::Health::Healthy) => Some(Health::Healthy),
        Ok(endpoint::Health::Unhealthy) => Some(Health::Unhealthy),
        Ok(endpoint::Health::Draining) => Some(Health::Draining),
        Err(_) => {
            problems.push(&field("health"), format!("{} is not a known health status", endpoint.health));
            None
        }
    };
    Some(EndpointSpec {
        address: address?,
        locality: locality?,
        weight: endpoint.weight.max(1),
        labels: endpoint.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        health: health?,
    })
}

fn cluster_settings(
    policy: Option<&TrafficPolicy>,
    defaults: &ClusterDefaults,
    problems: &mut Problems<'_>,
) -> Option<ClusterSettings> {
    let tcp: Option<&TcpSettings> = policy.and_then(|p| p.connection_pool.as_ref()).and_then(|c| c.tcp.as_ref());
    let before = problems.count();
    let mut duration = |name: &str, value: Option<&crossgate_proto::Duration>| -> Option<Duration> {
        Duration::try_from(*value?)
            .map_err(|e| problems.push(&format!("trafficPolicy.connectionPool.tcp.{name}"), e.to_string()))
            .ok()
    };
    let connect_timeout = duration("connectTimeout", tcp.and_then(|t| t.connect_timeout.as_ref()));
    let idle_timeout = duration("idleTimeout", tcp.and_then(|t| t.idle_timeout.as_ref()));
    let max_duration = duration("maxConnectionDuration", tcp.and_then(|t| t.max_connection_duration.as_ref()));
    let keepalive = tcp.and_then(|t| t.tcp_keepalive.as_ref());
    let keepalive_time = duration("tcpKeepalive.time", keepalive.and_then(|k| k.time.as_ref()));
    let keepalive_interval = duration("tcpKeepalive.interval", keepalive.and_then(|k| k.interval.as_ref()));
    let max_connections = match tcp.map(|t| t.max_connections) {
        None | Some(0) => u32::MAX as usize,
        Some(n) if n < 0 => {
            problems.push("trafficPolicy.connectionPool.tcp.maxConnections", format!("{n} is negative"));
            0
        }
        Some(n) => n as usize,
    };
    if connect_timeout == Some(Duration::ZERO) {
        problems.push("trafficPolicy.connectionPool.tcp.connectTimeout", "must be more than 0s".to_owned());
    }
    if problems.count() > before {
        return None;
    }
    Some(ClusterSettings {
        connect_timeout: connect_timeout.unwrap_or(defaults.connect_timeout),
        // Istio: an explicit 0s disables the idle timeout; unset falls back to the gateway default.
        idle_timeout: match idle_timeout {
            Some(d) => non_zero(d),
            None => defaults.idle_timeout,
        },
        max_connection_duration: max_duration.map_or(defaults.max_connection_duration, non_zero),
        max_connections,
        keepalive: Keepalive {
            time: keepalive_time.unwrap_or(defaults.keepalive.time),
            interval: keepalive_interval.unwrap_or(defaults.keepalive.interval),
            probes: keepalive.map(|k| k.probes).filter(|p| *p > 0).unwrap_or(defaults.keepalive.probes),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_as_istio_builds_them() {
        let key = SniKey::parse("outbound_.9080_._.reviews.default.svc.cluster.local").unwrap();
        assert_eq!(key, SniKey { port: 9080, subset: "", host: "reviews.default.svc.cluster.local" });
        assert_eq!(key.to_string(), "outbound_.9080_._.reviews.default.svc.cluster.local");
        let key = SniKey::parse("outbound_.9080_.v1_.reviews.default.svc.cluster.local").unwrap();
        assert_eq!((key.port, key.subset), (9080, "v1"));
    }

    #[test]
    fn malformed_keys_are_refused_with_the_reason() {
        let cases = [
            ("inbound_.9080_._.reviews", KeyError::NotOutbound),
            ("reviews.default.svc.cluster.local", KeyError::NotOutbound),
            ("outbound|9080||reviews", KeyError::NotOutbound),
            ("outbound_.9080", KeyError::MissingFields),
            ("outbound_.9080_.v1", KeyError::MissingFields),
            ("outbound_.http_._.reviews", KeyError::BadPort),
            ("outbound_.0_._.reviews", KeyError::BadPort),
            ("outbound_.70000_._.reviews", KeyError::BadPort),
            ("outbound_.9080_._.", KeyError::BadHost),
            ("outbound_.9080_.v1_.a_.b", KeyError::BadHost),
        ];
        for (sni, expected) in cases {
            assert_eq!(SniKey::parse(sni), Err(expected), "{sni}");
        }
    }

    #[test]
    fn only_istio_mtls_alpns_match() {
        for alpn in ["istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"] {
            assert!(is_istio_alpn(alpn.as_bytes()));
        }
        for alpn in ["h2", "http/1.1", "istio-h3", ""] {
            assert!(!is_istio_alpn(alpn.as_bytes()));
        }
    }
}

#[cfg(test)]
mod build_tests {
    use super::*;

    fn build(yaml: &str) -> Result<RouteTable, InvalidResources> {
        let resources: Resources = serde_yaml_ng::from_str(yaml).unwrap();
        RouteTable::build(&resources, &ClusterDefaults::default(), &RouteTable::default())
    }

    #[test]
    fn every_problem_is_reported_with_its_location() {
        let error = build(
            "clusters:
- name: outbound_.80_._.a.ns.svc.cluster.local
  endpoints: [{ address: 10.0.0.1 }, { address: '10.0.0.2:0' }, { address: '10.0.0.3:80', locality: a/b/c/d }]
- name: reviews
- name: outbound_.80_._.b.ns.svc.cluster.local
  trafficPolicy: { connectionPool: { tcp: { maxConnections: -1, connectTimeout: -1s } } }
- name: outbound_.80_._.a.ns.svc.cluster.local
",
        )
        .unwrap_err();
        let messages: Vec<String> = error.errors.iter().map(ToString::to_string).collect();
        let expect = [
            "clusters[0] \"outbound_.80_._.a.ns.svc.cluster.local\": endpoints[0].address: \"10.0.0.1\" is not an ip:port",
            "endpoints[1].address: \"10.0.0.2:0\" has port 0",
            "endpoints[2].locality: locality \"a/b/c/d\"",
            "clusters[1] \"reviews\": name: does not start with \"outbound_.\"",
            "tcp.connectTimeout: -1s is negative",
            "tcp.maxConnections: -1 is negative",
            "clusters[3] \"outbound_.80_._.a.ns.svc.cluster.local\": name: is defined twice",
        ];
        for expected in expect {
            assert!(messages.iter().any(|m| m.contains(expected)), "missing {expected:?} in {messages:#?}");
        }
        assert_eq!(
            error.rejected_clusters(),
            vec![
                "outbound_.80_._.a.ns.svc.cluster.local",
                "reviews",
                "outbound_.80_._.b.ns.svc.cluster.local",
                "outbound_.80_._.a.ns.svc.cluster.local"
            ]
        );
    }

    #[test]
    fn destination_rule_settings_override_defaults() {
        let table = build(
            "clusters:
- name: outbound_.80_.v1_.a.ns.svc.cluster.local
  trafficPolicy: { connectionPool: { tcp: { maxConnections: 5, connectTimeout: 250ms, idleTimeout: 0s,
                   maxConnectionDuration: 1h, tcpKeepalive: { time: 10s, probes: 3 } } } }
- name: outbound_.80_._.a.ns.svc.cluster.local
",
        )
        .unwrap();
        let subset = &table.get("outbound_.80_.v1_.a.ns.svc.cluster.local").unwrap().settings;
        assert_eq!(subset.max_connections, 5);
        assert_eq!(subset.connect_timeout, Duration::from_millis(250));
        assert_eq!(subset.idle_timeout, None, "0s disables the idle timeout");
        assert_eq!(subset.max_connection_duration, Some(Duration::from_secs(3600)));
        assert_eq!(
            (subset.keepalive.time, subset.keepalive.interval, subset.keepalive.probes),
            (Duration::from_secs(10), Duration::from_secs(75), 3)
        );
        let plain =
            &table.get("OUTBOUND_.80_._.A.ns.svc.cluster.local").expect("SNI matches case-insensitively").settings;
        assert_eq!(plain.connect_timeout, Duration::from_secs(10));
        assert_eq!(plain.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(plain.max_connections, u32::MAX as usize);
    }
}
