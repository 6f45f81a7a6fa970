//! The mesh the scale benchmark serves: two Kubernetes clusters on two networks, services with two or three
//! ports whose endpoints spread over three zones per cluster (half of the services in both clusters, a quarter in
//! each alone), DestinationRules with outlier detection and locality failover (so priorities are computed) and
//! v1/v2 subsets on every fifth service, defined in both clusters as multi-primary Istio has them. Built as the
//! control service's [`MeshModel`], and changed one endpoint at a time.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crossgate_control::model::{
    ClusterModel, DestinationRuleModel, EndpointModel, MeshModel, Protocol, ServiceModel, ServicePort, SubsetModel,
};
use crossgate_proto::TrafficPolicy;

/// The two clusters: (cluster ID, network, region, zones).
pub const CLUSTERS: [(&str, &str, &str, [&str; 3]); 2] = [
    ("cluster1", "network1", "us-east1", ["us-east1-b", "us-east1-c", "us-east1-d"]),
    ("cluster2", "network2", "us-west1", ["us-west1-a", "us-west1-b", "us-west1-c"]),
];

const DOMAIN: &str = "cluster.local";
const TLS_MODE: (&str, &str) = ("security.istio.io/tlsMode", "istio");
/// Pod addresses count up from here; the addresses that changes give come from `CHANGED_BASE`.
const POD_BASE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CHANGED_BASE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// Service ports and the target ports the pods listen on: every third service has a third port.
const PORTS: [(&str, u16, u16); 3] = [("http", 80, 8080), ("grpc", 9090, 9090), ("tcp", 5000, 5000)];

/// The shape of the generated mesh.
#[derive(Debug, Clone, Copy)]
pub struct MeshShape {
    /// Endpoints in all (one per pod and service; each serves every port of its service).
    pub endpoints: usize,
    pub endpoints_per_service: usize,
}

/// Where one service lives: the cluster index of each of its instances.
#[derive(Debug, Clone)]
pub struct ServiceIndex {
    pub hostname: String,
    /// Indexes into [`CLUSTERS`] of the clusters defining it, with the index of the service in that cluster.
    pub instances: Vec<(usize, usize)>,
    /// The first port: the default-subset cluster of it (`outbound_.PORT_._.HOST`) is what changes are watched on.
    pub first_port: u16,
}

/// The generated mesh and what the changes need to find their way in it.
#[derive(Debug, Clone)]
pub struct ScaleMesh {
    pub model: MeshModel,
    pub services: Vec<ServiceIndex>,
    pub endpoints: usize,
    pub destination_rules: usize,
    changes: u32,
}

/// One endpoint change, as made.
#[derive(Debug, Clone)]
pub struct Change {
    /// The network of the changed endpoint: which gateways' views it reaches.
    pub network: &'static str,
    /// `outbound_.PORT_._.HOST` of the changed service's first port: its assignment changes.
    pub watched_cluster: String,
}

impl ScaleMesh {
    pub fn build(shape: MeshShape) -> ScaleMesh {
        let per_service = shape.endpoints_per_service.max(2);
        let service_count = shape.endpoints.div_ceil(per_service);
        let mut clusters: [ClusterModel; 2] = CLUSTERS.map(|(id, network, _, _)| ClusterModel {
            id: id.to_owned(),
            network: network.to_owned(),
            ..ClusterModel::default()
        });
        let mut services = Vec::with_capacity(service_count);
        let (mut next_pod, mut destination_rules) = (0u32, 0);
        for s in 0..service_count {
            let count = per_service.min(shape.endpoints - s * per_service);
            let name = format!("svc-{s}");
            let namespace = format!("ns-{}", s % 16);
            let hostname = format!("{name}.{namespace}.svc.{DOMAIN}");
            let ports: Vec<ServicePort> = PORTS[..if s.is_multiple_of(3) { 3 } else { 2 }]
                .iter()
                .map(|(port_name, port, _)| ServicePort {
                    name: (*port_name).to_owned(),
                    port: *port,
                    protocol: Protocol::Tcp,
                })
                .collect();
            // Half of the services are in both clusters (their endpoints split), a quarter in each alone.
            let homes: &[usize] = match s % 4 {
                0 | 1 => &[0, 1],
                2 => &[0],
                _ => &[1],
            };
            let mut instances = Vec::new();
            for (h, &home) in homes.iter().enumerate() {
                let share = count / homes.len() + usize::from(h < count % homes.len());
                let endpoints = (0..share)
                    .map(|e| {
                        next_pod += 1;
                        pod(home, s, e, u32::from(POD_BASE) + next_pod - 1, &ports)
                    })
                    .collect();
                let cluster = &mut clusters[home];
                instances.push((home, cluster.services.len()));
                cluster.services.push(Arc::new(ServiceModel {
                    name: name.clone(),
                    namespace: namespace.clone(),
                    hostname: hostname.clone(),
                    ports: ports.clone(),
                    endpoints,
                    publish_not_ready: false,
                }));
            }
            if s.is_multiple_of(5) {
                destination_rules += 1;
                for cluster in &mut clusters {
                    cluster.destination_rules.push(destination_rule(s, &name, &namespace));
                }
            }
            services.push(ServiceIndex { hostname, instances, first_port: ports[0].port });
        }
        let model = MeshModel {
            clusters: clusters.into_iter().map(|cluster| (cluster.id.clone(), Arc::new(cluster))).collect(),
        };
        ScaleMesh { model, services, endpoints: shape.endpoints, destination_rules, changes: 0 }
    }

    /// The mesh with one endpoint of service `service` (of its instance `instance % instances`) moved to a new
    /// address, as a pod replaced by its ReplicaSet: the service's assignments change, nothing else. The
    /// changed service is copied (the previous mesh version still holds the old one) and the cluster's other
    /// services are shared, as the sources do.
    pub fn change(&mut self, service: usize, instance: usize, endpoint: usize) -> (MeshModel, Change) {
        let index = &self.services[service % self.services.len()];
        let clusters = &self.model.clusters;
        let has_endpoints =
            |(home, position): (usize, usize)| !clusters[CLUSTERS[home].0].services[position].endpoints.is_empty();
        // An instance with endpoints (a small service's last instance may have none).
        let (home, position) = (0..index.instances.len())
            .map(|i| index.instances[(instance + i) % index.instances.len()])
            .find(|&at| has_endpoints(at))
            .expect("every service has endpoints");
        let (id, network, _, _) = CLUSTERS[home];
        let address = Ipv4Addr::from(u32::from(CHANGED_BASE) + self.changes);
        self.changes += 1;
        let cluster = Arc::make_mut(self.model.clusters.get_mut(id).expect("both clusters exist"));
        let endpoints = &mut Arc::make_mut(&mut cluster.services[position]).endpoints;
        let count = endpoints.len();
        endpoints[endpoint % count].address = IpAddr::V4(address);
        let change =
            Change { network, watched_cluster: format!("outbound_.{}_._.{}", index.first_port, index.hostname) };
        (self.model.clone(), change)
    }
}

fn pod(home: usize, service: usize, e: usize, address: u32, ports: &[ServicePort]) -> EndpointModel {
    let (id, network, region, zones) = CLUSTERS[home];
    let version = if e.is_multiple_of(2) { "v1" } else { "v2" };
    let labels = [
        ("app", format!("svc-{service}")),
        ("version", version.to_owned()),
        (TLS_MODE.0, TLS_MODE.1.to_owned()),
        ("pod-template-hash", "5d9f7c8b4".to_owned()),
    ];
    let target_ports = ports
        .iter()
        .map(|p| (p.port, PORTS.iter().find(|(_, port, _)| *port == p.port).map_or(p.port, |(_, _, target)| *target)))
        .collect();
    EndpointModel {
        address: IpAddr::V4(Ipv4Addr::from(address)),
        target_ports,
        labels: labels.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        locality: format!("{region}/{}", zones[e % zones.len()]),
        network: network.to_owned(),
        ready: true,
        terminating: false,
        workload_name: format!("svc-{service}-{version}-5d9f7c8b4-{e:05}"),
        // About 30 pods a node.
        node_name: format!("{id}-node-{}", address / 30 % 100_000),
    }
}

/// Outlier detection turns locality failover on, so priorities are computed per gateway: every other rule
/// orders by network, region and zone (failoverPriority), the others use Istio's default failover.
fn destination_rule(service: usize, name: &str, namespace: &str) -> DestinationRuleModel {
    let locality = if service.is_multiple_of(10) {
        serde_json::json!({ "failoverPriority": [
            "topology.istio.io/network", "topology.kubernetes.io/region", "topology.kubernetes.io/zone"
        ] })
    } else {
        serde_json::json!({})
    };
    let policy = serde_json::json!({
        "loadBalancer": { "simple": "LEAST_REQUEST", "localityLbSetting": locality },
        "connectionPool": { "tcp": { "connectTimeout": "2s" } },
        "outlierDetection": { "consecutive5xxErrors": 5, "interval": "10s", "baseEjectionTime": "30s" },
    });
    let traffic_policy: TrafficPolicy = serde_json::from_value(policy).expect("a valid traffic policy");
    let subset = |version: &str| SubsetModel {
        name: version.to_owned(),
        labels: BTreeMap::from([("version".to_owned(), version.to_owned())]),
        traffic_policy: None,
    };
    DestinationRuleModel {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        host: name.to_owned(),
        traffic_policy: Some(traffic_policy),
        subsets: vec![subset("v1"), subset("v2")],
        export_to: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_has_the_endpoints_asked_for_and_a_change_moves_one() {
        let mut mesh = ScaleMesh::build(MeshShape { endpoints: 1_001, endpoints_per_service: 40 });
        let count = |model: &MeshModel| -> usize {
            model.clusters.values().flat_map(|c| &c.services).map(|s| s.endpoints.len()).sum()
        };
        assert_eq!(count(&mesh.model), 1_001);
        assert_eq!(mesh.services.len(), 26);
        assert_eq!(mesh.destination_rules, 6);
        let before = mesh.model.clone();
        let (after, change) = mesh.change(4, 1, 3);
        assert_eq!(change.network, "network2");
        assert_eq!(change.watched_cluster, "outbound_.80_._.svc-4.ns-4.svc.cluster.local");
        assert_eq!(before.clusters["cluster1"], after.clusters["cluster1"]);
        assert_ne!(before.clusters["cluster2"], after.clusters["cluster2"]);
        assert_eq!(count(&after), 1_001);
    }
}
