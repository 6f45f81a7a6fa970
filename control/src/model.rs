//! The mesh as crossgate-control sees it, whatever the source: every source (Kubernetes watchers, the mesh
//! file) produces [`ClusterModel`]s with Istio's per-endpoint rules already applied (network, locality,
//! readiness, mTLS capability); the views turn a [`MeshModel`] into the resources one gateway serves.
//! Pure data: no I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use crossgate_proto::TrafficPolicy;

/// Every known cluster, by cluster ID. Cheap to clone: clusters are shared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshModel {
    pub clusters: BTreeMap<String, Arc<ClusterModel>>,
}

impl MeshModel {
    /// Takes from `previous` every cluster and service equal to this mesh's, for a source that builds its
    /// model afresh; returns whether the two meshes are equal.
    pub fn share_unchanged(&mut self, previous: &MeshModel) -> bool {
        let mut equal = self.clusters.len() == previous.clusters.len();
        for (id, cluster) in &mut self.clusters {
            match previous.clusters.get(id) {
                Some(before) if Arc::make_mut(cluster).share_unchanged(before) => *cluster = Arc::clone(before),
                _ => equal = false,
            }
        }
        equal
    }
}

/// One Kubernetes cluster (or one `clusters[]` entry of the mesh file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterModel {
    /// Istio's cluster ID (`CLUSTER_ID`; the data key of a remote secret).
    pub id: String,
    /// The cluster's network: the `topology.istio.io/network` label of its system namespace (or the mesh
    /// file's `network`). Endpoints without a network of their own are on it; empty when unknown.
    pub network: String,
    /// Shared between the versions of the cluster's model: a source replaces the services that changed and
    /// keeps the others' `Arc`s, so that a change costs in proportion to the services it touches (see
    /// [`ClusterModel::share_unchanged`]).
    pub services: Vec<Arc<ServiceModel>>,
    /// The DestinationRules defined in this cluster: what a gateway running in this cluster applies.
    pub destination_rules: Vec<DestinationRuleModel>,
}

impl ClusterModel {
    /// Takes from `previous` the `Arc` of every service equal to one of this cluster's (a hostname is defined
    /// once in a cluster), so that consumers compare what is shared by pointer; returns whether the two
    /// clusters are equal.
    pub fn share_unchanged(&mut self, previous: &ClusterModel) -> bool {
        let before: BTreeMap<&str, &Arc<ServiceModel>> =
            previous.services.iter().map(|service| (service.hostname.as_str(), service)).collect();
        for service in &mut self.services {
            if let Some(kept) = before.get(service.hostname.as_str()).filter(|kept| ****kept == **service) {
                *service = Arc::clone(kept);
            }
        }
        self.id == previous.id
            && self.network == previous.network
            && self.services.len() == previous.services.len()
            && self.services.iter().zip(&previous.services).all(|(a, b)| Arc::ptr_eq(a, b))
            && self.destination_rules == previous.destination_rules
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceModel {
    pub name: String,
    pub namespace: String,
    /// The FQDN, `<name>.<namespace>.svc.<domain>`.
    pub hostname: String,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<EndpointModel>,
    /// `spec.publishNotReadyAddresses`: not-ready endpoints are kept.
    pub publish_not_ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    /// The Service port: the PORT of the SNI key.
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    /// Skipped by sni-dnat, as Istio does.
    Udp,
    Sctp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointModel {
    pub address: IpAddr,
    /// Service port -> the port the endpoint listens on (the target port). A Service port missing here is
    /// not served by this endpoint.
    pub target_ports: BTreeMap<u16, u16>,
    /// The pod's labels (`security.istio.io/tlsMode`, `app`, `version`, subset labels...).
    pub labels: BTreeMap<String, String>,
    /// `region/zone/subzone`, from the pod label `topology.istio.io/locality`, else the node's topology labels.
    pub locality: String,
    /// From the pod label `topology.istio.io/network`, else the cluster's network; empty when unknown.
    pub network: String,
    /// EndpointSlice `conditions.ready`.
    pub ready: bool,
    /// EndpointSlice `conditions.terminating` while still serving: keeps its tunnels, takes no new ones.
    pub terminating: bool,
    /// The pod name (destination_workload is derived from it by the views: the owner's name when known).
    pub workload_name: String,
    pub node_name: String,
}

/// The parts of an Istio DestinationRule that apply to a gateway's sni-dnat clusters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestinationRuleModel {
    pub name: String,
    pub namespace: String,
    /// `spec.host`, as written (short names are relative to `namespace`).
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<SubsetModel>,
    /// `spec.exportTo`; empty means exported everywhere.
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubsetModel {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}
