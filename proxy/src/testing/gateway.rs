//! A whole gateway in-process on 127.0.0.1 ports chosen by the kernel, configured by a real resources file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::task::JoinHandle;

use crate::admin::AdminAddresses;
use crate::config::GatewayConfig;
use crate::gateway::{Gateway, GatewayHandle};

/// A running gateway and the file it reads.
#[derive(Debug)]
pub struct TestGateway {
    pub listen: std::net::SocketAddr,
    pub admin: AdminAddresses,
    pub handle: GatewayHandle,
    pub resources: PathBuf,
    directory: TempDir,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestGateway {
    /// Starts a gateway serving `resources_yaml`, with `flags` added to its command line.
    pub async fn start(resources_yaml: &str, flags: &[&str]) -> TestGateway {
        let directory = TempDir::new("gateway");
        let resources = directory.path().join("resources.yaml");
        std::fs::write(&resources, resources_yaml).expect("write resources");
        let resources_flag = format!("--resources={}", resources.display());
        Self::launch(directory, resources, [&[resources_flag.as_str()], flags].concat()).await
    }

    /// Starts a gateway whose configuration source is in `flags` (e.g. `--xds`).
    pub async fn start_without_resources(flags: &[&str]) -> TestGateway {
        let directory = TempDir::new("gateway");
        let resources = directory.path().join("resources.yaml");
        Self::launch(directory, resources, flags.to_vec()).await
    }

    async fn launch(directory: TempDir, resources: PathBuf, flags: Vec<&str>) -> TestGateway {
        let mut args: Vec<String> = [
            "--listen=127.0.0.1:0",
            "--status-addr=127.0.0.1:0",
            "--metrics-addr=127.0.0.1:0",
            "--admin-addr=127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec();
        args.extend(flags.iter().map(|f| f.to_string()));
        let config = GatewayConfig::from_flags(args).expect("valid flags");
        let gateway = Gateway::bind(config).await.expect("gateway binds");
        let (listen, admin, handle) = (gateway.listen_addr(), gateway.admin_addresses(), gateway.handle());
        let task = tokio::spawn(gateway.run());
        TestGateway { listen, admin, handle, resources, directory, task: Some(task) }
    }

    /// Replaces the resources file the way Kubernetes updates a mounted ConfigMap: a new file renamed over it.
    pub fn write_resources(&self, yaml: &str) {
        let staging = self.directory.path().join(".resources.yaml.new");
        std::fs::write(&staging, yaml).expect("write resources");
        std::fs::rename(&staging, &self.resources).expect("rename resources");
    }

    /// The Prometheus exposition of this gateway's metrics.
    pub fn metrics(&self) -> String {
        self.handle.telemetry.render()
    }

    /// Waits for `run` to return (after a shutdown through `handle`).
    pub async fn finished(mut self) -> anyhow::Result<()> {
        self.task.take().expect("not awaited twice").await?
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.handle.terminate();
            task.abort();
        }
    }
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let unique = format!("crossgate-{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
