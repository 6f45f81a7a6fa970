//! Istio's per-endpoint rules (ISTIO-SEMANTICS.md §2, §4, §6): the reflector stores of one cluster -> its
//! [`ClusterModel`]. Pure: it reads the stores and nothing else.

use std::collections::{BTreeMap, HashMap};
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

impl Stores {
    /// The whole cluster, in a stable order so that an unchanged cluster builds an equal model.
    pub fn build(&self, ctx: &Context<'_>, rules: &mut DestinationRuleCache) -> ClusterModel {
        let network = self
            .namespaces
            .get(&ObjectRef::new(ctx.system_namespace))
            .and_then(|ns| ns.labels().get(LABEL_NETWORK).cloned())
            .unwrap_or_default();
        let mut slices: HashMap<(String, String), Vec<_>> = HashMap::new();
        for slice in self.slices.state() {
            let labels = slice.labels();
            let usable = slice.address_type != "FQDN"
                && labels.get(LABEL_MANAGED_BY).map(String::as_str) != Some(MIRRORING_CONTROLLER);
            if let (true, Some(service)) = (usable, labels.get(LABEL_SERVICE_NAME)) {
                slices.entry((slice.namespace().unwrap_or_default(), service.clone())).or_default().push(slice);
            }
        }
        let mut services: Vec<ServiceModel> = self
            .services
            .state()
            .iter()
            .filter_map(|svc| {
                let key = (svc.namespace().unwrap_or_default(), svc.name_any());
                let slices = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
                self.service(ctx, &network, svc, slices.iter().map(|s| &**s))
            })
            .collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        ClusterModel {
            id: ctx.cluster_id.to_owned(),
            destination_rules: rules.translate(&self.destination_rules.state()),
            network,
            services: services.into_iter().map(Arc::new).collect(),
        }
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
