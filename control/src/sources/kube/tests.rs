//! The Kubernetes source against `fake_kube`: remote clusters over real HTTP through kubeconfigs in remote secrets,
//! the local cluster in-process.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::*;
use crate::fake_kube::{FakeCluster, Fault, ServedCluster, assert_eventually};
use crate::model::{ClusterModel, EndpointModel, Protocol, ServiceModel};

const WAIT: Duration = Duration::from_secs(10);
const NS: &str = "apps";

fn options() -> KubeOptions {
    KubeOptions {
        debounce: Duration::from_millis(20),
        destination_rule_recheck: Duration::from_millis(200),
        ..KubeOptions::default()
    }
}

/// The process-wide recorder; every test installs it before creating any handle, or its handles would be no-ops.
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("no other recorder in this test binary");
        handle
    })
}

/// The value of one series, e.g. `crossgate_control_cluster_synced{cluster="x"}`.
fn metric(series: &str) -> Option<f64> {
    metrics().render().lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn synced_gauge(cluster: &str) -> Option<f64> {
    metric(&format!("crossgate_control_cluster_synced{{cluster=\"{cluster}\"}}"))
}

/// The mesh, status and priming channels a test's sources write into.
struct Harness {
    updates: watch::Sender<MeshModel>,
    status: watch::Sender<SyncStatuses>,
    primed: watch::Sender<bool>,
}

impl Harness {
    fn new() -> Self {
        metrics();
        Self {
            updates: watch::Sender::new(MeshModel::default()),
            status: watch::Sender::new(SyncStatuses::default()),
            primed: watch::Sender::new(false),
        }
    }

    fn watch(&self, client: Client, id: &str, options: &KubeOptions) -> ClusterWatcher {
        ClusterWatcher::spawn(client, id, options, self.updates.clone(), self.status.clone())
    }

    /// `run_kube_sources` on its own task; send on the returned sender to shut it down.
    fn run(&self, local: Client, id: &str) -> (oneshot::Sender<()>, JoinHandle<()>) {
        self.run_with(local, id, options())
    }

    fn run_with(&self, local: Client, id: &str, options: KubeOptions) -> (oneshot::Sender<()>, JoinHandle<()>) {
        let (stop, stopped) = oneshot::channel::<()>();
        let (id, updates, status, primed) =
            (id.to_owned(), self.updates.clone(), self.status.clone(), self.primed.clone());
        let task = tokio::spawn(async move {
            run_kube_sources(local, id, options, updates, status, primed, async move {
                let _ = stopped.await;
            })
            .await;
        });
        (stop, task)
    }

    fn primed(&self) -> bool {
        *self.primed.borrow()
    }

    fn clusters(&self) -> Vec<String> {
        self.updates.borrow().clusters.keys().cloned().collect()
    }

    fn cluster(&self, id: &str) -> Option<Arc<ClusterModel>> {
        self.updates.borrow().clusters.get(id).cloned()
    }

    fn synced(&self, id: &str) -> Option<bool> {
        self.status.borrow().get(id).map(SyncStatus::synced)
    }

    /// The endpoint addresses of `NS/name` in cluster `id`, sorted; empty when absent.
    fn addresses(&self, id: &str, service: &str) -> Vec<String> {
        self.cluster(id)
            .and_then(|c| {
                find_service(&c, service).map(|s| s.endpoints.iter().map(|e| e.address.to_string()).collect())
            })
            .unwrap_or_default()
    }

    /// Records the endpoint count of `NS/service` in cluster `id` in every published mesh.
    fn record_endpoint_counts(&self, id: &str, service: &str) -> Arc<Mutex<Vec<usize>>> {
        let counts = Arc::new(Mutex::new(Vec::new()));
        let (out, mut rx, id, service) = (counts.clone(), self.updates.subscribe(), id.to_owned(), service.to_owned());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let count = rx
                    .borrow_and_update()
                    .clusters
                    .get(&id)
                    .and_then(|c| Some(find_service(c, &service)?.endpoints.len()));
                out.lock().unwrap().extend(count);
            }
        });
        counts
    }
}

fn find_service<'a>(cluster: &'a ClusterModel, name: &str) -> Option<&'a ServiceModel> {
    cluster.services.iter().find(|s| s.namespace == NS && s.name == name).map(|s| &**s)
}

fn endpoint<'a>(service: &'a ServiceModel, address: &str) -> Option<&'a EndpointModel> {
    let address: IpAddr = address.parse().unwrap();
    service.endpoints.iter().find(|e| e.address == address)
}

/// A client built the way remote clusters get theirs: from kubeconfig text.
async fn http_client(served: &ServedCluster, name: &str) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&served.kubeconfig_yaml(name)).unwrap();
    Client::try_from(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap()).unwrap()
}

fn system_namespace(network: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "istio-system", "labels": {"topology.istio.io/network": network}}})
}

fn node(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
}

fn pod(name: &str, node: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]}, "status": {"phase": "Running"}})
}

fn service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

/// An endpoint backed by pod `pod`, ready.
fn ep(address: &str, pod: &str) -> Value {
    json!({"addresses": [address], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": pod, "namespace": NS}})
}

fn slice(name: &str, service: &str, ports: Value, endpoints: Value) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
        "ports": ports, "endpoints": endpoints})
}

/// Service `web` with one ready endpoint per (address, pod), pods created too.
fn web_service(fake: &FakeCluster, endpoints: &[(&str, &str)]) {
    fake.apply_json(service("web"));
    for (_, name) in endpoints {
        fake.apply_json(pod(name, "n1", json!({"app": "web", "security.istio.io/tlsMode": "istio"})));
    }
    let eps: Vec<Value> = endpoints.iter().map(|(address, name)| ep(address, name)).collect();
    fake.apply_json(slice("web-1", "web", json!([{"name": "http", "port": 8080}]), Value::from(eps)));
}

/// What `istioctl create-remote-secret` writes, one data key per cluster.
fn remote_secret(name: &str, entries: &[(&str, String)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("istio-system".to_owned()),
            labels: Some(BTreeMap::from([("istio/multiCluster".to_owned(), "true".to_owned())])),
            annotations: entries
                .first()
                .map(|(id, _)| BTreeMap::from([("networking.istio.io/cluster".to_owned(), (*id).to_owned())])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(entries.iter().map(|(id, kc)| ((*id).to_owned(), ByteString(kc.clone().into_bytes()))).collect()),
        ..Secret::default()
    }
}

fn requests_with_token(fake: &FakeCluster, token: &str) -> usize {
    let bearer = format!("Bearer {token}");
    fake.requests().iter().filter(|r| r.authorization.as_deref() == Some(bearer.as_str())).count()
}

#[tokio::test]
async fn a_remote_cluster_over_http_joins_the_mesh_on_its_own_network() {
    let harness = Harness::new();
    let (cluster1, cluster2) = (FakeCluster::new("cluster1", 1000), FakeCluster::new("cluster2", 5_000_000));
    let decoy = FakeCluster::new("decoy", 7000);
    cluster1.apply_json(system_namespace("network1"));
    cluster2.apply_json(system_namespace("network2"));
    web_service(&cluster1, &[("10.1.0.1", "web-a")]);
    web_service(&cluster2, &[("10.2.0.1", "web-a")]);
    let (served2, served_decoy) = (cluster2.serve().await.unwrap(), decoy.serve().await.unwrap());
    // A key equal to the local cluster ID is ignored: were it watched, "cluster1" would turn into the decoy.
    cluster1.apply(&remote_secret(
        "istio-remote-secret-cluster2",
        &[("cluster2", served2.kubeconfig_yaml("cluster2")), ("cluster1", served_decoy.kubeconfig_yaml("cluster1"))],
    ));
    // Without the label: not a remote secret.
    let mut unlabelled = remote_secret("not-a-remote-secret", &[("decoy", served_decoy.kubeconfig_yaml("decoy"))]);
    unlabelled.metadata.labels = None;
    cluster1.apply(&unlabelled);

    let (stop, task) = harness.run(cluster1.client(), "cluster1");
    assert_eventually("both clusters in the mesh", WAIT, || {
        harness.addresses("cluster1", "web") == ["10.1.0.1"] && harness.addresses("cluster2", "web") == ["10.2.0.1"]
    })
    .await;
    let model2 = harness.cluster("cluster2").unwrap();
    assert_eq!((model2.id.as_str(), model2.network.as_str()), ("cluster2", "network2"));
    assert_eq!(harness.cluster("cluster1").unwrap().network, "network1");

    // An endpoint added in cluster2 arrives, on network2.
    assert_eventually("cluster2's watches are open", WAIT, || cluster2.open_watches() == 6).await;
    cluster2.apply_json(pod("web-b", "n1", json!({"app": "web", "security.istio.io/tlsMode": "istio"})));
    cluster2.apply_json(slice(
        "web-1",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.2.0.1", "web-a"), ep("10.2.0.2", "web-b")]),
    ));
    assert_eventually("the new endpoint", WAIT, || harness.addresses("cluster2", "web") == ["10.2.0.1", "10.2.0.2"])
        .await;
    let model2 = harness.cluster("cluster2").unwrap();
    let added = endpoint(find_service(&model2, "web").unwrap(), "10.2.0.2").unwrap();
    assert_eq!((added.network.as_str(), added.workload_name.as_str()), ("network2", "web-b"));
    assert_eq!(added.labels["security.istio.io/tlsMode"], "istio");
    assert_eq!(harness.addresses("cluster1", "web"), ["10.1.0.1"], "cluster1 untouched");

    // cluster2 was reached with the secret's credentials; the decoy never was.
    assert!(cluster2.requests().iter().all(|r| r.authorization.as_deref() == Some("Bearer fake-token-cluster2")));
    assert!(decoy.requests().is_empty(), "{:?}", decoy.requests());
    let secret_watch = cluster1.requests().into_iter().find(|r| r.path == "/api/v1/namespaces/istio-system/secrets");
    assert_eq!(secret_watch.unwrap().param("labelSelector"), Some("istio/multiCluster=true"));
    assert_eq!(harness.synced("cluster2"), Some(true));

    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, task).await.expect("shutdown completes").unwrap();
    assert!(harness.status.borrow().is_empty(), "stopped watchers leave no status");
    assert_eq!(harness.cluster("cluster2").unwrap().id, "cluster2", "shutdown does not empty the mesh");
}

#[tokio::test]
async fn remote_secrets_bring_clusters_in_restart_them_and_take_them_out() {
    let harness = Harness::new();
    let (west, east, far) =
        (FakeCluster::new("west", 1000), FakeCluster::new("east", 5_000_000), FakeCluster::new("far", 9000));
    west.apply_json(system_namespace("net-west"));
    east.apply_json(system_namespace("net-east"));
    web_service(&east, &[("10.2.0.1", "web-a"), ("10.2.0.2", "web-b")]);
    let (served_east, served_far) = (east.serve().await.unwrap(), far.serve().await.unwrap());
    let (stop, task) = harness.run(west.client(), "west");
    assert_eventually("the local cluster", WAIT, || harness.synced("west") == Some(true)).await;
    assert_eventually("the secrets watch", WAIT, || west.open_watches() == 7).await;
    assert_eq!(harness.clusters(), ["west"]);
    assert!(harness.primed(), "no remote secret at start: the local cluster is the whole mesh");

    // A secret added later brings its cluster in.
    west.apply(&remote_secret("istio-remote-secret-east", &[("east", served_east.kubeconfig_yaml("east"))]));
    assert_eventually("east joins", WAIT, || harness.addresses("east", "web") == ["10.2.0.1", "10.2.0.2"]).await;
    assert_eventually("east synced", WAIT, || {
        harness.synced("east") == Some(true) && synced_gauge("east") == Some(1.0)
    })
    .await;

    // A second secret naming east again is ignored for east (far, its other key, comes in).
    west.apply(&remote_secret(
        "istio-remote-secret-far",
        &[("far", served_far.kubeconfig_yaml("far")), ("east", served_far.kubeconfig_yaml("east"))],
    ));
    assert_eventually("far joins", WAIT, || harness.synced("far") == Some(true)).await;
    assert_eq!(requests_with_token(&far, "fake-token-east"), 0, "the duplicate east was not watched");
    assert_eq!(harness.cluster("east").unwrap().network, "net-east");

    // East's API server goes away: east keeps its last model, and shows as not synced.
    let before = harness.cluster("east").unwrap();
    drop(served_east);
    assert_eventually("east unsynced", WAIT, || harness.synced("east") == Some(false)).await;
    assert_eq!(synced_gauge("east"), Some(0.0));
    assert!(!harness.status.borrow()["east"].last_errors.is_empty());
    assert_eq!(harness.cluster("east").unwrap(), before, "the last model stays");

    // It comes back elsewhere: the changed kubeconfig restarts the watcher.
    let served_east = east.serve().await.unwrap();
    west.apply(&remote_secret("istio-remote-secret-east", &[("east", served_east.kubeconfig_yaml("east-rotated"))]));
    assert_eventually("east synced again", WAIT, || {
        harness.synced("east") == Some(true) && synced_gauge("east") == Some(1.0)
    })
    .await;
    assert!(requests_with_token(&east, "fake-token-east-rotated") > 0);
    east.delete("Pod", Some(NS), "web-b");
    assert_eventually("east is watched through the new kubeconfig", WAIT, || {
        harness.addresses("east", "web") == ["10.2.0.1"]
    })
    .await;

    // Removing a secret takes its clusters out; so does removing a key.
    west.delete("Secret", Some("istio-system"), "istio-remote-secret-far");
    assert_eventually("far leaves", WAIT, || harness.cluster("far").is_none() && harness.synced("far").is_none()).await;
    assert!(harness.cluster("east").is_some(), "east stays with its own secret");
    west.apply(&remote_secret("istio-remote-secret-east", &[]));
    assert_eventually("east leaves", WAIT, || harness.cluster("east").is_none() && harness.synced("east").is_none())
        .await;
    assert!(harness.cluster("west").is_some());

    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, task).await.expect("shutdown completes").unwrap();
}

#[tokio::test]
async fn istio_endpoint_rules_are_applied() {
    let harness = Harness::new();
    let fake = FakeCluster::new("rules", 1000);
    fake.apply_json(system_namespace("net1"));
    let ga = json!({"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z1",
        "topology.istio.io/subzone": "s1", "failure-domain.beta.kubernetes.io/region": "old"});
    fake.apply_json(node("n1", ga));
    let beta =
        json!({"failure-domain.beta.kubernetes.io/region": "r2", "failure-domain.beta.kubernetes.io/zone": "z2"});
    fake.apply_json(node("n2", beta));
    fake.apply_json(pod(
        "p-label",
        "n1",
        json!({"app": "web", "version": "v1", "security.istio.io/tlsMode": "istio",
        "topology.istio.io/network": "net-pod", "topology.istio.io/locality": "ra.za.sa"}),
    ));
    fake.apply_json(pod("p-legacy", "n1", json!({"app": "web", "istio-locality": "rb.zb"})));
    fake.apply_json(pod("p-node1", "n1", json!({"app": "web"})));
    fake.apply_json(pod("p-node2", "n2", json!({"app": "web"})));
    let mut failed = pod("p-failed", "n1", json!({"app": "web"}));
    failed["status"]["phase"] = "Failed".into();
    fake.apply_json(failed);
    fake.apply_json(pod("p-notready", "n1", json!({"app": "web"})));
    fake.apply_json(pod("p-term", "n1", json!({"app": "web"})));
    fake.apply_json(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
    "spec": {"publishNotReadyAddresses": true, "ports": [
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "grpc", "port": 90, "targetPort": "grpc"},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]}}));
    fake.apply_json(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": NS},
        "spec": {"type": "ExternalName", "externalName": "example.com"}}));
    let mut not_ready = ep("10.0.0.6", "p-notready");
    not_ready["conditions"] = json!({"ready": false, "serving": false});
    let mut terminating = ep("10.0.0.7", "p-term");
    terminating["conditions"] = json!({"ready": false, "serving": true, "terminating": true});
    let mut no_conditions = ep("10.0.0.3", "p-node1");
    no_conditions.as_object_mut().unwrap().remove("conditions");
    fake.apply_json(slice(
        "web-1",
        "web",
        json!([{"name": "http", "port": 8080}, {"name": "grpc", "port": 9090}, {"name": "dns", "port": 5353}]),
        json!([ep("10.0.0.1", "p-label"), ep("10.0.0.2", "p-legacy"), no_conditions, ep("10.0.0.4", "p-node2"),
            ep("10.0.0.5", "p-failed"), not_ready, terminating, ep("10.0.0.8", "p-later"),
            {"addresses": ["10.0.0.9"], "nodeName": "n2"}]),
    ));
    // Only http in this one; an address in two slices keeps its ready entry.
    let mut stale = ep("10.0.0.1", "p-label");
    stale["conditions"]["ready"] = false.into();
    fake.apply_json(slice(
        "web-2",
        "web",
        json!([{"name": "http", "port": 8081}]),
        json!([{"addresses": ["10.0.1.1"]}, stale]),
    ));
    fake.apply_json(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "FQDN",
        "metadata": {"name": "web-fqdn", "namespace": NS, "labels": {"kubernetes.io/service-name": "web"}},
        "endpoints": [{"addresses": ["web.example.com"]}]}));
    let mut mirrored =
        slice("web-mirror", "web", json!([{"name": "http", "port": 8080}]), json!([{"addresses": ["10.0.0.10"]}]));
    mirrored["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] =
        "endpointslicemirroring-controller.k8s.io".into();
    fake.apply_json(mirrored);

    let options = KubeOptions { domain_suffix: "example.org".to_owned(), ..options() };
    let watcher = harness.watch(fake.client(), "rules", &options);
    assert_eventually("the model", WAIT, || harness.cluster("rules").is_some()).await;
    let model = harness.cluster("rules").unwrap();
    assert_eq!((model.id.as_str(), model.network.as_str()), ("rules", "net1"));
    assert_eq!(model.services.len(), 1, "ExternalName services are left out");
    let web = &model.services[0];
    assert_eq!(web.hostname, "web.apps.svc.example.org");
    assert!(web.publish_not_ready);
    let ports: Vec<(&str, u16, Protocol)> = web.ports.iter().map(|p| (p.name.as_str(), p.port, p.protocol)).collect();
    assert_eq!(ports, [("http", 80, Protocol::Tcp), ("grpc", 90, Protocol::Tcp), ("dns", 53, Protocol::Udp)]);
    let addresses: Vec<String> = web.endpoints.iter().map(|e| e.address.to_string()).collect();
    assert_eq!(
        addresses,
        ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.6", "10.0.0.7", "10.0.0.9", "10.0.1.1"],
        "no failed pod (.5), no pod not seen yet (.8), no mirrored (.10) or FQDN slice"
    );
    let e = |address| endpoint(web, address).unwrap();

    let labelled = e("10.0.0.1");
    assert_eq!((labelled.network.as_str(), labelled.locality.as_str()), ("net-pod", "ra/za/sa"));
    assert_eq!(labelled.target_ports, BTreeMap::from([(80, 8080), (90, 9090), (53, 5353)]));
    assert_eq!(labelled.labels["security.istio.io/tlsMode"], "istio");
    assert_eq!(labelled.labels["version"], "v1");
    assert_eq!((labelled.workload_name.as_str(), labelled.node_name.as_str()), ("p-label", "n1"));
    assert!(labelled.ready && !labelled.terminating, "the ready entry wins over web-2's");
    assert_eq!((e("10.0.0.2").network.as_str(), e("10.0.0.2").locality.as_str()), ("net1", "rb/zb"));
    assert_eq!(e("10.0.0.3").locality, "r1/z1/s1", "node labels; GA region over beta");
    assert!(e("10.0.0.3").ready, "no conditions means ready");
    assert!(!e("10.0.0.3").labels.contains_key("security.istio.io/tlsMode"));
    assert_eq!(e("10.0.0.4").locality, "r2/z2", "beta node labels");
    assert!(!e("10.0.0.6").ready && !e("10.0.0.6").terminating);
    assert!(!e("10.0.0.7").ready && e("10.0.0.7").terminating);
    let bare = e("10.0.0.9");
    assert_eq!((bare.node_name.as_str(), bare.locality.as_str(), bare.workload_name.as_str()), ("n2", "r2/z2", ""));
    assert!(bare.labels.is_empty());
    assert_eq!(e("10.0.1.1").target_ports, BTreeMap::from([(80, 8081)]), "only the slice's own ports");

    // A pod seen late brings its endpoint; a pod's network label change moves it.
    fake.apply_json(pod("p-later", "n2", json!({"app": "web"})));
    fake.apply_json(pod(
        "p-legacy",
        "n1",
        json!({"app": "web", "istio-locality": "rb.zb", "topology.istio.io/network": "net9"}),
    ));
    assert_eventually("the late pod's endpoint and the relabelled one", WAIT, || {
        let model = harness.cluster("rules").unwrap();
        let web = find_service(&model, "web").unwrap();
        endpoint(web, "10.0.0.8").is_some_and(|e| e.locality == "r2/z2")
            && endpoint(web, "10.0.0.2").is_some_and(|e| e.network == "net9")
    })
    .await;

    // DestinationRules: Istio fields the proto lacks are dropped, a broken one is skipped alone.
    fake.apply_json(json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"host": "web", "exportTo": ["."],
            "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}, "tls": {"mode": "ISTIO_MUTUAL"},
                "outlierDetection": {"consecutive5xxErrors": 3, "interval": "5s"},
                "portLevelSettings": [{"port": {"number": 80}, "loadBalancer": {"simple": "RANDOM"}}]},
            "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 7}}}}]}}));
    fake.apply_json(json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "broken", "namespace": NS},
        "spec": {"host": "web", "trafficPolicy": {"outlierDetection": {"interval": "soon"}}}}));
    assert_eventually("the DestinationRule", WAIT, || !harness.cluster("rules").unwrap().destination_rules.is_empty())
        .await;
    let model = harness.cluster("rules").unwrap();
    let [rule] = model.destination_rules.as_slice() else {
        panic!("only the readable DR: {:?}", model.destination_rules)
    };
    assert_eq!((rule.name.as_str(), rule.namespace.as_str(), rule.host.as_str()), ("web", NS, "web"));
    assert_eq!(rule.export_to, ["."]);
    let policy = rule.traffic_policy.as_ref().unwrap();
    assert_eq!(policy.outlier_detection.unwrap().consecutive_5xx_errors.map(|v| v.value), Some(3));
    let subsets: Vec<(&str, &str)> =
        rule.subsets.iter().map(|s| (s.name.as_str(), s.labels["version"].as_str())).collect();
    assert_eq!(subsets, [("v1", "v1"), ("v2", "v2")]);
    let v2 = rule.subsets[1].traffic_policy.as_ref().unwrap();
    assert_eq!(v2.connection_pool.as_ref().unwrap().tcp.as_ref().unwrap().max_connections, 7);

    assert_eq!(harness.synced("rules"), Some(true));
    assert_eq!(synced_gauge("rules"), Some(1.0));
    watcher.stop().await;
    assert_eq!(harness.synced("rules"), None);
}

#[tokio::test]
async fn an_absent_destination_rule_api_does_not_block_sync() {
    let harness = Harness::new();
    let fake = FakeCluster::new("no-drs", 1000);
    fake.fail(Fault::ApiAbsent { kind: "DestinationRule".into() });
    web_service(&fake, &[("10.0.0.1", "web-a")]);
    let _watcher = harness.watch(fake.client(), "no-drs", &options());
    assert_eventually("synced without DRs", WAIT, || harness.addresses("no-drs", "web") == ["10.0.0.1"]).await;
    assert_eq!(harness.synced("no-drs"), Some(true));
    assert!(harness.cluster("no-drs").unwrap().network.is_empty(), "no system namespace, no network");

    // Istio gets installed: the API is found on a later check.
    fake.clear_faults();
    fake.apply_json(json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": NS}, "spec": {"host": "web.apps.svc.cluster.local"}}));
    assert_eventually("the DR once its API exists", WAIT, || {
        harness.cluster("no-drs").unwrap().destination_rules.len() == 1
    })
    .await;
    assert_eq!(harness.synced("no-drs"), Some(true));
}

#[tokio::test]
async fn a_410_relists_without_losing_endpoints_and_a_cut_watch_resumes() {
    let harness = Harness::new();
    let fake = FakeCluster::new("relist", 5_000_000);
    web_service(&fake, &[("10.0.0.1", "web-a"), ("10.0.0.2", "web-b")]);
    let served = fake.serve().await.unwrap();
    let _watcher = harness.watch(http_client(&served, "relist").await, "relist", &options());
    assert_eventually("the first model", WAIT, || harness.addresses("relist", "web").len() == 2).await;
    assert_eventually("every watch open", WAIT, || fake.open_watches() == 6).await;
    let counts = harness.record_endpoint_counts("relist", "web");
    let slices = "/apis/discovery.k8s.io/v1/endpointslices";
    let lists = || fake.requests().iter().filter(|r| r.path == slices && !r.is_watch()).count();

    // Disconnected while the endpoint grows and history is compacted past the watcher's RV: 410, relist.
    fake.drop_watches();
    fake.apply_json(pod("web-c", "n1", json!({"app": "web"})));
    fake.apply_json(slice(
        "web-1",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.0.0.1", "web-a"), ep("10.0.0.2", "web-b"), ep("10.0.0.3", "web-c")]),
    ));
    fake.compact();
    assert_eventually("the relisted endpoints", WAIT, || harness.addresses("relist", "web").len() == 3).await;
    assert_eq!(lists(), 2, "one relist");
    assert_eventually("synced after the relist", WAIT, || harness.synced("relist") == Some(true)).await;

    // A cut watch resumes from its last RV: no relist.
    assert_eventually("every watch open again", WAIT, || fake.open_watches() == 6).await;
    fake.drop_watches();
    fake.apply_json(slice(
        "web-1",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.0.0.1", "web-a"), ep("10.0.0.3", "web-c")]),
    ));
    assert_eventually("the resumed watch's change", WAIT, || {
        harness.addresses("relist", "web") == ["10.0.0.1", "10.0.0.3"]
    })
    .await;
    assert_eq!(lists(), 2, "no relist after a cut");
    assert_eq!(*counts.lock().unwrap(), [3, 2], "never fewer endpoints than there were");
}

#[tokio::test]
async fn an_outage_keeps_the_last_model_and_shows_in_the_status() {
    let harness = Harness::new();
    let fake = FakeCluster::new("outage", 1000);
    web_service(&fake, &[("10.0.0.1", "web-a")]);
    let _watcher = harness.watch(fake.client(), "outage", &options());
    assert_eventually("synced", WAIT, || harness.synced("outage") == Some(true) && synced_gauge("outage") == Some(1.0))
        .await;
    assert_eventually("every watch open", WAIT, || fake.open_watches() == 6).await;
    let before = harness.cluster("outage").unwrap();

    // The endpoints change while every watch is cut and history is compacted past them: every watcher must relist
    // (410), and the slice lists fail.
    fake.fail(Fault::ListError { kind: "EndpointSlice".into(), code: 503, times: 1_000 });
    fake.drop_watches();
    fake.apply_json(pod("web-b", "n1", json!({"app": "web"})));
    fake.apply_json(slice(
        "web-1",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.0.0.1", "web-a"), ep("10.0.0.2", "web-b")]),
    ));
    fake.compact();
    assert_eventually("the others relisted, the slices failing", WAIT, || {
        let status = &harness.status.borrow()["outage"];
        status.pending.iter().copied().eq(["endpointslices"])
            && status.last_errors.get("endpointslices").is_some_and(|e| e.contains("503"))
    })
    .await;
    assert_eq!((harness.synced("outage"), synced_gauge("outage")), (Some(false), Some(0.0)));
    assert!(metric(r#"crossgate_control_watch_errors_total{cluster="outage",resource="endpointslices"}"#) >= Some(1.0));
    // The services watch works: its change is published, with the endpoints last listed.
    fake.apply_json(service("other"));
    assert_eventually("a rebuild during the outage", WAIT, || {
        harness.cluster("outage").is_some_and(|c| find_service(&c, "other").is_some())
    })
    .await;
    assert_eq!(harness.addresses("outage", "web"), ["10.0.0.1"], "the last listed endpoints stay");
    assert_eq!(find_service(&harness.cluster("outage").unwrap(), "web"), find_service(&before, "web"));

    fake.clear_faults();
    assert_eventually("synced again", WAIT, || {
        harness.synced("outage") == Some(true) && synced_gauge("outage") == Some(1.0)
    })
    .await;
    assert_eventually("the change made during the outage", WAIT, || {
        harness.addresses("outage", "web") == ["10.0.0.1", "10.0.0.2"]
    })
    .await;
}

#[tokio::test]
async fn gateways_are_served_once_the_local_and_listed_remote_clusters_have_synced() {
    let harness = Harness::new();
    let (west, east) = (FakeCluster::new("west", 1000), FakeCluster::new("east", 5_000_000));
    west.apply_json(system_namespace("net-west"));
    east.apply_json(system_namespace("net-east"));
    web_service(&east, &[("10.2.0.1", "web-a")]);
    // East cannot list its endpoint slices yet: it is watched but not synced.
    east.fail(Fault::Forbidden { kind: "EndpointSlice".into() });
    let served_east = east.serve().await.unwrap();
    west.apply(&remote_secret("istio-remote-secret-east", &[("east", served_east.kubeconfig_yaml("east"))]));
    let (stop, task) =
        harness.run_with(west.client(), "west", KubeOptions { remote_sync_timeout: WAIT * 6, ..options() });

    assert_eventually("west published, east watched", WAIT, || {
        harness.clusters() == ["west"] && harness.synced("east") == Some(false)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!harness.primed(), "a gateway would be told east is empty");

    east.clear_faults();
    assert_eventually("primed", WAIT * 3, || harness.primed()).await;
    assert_eq!(harness.clusters(), ["east", "west"], "the mesh is whole when it is first served");
    assert_eq!(harness.addresses("east", "web"), ["10.2.0.1"]);
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn a_remote_cluster_that_does_not_sync_is_waited_for_only_until_the_timeout() {
    let harness = Harness::new();
    let (west, east) = (FakeCluster::new("west", 1000), FakeCluster::new("east", 5_000_000));
    west.apply_json(system_namespace("net-west"));
    east.fail(Fault::Forbidden { kind: "Pod".into() });
    let served_east = east.serve().await.unwrap();
    west.apply(&remote_secret("istio-remote-secret-east", &[("east", served_east.kubeconfig_yaml("east"))]));
    let timeouts = metric("crossgate_control_remote_sync_timeouts_total").unwrap_or(0.0);
    let timeout = Duration::from_millis(800);
    let started = std::time::Instant::now();
    let (stop, task) =
        harness.run_with(west.client(), "west", KubeOptions { remote_sync_timeout: timeout, ..options() });

    assert_eventually("primed", WAIT, || harness.primed()).await;
    assert!(started.elapsed() >= timeout, "primed after {:?}, before the timeout", started.elapsed());
    assert_eq!(harness.clusters(), ["west"], "served without east");
    assert_eq!(harness.synced("east"), Some(false));
    assert_eq!(metric("crossgate_control_remote_sync_timeouts_total"), Some(timeouts + 1.0));
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn a_change_rebuilds_the_services_it_touches_and_shares_the_others() {
    let harness = Harness::new();
    let fake = FakeCluster::new("touch", 1000);
    fake.apply_json(system_namespace("net1"));
    fake.apply_json(node("n1", json!({"topology.kubernetes.io/region": "r1"})));
    web_service(&fake, &[("10.0.0.1", "web-a")]);
    fake.apply_json(service("other"));
    fake.apply_json(pod("other-a", "n1", json!({"app": "other"})));
    let other_slice = |service: &str| {
        slice("other-1", service, json!([{"name": "http", "port": 8080}]), json!([ep("10.0.1.1", "other-a")]))
    };
    fake.apply_json(other_slice("other"));
    let _watcher = harness.watch(fake.client(), "touch", &options());
    assert_eventually("the model", WAIT, || harness.addresses("touch", "other") == ["10.0.1.1"]).await;
    let shared = |name: &str| -> Arc<ServiceModel> {
        let model = harness.cluster("touch").unwrap();
        Arc::clone(model.services.iter().find(|s| s.name == name).unwrap())
    };
    let other = shared("other");

    // A pod of web is relabelled: web is rebuilt, other keeps its Arc.
    fake.apply_json(pod("web-a", "n1", json!({"app": "web", "version": "v2"})));
    assert_eventually("the relabelled pod", WAIT, || {
        endpoint(&shared("web"), "10.0.0.1").is_some_and(|e| e.labels.get("version").is_some_and(|v| v == "v2"))
    })
    .await;
    assert!(Arc::ptr_eq(&other, &shared("other")), "other is shared, not rebuilt");

    // A new service takes its place in order; a slice moves from other to it.
    fake.apply_json(service("mid"));
    fake.apply_json(other_slice("mid"));
    assert_eventually("the slice in its new service", WAIT, || {
        harness.addresses("touch", "mid") == ["10.0.1.1"] && harness.addresses("touch", "other").is_empty()
    })
    .await;
    let names: Vec<String> = harness.cluster("touch").unwrap().services.iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["mid", "other", "web"]);

    // The pod of the moved slice changes: the service that now points at it follows.
    fake.apply_json(pod("other-a", "n1", json!({"app": "other", "version": "v3"})));
    assert_eventually("the pod of the moved slice", WAIT, || {
        endpoint(&shared("mid"), "10.0.1.1").is_some_and(|e| e.labels.get("version").is_some_and(|v| v == "v3"))
    })
    .await;

    // A node's labels reach the pods on it; a deleted service leaves.
    fake.apply_json(node("n1", json!({"topology.kubernetes.io/region": "r9"})));
    fake.delete("Service", Some(NS), "other");
    assert_eventually("the node's locality and the deletion", WAIT, || {
        let model = harness.cluster("touch").unwrap();
        find_service(&model, "other").is_none()
            && endpoint(find_service(&model, "web").unwrap(), "10.0.0.1").is_some_and(|e| e.locality == "r9")
    })
    .await;
}
