//! The control service and gateways together: the mesh file source, the delta discovery stream, real mTLS
//! traffic through gateways that learn their endpoints from it.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use crossgate_control::service::TlsFiles;
use crossgate_proxy::testing::gateway::TempDir;
use crossgate_proxy::testing::{eventually, metric, refusing_address};

#[tokio::test]
async fn each_gateway_routes_to_its_own_network_and_follows_the_mesh_file() {
    let mesh = mesh();
    let (port, backends) = backends(&mesh, &["v1-cluster1", "v2-cluster2", "v2b-cluster2"]).await;
    let dir = TempDir::new("e2e-mesh");
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh_yaml(port, &[(1, "127.0.0.2", "v1"), (2, "127.0.0.3", "v2")], "")).unwrap();
    let control = RunningControl::start(&mesh_file, "127.0.0.1:0".parse().unwrap(), None).await;
    let xds = format!("http://{}", control.grpc);
    let east = gateway(&xds, "cluster1", "network1", &[]).await;
    let west = gateway(&xds, "cluster2", "network2", &[]).await;
    eventually(WITHIN, "both gateways configured", || async { ready(&east).await && ready(&west).await }).await;

    // Each gateway sees only the endpoints of its own network (REQUESTED_NETWORK_VIEW).
    for _ in 0..4 {
        assert_eq!(mesh.call(east.listen).await.as_deref(), Some("v1-cluster1"));
        assert_eq!(mesh.call(west.listen).await.as_deref(), Some("v2-cluster2"));
    }

    // An endpoint added in cluster2 reaches cluster2's gateway, within a second, and not cluster1's.
    let started = std::time::Instant::now();
    let endpoints = [(1, "127.0.0.2", "v1"), (2, "127.0.0.3", "v2"), (2, "127.0.0.4", "v2")];
    write_atomically(&mesh_file, &mesh_yaml(port, &endpoints, ""));
    eventually(WITHIN, "the new endpoint takes connections", || async {
        mesh.call(west.listen).await.as_deref() == Some("v2b-cluster2")
    })
    .await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "followed the change in {elapsed:?}");
    for _ in 0..4 {
        assert_eq!(mesh.call(east.listen).await.as_deref(), Some("v1-cluster1"));
    }
    let gateways = control.debug_gateways().await;
    assert_eq!(gateways.as_array().unwrap().len(), 2, "{gateways}");
    drop(backends);
    control.stop().await;
}

#[tokio::test]
async fn gateways_keep_routing_through_a_control_outage_and_resync() {
    let mesh = mesh();
    let (port, _backends) = backends(&mesh, &["one", "two"]).await;
    let dir = TempDir::new("e2e-outage");
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh_yaml(port, &[(1, "127.0.0.2", "v1")], "")).unwrap();
    let control = RunningControl::start(&mesh_file, "127.0.0.1:0".parse().unwrap(), None).await;
    let listen = control.grpc;
    let east = gateway(&format!("http://{listen}"), "cluster1", "network1", &[]).await;
    eventually(WITHIN, "configured", || async { mesh.call(east.listen).await.as_deref() == Some("one") }).await;

    control.stop().await;
    // The last good configuration keeps serving while the control service is away.
    for _ in 0..3 {
        assert_eq!(mesh.call(east.listen).await.as_deref(), Some("one"));
    }
    eventually(WITHIN, "the gateway noticed", || async {
        metric(&east.metrics(), "crossgate_xds_connected", &[]) == 0.0
    })
    .await;

    // Back on the same address with a changed mesh: the gateway reconnects and resyncs.
    write_atomically(&mesh_file, &mesh_yaml(port, &[(1, "127.0.0.3", "v1")], ""));
    let control = RunningControl::start(&mesh_file, listen, None).await;
    eventually(Duration::from_secs(30), "resynced", || async {
        mesh.call(east.listen).await.as_deref() == Some("two")
    })
    .await;
    control.stop().await;
}

#[tokio::test]
async fn a_cluster_the_control_service_cannot_build_is_not_sent_and_the_last_good_one_serves() {
    let mesh = mesh();
    let (port, _backends) = backends(&mesh, &["v1", "v1b"]).await;
    let dir = TempDir::new("e2e-refused");
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh_yaml(port, &[(1, "127.0.0.2", "v1")], "")).unwrap();
    let control = RunningControl::start(&mesh_file, "127.0.0.1:0".parse().unwrap(), None).await;
    let east = gateway(&format!("http://{}", control.grpc), "cluster1", "network1", &[]).await;
    eventually(WITHIN, "configured", || async { mesh.call(east.listen).await.is_some() }).await;
    let before = control.debug_gateways().await[0]["mesh_version"].as_u64().unwrap();

    // PASSTHROUGH cannot be served by an sni-dnat gateway: the control service does not build it (as istiod's
    // validation would refuse it), and the gateway keeps the last good cluster, endpoint move included.
    let passthrough = "  destination_rules:\n  - { name: hw, namespace: sample, host: helloworld, \
                       trafficPolicy: { loadBalancer: { simple: PASSTHROUGH } } }\n";
    write_atomically(&mesh_file, &mesh_yaml(port, &[(1, "127.0.0.3", "v1")], passthrough));
    eventually(WITHIN, "the control service computed the gateway's view again", || async {
        control.debug_gateways().await[0]["mesh_version"].as_u64() > Some(before)
    })
    .await;
    for _ in 0..3 {
        assert_eq!(mesh.call(east.listen).await.as_deref(), Some("v1"), "the last good configuration serves");
    }
    let gateways = control.debug_gateways().await;
    assert!(gateways[0]["last_nack"].is_null(), "{gateways}");
    assert_eq!(metric(&east.metrics(), "crossgate_xds_responses_total", &[("result", "nack")]), 0.0);

    // Once the rule is fixed the cluster is sent again, with the endpoint where it now is.
    write_atomically(&mesh_file, &mesh_yaml(port, &[(1, "127.0.0.3", "v1")], ""));
    eventually(WITHIN, "the fixed cluster is served", || async {
        mesh.call(east.listen).await.as_deref() == Some("v1b")
    })
    .await;
    control.stop().await;
}

#[tokio::test]
async fn a_gateway_waits_for_its_first_configuration_before_routing() {
    // Nothing listens there yet; no other test uses this loopback address, so the port stays ours.
    let (reserved, address) = refusing_address(std::net::Ipv4Addr::new(127, 0, 0, 99));
    let east = gateway(&format!("http://{address}"), "cluster1", "network1", &[]).await;
    let mesh = mesh();
    let (port, _backends) = backends(&mesh, &["v1"]).await;
    // A client that arrives before any configuration waits in the backlog instead of being refused.
    let early = tokio::spawn({
        let (client, server) = (mesh.client.clone(), mesh.server.clone());
        let listen = east.listen;
        async move { common::Mesh { client, server }.call(listen).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!ready(&east).await);
    assert!(!early.is_finished());

    let dir = TempDir::new("e2e-ready");
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh_yaml(port, &[(1, "127.0.0.2", "v1")], "")).unwrap();
    drop(reserved);
    let control = RunningControl::start(&mesh_file, address, None).await;
    eventually(Duration::from_secs(30), "ready once configured", || async { ready(&east).await }).await;
    assert_eq!(tokio::time::timeout(WITHIN, early).await.unwrap().unwrap().as_deref(), Some("v1"));
    assert_eq!(mesh.call(east.listen).await.as_deref(), Some("v1"));
    control.stop().await;
}

#[tokio::test]
async fn the_control_channel_runs_over_mtls_with_crossgate_control_certs() {
    let dir = TempDir::new("e2e-mtls");
    let pki = dir.path();
    crossgate_control::certs::root_ca(pki).unwrap();
    crossgate_control::certs::intermediate(pki, "cluster1").unwrap();
    let leaf = |name: &str| -> PathBuf {
        let out = pki.join(name);
        crossgate_control::certs::leaf(&pki.join("cluster1"), &[format!("{name}.istio-system.svc")], &[], 1, &out)
            .unwrap();
        out
    };
    let (server, client) = (leaf("crossgate-control"), leaf("gateway"));
    let mesh = mesh();
    let (port, _backends) = backends(&mesh, &["v1"]).await;
    let mesh_file = pki.join("mesh.yaml");
    std::fs::write(&mesh_file, mesh_yaml(port, &[(1, "127.0.0.2", "v1")], "")).unwrap();
    let tls =
        TlsFiles { cert: server.join("cert.pem"), key: server.join("key.pem"), client_ca: Some(server.join("ca.pem")) };
    let control = RunningControl::start(&mesh_file, "127.0.0.1:0".parse().unwrap(), Some(tls)).await;
    let flags = [
        format!("--xds-ca={}", client.join("ca.pem").display()),
        format!("--xds-cert={}", client.join("cert.pem").display()),
        format!("--xds-key={}", client.join("key.pem").display()),
        "--xds-server-name=crossgate-control.istio-system.svc".to_owned(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let east = gateway(&format!("https://{}", control.grpc), "cluster1", "network1", &flags).await;
    eventually(WITHIN, "configured over mTLS", || async { mesh.call(east.listen).await.as_deref() == Some("v1") })
        .await;

    // Without a client certificate the control service refuses the gateway.
    let one_way = [format!("--xds-ca={}", client.join("ca.pem").display()), flags[3].to_owned()];
    let one_way: Vec<&str> = one_way.iter().map(String::as_str).collect();
    let stranger = gateway(&format!("https://{}", control.grpc), "cluster1", "network1", &one_way).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!ready(&stranger).await);
    control.stop().await;
}
