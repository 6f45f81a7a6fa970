//! Istio's per-endpoint rules (ISTIO-SEMANTICS.md §2, §4, §6): the reflector stores of one cluster -> its
//! [`ClusterModel`]. Pure: it reads the stores and nothing else.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::ResourceExt;
use kube::api::DynamicObject;
use kube::runtime::reflector::{ObjectRef, Store};

use super::destination_rule::DestinationRuleCache;
use crate::model::{ClusterModel, EndpointModel, Protocol, ServiceModel, ServicePort};

pub(super) const LABEL_NETWORK: &str = "topology.istio.io/network";
const LABEL_LOCALITY: &str = "topology.istio.io/locality";
const LABEL_LEGACY_LOCALITY: &str = "istio-locality";
const LABEL_REGION: &str = "topology.kubernetes.io/region";
const LABEL_REGION_BETA: &str = "failure-domain.beta.kubernetes.io/region";
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
const LABEL_ZONE_BETA: &str = "failure-domain.beta.kubernetes.io/zone";
const LABEL_SUBZONE: &str = "topology.istio.io/subzone";
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Slices mirrored from custom Endpoints: Istio leaves them out (they duplicate what the Endpoints hold).
const MIRRORING_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";

/// What one cluster's watchers hold.
#[derive(Clone)]
pub(super) struct Stores {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub namespaces: Store<Namespace>,
    pub destination_rules: Store<DynamicObject>,
}

/// The cluster-wide inputs of one build.
pub(super) struct Context<'a> {
    pub cluster_id: &'a str,
    pub system_namespace: &'a str,
    pub domain_suffix: &'a str,
}

/// A Service (or the Service of an EndpointSlice), by namespace and name.
pub(super) type ServiceKey = (String, String);

/// What the watchers changed in a cluster's stores since its model was last built.
#[derive(Debug, Default)]
pub(super) struct Touched {
    /// Anything may have: the model is built whole (a relist, the system namespace, a node's labels).
    pub all: bool,
    pub destination_rules: bool,
    pub services: BTreeSet<ServiceKey>,
    /// EndpointSlices by namespace and name (their Services are in `services`).
    pub slices: BTreeSet<(String, String)>,
    /// Pods by namespace and name.
    pub pods: BTreeSet<(String, String)>,
}

/// A cluster's model as last built, with the indexes that lead a change to the services it touches.
#[derive(Default)]
pub(super) struct Built {
    model: Arc<ClusterModel>,
    /// The usable EndpointSlices of each Service, by name, and the Service of each.
    slices: HashMap<ServiceKey, BTreeSet<String>>,
    slice_service: HashMap<(String, String), ServiceKey>,
    /// The Services whose slices point at each pod (namespace, name), seen yet or not, and each one's pods.
    pod_services: HashMap<(String, String), BTreeSet<ServiceKey>>,
    service_pods: HashMap<ServiceKey, BTreeSet<(String, String)>>,
}

impl Built {
    /// Records the pods a Service's slices point at.
    fn index_pods(&mut self, key: &ServiceKey, pods: BTreeSet<(String, String)>) {
        for pod in self.service_pods.remove(key).unwrap_or_default() {
            if let Some(services) = self.pod_services.get_mut(&pod) {
                services.remove(key);
                if services.is_empty() {
                    self.pod_services.remove(&pod);
                }
            }
        }
        for pod in &pods {
            self.pod_services.entry(pod.clone()).or_default().insert(key.clone());
        }
        if !pods.is_empty() {
            self.service_pods.insert(key.clone(), pods);
        }
    }

    /// Moves a slice to the Service it now belongs to (none: gone, or not usable).
    fn index_slice(&mut self, slice: (String, String), service: Option<ServiceKey>) {
        if let Some(before) = self.slice_service.remove(&slice)
            && let Some(names) = self.slices.get_mut(&before)
        {
            names.remove(&slice.1);
            if names.is_empty() {
                self.slices.remove(&before);
            }
        }
        if let Some(service) = service {
            self.slices.entry(service.clone()).or_default().insert(slice.1.clone());
            self.slice_service.insert(slice, service);
        }
    }
}

impl Stores {
    /// The cluster's model after `touched`, if it differs from the last one built. The first build, and one
    /// after anything cluster-wide changed, reads every store; otherwise only the touched Services are built
    /// again, and the others keep their `Arc`s.
    pub fn update(
        &self,
        ctx: &Context<'_>,
        rules: &mut DestinationRuleCache,
        built: &mut Option<Built>,
        touched: Touched,
    ) -> Option<Arc<ClusterModel>> {
        let previous = match built.as_mut() {
            Some(previous) if !touched.all => previous,
            _ => {
                let mut whole = self.build(ctx, rules);
                let previous = built.as_ref().map(|b| Arc::clone(&b.model));
                let unchanged = previous.as_ref().is_some_and(|p| Arc::make_mut(&mut whole.model).share_unchanged(p));
                if let (true, Some(previous)) = (unchanged, previous) {
                    whole.model = previous;
                }
                let model = Arc::clone(&whole.model);
                *built = Some(whole);
                return (!unchanged).then_some(model);
            }
        };
        for slice in touched.slices {
            let service = self.slices.get(&ObjectRef::new(&slice.1).within(&slice.0)).and_then(|s| service_of(&s));
            previous.index_slice(slice, service);
        }
        let mut services = touched.services;
        for pod in &touched.pods {
            services.extend(previous.pod_services.get(pod).into_iter().flatten().cloned());
        }
        let mut model = (*previous.model).clone();
        let mut changed = false;
        if touched.destination_rules {
            model.destination_rules = rules.translate(&self.destination_rules.state());
            changed = model.destination_rules != previous.model.destination_rules;
        }
        for key in services {
            let slices: Vec<Arc<EndpointSlice>> = previous
                .slices
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|name| self.slices.get(&ObjectRef::new(name).within(&key.0)))
                .collect();
            previous.index_pods(&key, pods_of(&slices));
            let svc = self.services.get(&ObjectRef::new(&key.1).within(&key.0));
            let service = svc.and_then(|svc| self.service(ctx, &model.network, &svc, slices.iter().map(|s| &**s)));
            let at = model
                .services
                .binary_search_by(|s| (s.namespace.as_str(), s.name.as_str()).cmp(&(key.0.as_str(), key.1.as_str())));
            match (at, service) {
                (Ok(at), Some(service)) if *model.services[at] != service => model.services[at] = Arc::new(service),
                (Ok(_), Some(_)) | (Err(_), None) => continue,
                (Ok(at), None) => drop(model.services.remove(at)),
                (Err(at), Some(service)) => model.services.insert(at, Arc::new(service)),
            }
            changed = true;
        }
        if !changed {
            return None;
        }
        previous.model = Arc::new(model);
        Some(Arc::clone(&previous.model))
    }

    /// The whole cluster, in a stable order so that an unchanged cluster builds an equal model.
    fn build(&self, ctx: &Context<'_>, rules: &mut DestinationRuleCache) -> Built {
        let network = self
            .namespaces
            .get(&ObjectRef::new(ctx.system_namespace))
            .and_then(|ns| ns.labels().get(LABEL_NETWORK).cloned())
            .unwrap_or_default();
        let mut built = Built::default();
        let mut slices: HashMap<ServiceKey, Vec<_>> = HashMap::new();
        for slice in self.slices.state() {
            if let Some(service) = service_of(&slice) {
                built.index_slice((service.0.clone(), slice.name_any()), Some(service.clone()));
                slices.entry(service).or_default().push(slice);
            }
        }
        let mut services: Vec<ServiceModel> = Vec::new();
        for svc in self.services.state() {
            let key = (svc.namespace().unwrap_or_default(), svc.name_any());
            let slices = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
            built.index_pods(&key, pods_of(slices));
            services.extend(self.service(ctx, &network, &svc, slices.iter().map(|s| &**s)));
        }
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        built.model = Arc::new(ClusterModel {
            id: ctx.cluster_id.to_owned(),
            destination_rules: rules.translate(&self.destination_rules.state()),
            network,
            services: services.into_iter().map(Arc::new).collect(),
        });
        built
    }

    /// `None` for an ExternalName service: it has no endpoints to route to.
    fn service<'s>(
        &self,
        ctx: &Context<'_>,
        network: &str,
        svc: &Service,
        slices: impl Iterator<Item = &'s EndpointSlice>,
    ) -> Option<ServiceModel> {
        let spec = svc.spec.as_ref();
        if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            return None;
        }
        let (name, namespace) = (svc.name_any(), svc.namespace().unwrap_or_default());
        let ports: Vec<_> = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port: u16::try_from(p.port).ok()?,
                    protocol: match p.protocol.as_deref() {
                        Some("UDP") => Protocol::Udp,
                        Some("SCTP") => Protocol::Sctp,
                        _ => Protocol::Tcp,
                    },
                })
            })
            .collect();
        // One endpoint per address; one listed in several slices (while it moves between them) keeps its ready
        // entry, as Istio does.
        let mut endpoints: BTreeMap<IpAddr, EndpointModel> = BTreeMap::new();
        for slice in slices {
            let target_ports: BTreeMap<u16, u16> = ports
                .iter()
                .filter_map(|sp| {
                    let port =
                        slice.ports.iter().flatten().find(|p| p.name.as_deref().unwrap_or_default() == sp.name)?;
                    Some((sp.port, u16::try_from(port.port?).ok()?))
                })
                .collect();
            for endpoint in &slice.endpoints {
                for model in self.endpoints(network, &namespace, endpoint, &target_ports) {
                    match endpoints.get(&model.address) {
                        Some(kept) if kept.ready || !model.ready => {}
                        _ => {
                            endpoints.insert(model.address, model);
                        }
                    }
                }
            }
        }
        Some(ServiceModel {
            hostname: format!("{name}.{namespace}.svc.{}", ctx.domain_suffix),
            name,
            namespace,
            ports,
            endpoints: endpoints.into_values().collect(),
            publish_not_ready: spec.and_then(|s| s.publish_not_ready_addresses).unwrap_or(false),
        })
    }

    /// The endpoint's addresses. None when it points at a pod not seen yet (Istio waits for the pod too: its
    /// labels decide the mTLS filter) or one that failed (the pod watch leaves those out).
    fn endpoints(
        &self,
        cluster_network: &str,
        slice_namespace: &str,
        endpoint: &Endpoint,
        target_ports: &BTreeMap<u16, u16>,
    ) -> Vec<EndpointModel> {
        let pod = match endpoint.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")) {
            Some(target) => {
                let namespace = target.namespace.as_deref().unwrap_or(slice_namespace);
                let Some(pod) =
                    self.pods.get(&ObjectRef::new(target.name.as_deref().unwrap_or_default()).within(namespace))
                else {
                    return Vec::new();
                };
                Some(pod)
            }
            None => None,
        };
        let labels = pod.as_ref().map(|p| p.labels().clone()).unwrap_or_default();
        let node_name = pod
            .as_ref()
            .and_then(|p| p.spec.as_ref()?.node_name.clone())
            .or_else(|| endpoint.node_name.clone())
            .unwrap_or_default();
        let locality = pod_locality(&labels).unwrap_or_else(|| {
            self.nodes.get(&ObjectRef::new(&node_name)).map(|node| node_locality(node.labels())).unwrap_or_default()
        });
        let network = labels.get(LABEL_NETWORK).map_or(cluster_network, String::as_str).to_owned();
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        let ready = conditions.ready.unwrap_or(true);
        let terminating = conditions.terminating.unwrap_or(false) && conditions.serving.unwrap_or(true);
        let workload_name = pod.as_ref().map(|p| p.name_any()).unwrap_or_default();
        endpoint
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .map(|address| EndpointModel {
                address,
                target_ports: target_ports.clone(),
                labels: labels.clone(),
                locality: locality.clone(),
                network: network.clone(),
                ready,
                terminating,
                workload_name: workload_name.clone(),
                node_name: node_name.clone(),
            })
            .collect()
    }
}

/// The Service a slice serves, if Istio reads it: not an FQDN slice, not one mirrored from custom Endpoints.
pub(super) fn service_of(slice: &EndpointSlice) -> Option<ServiceKey> {
    let labels = slice.labels();
    let usable =
        slice.address_type != "FQDN" && labels.get(LABEL_MANAGED_BY).map(String::as_str) != Some(MIRRORING_CONTROLLER);
    let service = labels.get(LABEL_SERVICE_NAME).filter(|_| usable)?;
    Some((slice.namespace().unwrap_or_default(), service.clone()))
}

/// The pods (namespace, name) the slices' endpoints point at.
fn pods_of(slices: &[Arc<EndpointSlice>]) -> BTreeSet<(String, String)> {
    let mut pods = BTreeSet::new();
    for slice in slices {
        let namespace = slice.namespace().unwrap_or_default();
        for target in slice.endpoints.iter().filter_map(|e| e.target_ref.as_ref()) {
            if target.kind.as_deref() == Some("Pod")
                && let Some(name) = &target.name
            {
                pods.insert((target.namespace.clone().unwrap_or_else(|| namespace.clone()), name.clone()));
            }
        }
    }
    pods
}

/// The pod's own locality label, `topology.istio.io/locality` then the legacy `istio-locality`. Label values cannot
/// hold `/`, so `.` separates the parts there and becomes `/` (Istio's `GetLocalityLabel`).
fn pod_locality(labels: &BTreeMap<String, String>) -> Option<String> {
    let value =
        [LABEL_LOCALITY, LABEL_LEGACY_LOCALITY].iter().find_map(|l| labels.get(*l).filter(|v| !v.is_empty()))?;
    Some(if value.contains('/') { value.clone() } else { value.replace('.', "/") })
}

/// `region/zone/subzone` from the node's topology labels (GA, else beta), without trailing empty parts; empty when
/// the node has none.
fn node_locality(labels: &BTreeMap<String, String>) -> String {
    let get = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).map_or("", String::as_str);
    let parts = [get(&[LABEL_REGION, LABEL_REGION_BETA]), get(&[LABEL_ZONE, LABEL_ZONE_BETA]), get(&[LABEL_SUBZONE])];
    parts.join("/").trim_end_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn pod_locality_labels() {
        assert_eq!(pod_locality(&labels(&[(LABEL_LOCALITY, "r1/z1/s1")])).as_deref(), Some("r1/z1/s1"));
        assert_eq!(pod_locality(&labels(&[(LABEL_LOCALITY, "r1.z1")])).as_deref(), Some("r1/z1"));
        let both = labels(&[(LABEL_LOCALITY, "new/z"), (LABEL_LEGACY_LOCALITY, "old.z")]);
        assert_eq!(pod_locality(&both).as_deref(), Some("new/z"));
        assert_eq!(
            pod_locality(&labels(&[(LABEL_LEGACY_LOCALITY, "eu.eu-a.rack1")])).as_deref(),
            Some("eu/eu-a/rack1")
        );
        assert_eq!(pod_locality(&labels(&[(LABEL_LOCALITY, "")])), None);
        assert_eq!(pod_locality(&labels(&[("app", "x")])), None);
    }

    #[test]
    fn node_locality_prefers_ga_labels_and_trims() {
        let ga_and_beta = labels(&[(LABEL_REGION, "r"), (LABEL_REGION_BETA, "old"), (LABEL_ZONE_BETA, "z")]);
        assert_eq!(node_locality(&ga_and_beta), "r/z");
        assert_eq!(node_locality(&labels(&[(LABEL_REGION, "r"), (LABEL_ZONE, "z"), (LABEL_SUBZONE, "s")])), "r/z/s");
        assert_eq!(node_locality(&labels(&[(LABEL_REGION, "r"), (LABEL_SUBZONE, "s")])), "r//s");
        assert_eq!(node_locality(&labels(&[])), "");
    }
}
