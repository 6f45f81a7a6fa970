//! A real Envoy as the east-west gateway, fed by crossgate-control over delta ADS with the bootstrap
//! `crossgate-control bootstrap envoy` writes: Istio's SNI and ALPN route real mTLS through it to the right
//! backend, and it follows the mesh file. Without `envoy` on PATH the test is skipped, except under CI=true,
//! where it fails (`common::envoy`).

mod common;

use std::time::Duration;

use common::envoy::{Envoy, envoy_binary, free_port, stat_sum};
use common::*;
use crossgate_control::ads::AdsOptions;
use crossgate_control::service::MeshSource;
use crossgate_istio::node::GatewayNode;
use crossgate_proxy::testing::gateway::TempDir;
use crossgate_proxy::testing::{eventually, workload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_real_envoy_routes_istio_mtls_on_the_control_services_ads_and_follows_the_mesh() {
    let Some(envoy_binary) = envoy_binary() else { return };
    let mesh = mesh();
    let (port, _backends) = backends(&mesh, &["one", "two"]).await;
    let dir = TempDir::new("e2e-envoy");
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh_yaml(port, &[(1, "127.0.0.2", "v1")], "")).unwrap();
    let gateway_port = free_port();
    let ads = AdsOptions { listener_port: gateway_port, ..AdsOptions::default() };
    let source = MeshSource::File(mesh_file.clone());
    let control = RunningControl::start_with_ads(source, "127.0.0.1:0".parse().unwrap(), None, ads.clone()).await;

    let node = GatewayNode {
        id: "envoy-eastwestgateway".to_owned(),
        cluster_id: "cluster1".to_owned(),
        network: "network1".to_owned(),
        requested_network_view: vec!["network1".to_owned()],
        ..GatewayNode::default()
    };
    let gateway = Envoy::start(&envoy_binary, node, control.grpc, gateway_port, dir.path()).await;
    let listen = gateway.listen;
    // The backend greets with its name once the client's certificate checked: mTLS went through untouched.
    eventually(WITHIN, "Envoy routes Istio's SNI to the endpoint", || async {
        mesh.call(listen).await.as_deref() == Some("one")
    })
    .await;
    // Bytes both ways, end to end: the backend saw the client's own certificate and echoes.
    let mut tls = workload::connect(listen, SNI, mesh.client_config()).await.unwrap();
    let (backend, client) = workload::read_greeting(&mut tls).await.unwrap();
    assert_eq!((backend.as_str(), client.as_str()), ("one", mesh.client.spiffe.as_str()));
    tls.write_all(b"ping through envoy\n").await.unwrap();
    let mut echoed = [0u8; 19];
    tls.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping through envoy\n");
    drop(tls);
    // No filter chain for a cluster that does not exist: closed, never routed elsewhere.
    assert_eq!(mesh.call_sni(listen, "outbound_.5001_._.helloworld.sample.svc.cluster.local").await, None);
    let (status, metrics) = http_get(gateway.metrics, "/stats/prometheus").await.unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("envoy_cluster_manager_active_clusters"), "{metrics}");

    // The endpoint replaced, then a second one added: Envoy follows both changes.
    write_atomically(&mesh_file, &mesh_yaml(port, &[(1, "127.0.0.3", "v1")], ""));
    eventually(WITHIN, "Envoy follows the replaced endpoint", || async {
        mesh.call(listen).await.as_deref() == Some("two")
    })
    .await;
    write_atomically(&mesh_file, &mesh_yaml(port, &[(1, "127.0.0.2", "v1"), (1, "127.0.0.3", "v1")], ""));
    let deadline = tokio::time::Instant::now() + WITHIN;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "Envoy balances over both endpoints: only {seen:?}");
        if let Ok(Some(name)) = tokio::time::timeout(WITHIN, mesh.call(listen)).await {
            seen.insert(name);
        }
    }

    // The control service saw only ACKs.
    let gateways = control.debug_gateways().await;
    let envoy = gateways.as_array().unwrap().iter().find(|g| g["protocol"] == "delta").expect("the Envoy gateway");
    assert_eq!(envoy["node"]["id"], "envoy-eastwestgateway");
    assert_eq!(envoy["nacks"], 0, "{envoy}");
    assert!(envoy["last_nack"].is_null(), "{envoy}");
    let acked_assignments = &envoy["acked"]["type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"];
    assert!(acked_assignments[SNI].is_string(), "{envoy}");

    // And Envoy holds every cluster active: none warming, nothing rejected.
    let stats = gateway.stats().await;
    assert_eq!(stat_sum(&stats, "cluster_manager.warming_clusters"), 0, "{stats}");
    assert_eq!(stat_sum(&stats, ".update_rejected"), 0, "{stats}");
    assert_eq!(stat_sum(&stats, "control_plane.connected_state"), 1, "{stats}");
    let (_, dump) = http_get(gateway.admin, "/config_dump").await.unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let configs = dump["configs"].as_array().unwrap();
    let clusters = configs.iter().find(|c| c["@type"].as_str().unwrap().ends_with("ClustersConfigDump")).unwrap();
    assert!(clusters["dynamic_warming_clusters"].as_array().is_none_or(Vec::is_empty), "{clusters}");
    let active: Vec<&str> = clusters["dynamic_active_clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["cluster"]["name"].as_str())
        .collect();
    assert_eq!(active, [SNI]);
    let listeners = configs.iter().find(|c| c["@type"].as_str().unwrap().ends_with("ListenersConfigDump")).unwrap();
    let dynamic = listeners["dynamic_listeners"].as_array().unwrap();
    assert_eq!(dynamic.len(), 1, "{listeners}");
    assert!(dynamic[0]["warming_state"].is_null() && dynamic[0]["active_state"].is_object(), "{listeners}");

    // The control service restarts: Envoy reconnects with the versions it holds, which still match, so it is
    // sent nothing again, and routes on.
    let listen_grpc = control.grpc;
    control.stop().await;
    let source = MeshSource::File(mesh_file.clone());
    let control = RunningControl::start_with_ads(source, listen_grpc, None, ads).await;
    eventually(Duration::from_secs(30), "Envoy reconnected and answered", || async {
        let gateways = control.debug_gateways().await;
        gateways.as_array().unwrap().iter().any(|g| g["protocol"] == "delta" && g["acks"].as_u64() >= Some(2))
    })
    .await;
    let gateways = control.debug_gateways().await;
    let envoy = gateways.as_array().unwrap().iter().find(|g| g["protocol"] == "delta").unwrap();
    assert_eq!((envoy["pushed_resources"].as_u64(), envoy["nacks"].as_u64()), (Some(0), Some(0)), "{envoy}");
    assert!(mesh.call(listen).await.is_some());
    control.stop().await;
}
