//! The whole path from Kubernetes to traffic: two fake API servers on two networks, joined by an Istio
//! remote secret, watched by the real control service through kubeconfigs over HTTP; each network's gateway
//! learns its endpoints from it and carries real mTLS traffic to them.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use crossgate_control::fake_kube::{FakeCluster, Fault, ServedCluster};
use crossgate_control::service::MeshSource;
use crossgate_control::sources::kube::KubeOptions;
use crossgate_proxy::testing::eventually;
use crossgate_proxy::testing::gateway::TempDir;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

const SUBSET_V1: &str = "outbound_.5000_.v1_.helloworld.sample.svc.cluster.local";

fn system_namespace(network: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "istio-system", "labels": {"topology.istio.io/network": network}}})
}

fn helloworld_service(target_port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "helloworld", "namespace": "sample"},
        "spec": {"ports": [{"name": "tls", "port": 5000, "targetPort": target_port}]}})
}

fn helloworld_pod(name: &str, version: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "sample",
                     "labels": {"app": "helloworld", "version": version, "security.istio.io/tlsMode": "istio"}},
        "spec": {"containers": [{"name": "helloworld", "image": "helloworld"}]}, "status": {"phase": "Running"}})
}

/// The EndpointSlice of helloworld: (address, pod) pairs, all ready.
fn helloworld_slice(target_port: u16, endpoints: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(address, pod)| {
            json!({"addresses": [address], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": "sample"}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "helloworld-abc", "namespace": "sample", "labels": {"kubernetes.io/service-name": "helloworld"}},
        "ports": [{"name": "tls", "port": target_port}], "endpoints": endpoints})
}

/// What `istioctl create-remote-secret --name cluster2` writes.
fn remote_secret(served: &ServedCluster) -> Secret {
    let annotation = ("networking.istio.io/cluster".to_owned(), "cluster2".to_owned());
    Secret {
        metadata: ObjectMeta {
            name: Some("istio-remote-secret-cluster2".to_owned()),
            namespace: Some("istio-system".to_owned()),
            labels: Some(BTreeMap::from([("istio/multiCluster".to_owned(), "true".to_owned())])),
            annotations: Some(BTreeMap::from([annotation])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            "cluster2".to_owned(),
            ByteString(served.kubeconfig_yaml("cluster2").into_bytes()),
        )])),
        ..Secret::default()
    }
}

/// Two fake clusters on two networks serving helloworld on `port` (v1 at 127.0.0.2 in cluster1, v2 at 127.0.0.3
/// in cluster2), cluster1 holding cluster2's remote secret, and the kube source that reads them through cluster1.
struct TwoClusters {
    cluster1: FakeCluster,
    cluster2: FakeCluster,
    _served: (ServedCluster, ServedCluster),
    _dir: TempDir,
    source: MeshSource,
}

impl TwoClusters {
    async fn start(port: u16) -> TwoClusters {
        // cluster1 holds the remote secret; the RVs are far apart so that cross-wiring would show.
        let cluster1 = FakeCluster::new("cluster1", 1000);
        let cluster2 = FakeCluster::new("cluster2", 5_000_000);
        let (served1, served2) = (cluster1.serve().await.unwrap(), cluster2.serve().await.unwrap());
        for (cluster, network, pod, version, address) in [
            (&cluster1, "network1", "helloworld-v1-7d9f-abcde", "v1", "127.0.0.2"),
            (&cluster2, "network2", "helloworld-v2-5c8b-fghij", "v2", "127.0.0.3"),
        ] {
            cluster.apply_json(system_namespace(network));
            cluster.apply_json(helloworld_service(port));
            cluster.apply_json(helloworld_pod(pod, version));
            cluster.apply_json(helloworld_slice(port, &[(address, pod)]));
        }
        // Subsets exist in cluster1's DestinationRule only: per-cluster config, as in multi-primary Istio.
        cluster1.apply_json(json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "helloworld", "namespace": "sample"},
            "spec": {"host": "helloworld", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                       {"name": "v2", "labels": {"version": "v2"}}],
                     "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}}));
        cluster1.apply(&remote_secret(&served2));

        let dir = TempDir::new("e2e-kube");
        let kubeconfig = dir.path().join("cluster1.kubeconfig");
        served1.write_kubeconfig(&kubeconfig).unwrap();
        let options = KubeOptions {
            debounce: Duration::from_millis(20),
            destination_rule_recheck: Duration::from_millis(200),
            ..KubeOptions::default()
        };
        let source = MeshSource::Kube { kubeconfig: Some(kubeconfig), options };
        TwoClusters { cluster1, cluster2, _served: (served1, served2), _dir: dir, source }
    }
}

#[tokio::test]
async fn kubernetes_clusters_joined_by_a_remote_secret_route_by_network() {
    let mesh = mesh();
    let (port, _backends) = backends(&mesh, &["v1-cluster1", "v2-cluster2", "v2b-cluster2"]).await;
    let clusters = TwoClusters::start(port).await;
    let (cluster1, cluster2) = (&clusters.cluster1, &clusters.cluster2);
    let control = RunningControl::start_with(clusters.source.clone(), "127.0.0.1:0".parse().unwrap(), None).await;
    let xds = format!("http://{}", control.grpc);
    let east = gateway(&xds, "cluster1", "network1", &[]).await;
    let west = gateway(&xds, "cluster2", "network2", &[]).await;
    eventually(WITHIN, "both networks reachable", || async {
        mesh.call(east.listen).await.as_deref() == Some("v1-cluster1")
            && mesh.call(west.listen).await.as_deref() == Some("v2-cluster2")
    })
    .await;

    // An endpoint added in cluster2 appears in cluster2's gateway, never in cluster1's.
    cluster2.apply_json(helloworld_pod("helloworld-v2-5c8b-klmno", "v2"));
    let endpoints = [("127.0.0.3", "helloworld-v2-5c8b-fghij"), ("127.0.0.4", "helloworld-v2-5c8b-klmno")];
    cluster2.apply_json(helloworld_slice(port, &endpoints));
    eventually(WITHIN, "the new cluster2 endpoint is routed", || async {
        mesh.call(west.listen).await.as_deref() == Some("v2b-cluster2")
    })
    .await;
    for _ in 0..6 {
        assert_eq!(mesh.call(east.listen).await.as_deref(), Some("v1-cluster1"));
    }

    // The subset is routable through cluster1's gateway (its cluster defines it), not through cluster2's.
    assert_eq!(mesh.call_sni(east.listen, SUBSET_V1).await.as_deref(), Some("v1-cluster1"));
    assert_eq!(mesh.call_sni(west.listen, SUBSET_V1).await, None);

    // Removing the remote secret takes cluster2 out: its gateway has nothing left to route to.
    cluster1.delete("Secret", Some("istio-system"), "istio-remote-secret-cluster2");
    eventually(WITHIN, "cluster2 left the mesh", || async { mesh.call(west.listen).await.is_none() }).await;
    assert_eq!(mesh.call(east.listen).await.as_deref(), Some("v1-cluster1"));
    let statuses: BTreeMap<String, Value> =
        serde_json::from_str(&control.admin_get("/debug/clusters").await.1).unwrap();
    assert_eq!(statuses.keys().collect::<Vec<_>>(), vec!["cluster1"], "{statuses:?}");
    control.stop().await;
}

#[tokio::test]
async fn a_restarted_control_service_serves_gateways_only_once_its_clusters_have_synced() {
    let mesh = mesh();
    let (port, _backends) = backends(&mesh, &["v1-cluster1", "v2-cluster2"]).await;
    let clusters = TwoClusters::start(port).await;
    let control = RunningControl::start_with(clusters.source.clone(), "127.0.0.1:0".parse().unwrap(), None).await;
    let listen = control.grpc;
    let west = gateway(&format!("http://{listen}"), "cluster2", "network2", &[]).await;
    eventually(WITHIN, "configured", || async { mesh.call(west.listen).await.as_deref() == Some("v2-cluster2") }).await;

    // The control service restarts while cluster2's API server refuses its endpoint slices.
    control.stop().await;
    clusters.cluster2.fail(Fault::Forbidden { kind: "EndpointSlice".into() });
    let control = RunningControl::start_with(clusters.source.clone(), listen, None).await;
    eventually(Duration::from_secs(30), "the gateway reconnected", || async {
        control.debug_gateways().await.as_array().is_some_and(|gateways| !gateways.is_empty())
    })
    .await;
    // Until cluster2 has synced the gateway is sent nothing, so it keeps routing on what it had.
    for _ in 0..5 {
        assert_eq!(mesh.call(west.listen).await.as_deref(), Some("v2-cluster2"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(control.debug_gateways().await[0]["pushes"], 0);
    let (status, body) = control.admin_get("/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cluster2"), "{body}");

    clusters.cluster2.clear_faults();
    eventually(WITHIN, "the gateway is served again", || async {
        control.debug_gateways().await[0]["acks"].as_u64() > Some(0)
    })
    .await;
    assert_eq!(mesh.call(west.listen).await.as_deref(), Some("v2-cluster2"));
    assert_eq!(control.admin_get("/ready").await.0, 200);

    // A later outage of cluster2 keeps the control service ready: it is serving, and its gateways need it.
    clusters.cluster2.fail(Fault::Forbidden { kind: "EndpointSlice".into() });
    clusters.cluster2.drop_watches();
    eventually(WITHIN, "cluster2 shows as not synced", || async {
        control.admin_get("/debug/clusters").await.1.contains("endpointslices")
    })
    .await;
    assert_eq!(control.admin_get("/ready").await.0, 200);
    assert_eq!(mesh.call(west.listen).await.as_deref(), Some("v2-cluster2"), "the last model keeps serving");
    control.stop().await;
}
