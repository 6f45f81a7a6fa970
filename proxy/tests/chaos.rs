//! Hostile load and local faults (issue #11): the gateway as a child process under a descriptor limit, with
//! its side doors held by idle clients, its stderr closed, SIGHUP, and an in-place restart beside a draining
//! gateway. Each test failed before its fix.

use std::net::SocketAddr;
use std::time::Duration;

use crossgate_proxy::config::GatewayConfig;
use crossgate_proxy::gateway::Gateway;
use crossgate_proxy::testing::eventually;
use crossgate_proxy::testing::gateway::{TempDir, TestGateway};
use crossgate_proxy::testing::workload::{self, EchoBackend, Mesh};
use crossgate_sidedoor::testing::{LimitedChild, free_address, hold_idle, http_get};

const SNI: &str = "outbound_.5000_._.helloworld.sample.svc.cluster.local";
const WITHIN: Duration = Duration::from_secs(10);
/// A process that retries a failed accept at once uses a whole core; one that waits uses next to nothing.
/// Half a core is far from both, and leaves room for a slow CI machine serving the tunnels of the test.
const SPINNING: f64 = 0.5;

fn resources(endpoints: &[SocketAddr]) -> String {
    let mut yaml = format!("clusters:\n- name: {SNI}\n  endpoints:\n");
    for endpoint in endpoints {
        yaml.push_str(&format!("  - address: '{endpoint}'\n    cluster_id: cluster1\n"));
    }
    yaml
}

/// A gateway run from its binary, on ports known in advance.
struct ChildGateway {
    process: LimitedChild,
    listen: SocketAddr,
    status: SocketAddr,
    metrics: SocketAddr,
    admin: SocketAddr,
    resources: std::path::PathBuf,
    _directory: TempDir,
}

impl ChildGateway {
    /// Starts the binary with `max_files` descriptors at most, serving `yaml`, and waits until it is ready.
    async fn start(yaml: &str, max_files: u32, flags: &[&str]) -> ChildGateway {
        let directory = TempDir::new("chaos");
        let resources = directory.path().join("resources.yaml");
        std::fs::write(&resources, yaml).unwrap();
        let [listen, status, metrics, admin] = [(); 4].map(|()| free_address());
        let mut args = vec![
            "--workers=1".to_owned(),
            format!("--resources={}", resources.display()),
            format!("--listen={listen}"),
            format!("--status-addr={status}"),
            format!("--metrics-addr={metrics}"),
            format!("--admin-addr={admin}"),
        ];
        args.extend(flags.iter().map(|flag| flag.to_string()));
        let process = LimitedChild::spawn(env!("CARGO_BIN_EXE_crossgate-proxy"), &args, max_files);
        let gateway = ChildGateway { process, listen, status, metrics, admin, resources, _directory: directory };
        eventually(WITHIN, "the child gateway is ready", || gateway.ready()).await;
        gateway
    }

    async fn ready(&self) -> bool {
        matches!(http_get(self.status, "/healthz/ready").await, Ok((200, _)))
    }

    /// The share of a core the process used while `work` ran, and what `work` returned.
    async fn cpu_during<T>(&self, work: impl Future<Output = T>) -> (f64, T) {
        let (cpu, wall) = (self.process.cpu_time(), tokio::time::Instant::now());
        let result = work.await;
        let used = (self.process.cpu_time() - cpu).as_secs_f64() / wall.elapsed().as_secs_f64();
        (used, result)
    }
}

/// Sidecar-like tunnels through `gateway`, one after the other for `during`: how many got the backend's
/// greeting, and why the others failed.
async fn tunnels(mesh: &Mesh, gateway: SocketAddr, during: Duration) -> (usize, Vec<String>) {
    let (mut good, mut failed) = (0, Vec::new());
    let until = tokio::time::Instant::now() + during;
    while tokio::time::Instant::now() < until {
        let tunnel = async {
            let mut tls = workload::connect(gateway, &mesh.sni, mesh.client_config()).await?;
            workload::read_greeting(&mut tls).await
        };
        match tokio::time::timeout(Duration::from_secs(5), tunnel).await {
            Ok(Ok(_)) => good += 1,
            Ok(Err(error)) => failed.push(error.to_string()),
            Err(_) => failed.push("timed out".to_owned()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (good, failed)
}

/// 600 idle clients on the status and metrics ports: the side doors take their cap (64 each) and close the
/// rest at once, so the data plane keeps its descriptors and every tunnel goes through, without a spin and with
/// a handful of log lines. Before: the status port took every descriptor, tunnels failed, and the admin
/// accept loop spun on EMFILE with a warning per try.
#[tokio::test]
async fn idle_clients_on_the_side_doors_leave_the_data_plane_its_descriptors() {
    let mesh = Mesh::new(SNI);
    let backend = EchoBackend::start(&mesh.server, "helloworld-v1").await;
    let gateway = ChildGateway::start(&resources(&[backend.address]), 320, &[]).await;
    let lines = gateway.process.log_lines();
    let mut held = hold_idle(gateway.status, 300).await;
    held.extend(hold_idle(gateway.metrics, 300).await);
    let (cpu, (good, failed)) = gateway.cpu_during(tunnels(&mesh, gateway.listen, Duration::from_secs(3))).await;
    let logged = gateway.process.log_lines() - lines;
    assert!(failed.is_empty(), "{good} tunnels went through, these failed: {failed:?}");
    assert!(cpu < SPINNING, "the gateway used {cpu:.2} of a core");
    assert!(logged < 50, "{logged} log lines:\n{}", gateway.process.log());
}

/// With fewer descriptors left than the side door's cap, the status port runs out of them: its accept loop
/// pauses instead of spinning, logs a line now and then, and serves again once descriptors are freed.
#[tokio::test]
async fn a_side_door_out_of_descriptors_pauses_and_recovers() {
    let mesh = Mesh::new(SNI);
    let backend = EchoBackend::start(&mesh.server, "helloworld-v1").await;
    let gateway = ChildGateway::start(&resources(&[backend.address]), 64, &[]).await;
    let lines = gateway.process.log_lines();
    let (cpu, held) = gateway
        .cpu_during(async {
            let held = hold_idle(gateway.status, 100).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            held
        })
        .await;
    let logged = gateway.process.log_lines() - lines;
    assert!(cpu < SPINNING, "the gateway used {cpu:.2} of a core");
    assert!(logged < 20, "{logged} log lines:\n{}", gateway.process.log());
    assert!(gateway.process.log().contains("accept failed"), "{}", gateway.process.log());
    drop(held);
    eventually(WITHIN, "the status port serves again", || gateway.ready()).await;
    assert_eq!(tunnels(&mesh, gateway.listen, Duration::from_millis(500)).await.1, Vec::<String>::new());
}

/// Once the log's reader has gone, logging fails: configuration reloads still apply, and SIGTERM still drains
/// and exits. Before: the first failed write panicked the task that logged, so the watcher died after one
/// reload and SIGTERM was ignored.
#[tokio::test]
async fn a_closed_log_pipe_neither_stops_the_watcher_nor_disables_sigterm() {
    let mesh = Mesh::new(SNI);
    let (first, second) = (EchoBackend::start(&mesh.server, "v1").await, EchoBackend::start(&mesh.server, "v2").await);
    let flags = ["--drain-duration=1s", "--termination-grace=5s"];
    let mut gateway = ChildGateway::start(&resources(&[first.address]), 1024, &flags).await;
    gateway.process.close_output().await;
    // Two reloads, each logged; the second must still be applied.
    for endpoints in [vec![first.address, second.address], vec![second.address]] {
        let staging = gateway.resources.with_extension("new");
        std::fs::write(&staging, resources(&endpoints)).unwrap();
        std::fs::rename(&staging, &gateway.resources).unwrap();
        let dump = || async {
            http_get(gateway.admin, "/config_dump").await.is_ok_and(|(_, dump)| {
                dump.contains(&second.address.to_string()) == endpoints.contains(&second.address)
                    && dump.contains(&first.address.to_string()) == endpoints.contains(&first.address)
            })
        };
        eventually(WITHIN, "the reload is applied", dump).await;
    }
    gateway.process.signal("TERM");
    eventually(WITHIN, "readiness fails once draining", || async {
        matches!(http_get(gateway.status, "/healthz/ready").await, Ok((503, _)))
    })
    .await;
    let status = gateway.process.exited_within(WITHIN).await.expect("the gateway exits after its drain");
    assert!(status.success(), "{status}");
}

/// SIGHUP is ignored (logged once): the gateway keeps serving. Before: it killed the gateway at once.
#[tokio::test]
async fn sighup_is_ignored() {
    let mesh = Mesh::new(SNI);
    let backend = EchoBackend::start(&mesh.server, "helloworld-v1").await;
    let mut gateway = ChildGateway::start(&resources(&[backend.address]), 1024, &[]).await;
    gateway.process.signal("HUP");
    gateway.process.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(gateway.process.running(), "SIGHUP killed the gateway");
    assert!(gateway.ready().await);
    assert_eq!(tunnels(&mesh, gateway.listen, Duration::from_millis(500)).await.1, Vec::<String>::new());
    assert_eq!(gateway.process.log().matches("SIGHUP ignored").count(), 1, "{}", gateway.process.log());
}

/// Whether `failures` are at most the one the kernel may cause: a connection queued on the old gateway's
/// socket (one per port with `--workers=1`) in the instant that socket closes is reset, not moved to the new one
/// (unless `net.ipv4.tcp_migrate_req` is set); about one run in ten hits it. A refusal or a timeout never passes.
fn within_the_close_race(failures: &[String]) -> bool {
    failures.len() <= 1 && failures.iter().all(|failure| failure.contains("reset by peer"))
}

/// A new gateway starts on the ports of one that is draining, and takes over: no tunnel and no readiness
/// probe is refused throughout (see `within_the_close_race`). Before: the new one could not bind the status port.
#[tokio::test]
async fn a_new_gateway_starts_beside_a_draining_one_and_no_connection_is_refused() {
    let mesh = Mesh::new(SNI);
    let backend = EchoBackend::start(&mesh.server, "helloworld-v1").await;
    let yaml = resources(&[backend.address]);
    let old = TestGateway::start(&yaml, &["--workers=1", "--drain-duration=1s", "--termination-grace=3s"]).await;
    eventually(WITHIN, "ready", || async {
        matches!(http_get(old.admin.status, "/healthz/ready").await, Ok((200, _)))
    })
    .await;
    let (listen, status) = (old.listen, old.admin.status);
    const THROUGHOUT: Duration = Duration::from_secs(5);
    let probes = tokio::spawn(async move {
        let (mut refused, until) = (Vec::new(), tokio::time::Instant::now() + THROUGHOUT);
        while tokio::time::Instant::now() < until {
            if let Err(error) = http_get(status, "/healthz/ready").await {
                refused.push(error.to_string());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        refused
    });
    let clients = tokio::spawn(async move { tunnels(&mesh, listen, THROUGHOUT).await });

    tokio::time::sleep(Duration::from_millis(500)).await;
    let handle = old.handle.clone();
    let drain = tokio::spawn(async move { handle.shut_down().await });
    let config = GatewayConfig::from_flags([
        "--workers=1".to_owned(),
        format!("--resources={}", old.resources.display()),
        format!("--listen={listen}"),
        format!("--status-addr={status}"),
        format!("--metrics-addr={}", old.admin.metrics),
        format!("--admin-addr={}", old.admin.admin),
    ])
    .unwrap();
    let new = Gateway::bind(config).await.expect("the new gateway binds beside the draining one");
    let new_handle = new.handle();
    let new_run = tokio::spawn(new.run());

    tokio::time::timeout(WITHIN, drain).await.expect("the old gateway drains").unwrap();
    tokio::time::timeout(WITHIN, old.finished()).await.expect("the old gateway exits").unwrap();
    let (good, failed) = clients.await.unwrap();
    assert!(within_the_close_race(&failed), "{good} tunnels went through, these failed: {failed:?}");
    let refused = probes.await.unwrap();
    assert!(within_the_close_race(&refused), "readiness probes failed: {refused:?}");
    assert!(matches!(http_get(status, "/healthz/ready").await, Ok((200, _))), "the new gateway is ready");
    new_handle.terminate();
    new_run.await.unwrap().unwrap();
}
