//! What the end-to-end tests share: a mesh PKI, backends on loopback addresses, a control service and
//! gateways running in process.

#![allow(dead_code)] // each test file uses its own part of this module

pub mod envoy;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crossgate_control::ads::AdsOptions;
use crossgate_control::service::{Control, ControlConfig, MeshSource, TlsFiles};
use crossgate_control::views::ViewOptions;
use crossgate_proxy::testing::gateway::TestGateway;
use crossgate_proxy::testing::pki::{SIDECAR_ALPN, TestCa, WorkloadIdentity};
use crossgate_proxy::testing::workload::{self, EchoBackend};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SNI: &str = "outbound_.5000_._.helloworld.sample.svc.cluster.local";
pub const WITHIN: Duration = Duration::from_secs(10);

pub struct Mesh {
    pub client: WorkloadIdentity,
    pub server: WorkloadIdentity,
}

pub fn mesh() -> Mesh {
    let ca = TestCa::new("cluster.local");
    Mesh { client: ca.workload("sleep", "sleep"), server: ca.workload("sample", "helloworld") }
}

impl Mesh {
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.client_config(&self.server.spiffe, &SIDECAR_ALPN)
    }

    /// The backend's name, as seen through the gateway at `address`.
    pub async fn call(&self, address: SocketAddr) -> Option<String> {
        self.call_sni(address, SNI).await
    }

    /// The same, asking for the cluster `sni` (e.g. a subset).
    pub async fn call_sni(&self, address: SocketAddr, sni: &str) -> Option<String> {
        let mut tls = workload::connect(address, sni, self.client_config()).await.ok()?;
        workload::read_greeting(&mut tls).await.ok().map(|(name, _)| name)
    }
}

/// Backends for the same service port on different loopback addresses, as pods of one Service share their
/// target port: 127.0.0.2, 127.0.0.3, ... all on one port.
pub async fn backends(mesh: &Mesh, names: &[&str]) -> (u16, Vec<EchoBackend>) {
    'port: loop {
        let first = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for i in 1..names.len() {
            match TcpListener::bind(format!("127.0.0.{}:{port}", i + 2)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => continue 'port,
            }
        }
        let backends =
            listeners.into_iter().zip(names).map(|(listener, name)| EchoBackend::serve(listener, &mesh.server, name));
        return (port, backends.collect());
    }
}

/// A two-cluster mesh file: `cluster1` on network1 and `cluster2` on network2, helloworld's endpoints given
/// as (cluster index, address, version), plus extra YAML for each cluster's destination rules.
pub fn mesh_yaml(port: u16, endpoints: &[(usize, &str, &str)], destination_rules: &str) -> String {
    let mut yaml = String::from("clusters:\n");
    for (index, network) in [(1, "network1"), (2, "network2")] {
        yaml.push_str(&format!(
            "- name: cluster{index}\n  network: {network}\n  services:\n  - name: helloworld\n    namespace: sample\n    \
             ports: [{{ name: tls, port: 5000, target_port: {port} }}]\n    endpoints:\n"
        ));
        for (_, address, version) in endpoints.iter().filter(|(cluster, _, _)| *cluster == index) {
            yaml.push_str(&format!(
                "    - address: {address}\n      labels: {{ app: helloworld, version: {version}, \
                 security.istio.io/tlsMode: istio }}\n      workload_name: helloworld-{version}\n"
            ));
        }
        yaml.push_str(destination_rules);
    }
    yaml
}

pub fn write_atomically(path: &Path, text: &str) {
    let staging = path.with_extension("new");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

pub struct RunningControl {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningControl {
    pub async fn start(mesh_file: &Path, listen: SocketAddr, tls: Option<TlsFiles>) -> RunningControl {
        Self::start_with(MeshSource::File(mesh_file.to_owned()), listen, tls).await
    }

    pub async fn start_with(source: MeshSource, listen: SocketAddr, tls: Option<TlsFiles>) -> RunningControl {
        Self::start_with_ads(source, listen, tls, AdsOptions::default()).await
    }

    /// With the given settings for Envoy gateways.
    pub async fn start_with_ads(
        source: MeshSource,
        listen: SocketAddr,
        tls: Option<TlsFiles>,
        ads: AdsOptions,
    ) -> RunningControl {
        let config = ControlConfig {
            source,
            cluster_id: "cluster1".to_owned(),
            view: ViewOptions::default(),
            ads,
            listen,
            admin: "127.0.0.1:0".parse().unwrap(),
            debounce: Duration::from_millis(20),
            tls,
            limits: Default::default(),
        };
        let control = Control::bind(config).await.unwrap();
        let (grpc, admin) = (control.grpc_addr(), control.admin_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(control.run(None, async move {
            let _ = stopped.await;
        }));
        RunningControl { grpc, admin, stop: Some(stop), task }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WITHIN, &mut self.task).await.expect("control stops").unwrap().unwrap();
    }

    pub async fn debug_gateways(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/debug/gateways").await.1).unwrap()
    }

    /// The status code and body of `GET path` on the admin port.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await.unwrap()
    }
}

/// The status code and body of `GET path` at `address` (HTTP/1.1, the connection closed after it).
pub async fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let malformed = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not HTTP: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).ok_or_else(malformed)?;
    let chunked = head.lines().any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked { dechunk(body).ok_or_else(malformed)? } else { body.to_owned() };
    Ok((status, body))
}

/// A chunked HTTP/1.1 body (Envoy's admin sends large ones so), joined.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// A gateway of `cluster` on `network`, fed by the control service at `xds`.
pub async fn gateway(xds: &str, cluster: &str, network: &str, extra: &[&str]) -> TestGateway {
    let mut flags = vec![
        format!("--xds={xds}"),
        format!("--cluster-id={cluster}"),
        format!("--network={network}"),
        format!("--requested-network-view={network}"),
        format!("--node-id={cluster}-gateway"),
    ];
    flags.extend(extra.iter().map(|f| f.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestGateway::start_without_resources(&flags).await
}

pub async fn ready(gateway: &TestGateway) -> bool {
    gateway.handle.store.is_loaded()
}
