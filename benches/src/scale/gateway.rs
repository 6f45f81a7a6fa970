//! The gateways: `crossgate-proxy` child processes on the control service's delta ADS, each with its own
//! cluster, network, requested network view and locality, every port on 127.0.0.1, one worker.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::mesh::CLUSTERS;
use super::probe;

/// Who one gateway is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: String,
    pub cluster_id: String,
    pub network: String,
    /// The networks whose endpoints it is sent.
    pub view: Vec<String>,
    pub locality: String,
}

impl Identity {
    /// Gateway `i`: cluster1 and cluster2 in turn, each on its cluster's network in one of its three zones;
    /// every third (from the second) asks for both networks' endpoints, the others for their own network's.
    pub fn nth(i: usize) -> Identity {
        let (cluster_id, network, region, zones) = CLUSTERS[i % 2];
        let view = if i % 3 == 1 {
            CLUSTERS.iter().map(|(_, network, _, _)| (*network).to_owned()).collect()
        } else {
            vec![network.to_owned()]
        };
        Identity {
            node_id: format!("gw-{i}"),
            cluster_id: cluster_id.to_owned(),
            network: network.to_owned(),
            view,
            locality: format!("{region}/{}", zones[i / 2 % zones.len()]),
        }
    }

    /// Whether a change of an endpoint on `network` reaches this gateway's view.
    pub fn sees(&self, network: &str) -> bool {
        self.view.is_empty() || self.view.iter().any(|n| n == network)
    }
}

/// A running gateway; killed when dropped.
#[derive(Debug)]
pub struct GatewayProcess {
    pub identity: Identity,
    child: Child,
    pub status_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

impl GatewayProcess {
    pub fn spawn(binary: &Path, xds: SocketAddr, identity: Identity, log_dir: &Path) -> anyhow::Result<Self> {
        let [listen, status_addr, metrics_addr, admin_addr] = free_ports()?;
        let log = File::create(log_dir.join(format!("{}.log", identity.node_id)))?;
        let mut command = Command::new(binary);
        command
            .arg("--xds")
            .arg(format!("http://{xds}"))
            .args(["--node-id", &identity.node_id, "--cluster-id", &identity.cluster_id])
            .args(["--network", &identity.network, "--requested-network-view", &identity.view.join(",")])
            .args(["--locality", &identity.locality, "--workers", "1"])
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--status-addr")
            .arg(status_addr.to_string())
            .arg("--metrics-addr")
            .arg(metrics_addr.to_string())
            .arg("--admin-addr")
            .arg(admin_addr.to_string())
            // Its log at warn: the per-update info lines would cost CPU the figures should not include.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command.spawn().with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(GatewayProcess { identity, child, status_addr, metrics_addr })
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Whether it answers 200 on its status port's `/healthz/ready`; an error if it exited.
    pub fn ready(&mut self) -> anyhow::Result<bool> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited: {status}", self.identity.node_id);
        }
        let answer = probe::http_get(self.status_addr, "/healthz/ready", Duration::from_secs(2));
        Ok(matches!(answer, Ok((200, _))))
    }

    /// Its `/stats/prometheus` page.
    pub fn metrics_page(&self) -> anyhow::Result<String> {
        let (status, body) = probe::http_get(self.metrics_addr, "/stats/prometheus", Duration::from_secs(60))
            .with_context(|| format!("{}: metrics page", self.identity.node_id))?;
        anyhow::ensure!(status == 200, "{}: metrics page answered {status}", self.identity.node_id);
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    pub fn rss_bytes(&self) -> u64 {
        probe::status_bytes(&self.pid(), "VmRSS:")
    }

    pub fn cpu_ns(&self) -> u64 {
        probe::process_cpu_ns(&self.pid())
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Four free ports on 127.0.0.1 (held together while picked, so they differ).
fn free_ports() -> anyhow::Result<[SocketAddr; 4]> {
    let listeners = (0..4).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    let addrs = listeners.iter().map(TcpListener::local_addr).collect::<Result<Vec<_>, _>>()?;
    Ok([addrs[0], addrs[1], addrs[2], addrs[3]])
}

/// The crossgate-proxy binary: `explicit`, else the one beside this program (as `cargo build` puts both),
/// else the release one.
pub fn find_proxy(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    let beside = exe.as_ref().and_then(|exe| Some(exe.parent()?.join("crossgate-proxy")));
    let release = exe.as_ref().and_then(|exe| Some(exe.parent()?.parent()?.join("release/crossgate-proxy")));
    explicit.or(beside.filter(|p| p.is_file())).or(release).filter(|p| p.is_file()).context(
        "no crossgate-proxy binary beside this one: build it (cargo build --release -p crossgate-proxy) or pass \
         --proxy-bin",
    )
}
