//! What istiod sends an east-west gateway for one sni-dnat cluster, built from crossgate's compact form: the
//! Envoy `Cluster` (`cluster.go` `buildOutboundSniDnatClusters`, `cluster_builder.go`), its
//! `ClusterLoadAssignment` with priorities and locality weights computed for the gateway
//! (`pilot/pkg/xds/endpoints/endpoint_builder.go`, `loadbalancer.go`), and its filter chain on the
//! `0.0.0.0_15443` listener (`gateway.go` `buildGatewayListeners` for an AUTO_PASSTHROUGH server).
//!
//! crossgate-control builds every gateway's resources here; crossgate-proxy builds its static resources file
//! here too, so that both take the same path into the gateway: Envoy's resources.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use crossgate_proto::{Cluster as CompactCluster, Endpoint as CompactEndpoint, endpoint::Health as CompactHealth};
use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::r#type::v3::{HashPolicy, hash_policy};
use envoy_types::pb::google::protobuf::{self, Any, Struct, Value, value::Kind};
use prost::{Message, Name};

use crate::labels::{Locality, LocalityError, TLS_MODE_LABEL};
use crate::locality_lb::{Arrangement, GatewayIdentity, LbEndpoint};
use crate::policy::{ClusterPolicy, PolicyError, percent, proto_duration};
use crate::sni::{ISTIO_MTLS_ALPNS, SniKey};

/// The listener istiod builds for an AUTO_PASSTHROUGH server on port 15443.
pub const LISTENER_NAME: &str = "0.0.0.0_15443";
pub const LISTENER_PORT: u16 = 15443;
pub const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";
pub const TLS_INSPECTOR_FILTER: &str = "envoy.filters.listener.tls_inspector";
/// The endpoint metadata namespace istiod writes the workload into, and the key.
pub const ISTIO_METADATA: &str = "istio";
pub const WORKLOAD_KEY: &str = "workload";
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// Settings of the mesh that every cluster defaults to.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshDefaults {
    /// meshConfig `connectTimeout` (10 s by default).
    pub connect_timeout: Duration,
}

impl Default for MeshDefaults {
    fn default() -> Self {
        MeshDefaults { connect_timeout: Duration::from_secs(10) }
    }
}

/// One sni-dnat cluster as istiod sends it: the three resources it becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct SniDnatCluster {
    pub cluster: cluster::Cluster,
    pub assignment: endpoint::ClusterLoadAssignment,
    pub filter_chain: listener::FilterChain,
}

/// One problem in a compact cluster, located by field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct BuildError {
    /// e.g. `endpoints[0].address`, `trafficPolicy.loadBalancer`.
    pub field: String,
    pub problem: String,
}

/// Builds the resources of one compact cluster as istiod would for `gateway`. Every problem is reported.
pub fn build(
    compact: &CompactCluster,
    gateway: &GatewayIdentity,
    mesh: &MeshDefaults,
) -> Result<SniDnatCluster, Vec<BuildError>> {
    let mut errors = Vec::new();
    let key = SniKey::parse(&compact.name)
        .map_err(|e| errors.push(BuildError { field: "name".into(), problem: e.to_string() }))
        .ok();
    if compact.name.bytes().any(|b| b.is_ascii_uppercase()) {
        errors.push(BuildError {
            field: "name".into(),
            problem: "must be lower case (SNI is matched case-insensitively)".into(),
        });
    }
    let policy = ClusterPolicy::new(compact.traffic_policy.as_ref())
        .map_err(|PolicyError { field, reason }| {
            errors.push(BuildError { field: format!("trafficPolicy.{field}"), problem: reason })
        })
        .ok();
    let endpoints: Vec<Option<ParsedEndpoint<'_>>> =
        compact.endpoints.iter().enumerate().map(|(i, e)| ParsedEndpoint::new(e, i, &mut errors)).collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    let (Some(key), Some(policy)) = (key, policy) else { return Err(errors) };
    let endpoints: Vec<ParsedEndpoint<'_>> = endpoints.into_iter().flatten().collect();
    let (service_name, namespace) = service_identity(key.host, &compact.service_name, &compact.service_namespace);
    let arrangement = Arrangement::new(
        &endpoints.iter().map(ParsedEndpoint::lb).collect::<Vec<_>>(),
        gateway,
        &policy.locality,
        policy.outlier_detection.is_some(),
    );
    let assignment = assignment(&compact.name, &endpoints, &arrangement, &namespace);
    let cluster = envoy_cluster(&compact.name, key.host, &service_name, &namespace, &policy, &arrangement, mesh);
    let filter_chain = filter_chain(&compact.name, &policy);
    Ok(SniDnatCluster { cluster, assignment, filter_chain })
}

/// Everything one gateway is sent: the listener, and each cluster with its assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayResources {
    pub listener: listener::Listener,
    pub clusters: Vec<cluster::Cluster>,
    pub assignments: Vec<endpoint::ClusterLoadAssignment>,
}

impl GatewayResources {
    pub fn new(built: Vec<SniDnatCluster>) -> Self {
        let listener = listener(built.iter().map(|c| &c.filter_chain));
        let (clusters, assignments) = built.into_iter().map(|c| (c.cluster, c.assignment)).unzip();
        GatewayResources { listener, clusters, assignments }
    }
}

/// The `0.0.0.0_15443` listener with these filter chains (istiod sorts them by server name).
pub fn listener<'a>(chains: impl IntoIterator<Item = &'a listener::FilterChain>) -> listener::Listener {
    let mut filter_chains: Vec<listener::FilterChain> = chains.into_iter().cloned().collect();
    filter_chains.sort_by(|a, b| a.name.cmp(&b.name));
    listener::Listener {
        name: LISTENER_NAME.to_owned(),
        address: Some(socket_address("0.0.0.0", LISTENER_PORT)),
        traffic_direction: core::TrafficDirection::Outbound as i32,
        listener_filters: vec![listener::ListenerFilter {
            name: TLS_INSPECTOR_FILTER.to_owned(),
            config_type: Some(listener::listener_filter::ConfigType::TypedConfig(pack(&TlsInspector {
                initial_read_buffer_size: Some(protobuf::UInt32Value { value: 512 }),
                ..Default::default()
            }))),
            ..Default::default()
        }],
        filter_chains,
        ..Default::default()
    }
}

/// Packs a message into an `Any`.
pub fn pack<M: Message + Name>(message: &M) -> Any {
    Any { type_url: M::type_url(), value: message.encode_to_vec() }
}

pub fn socket_address(ip: &str, port: u16) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_owned(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// A compact endpoint, checked.
struct ParsedEndpoint<'a> {
    compact: &'a CompactEndpoint,
    address: SocketAddr,
    locality: Locality,
    labels: BTreeMap<String, String>,
    health: core::HealthStatus,
}

impl<'a> ParsedEndpoint<'a> {
    fn new(compact: &'a CompactEndpoint, index: usize, errors: &mut Vec<BuildError>) -> Option<Self> {
        let mut problem = |name: &str, problem: String| {
            errors.push(BuildError { field: format!("endpoints[{index}].{name}"), problem });
        };
        let address = match compact.address.parse::<SocketAddr>() {
            Ok(address) if address.port() == 0 => {
                problem("address", format!("{:?} has port 0", compact.address));
                None
            }
            Ok(address) => Some(address),
            Err(_) => {
                problem("address", format!("{:?} is not an ip:port socket address", compact.address));
                None
            }
        };
        let locality =
            compact.locality.parse::<Locality>().map_err(|e: LocalityError| problem("locality", e.to_string())).ok();
        let health = match CompactHealth::try_from(compact.health) {
            Ok(CompactHealth::Unknown | CompactHealth::Healthy) => Some(core::HealthStatus::Healthy),
            Ok(CompactHealth::Unhealthy) => Some(core::HealthStatus::Unhealthy),
            Ok(CompactHealth::Draining) => Some(core::HealthStatus::Draining),
            Err(_) => {
                problem("health", format!("{} is not a known health status", compact.health));
                None
            }
        };
        let (address, locality, health) = (address?, locality?, health?);
        let mut labels = compact.labels.clone();
        locality.augment(&mut labels);
        Some(ParsedEndpoint { compact, address, locality, labels, health })
    }

    fn lb(&self) -> LbEndpoint<'_> {
        LbEndpoint { locality: &self.locality, labels: &self.labels, weight: self.compact.weight.max(1) }
    }
}

fn assignment(
    name: &str,
    endpoints: &[ParsedEndpoint<'_>],
    arrangement: &Arrangement,
    namespace: &str,
) -> endpoint::ClusterLoadAssignment {
    let groups = arrangement
        .groups
        .iter()
        .map(|group| endpoint::LocalityLbEndpoints {
            locality: Some(envoy_locality(&group.locality)),
            priority: group.priority,
            load_balancing_weight: Some(protobuf::UInt32Value { value: group.weight }),
            lb_endpoints: group.members.iter().map(|i| lb_endpoint(&endpoints[*i], namespace)).collect(),
            ..Default::default()
        })
        .collect();
    endpoint::ClusterLoadAssignment { cluster_name: name.to_owned(), endpoints: groups, ..Default::default() }
}

pub fn envoy_locality(locality: &Locality) -> core::Locality {
    core::Locality { region: locality.region.clone(), zone: locality.zone.clone(), sub_zone: locality.subzone.clone() }
}

fn lb_endpoint(e: &ParsedEndpoint<'_>, namespace: &str) -> endpoint::LbEndpoint {
    let mut filter_metadata = HashMap::new();
    if e.labels.get(TLS_MODE_LABEL).is_some_and(|mode| mode == "istio") {
        filter_metadata.insert(TRANSPORT_SOCKET_MATCH.to_owned(), string_struct([("tlsMode", "istio")]));
    }
    let workload = WorkloadMetadata::from_labels(&e.compact.workload_name, namespace, &e.labels, &e.compact.cluster_id);
    filter_metadata.insert(ISTIO_METADATA.to_owned(), string_struct([(WORKLOAD_KEY, workload.to_string().as_str())]));
    endpoint::LbEndpoint {
        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(endpoint::Endpoint {
            address: Some(socket_address(&e.address.ip().to_string(), e.address.port())),
            ..Default::default()
        })),
        health_status: e.health as i32,
        load_balancing_weight: Some(protobuf::UInt32Value { value: e.compact.weight.max(1) }),
        metadata: Some(core::Metadata { filter_metadata, ..Default::default() }),
    }
}

fn string_struct<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value { kind: Some(Kind::StringValue(v.to_owned())) }))
            .collect(),
    }
}

/// Istio's `istio.workload` endpoint metadata, `name;namespace;canonical-service;revision;cluster`: what the
/// gateway's metrics say about the destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadMetadata {
    pub name: String,
    pub namespace: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl WorkloadMetadata {
    /// As istiod derives it from the pod: the canonical service and revision from their labels, else `app` and
    /// `version` (and their `app.kubernetes.io` forms), else the workload name and `latest`.
    pub fn from_labels(name: &str, namespace: &str, labels: &BTreeMap<String, String>, cluster: &str) -> Self {
        let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).filter(|v| !v.is_empty())).cloned();
        WorkloadMetadata {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            canonical_service: first(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
                .unwrap_or_else(|| name.to_owned()),
            canonical_revision: first(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"])
                .unwrap_or_else(|| "latest".to_owned()),
            cluster: cluster.to_owned(),
        }
    }

    /// Parses the metadata string; missing trailing fields are empty.
    pub fn parse(text: &str) -> Self {
        let mut parts = text.split(';').map(str::to_owned);
        let mut next = || parts.next().unwrap_or_default();
        WorkloadMetadata {
            name: next(),
            namespace: next(),
            canonical_service: next(),
            canonical_revision: next(),
            cluster: next(),
        }
    }
}

impl std::fmt::Display for WorkloadMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let WorkloadMetadata { name, namespace, canonical_service, canonical_revision, cluster } = self;
        write!(f, "{name};{namespace};{canonical_service};{canonical_revision};{cluster}")
    }
}

/// The Service name and namespace of `host`: as configured (non-empty), else from `<name>.<namespace>.svc...`, as
/// the gateway's metrics label them.
pub fn service_identity(host: &str, configured_name: &str, configured_namespace: &str) -> (String, String) {
    let mut labels = host.split('.');
    let name = labels.next().unwrap_or_default();
    let namespace = labels.next().unwrap_or_default();
    let pick = |configured: &str, derived: &str| {
        if configured.is_empty() { derived.to_owned() } else { configured.to_owned() }
    };
    (pick(configured_name, name), pick(configured_namespace, namespace))
}

fn envoy_cluster(
    name: &str,
    host: &str,
    service_name: &str,
    namespace: &str,
    policy: &ClusterPolicy,
    arrangement: &Arrangement,
    mesh: &MeshDefaults,
) -> cluster::Cluster {
    let max = |value: u32| Some(protobuf::UInt32Value { value });
    let service = Value {
        kind: Some(Kind::StructValue(string_struct([
            ("host", host),
            ("name", service_name),
            ("namespace", namespace),
        ]))),
    };
    let services = Value { kind: Some(Kind::ListValue(protobuf::ListValue { values: vec![service] })) };
    let istio = Struct { fields: HashMap::from([("services".to_owned(), services)]) };
    let locality_config = arrangement.locality_weighted.then(|| {
        cluster::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(Default::default())
    });
    let common_lb_config = (policy.healthy_panic_threshold.is_some() || locality_config.is_some()).then(|| {
        cluster::cluster::CommonLbConfig {
            healthy_panic_threshold: policy.healthy_panic_threshold.map(percent),
            locality_config_specifier: locality_config,
            ..Default::default()
        }
    });
    cluster::Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            service_name: name.to_owned(),
            eds_config: Some(core::ConfigSource {
                resource_api_version: core::ApiVersion::V3 as i32,
                config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(Default::default())),
                ..Default::default()
            }),
        }),
        connect_timeout: Some(proto_duration(policy.connect_timeout.unwrap_or(mesh.connect_timeout))),
        lb_policy: policy.lb_policy as i32,
        lb_config: policy.lb_config.clone(),
        circuit_breakers: Some(cluster::CircuitBreakers {
            thresholds: vec![cluster::circuit_breakers::Thresholds {
                max_connections: max(policy.max_connections.unwrap_or(u32::MAX)),
                max_pending_requests: max(u32::MAX),
                max_requests: max(u32::MAX),
                max_retries: max(u32::MAX),
                track_remaining: true,
                ..Default::default()
            }],
            ..Default::default()
        }),
        outlier_detection: policy.outlier_detection.clone(),
        common_lb_config,
        upstream_connection_options: policy.tcp_keepalive.map(|tcp_keepalive| cluster::UpstreamConnectionOptions {
            tcp_keepalive: Some(tcp_keepalive),
            ..Default::default()
        }),
        metadata: Some(core::Metadata {
            filter_metadata: HashMap::from([(ISTIO_METADATA.to_owned(), istio)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn filter_chain(name: &str, policy: &ClusterPolicy) -> listener::FilterChain {
    let tcp_proxy = tcp_proxy::TcpProxy {
        stat_prefix: name.to_owned(),
        cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(name.to_owned())),
        idle_timeout: policy.idle_timeout.map(proto_duration),
        max_downstream_connection_duration: policy.max_connection_duration.map(proto_duration),
        hash_policy: if policy.hash_source_ip {
            vec![HashPolicy { policy_specifier: Some(hash_policy::PolicySpecifier::SourceIp(Default::default())) }]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    listener::FilterChain {
        name: name.to_owned(),
        filter_chain_match: Some(listener::FilterChainMatch {
            server_names: vec![name.to_owned()],
            application_protocols: ISTIO_MTLS_ALPNS
                .iter()
                .map(|alpn| String::from_utf8_lossy(alpn).into_owned())
                .collect(),
            ..Default::default()
        }),
        filters: vec![listener::Filter {
            name: TCP_PROXY_FILTER.to_owned(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(pack(&tcp_proxy))),
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
