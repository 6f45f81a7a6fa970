//! What one gateway sees: the sni-dnat clusters istiod would build for an `istio-eastwestgateway`
//! (`buildOutboundSniDnatClusters`) with the endpoints its EDS would send (`filterIstioEndpoint`), as
//! crossgate resources, plus the diff against what the gateway already holds.

mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crossgate_istio::labels::{
    CLUSTER_LABEL, HOSTNAME_LABEL, NETWORK_LABEL, REGION_LABEL, SUBZONE_LABEL, TLS_MODE_LABEL, ZONE_LABEL,
};
use crossgate_istio::node::GatewayNode;
use crossgate_proto::{Cluster, Endpoint, endpoint::Health};

use rules::{RuleLookup, merge_policy};

use crate::model::{ClusterModel, EndpointModel, MeshModel, Protocol, ServiceModel};

/// The settings of the control plane a view depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewOptions {
    /// The cluster DNS domain (istiod `DOMAIN_SUFFIX`).
    pub domain_suffix: String,
    /// The namespace the gateways run in: whose DestinationRules they see first, and the one `exportTo`
    /// lists are checked against.
    pub gateway_namespace: String,
    /// meshConfig `rootNamespace`: its exported DestinationRules apply mesh-wide.
    pub root_namespace: String,
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            domain_suffix: "cluster.local".to_owned(),
            gateway_namespace: "istio-system".to_owned(),
            root_namespace: "istio-system".to_owned(),
        }
    }
}

/// The clusters one gateway may route to, by name: one per service hostname and non-UDP port, and one per
/// subset of the DestinationRule the gateway sees for it. A hostname defined in several clusters is one
/// service, its endpoints merged. Clusters without endpoints are kept, so that the gateway refuses their
/// connections with UH, as Envoy does.
pub fn gateway_view(mesh: &MeshModel, gateway: &GatewayNode, options: &ViewOptions) -> BTreeMap<String, Cluster> {
    GatewayView::default().rebuild(mesh, gateway, options)
}

/// What one gateway's view keeps from one mesh version to the next, so that a change recomputes only the services
/// it touches (see [`changed_hosts`]): the names of each service's clusters, not the clusters (their resources,
/// built from them, are what the gateway is served; a copy here would cost as much again).
#[derive(Debug, Default)]
pub struct GatewayView {
    /// Each service hostname's cluster names.
    by_host: BTreeMap<String, Vec<String>>,
    /// The DestinationRules of the gateway's cluster, indexed when the view is computed whole: a version whose
    /// changes are known changed no cluster's rules.
    rules: RuleLookup,
}

impl GatewayView {
    /// Computes the whole view.
    pub fn rebuild(
        &mut self,
        mesh: &MeshModel,
        gateway: &GatewayNode,
        options: &ViewOptions,
    ) -> BTreeMap<String, Cluster> {
        self.rules = RuleLookup::new(own_rules(mesh, gateway), options);
        let mut services: BTreeMap<&str, Vec<(&ClusterModel, &ServiceModel)>> = BTreeMap::new();
        for cluster in mesh.clusters.values() {
            for service in &cluster.services {
                services.entry(&service.hostname).or_default().push((cluster, service));
            }
        }
        let mut clusters = BTreeMap::new();
        self.by_host.clear();
        for (host, instances) in services {
            let names = add_service(&mut clusters, host, &instances, gateway, &self.rules, options);
            self.by_host.insert(host.to_owned(), names);
        }
        clusters
    }

    /// Recomputes the clusters of the services `hosts` only, found through `services` (the index of `mesh`):
    /// returns each of their clusters, as it is now or `None` when it went away (whether or not it changed). The
    /// mesh's other services and every cluster's DestinationRules must be as when the view was last computed.
    pub fn update(
        &mut self,
        mesh: &MeshModel,
        services: &ServiceIndex,
        gateway: &GatewayNode,
        options: &ViewOptions,
        hosts: &BTreeSet<String>,
    ) -> BTreeMap<String, Option<Cluster>> {
        let mut clusters = BTreeMap::new();
        for host in hosts {
            let before = self.by_host.remove(host).unwrap_or_default();
            let instances = services.instances(mesh, host);
            let mut now = BTreeMap::new();
            if !instances.is_empty() {
                let names = add_service(&mut now, host, &instances, gateway, &self.rules, options);
                self.by_host.insert(host.clone(), names);
            }
            clusters.extend(before.into_iter().filter(|name| !now.contains_key(name)).map(|name| (name, None)));
            clusters.extend(now.into_iter().map(|(name, cluster)| (name, Some(cluster))));
        }
        clusters
    }
}

/// The DestinationRules a gateway applies: those of its own cluster.
fn own_rules<'m>(mesh: &'m MeshModel, gateway: &GatewayNode) -> &'m [crate::model::DestinationRuleModel] {
    mesh.clusters.get(&gateway.cluster_id).map_or(&[][..], |c| c.destination_rules.as_slice())
}

/// Where each service hostname is defined in a mesh: cluster ID -> hostname -> places in the cluster's
/// `services`. Carried from one mesh version to the next (see [`ServiceIndex::next`]), so that a view finds the
/// instances of a changed service without a scan of every service.
#[derive(Debug, Default)]
pub struct ServiceIndex {
    clusters: BTreeMap<String, Arc<BTreeMap<String, Vec<usize>>>>,
}

impl ServiceIndex {
    pub fn new(mesh: &MeshModel) -> Self {
        ServiceIndex { clusters: mesh.clusters.iter().map(|(id, c)| (id.clone(), Arc::new(places(c)))).collect() }
    }

    /// The index of `next`, this being the index of `previous`. A cluster whose services kept their places
    /// (the usual change: some services replaced) keeps its index: that costs a pointer comparison per service.
    pub fn next(&self, previous: &MeshModel, next: &MeshModel) -> Self {
        let clusters = next.clusters.iter().map(|(id, cluster)| {
            let kept = previous.clusters.get(id).filter(|before| same_places(before, cluster));
            let index = match kept.and_then(|_| self.clusters.get(id)) {
                Some(index) => Arc::clone(index),
                None => Arc::new(places(cluster)),
            };
            (id.clone(), index)
        });
        ServiceIndex { clusters: clusters.collect() }
    }

    /// Every definition of the service `host` in `mesh`, the mesh this index is of.
    pub fn instances<'m>(&self, mesh: &'m MeshModel, host: &str) -> Vec<(&'m ClusterModel, &'m ServiceModel)> {
        let mut instances = Vec::new();
        for (id, cluster) in &mesh.clusters {
            let places = self.clusters.get(id).and_then(|index| index.get(host)).into_iter().flatten();
            let services = places.filter_map(|at| cluster.services.get(*at)).filter(|s| s.hostname == host);
            instances.extend(services.map(|service| (&**cluster, &**service)));
        }
        instances
    }
}

fn places(cluster: &ClusterModel) -> BTreeMap<String, Vec<usize>> {
    let mut places: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (at, service) in cluster.services.iter().enumerate() {
        places.entry(service.hostname.clone()).or_default().push(at);
    }
    places
}

fn same_places(before: &Arc<ClusterModel>, after: &Arc<ClusterModel>) -> bool {
    Arc::ptr_eq(before, after)
        || (before.services.len() == after.services.len()
            && before.services.iter().zip(&after.services).all(|(a, b)| Arc::ptr_eq(a, b) || a.hostname == b.hostname))
}

/// The service hostnames whose clusters may differ between two meshes, in any gateway's view; `None` when
/// every view must be recomputed (clusters came or went, or a cluster's network or DestinationRules changed).
/// What a source shares unchanged costs a pointer comparison: a cluster (the same `Arc`), or a service of a
/// changed cluster. Only the services it replaced are compared.
pub fn changed_hosts(previous: &MeshModel, next: &MeshModel) -> Option<BTreeSet<String>> {
    if previous.clusters.len() != next.clusters.len() {
        return None;
    }
    let mut hosts = BTreeSet::new();
    for (id, cluster) in &next.clusters {
        let before = previous.clusters.get(id)?;
        if Arc::ptr_eq(before, cluster) {
            continue;
        }
        if before.network != cluster.network || before.destination_rules != cluster.destination_rules {
            return None;
        }
        changed_services(before, cluster, &mut hosts);
    }
    Some(hosts)
}

/// Adds the hostnames whose services differ between two versions of a cluster to `hosts`.
fn changed_services(before: &ClusterModel, after: &ClusterModel, hosts: &mut BTreeSet<String>) {
    let same = |a: &Arc<ServiceModel>, b: &Arc<ServiceModel>| Arc::ptr_eq(a, b) || a == b;
    if before.services.len() == after.services.len() {
        // The usual change: the services kept their places and a few were replaced.
        let mut places_kept = true;
        for (a, b) in before.services.iter().zip(&after.services) {
            if a.hostname != b.hostname && !Arc::ptr_eq(a, b) {
                places_kept = false;
                break;
            }
            if !same(a, b) {
                hosts.insert(b.hostname.clone());
            }
        }
        if places_kept {
            return;
        }
    }
    // Services came, went or moved: compared by hostname.
    let by_host = |cluster: &'_ ClusterModel| {
        let mut map: BTreeMap<String, Vec<Arc<ServiceModel>>> = BTreeMap::new();
        for service in &cluster.services {
            map.entry(service.hostname.clone()).or_default().push(Arc::clone(service));
        }
        map
    };
    let (old, new) = (by_host(before), by_host(after));
    for host in old.keys().chain(new.keys()) {
        let unchanged = match (old.get(host), new.get(host)) {
            (Some(a), Some(b)) => a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b)),
            _ => false,
        };
        if !unchanged {
            hosts.insert(host.clone());
        }
    }
}

/// Adds the clusters of one service hostname, defined in one or more clusters of the mesh; returns their names.
fn add_service(
    view: &mut BTreeMap<String, Cluster>,
    host: &str,
    instances: &[(&ClusterModel, &ServiceModel)],
    gateway: &GatewayNode,
    rules: &RuleLookup,
    options: &ViewOptions,
) -> Vec<String> {
    let (_, service) = instances[0];
    let mut ports: Vec<u16> =
        instances.iter().flat_map(|(_, s)| &s.ports).filter(|p| p.protocol != Protocol::Udp).map(|p| p.port).collect();
    ports.sort_unstable();
    ports.dedup();
    let cluster_local = is_cluster_local(host, &options.domain_suffix);
    let mut candidates: Vec<Candidate> = instances
        .iter()
        .filter(|(cluster, _)| !cluster_local || cluster.id == gateway.cluster_id)
        .flat_map(|&(cluster, service)| {
            service.endpoints.iter().filter_map(move |e| Candidate::new(e, cluster, service, gateway))
        })
        .collect();
    candidates.sort_by(|a, b| a.order().cmp(&b.order()));
    let rule = rules.lookup(host, &service.namespace);
    let default_subset = ("", None, rule.and_then(|r| r.traffic_policy.clone()));
    let subsets = rule.into_iter().flat_map(|rule| {
        rule.subsets.iter().map(|s| {
            (s.name.as_str(), Some(&s.labels), merge_policy(rule.traffic_policy.as_ref(), s.traffic_policy.as_ref()))
        })
    });
    let mut names = Vec::new();
    for (subset, labels, traffic_policy) in std::iter::once(default_subset).chain(subsets) {
        for &port in &ports {
            let endpoints = candidates
                .iter()
                .filter(|c| labels.is_none_or(|wanted| wanted.iter().all(|(k, v)| c.labels.get(k) == Some(v))))
                .filter_map(|c| c.endpoint_for(port))
                .collect();
            let name = format!("outbound_.{port}_.{subset}_.{host}");
            let cluster = Cluster {
                name: name.clone(),
                service_name: service.name.clone(),
                service_namespace: service.namespace.clone(),
                traffic_policy: traffic_policy.clone(),
                endpoints,
            };
            names.push(name.clone());
            view.insert(name, cluster);
        }
    }
    names
}

/// An endpoint of a service that passed the filters every cluster of it applies.
struct Candidate<'a> {
    endpoint: &'a EndpointModel,
    cluster: &'a ClusterModel,
    health: Health,
    /// The pod labels augmented as Istio does: what subsets select on and failoverPriority compares.
    labels: BTreeMap<String, String>,
    workload_name: String,
}

impl<'a> Candidate<'a> {
    /// The endpoint if the gateway may see it: on its network view, mTLS-capable, and ready (or draining, or
    /// of a service that publishes not-ready addresses).
    fn new(
        endpoint: &'a EndpointModel,
        cluster: &'a ClusterModel,
        service: &ServiceModel,
        gateway: &GatewayNode,
    ) -> Option<Self> {
        let view = &gateway.requested_network_view;
        // Istio always adds the undefined network to a requested view.
        let on_view = view.is_empty() || endpoint.network.is_empty() || view.contains(&endpoint.network);
        let mtls = endpoint.labels.get(TLS_MODE_LABEL).is_some_and(|mode| mode == "istio");
        let health = if endpoint.ready {
            Health::Healthy
        } else if endpoint.terminating {
            Health::Draining
        } else if service.publish_not_ready {
            Health::Healthy
        } else {
            return None;
        };
        (on_view && mtls).then(|| Candidate {
            endpoint,
            cluster,
            health,
            labels: augment_labels(endpoint, &cluster.id),
            workload_name: workload_name(&endpoint.workload_name, &endpoint.labels),
        })
    }

    /// Endpoints are sent in address order; the rest of the key only makes the order total.
    fn order(&self) -> (IpAddr, &str, &BTreeMap<u16, u16>, &str) {
        (self.endpoint.address, &self.cluster.id, &self.endpoint.target_ports, &self.endpoint.workload_name)
    }

    /// The resource for one Service port, if the endpoint serves it.
    fn endpoint_for(&self, port: u16) -> Option<Endpoint> {
        let target_port = *self.endpoint.target_ports.get(&port)?;
        Some(Endpoint {
            address: SocketAddr::new(self.endpoint.address, target_port).to_string(),
            locality: self.endpoint.locality.clone(),
            weight: 1,
            labels: self.labels.clone(),
            health: self.health as i32,
            cluster_id: self.cluster.id.clone(),
            workload_name: self.workload_name.clone(),
        })
    }
}

/// Istio's `AugmentLabels`: the pod labels plus the topology labels, each only when known; a pod's own
/// network label is kept.
fn augment_labels(endpoint: &EndpointModel, cluster_id: &str) -> BTreeMap<String, String> {
    let mut labels = endpoint.labels.clone();
    let mut parts = endpoint.locality.split('/');
    let (region, zone, subzone) = (parts.next(), parts.next(), parts.next());
    let topology = [
        (REGION_LABEL, region.unwrap_or_default()),
        (ZONE_LABEL, zone.unwrap_or_default()),
        (SUBZONE_LABEL, subzone.unwrap_or_default()),
        (CLUSTER_LABEL, cluster_id),
        (HOSTNAME_LABEL, &endpoint.node_name),
    ];
    for (key, value) in topology.into_iter().filter(|(_, value)| !value.is_empty()) {
        labels.insert(key.to_owned(), value.to_owned());
    }
    if !endpoint.network.is_empty() {
        labels.entry(NETWORK_LABEL.to_owned()).or_insert_with(|| endpoint.network.clone());
    }
    labels
}

/// Istio's destination_workload is the pod's owner (`GetDeployMetaFromPod`). The model carries the pod name
/// only, so the owner is recovered from the names and labels its controller gives the pod.
fn workload_name(pod: &str, labels: &BTreeMap<String, String>) -> String {
    // A Deployment's pod is `<deployment>-<pod-template-hash>-<suffix>`.
    if let Some(hash) = labels.get("pod-template-hash")
        && let Some(at) = pod.rfind(&format!("-{hash}-"))
    {
        return pod[..at].to_owned();
    }
    // A StatefulSet's pod is `<statefulset>-<ordinal>`.
    if labels.get("statefulset.kubernetes.io/pod-name").is_some_and(|name| name == pod)
        && let Some((set, ordinal)) = pod.rsplit_once('-')
        && ordinal.parse::<u32>().is_ok()
    {
        return set.to_owned();
    }
    pod.to_owned()
}

/// Istio's default cluster-local hosts (`meshConfig.serviceSettings`): only the gateway's own cluster's
/// endpoints are used for them.
fn is_cluster_local(host: &str, domain: &str) -> bool {
    host.strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix(".svc."))
        .is_some_and(|service| service == "kubernetes.default" || service.ends_with(".kube-system"))
}

#[cfg(test)]
mod tests;
