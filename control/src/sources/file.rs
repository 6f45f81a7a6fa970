//! The mesh file: a whole mesh written by hand (clusters, their networks, services, endpoints and
//! DestinationRules), the default source for local runs and experiments. It is followed while the control
//! service runs: its directory is watched (Kubernetes updates a mounted ConfigMap by swapping a symlink
//! there) and a slow poll backs the watch up; a refused version is logged and the last good one keeps
//! serving.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossgate_files::FileWatch;
use crossgate_proto::TrafficPolicy;
use serde::Deserialize;
use tokio::sync::watch as channel;

use crate::model::{
    ClusterModel, DestinationRuleModel, EndpointModel, MeshModel, Protocol, ServiceModel, ServicePort, SubsetModel,
};

/// The mesh the control service serves when no source is given (`deploy/local/mesh.yaml`).
pub const EMBEDDED_MESH: &str = include_str!("../../../deploy/local/mesh.yaml");

const NETWORK_LABEL: &str = "topology.istio.io/network";

/// Why a mesh file was refused.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("not a mesh file: {0}")]
    Syntax(#[from] serde_yaml_ng::Error),
    #[error("{} problem(s): {}", .0.len(), .0.join("; "))]
    Invalid(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read mesh file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("mesh file {path} was refused, fix it and save again: {source}")]
    Refused { path: PathBuf, source: MeshError },
    #[error("cannot watch mesh file {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
}

/// A parsed and validated mesh file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshFile {
    clusters: Vec<ClusterEntry>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterEntry {
    name: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    services: Vec<ServiceEntry>,
    #[serde(default)]
    destination_rules: Vec<DestinationRuleEntry>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: String,
    namespace: String,
    ports: Vec<PortEntry>,
    #[serde(default)]
    endpoints: Vec<EndpointEntry>,
    #[serde(default)]
    publish_not_ready: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortEntry {
    #[serde(default)]
    name: String,
    // Wider than u16 so that an out-of-range port is reported with its location, like every other problem.
    port: i64,
    /// Defaults to `port`, as in Kubernetes.
    target_port: Option<i64>,
    #[serde(default)]
    protocol: ProtocolEntry,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
enum ProtocolEntry {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointEntry {
    address: String,
    /// Service port -> the port this endpoint listens on, where it differs from the service's target port
    /// (several endpoints on one address, as in a mesh on one machine).
    #[serde(default)]
    target_ports: BTreeMap<i64, i64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    locality: String,
    /// Defaults to the pod label `topology.istio.io/network`, else the cluster's network.
    network: Option<String>,
    #[serde(default = "yes")]
    ready: bool,
    #[serde(default)]
    terminating: bool,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    node: String,
}

fn yes() -> bool {
    true
}

/// A DestinationRule, with Istio's field names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DestinationRuleEntry {
    name: String,
    namespace: String,
    host: String,
    traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    subsets: Vec<SubsetEntry>,
    #[serde(default)]
    export_to: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubsetEntry {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    traffic_policy: Option<TrafficPolicy>,
}

impl MeshFile {
    /// Parses and validates a mesh file's text; every problem is reported, each with its location.
    pub fn parse(text: &str) -> Result<MeshFile, MeshError> {
        let file: MeshFile = serde_yaml_ng::from_str(text)?;
        let problems = file.problems();
        if problems.is_empty() { Ok(file) } else { Err(MeshError::Invalid(problems)) }
    }

    pub fn read(path: &Path) -> Result<MeshFile, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.to_owned(), source })?;
        MeshFile::parse(&text).map_err(|source| FileError::Refused { path: path.to_owned(), source })
    }

    /// The mesh model, with hostnames `<name>.<namespace>.svc.<domain>`.
    pub fn model(&self, domain: &str) -> MeshModel {
        let clusters = self.clusters.iter().map(|cluster| (cluster.name.clone(), Arc::new(cluster.model(domain))));
        MeshModel { clusters: clusters.collect() }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Problems::default();
        let mut names = BTreeSet::new();
        for (i, cluster) in self.clusters.iter().enumerate() {
            let at = format!("clusters[{i}] {:?}", cluster.name);
            if cluster.name.is_empty() {
                problems.push(&at, "name", "is empty");
            } else if !names.insert(&cluster.name) {
                problems.push(&at, "name", "is defined twice");
            }
            cluster.check(&at, &mut problems);
        }
        problems.0
    }
}

/// Validation problems, each `location: field: problem`.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, at: &str, field: &str, problem: impl std::fmt::Display) {
        self.0.push(format!("{at}: {field}: {problem}"));
    }

    fn dns_label(&mut self, at: &str, field: &str, value: &str) {
        if !is_dns_label(value) {
            self.push(at, field, format_args!("{value:?} is not a DNS-1123 label (lower case letters, digits, '-')"));
        }
    }

    fn port(&mut self, at: &str, field: &str, port: i64) {
        if u16::try_from(port).is_err() || port == 0 {
            self.push(at, field, format_args!("{port} is not a port from 1 to 65535"));
        }
    }
}

fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

impl ClusterEntry {
    fn check(&self, at: &str, problems: &mut Problems) {
        let mut services = BTreeSet::new();
        for (j, service) in self.services.iter().enumerate() {
            let at = format!("{at}: services[{j}] {:?}", service.name);
            if !services.insert((&service.namespace, &service.name)) {
                problems.push(&at, "name", format_args!("is defined twice in namespace {:?}", service.namespace));
            }
            service.check(&at, problems);
        }
        let mut rules = BTreeSet::new();
        for (j, rule) in self.destination_rules.iter().enumerate() {
            let at = format!("{at}: destination_rules[{j}] {:?}", rule.name);
            if !rules.insert((&rule.namespace, &rule.name)) {
                problems.push(&at, "name", format_args!("is defined twice in namespace {:?}", rule.namespace));
            }
            rule.check(&at, problems);
        }
    }

    fn model(&self, domain: &str) -> ClusterModel {
        ClusterModel {
            id: self.name.clone(),
            network: self.network.clone(),
            services: self.services.iter().map(|s| Arc::new(s.model(domain, &self.network))).collect(),
            destination_rules: self.destination_rules.iter().map(DestinationRuleEntry::model).collect(),
        }
    }
}

impl ServiceEntry {
    fn check(&self, at: &str, problems: &mut Problems) {
        problems.dns_label(at, "name", &self.name);
        problems.dns_label(at, "namespace", &self.namespace);
        if self.ports.is_empty() {
            problems.push(at, "ports", "is empty (a service needs at least one port)");
        }
        let mut ports = BTreeSet::new();
        for (k, port) in self.ports.iter().enumerate() {
            problems.port(at, &format!("ports[{k}].port"), port.port);
            if let Some(target_port) = port.target_port {
                problems.port(at, &format!("ports[{k}].target_port"), target_port);
            }
            if !ports.insert(port.port) {
                problems.push(at, &format!("ports[{k}].port"), format_args!("{} is listed twice", port.port));
            }
        }
        for (k, endpoint) in self.endpoints.iter().enumerate() {
            let field = |name: &str| format!("endpoints[{k}].{name}");
            if endpoint.address.parse::<IpAddr>().is_err() {
                problems.push(at, &field("address"), format_args!("{:?} is not an IP address", endpoint.address));
            }
            if endpoint.locality.split('/').count() > 3 {
                let problem = format_args!("{:?} has more than region/zone/subzone", endpoint.locality);
                problems.push(at, &field("locality"), problem);
            }
            for (&service_port, &target_port) in &endpoint.target_ports {
                let field = field(&format!("target_ports[{service_port}]"));
                if !ports.contains(&service_port) {
                    problems.push(at, &field, format_args!("{service_port} is not a port of the service"));
                }
                problems.port(at, &field, target_port);
            }
            if let (Some(network), Some(label)) = (&endpoint.network, endpoint.labels.get(NETWORK_LABEL))
                && network != label
            {
                let problem = format_args!("{network:?} disagrees with the label {NETWORK_LABEL}={label:?}");
                problems.push(at, &field("network"), problem);
            }
        }
    }

    fn model(&self, domain: &str, cluster_network: &str) -> ServiceModel {
        let ports: Vec<ServicePort> = self
            .ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                port: p.port as u16,
                protocol: match p.protocol {
                    ProtocolEntry::Tcp => Protocol::Tcp,
                    ProtocolEntry::Udp => Protocol::Udp,
                    ProtocolEntry::Sctp => Protocol::Sctp,
                },
            })
            .collect();
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| EndpointModel {
                address: e.address.parse().expect("validated"),
                target_ports: self
                    .ports
                    .iter()
                    .map(|p| {
                        let target = e.target_ports.get(&p.port).copied().or(p.target_port).unwrap_or(p.port);
                        (p.port as u16, target as u16)
                    })
                    .collect(),
                labels: e.labels.clone(),
                locality: e.locality.clone(),
                network: e.network.as_ref().or(e.labels.get(NETWORK_LABEL)).map_or(cluster_network, |n| n).to_owned(),
                ready: e.ready,
                terminating: e.terminating,
                workload_name: e.workload_name.clone(),
                node_name: e.node.clone(),
            })
            .collect();
        ServiceModel {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            hostname: format!("{}.{}.svc.{domain}", self.name, self.namespace),
            ports,
            endpoints,
            publish_not_ready: self.publish_not_ready,
        }
    }
}

impl DestinationRuleEntry {
    fn check(&self, at: &str, problems: &mut Problems) {
        problems.dns_label(at, "name", &self.name);
        problems.dns_label(at, "namespace", &self.namespace);
        if self.host.is_empty() {
            problems.push(at, "host", "is empty");
        }
        let mut names = BTreeSet::new();
        for (k, subset) in self.subsets.iter().enumerate() {
            let field = format!("subsets[{k}].name");
            // The subset name is a field of the SNI key, where `_.` or a dot would break it.
            problems.dns_label(at, &field, &subset.name);
            if !names.insert(&subset.name) {
                problems.push(at, &field, format_args!("{:?} is defined twice", subset.name));
            }
        }
        for (k, namespace) in self.export_to.iter().enumerate() {
            if !matches!(namespace.as_str(), "*" | "." | "~") && !is_dns_label(namespace) {
                problems.push(at, &format!("exportTo[{k}]"), format_args!("{namespace:?} is not *, . or a namespace"));
            }
        }
    }

    fn model(&self) -> DestinationRuleModel {
        DestinationRuleModel {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            host: self.host.clone(),
            traffic_policy: self.traffic_policy.clone(),
            subsets: self
                .subsets
                .iter()
                .map(|s| SubsetModel {
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                    traffic_policy: s.traffic_policy.clone(),
                })
                .collect(),
            export_to: self.export_to.clone(),
        }
    }
}

/// Follows the mesh file at `path`, publishing each new mesh on `updates`, until `shutdown` completes. The
/// first version must load (a bad configuration stops the service at start); later refused versions are
/// logged and the last good one keeps serving.
pub async fn watch(
    path: PathBuf,
    domain: String,
    updates: channel::Sender<MeshModel>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FileError> {
    let watch = FileWatch::start(&path).map_err(|source| FileError::Watch { path: path.clone(), source })?;
    let mut follower = Follower { path, domain, updates, last_read: None };
    follower.reload()?;
    watch.follow("mesh", shutdown, || follower.reload()).await;
    Ok(())
}

struct Follower {
    path: PathBuf,
    domain: String,
    updates: channel::Sender<MeshModel>,
    /// The text of the last version read, good or not, so that an unchanged file is neither re-parsed nor
    /// reported again at every poll.
    last_read: Option<String>,
}

impl Follower {
    /// Reads the file and publishes its mesh if the text and then the mesh changed. Returns whether it did.
    fn reload(&mut self) -> Result<bool, FileError> {
        let path = &self.path;
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.clone(), source })?;
        if self.last_read.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let parsed = MeshFile::parse(&text);
        self.last_read = Some(text);
        let model = parsed.map_err(|source| FileError::Refused { path: path.clone(), source })?.model(&self.domain);
        let mut model = model;
        // What did not change stays shared, so that the debounce compares the changed services alone.
        Ok(self.updates.send_if_modified(|current| {
            let changed = !model.share_unchanged(current);
            if changed {
                *current = model;
            }
            changed
        }))
    }
}

#[cfg(test)]
mod tests;
