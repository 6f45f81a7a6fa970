//! Envoy's resources as the gateway reads them: what an sni-dnat gateway uses of a `Listener` (the 15443 filter
//! chains and their tcp_proxy), of a `Cluster` (EDS clusters: balancing, timeouts, limits) and of a
//! `ClusterLoadAssignment` (hosts by priority and locality, health, weights, Istio's workload metadata). What a
//! passthrough gateway does not use is ignored, as the issue of a gateway fed by istiod demands: other filters
//! (`istio.stats`, `TypedStruct`), HTTP chains, transport sockets, non-EDS clusters. Each reader validates as
//! Envoy does and names the field at fault.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crossgate_istio::gateway::{ISTIO_METADATA, TCP_PROXY_FILTER, WORKLOAD_KEY, WorkloadMetadata, service_identity};
use crossgate_istio::sni::SniKey;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, common_lb_config};
use envoy_types::pb::envoy::config::core::v3::{HealthStatus, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::{self, value::Kind};
use prost::{Message, Name};

use crate::lb::{EndpointSpec, Group, Health, LbSettings, Locality, Topology, load::DEFAULT_OVERPROVISIONING_FACTOR};

/// Envoy's highest priority level.
const MAX_PRIORITY: u32 = 128;

/// A resource the gateway refuses, and why (what a NACK says).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Invalid {
    Invalid { field: field.into(), problem: problem.into() }
}

/// An Envoy duration as a `std` one.
fn duration(d: &protobuf::Duration, field: &str) -> Result<Duration, Invalid> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(invalid(field, "must not be negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// The tcp_proxy of one filter chain: which SNIs and ALPNs reach which cluster, with what limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainSpec {
    pub server_names: Vec<String>,
    /// Empty: any ALPN (and none) matches. Shared by the chains that list the same (Istio's five, on every chain).
    pub alpns: Arc<[String]>,
    pub cluster: String,
    /// `Some(ZERO)` disables the idle timeout; `None` leaves the gateway's default.
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
}

/// Reads the listener's filter chains. Chains without a tcp_proxy to one named cluster, or without server names,
/// are not an sni-dnat route and are skipped.
pub fn read_listener(listener: &Listener) -> Result<Vec<ChainSpec>, Invalid> {
    let mut chains = Vec::with_capacity(listener.filter_chains.len());
    let mut alpn_lists: HashMap<&[String], Arc<[String]>> = HashMap::new();
    for (index, chain) in listener.filter_chains.iter().enumerate() {
        let field = |name: &str| format!("filter_chains[{index}].{name}");
        let Some(chain_match) = &chain.filter_chain_match else { continue };
        if chain_match.server_names.is_empty() {
            continue;
        }
        let Some(proxy) = chain.filters.iter().find(|f| f.name == TCP_PROXY_FILTER) else { continue };
        let proxy = match &proxy.config_type {
            Some(filter::ConfigType::TypedConfig(any)) if any.type_url == TcpProxy::type_url() => {
                TcpProxy::decode(any.value.as_slice())
                    .map_err(|e| invalid(field("filters.tcp_proxy"), format!("does not decode: {e}")))?
            }
            _ => return Err(invalid(field("filters.tcp_proxy"), "has no TcpProxy typed_config")),
        };
        let Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)) = proxy.cluster_specifier else { continue };
        if proxy.stat_prefix.is_empty() {
            return Err(invalid(field("tcp_proxy.stat_prefix"), "must not be empty"));
        }
        let idle_timeout =
            proxy.idle_timeout.as_ref().map(|d| duration(d, &field("tcp_proxy.idle_timeout"))).transpose()?;
        let max_connection_duration = proxy
            .max_downstream_connection_duration
            .as_ref()
            .map(|d| duration(d, &field("tcp_proxy.max_downstream_connection_duration")))
            .transpose()?;
        chains.push(ChainSpec {
            server_names: chain_match.server_names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            alpns: Arc::clone(
                alpn_lists
                    .entry(&chain_match.application_protocols)
                    .or_insert_with(|| Arc::from(chain_match.application_protocols.as_slice())),
            ),
            cluster,
            idle_timeout,
            max_connection_duration,
        });
    }
    Ok(chains)
}

/// Istio's service of an sni-dnat cluster, for the destination_service labels: the host, port and subset of its
/// name (`outbound_.PORT_.SUBSET_.HOST`), the Service's name and namespace from its `istio` metadata or the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    pub host: String,
    pub port: u16,
    pub subset: String,
    pub name: String,
    pub namespace: String,
}

/// The upstream TCP keepalive a cluster sets; unset parts take the gateway's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepaliveSpec {
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
    pub probes: Option<u32>,
}

/// What the gateway uses of an EDS cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    pub lb: LbSettings,
    pub locality_weighted: bool,
    pub connect_timeout: Option<Duration>,
    /// `circuit_breakers.thresholds[0].max_connections` (Envoy's default 1024 when there are no thresholds; Istio
    /// always sends 2^32-1 unless the DestinationRule says otherwise).
    pub max_connections: usize,
    pub keepalive: KeepaliveSpec,
    pub service: ServiceSpec,
}

/// Envoy's circuit breaker default.
const ENVOY_DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Reads a cluster. `Ok(None)`: a cluster the gateway does not route to (not EDS: `BlackHoleCluster`,
/// `PassthroughCluster`, DNS or ORIGINAL_DST clusters); it is accepted and ignored.
pub fn read_cluster(cluster: &Cluster) -> Result<Option<ClusterSpec>, Invalid> {
    let discovery = match cluster.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(t).ok(),
        _ => None,
    };
    if discovery != Some(DiscoveryType::Eds) {
        return Ok(None);
    }
    let lb = LbSettings::from_envoy(cluster).map_err(|e| invalid("lb", e.to_string()))?;
    let connect_timeout = cluster.connect_timeout.as_ref().map(|d| duration(d, "connect_timeout")).transpose()?;
    if connect_timeout == Some(Duration::ZERO) {
        return Err(invalid("connect_timeout", "must be more than 0s"));
    }
    let max_connections = cluster
        .circuit_breakers
        .as_ref()
        .and_then(|c| c.thresholds.iter().find(|t| t.priority == 0))
        .map_or(ENVOY_DEFAULT_MAX_CONNECTIONS, |t| {
            t.max_connections.map_or(ENVOY_DEFAULT_MAX_CONNECTIONS, |m| m.value as usize)
        });
    let keepalive = cluster
        .upstream_connection_options
        .as_ref()
        .and_then(|o| o.tcp_keepalive.as_ref())
        .map(|k| KeepaliveSpec {
            time: k.keepalive_time.map(|v| Duration::from_secs(v.value.into())),
            interval: k.keepalive_interval.map(|v| Duration::from_secs(v.value.into())),
            probes: k.keepalive_probes.map(|v| v.value),
        })
        .unwrap_or_default();
    let locality_weighted = matches!(
        cluster.common_lb_config.as_ref().and_then(|c| c.locality_config_specifier.as_ref()),
        Some(common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
    );
    Ok(Some(ClusterSpec {
        lb,
        locality_weighted,
        connect_timeout,
        max_connections,
        keepalive,
        service: service_metadata(cluster),
    }))
}

/// The cluster's service: the first of `metadata.filter_metadata.istio.services`, completed from its name.
fn service_metadata(cluster: &Cluster) -> ServiceSpec {
    let istio = cluster.metadata.as_ref().and_then(|m| m.filter_metadata.get(ISTIO_METADATA));
    let first = istio.and_then(|s| s.fields.get("services")).and_then(|v| match &v.kind {
        Some(Kind::ListValue(list)) => list.values.first(),
        _ => None,
    });
    let field = |key: &str| match first.and_then(|v| match &v.kind {
        Some(Kind::StructValue(s)) => s.fields.get(key),
        _ => None,
    }) {
        Some(protobuf::Value { kind: Some(Kind::StringValue(s)) }) => s.as_str(),
        _ => "",
    };
    let (host, port, subset) = match SniKey::parse(&cluster.name) {
        Ok(key) => (key.host.to_owned(), key.port, key.subset.to_owned()),
        Err(_) => (field("host").to_owned(), 0, String::new()),
    };
    let (name, namespace) = service_identity(&host, field("name"), field("namespace"));
    ServiceSpec { host, port, subset, name, namespace }
}

/// The hosts of an assignment, in its order, and how they are arranged.
#[derive(Debug, Clone, PartialEq)]
pub struct AssignmentSpec {
    pub endpoints: Vec<EndpointSpec>,
    /// By priority, then locality; indices into `endpoints`. Draining hosts are in no group.
    pub priorities: Vec<Vec<Group>>,
    pub overprovisioning_factor: u32,
}

impl AssignmentSpec {
    /// The arrangement the lb balances over; `locality_weighted` comes from the cluster.
    pub fn topology(&self, locality_weighted: bool) -> Topology {
        Topology {
            priorities: self.priorities.clone(),
            locality_weighted,
            overprovisioning_factor: self.overprovisioning_factor,
        }
    }
}

/// Reads an assignment as Envoy's EDS does: priorities up to 128 (gaps are empty levels), weights at least 1, IP
/// addresses only, the first of duplicate addresses wins, DRAINING hosts take no part.
pub fn read_assignment(assignment: &ClusterLoadAssignment) -> Result<AssignmentSpec, Invalid> {
    // Sized once: a gateway keeps every assignment, and growth by doubling would keep up to half again as slack.
    let mut endpoints = Vec::with_capacity(assignment.endpoints.iter().map(|l| l.lb_endpoints.len()).sum());
    let mut priorities: Vec<Vec<Group>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // The pods of one workload share their metadata: one copy each.
    let mut workloads: HashMap<&str, Arc<WorkloadMetadata>> = HashMap::new();
    for (g, locality_endpoints) in assignment.endpoints.iter().enumerate() {
        let field = |name: &str| format!("endpoints[{g}].{name}");
        if locality_endpoints.priority > MAX_PRIORITY {
            return Err(invalid(field("priority"), format!("{} is above {MAX_PRIORITY}", locality_endpoints.priority)));
        }
        let weight = match locality_endpoints.load_balancing_weight {
            Some(w) if w.value == 0 => return Err(invalid(field("load_balancing_weight"), "must be at least 1")),
            Some(w) => u64::from(w.value),
            None => 0,
        };
        let locality = Arc::new(locality_endpoints.locality.as_ref().map_or_else(Locality::default, |l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.sub_zone.clone(),
        }));
        let mut members = Vec::with_capacity(locality_endpoints.lb_endpoints.len());
        for (e, lb_endpoint) in locality_endpoints.lb_endpoints.iter().enumerate() {
            let field = |name: &str| format!("endpoints[{g}].lb_endpoints[{e}].{name}");
            let address =
                endpoint_address(lb_endpoint).map_err(|problem| invalid(field("endpoint.address"), problem))?;
            let weight = match lb_endpoint.load_balancing_weight {
                Some(w) if w.value == 0 => return Err(invalid(field("load_balancing_weight"), "must be at least 1")),
                Some(w) => w.value,
                None => 1,
            };
            let health = match HealthStatus::try_from(lb_endpoint.health_status) {
                Ok(HealthStatus::Unknown | HealthStatus::Healthy) => Health::Healthy,
                Ok(HealthStatus::Draining) => Health::Draining,
                // Degraded hosts would spill like a lower priority in Envoy; Istio never sends them.
                Ok(HealthStatus::Unhealthy | HealthStatus::Timeout | HealthStatus::Degraded) | Err(_) => {
                    Health::Unhealthy
                }
            };
            if !seen.insert(address) {
                continue;
            }
            if health != Health::Draining {
                members.push(endpoints.len());
            }
            let workload = workload_metadata(lb_endpoint);
            let workload =
                Arc::clone(workloads.entry(workload).or_insert_with(|| Arc::new(WorkloadMetadata::parse(workload))));
            endpoints.push(EndpointSpec { address, locality: Arc::clone(&locality), weight, health, workload });
        }
        let priority = locality_endpoints.priority as usize;
        if priorities.len() <= priority {
            priorities.resize_with(priority + 1, Vec::new);
        }
        priorities[priority].push(Group { locality: Locality::clone(&locality), weight, members });
    }
    let overprovisioning_factor = assignment
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor)
        .map_or(DEFAULT_OVERPROVISIONING_FACTOR, |f| f.value);
    Ok(AssignmentSpec { endpoints, priorities, overprovisioning_factor })
}

fn endpoint_address(
    lb_endpoint: &envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint,
) -> Result<SocketAddr, String> {
    let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &lb_endpoint.host_identifier else {
        return Err("no endpoint (named endpoints are not supported)".to_owned());
    };
    let Some(address::Address::SocketAddress(socket)) = endpoint.address.as_ref().and_then(|a| a.address.as_ref())
    else {
        return Err("not a socket address".to_owned());
    };
    let ip: IpAddr = socket.address.parse().map_err(|_| format!("{:?} is not an IP address", socket.address))?;
    match socket.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(port)) if (1..=65535).contains(&port) => {
            Ok(SocketAddr::new(ip, port as u16))
        }
        _ => Err(format!("{:?} has no port from 1 to 65535", socket.address)),
    }
}

/// The endpoint's `istio.workload` text (`name;namespace;canonical-service;revision;cluster`), empty if none.
fn workload_metadata(lb_endpoint: &envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint) -> &str {
    let value = lb_endpoint
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(ISTIO_METADATA))
        .and_then(|s| s.fields.get(WORKLOAD_KEY));
    match value.and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(text)) => text,
        _ => "",
    }
}

/// The Envoy configuration in force, as read: what a route table is built from. Resources are shared with the
/// snapshots built from them.
#[derive(Debug, Clone, Default)]
pub struct EnvoyState {
    /// The sni-dnat listener's name and filter chains.
    pub listener_name: String,
    pub chains: Vec<Arc<ChainSpec>>,
    /// EDS clusters by name (other clusters are ignored).
    pub clusters: HashMap<String, Arc<ClusterSpec>>,
    pub assignments: HashMap<String, Arc<AssignmentSpec>>,
    /// Whether a listener update has been accepted (readiness waits for one, as Envoy's initial fetch does).
    pub listener_received: bool,
}

/// The lb of one compact cluster as the gateway holds it once istiod's resources for `gateway` are applied: the
/// same path as configuration (built by `crossgate_istio::gateway`, read back here), with the hosts in the order
/// the compact cluster lists its endpoints. The simulator and the lb's tests and benches come in this way.
pub fn compact_lb(
    compact: &crossgate_proto::Cluster,
    gateway: &crossgate_istio::locality_lb::GatewayIdentity,
    policy: Option<&str>,
    previous: Option<&crate::lb::ClusterLb>,
) -> Result<crate::lb::ClusterLb, String> {
    let mesh = crossgate_istio::gateway::MeshDefaults::default();
    let built = crossgate_istio::gateway::build(compact, gateway, &mesh)
        .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))?;
    let cluster = read_cluster(&built.cluster).map_err(|e| e.to_string())?.ok_or("not an EDS cluster")?;
    let assignment = read_assignment(&built.assignment).map_err(|e| e.to_string())?;
    // Back to the compact order: host i is the endpoint listed i-th.
    let position: std::collections::HashMap<SocketAddr, usize> =
        assignment.endpoints.iter().enumerate().map(|(i, e)| (e.address, i)).collect();
    let order: Vec<usize> = compact
        .endpoints
        .iter()
        .filter_map(|e| e.address.parse::<SocketAddr>().ok().and_then(|a| position.get(&a).copied()))
        .collect();
    let mut new_index = vec![0; assignment.endpoints.len()];
    for (new, old) in order.iter().enumerate() {
        new_index[*old] = new;
    }
    let endpoints = order.iter().map(|old| assignment.endpoints[*old].clone()).collect();
    let mut priorities = assignment.priorities.clone();
    for group in priorities.iter_mut().flatten() {
        for member in &mut group.members {
            *member = new_index[*member];
        }
    }
    let topology = Topology {
        priorities,
        locality_weighted: cluster.locality_weighted,
        overprovisioning_factor: assignment.overprovisioning_factor,
    };
    let mut settings = cluster.lb;
    if let Some(name) = policy {
        settings = settings.with_policy(name).map_err(|e| e.to_string())?;
    }
    Ok(crate::lb::ClusterLb::new(endpoints, topology, settings, previous, &compact.name))
}
