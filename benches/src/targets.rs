//! The targets: the direct path, crossgate and the peers, each routing the same SNI key to the same backend
//! as Istio's sni-dnat listener would (Istio's ALPNs required where the peer can match them, LEAST_REQUEST or
//! its equivalent, 1 h idle timeout). Peers run as child processes on 127.0.0.1 ports, from configs written
//! at run time into a temp dir, and are stopped after their turn.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossgate_proxy::route::ISTIO_MTLS_ALPNS;
use crossgate_proxy::testing::gateway::{TempDir, TestGateway};

use serde::Serialize;

use crate::sys::Account;

/// Descriptors a proxy keeps beside its tunnels (listeners, logs, its runtime).
pub const FD_RESERVE: u64 = 512;

/// The route every target serves, and a key it must refuse.
pub const SNI: &str = "outbound_.5000_._.echo.bench.svc.cluster.local";
pub const WRONG_SNI: &str = "outbound_.5000_._.other.bench.svc.cluster.local";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Direct,
    Crossgate,
    Envoy,
    Haproxy,
    Nginx,
    Sniproxy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [Kind::Direct, Kind::Crossgate, Kind::Envoy, Kind::Haproxy, Kind::Nginx, Kind::Sniproxy];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Crossgate => "crossgate",
            Kind::Envoy => "envoy",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
            Kind::Sniproxy => "sniproxy",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    pub fn is_peer(self) -> bool {
        !matches!(self, Kind::Direct | Kind::Crossgate)
    }

    /// Whether it refuses a hello without one of Istio's ALPNs, as Istio's filter chains do. sniproxy cannot
    /// match on ALPN.
    pub fn checks_alpn(self) -> bool {
        !matches!(self, Kind::Direct | Kind::Sniproxy)
    }

    /// sniproxy is a single-threaded event loop with no worker setting.
    pub fn runs_with(self, workers: usize) -> bool {
        self != Kind::Sniproxy || workers == 1
    }

    /// The program and the flag that prints its version.
    fn program(self) -> Option<(&'static str, &'static str)> {
        match self {
            Kind::Direct | Kind::Crossgate => None,
            Kind::Envoy => Some(("envoy", "--version")),
            Kind::Haproxy => Some(("haproxy", "-v")),
            Kind::Nginx => Some(("nginx", "-v")),
            Kind::Sniproxy => Some(("sniproxy", "-V")),
        }
    }
}

/// How a target runs.
#[derive(Debug, Clone)]
pub enum Launch {
    /// No proxy: the client connects to the backend.
    Direct,
    /// crossgate on a runtime of the harness (tests): its CPU and memory cannot be told apart.
    InProcess,
    Binary(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Target {
    pub kind: Kind,
    pub launch: Launch,
    pub version: String,
}

impl Target {
    /// The targets of `kinds` that can run here; a line in `notes` for each one skipped.
    pub fn discover(kinds: &[Kind], crossgate: Launch, notes: &mut Vec<String>) -> Vec<Target> {
        let mut targets = Vec::new();
        for &kind in kinds {
            let launch = match kind {
                Kind::Direct => Launch::Direct,
                Kind::Crossgate => crossgate.clone(),
                _ => {
                    let (program, _) = kind.program().expect("a peer has a program");
                    match which(program) {
                        Some(path) => Launch::Binary(path),
                        None => {
                            notes.push(format!("{program}: not installed, skipped (benches/install-peers.sh)"));
                            continue;
                        }
                    }
                }
            };
            let version = match (&launch, kind.program()) {
                (Launch::Binary(path), Some((_, flag))) => version_of(path, flag),
                (Launch::Binary(path), None) => version_of(path, "--version"),
                _ => String::new(),
            };
            targets.push(Target { kind, launch, version });
        }
        targets
    }

    /// Starts the target with `workers` data-plane threads (or processes), routing [`SNI`] to `backend`, its
    /// connection limits sized to the open-file limit `nofile` it inherits. Readiness is the caller's to check,
    /// with a real request.
    pub fn start(&self, workers: usize, backend: SocketAddr, nofile: u64) -> anyhow::Result<Running> {
        let dir = TempDir::new(self.kind.name());
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let (address, process, in_process) = match &self.launch {
            Launch::Direct => (backend, None, None),
            Launch::InProcess => {
                let gateway = InProcess::start(workers, backend)?;
                (gateway.listen, None, Some(gateway))
            }
            Launch::Binary(program) => {
                let args = self.write_config(dir.path(), workers, listen, backend, nofile)?;
                (listen, Some(spawn(program, &args, dir.path())?), None)
            }
        };
        Ok(Running { address, process, in_process, dir })
    }

    /// Writes this peer's config into `dir` and returns its command line.
    fn write_config(
        &self,
        dir: &Path,
        workers: usize,
        listen: SocketAddr,
        backend: SocketAddr,
        nofile: u64,
    ) -> anyhow::Result<Vec<String>> {
        let file = |name: &str| dir.join(name).display().to_string();
        let (name, text, args) = match self.kind {
            Kind::Crossgate => (
                "resources.yaml",
                crossgate_resources(backend),
                vec![
                    format!("--resources={}", file("resources.yaml")),
                    format!("--listen={listen}"),
                    format!("--status-addr=127.0.0.1:{}", free_port()?),
                    format!("--metrics-addr=127.0.0.1:{}", free_port()?),
                    format!("--admin-addr=127.0.0.1:{}", free_port()?),
                    format!("--workers={workers}"),
                ],
            ),
            Kind::Envoy => (
                "envoy.yaml",
                envoy_bootstrap(listen, backend),
                ["-c", &file("envoy.yaml"), "--concurrency", &workers.to_string(), "--log-level", "warn"]
                    .iter()
                    .map(|s| s.to_string())
                    // Hot restart shares memory by a fixed base id: other Envoys on the machine would collide.
                    .chain(["--disable-hot-restart".to_owned()])
                    .collect(),
            ),
            Kind::Haproxy => (
                "haproxy.cfg",
                haproxy_config(workers, listen, backend, nofile),
                vec!["-db".into(), "-f".into(), file("haproxy.cfg")],
            ),
            Kind::Nginx => ("nginx.conf", nginx_config(workers, listen, backend, nofile, dir), nginx_args(dir)),
            Kind::Sniproxy => (
                "sniproxy.conf",
                sniproxy_config(listen, backend, dir),
                vec!["-f".into(), "-c".into(), file("sniproxy.conf")],
            ),
            Kind::Direct => unreachable!("the direct path has no process"),
        };
        std::fs::write(dir.join(name), text)?;
        Ok(args)
    }
}

/// A started target; stopped on drop.
#[derive(Debug)]
pub struct Running {
    pub address: SocketAddr,
    process: Option<Child>,
    /// Held for its drop, which stops the in-process gateway.
    in_process: Option<InProcess>,
    dir: TempDir,
}

impl Running {
    /// The process to account memory to, when the target has one of its own.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// Whose CPU time is the proxy's: its process tree, or the threads of an in-process crossgate.
    pub fn account(&self) -> Option<Account> {
        match (&self.process, &self.in_process) {
            (Some(child), _) => Some(Account::Tree(child.id())),
            (None, Some(_)) => Some(Account::Threads(IN_PROCESS_THREADS)),
            (None, None) => None,
        }
    }

    /// Whether it exited on its own, with the end of its log: why it did not become ready.
    pub fn exit_report(&mut self) -> Option<String> {
        exit_report(self.process.as_mut()?, self.dir.path())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.process.as_mut() {
            stop(child);
        }
    }
}

/// Starts `program` with its output into `dir`/log.
pub(crate) fn spawn(program: &Path, args: &[String], dir: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join("log"))?;
    Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))
}

/// Whether a process [`spawn`]ed into `dir` exited, with the end of its log.
pub(crate) fn exit_report(child: &mut Child, dir: &Path) -> Option<String> {
    let status = child.try_wait().ok()??;
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(5).collect();
    Some(format!("exited with {status}: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | ")))
}

/// Stops a started process and everything below it.
pub(crate) fn stop(child: &mut Child) {
    // A signal first, as nginx's master takes its workers down on one but not on SIGKILL; SIGINT, as crossgate
    // drains for seconds on SIGTERM. Every peer stops at once on it.
    let tree = crate::sys::process_tree(child.id());
    let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).stderr(Stdio::null()).status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in tree.iter().skip(1).filter(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
        let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).stderr(Stdio::null()).status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The threads of an in-process crossgate, for their CPU time: its runtime's, its workers' and its admin
/// server's (thread names stop at 15 bytes; "crossgate-bench" is the harness's main thread).
pub const IN_PROCESS_THREADS: &[&str] = &["bench-crossgate", "crossgate-work", "crossgate-admi"];

/// crossgate on its own runtime inside the harness.
#[derive(Debug)]
struct InProcess {
    listen: SocketAddr,
    gateway: Option<TestGateway>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl InProcess {
    fn start(workers: usize, backend: SocketAddr) -> anyhow::Result<InProcess> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(IN_PROCESS_THREADS[0])
            .enable_all()
            .build()?;
        let gateway = runtime.block_on(TestGateway::start(&crossgate_resources(backend), &[]));
        Ok(InProcess { listen: gateway.listen, gateway: Some(gateway), runtime: Some(runtime) })
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        drop(self.gateway.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn crossgate_resources(backend: SocketAddr) -> String {
    format!(
        "clusters:\n- name: {SNI}\n  trafficPolicy: {{ loadBalancer: {{ simple: LEAST_REQUEST }} }}\n  endpoints:\n  - address: {backend}\n"
    )
}

fn alpn_names() -> impl Iterator<Item = &'static str> {
    ISTIO_MTLS_ALPNS.iter().map(|alpn| std::str::from_utf8(alpn).expect("ASCII ALPN"))
}

/// Istio's sni-dnat listener, reduced to one cluster: tls_inspector, a filter chain matching the SNI and
/// Istio's ALPNs, tcp_proxy to a LEAST_REQUEST cluster; 32 KiB connection buffers and circuit breakers at
/// 2^32-1, as Istio sets them (Envoy's own default stops at 1,024 connections per cluster).
fn envoy_bootstrap(listen: SocketAddr, backend: SocketAddr) -> String {
    let alpns = alpn_names().collect::<Vec<_>>().join(", ");
    let (ip, port, backend_ip, backend_port) = (listen.ip(), listen.port(), backend.ip(), backend.port());
    format!(
        r#"static_resources:
  listeners:
  - name: sni-dnat
    address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}
    per_connection_buffer_limit_bytes: 32768
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    filter_chains:
    - filter_chain_match:
        server_names: ["{SNI}"]
        application_protocols: [{alpns}]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: "{SNI}"
          cluster: "{SNI}"
          idle_timeout: 3600s
  clusters:
  - name: "{SNI}"
    type: STATIC
    connect_timeout: 10s
    lb_policy: LEAST_REQUEST
    per_connection_buffer_limit_bytes: 32768
    circuit_breakers:
      thresholds:
      - {{ max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295 }}
    load_assignment:
      cluster_name: "{SNI}"
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {backend_ip}, port_value: {backend_port} }} }} }}
"#
    )
}

/// TCP mode: wait for the hello, route on `req.ssl_sni` and `req.ssl_alpn`, no default backend. HAProxy
/// refuses to start when maxconn needs more descriptors than it may open (two per tunnel).
fn haproxy_config(workers: usize, listen: SocketAddr, backend: SocketAddr, nofile: u64) -> String {
    let alpns = alpn_names().collect::<Vec<_>>().join(" ");
    let maxconn = nofile.saturating_sub(FD_RESERVE) / 2;
    format!(
        "global
    nbthread {workers}
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h
frontend sni
    bind {listen}
    tcp-request inspect-delay 15s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend echo if {{ req.ssl_sni -i {SNI} }} {{ req.ssl_alpn -i {alpns} }}
backend echo
    balance leastconn
    server echo {backend}
"
    )
}

/// The stream module with ssl_preread; an unknown SNI or a hello without Istio's ALPNs goes to an upstream
/// whose only server is down, so it is closed without reaching the backend.
fn nginx_config(workers: usize, listen: SocketAddr, backend: SocketAddr, nofile: u64, dir: &Path) -> String {
    let alpns = alpn_names().map(|alpn| alpn.replace('.', "\\.")).collect::<Vec<_>>().join("|");
    let mut config = nginx_main(&workers.to_string(), nofile, dir);
    let _ = write!(
        config,
        r#"
stream {{
    map_hash_bucket_size 128;
    map $ssl_preread_alpn_protocols $istio_alpn {{
        "~(^|,)({alpns})(,|$)" 1;
        default 0;
    }}
    map "$istio_alpn $ssl_preread_server_name" $route {{
        "1 {SNI}" echo;
        default refuse;
    }}
    upstream echo {{ least_conn; server {backend}; }}
    upstream refuse {{ server 127.0.0.1:9 down; }}
    server {{
        listen {listen};
        ssl_preread on;
        preread_timeout 15s;
        proxy_pass $route;
        proxy_connect_timeout 10s;
        proxy_timeout 1h;
        proxy_half_close on;
    }}
}}
"#
    );
    config
}

/// The top of an nginx config: the stream module where Debian builds it as a dynamic module, in the
/// foreground with `workers` worker processes and its pid file in `dir`. A worker's connections count both
/// sides of a tunnel and its listener, so they are as many as it may open files.
pub(crate) fn nginx_main(workers: &str, nofile: u64, dir: &Path) -> String {
    let mut config = String::new();
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if module.exists() {
        let _ = writeln!(config, "load_module {};", module.display());
    }
    let _ = write!(
        config,
        "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {};\nevents {{ worker_connections {nofile}; }}",
        dir.join("nginx.pid").display()
    );
    config
}

/// nginx's command line for the `nginx.conf` in `dir`, with `dir` as its prefix.
pub(crate) fn nginx_args(dir: &Path) -> Vec<String> {
    let file = |name: &str| dir.join(name).display().to_string();
    vec!["-p".into(), file(""), "-e".into(), file("error.log"), "-c".into(), file("nginx.conf")]
}

/// One listener, one table entry (a regex on the SNI); no fallback, so an unknown SNI is closed.
fn sniproxy_config(listen: SocketAddr, backend: SocketAddr, dir: &Path) -> String {
    let pattern = SNI.replace('.', "\\.");
    format!(
        "user root
pidfile {pid}
error_log {{
    filename {log}
    priority warning
}}
listener {listen} {{
    protocol tls
    table bench
}}
table bench {{
    ^{pattern}$ {backend}
}}
",
        pid = dir.join("sniproxy.pid").display(),
        log = dir.join("error.log").display()
    )
}

/// A port the kernel says is free now (there is a small race until the target binds it).
pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}

/// The version a program prints: the first word (split on spaces and slashes) that starts with a digit and
/// has a dot, e.g. `1.40.0` from Envoy's `/path/to/envoy version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`.
fn version_of(program: &Path, flag: &str) -> String {
    let Ok(output) = Command::new(program).arg(flag).stdin(Stdio::null()).output() else {
        return "unknown".to_owned();
    };
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    // After the word "version" on its line when there is one: Envoy's line starts with its path, which may
    // hold digits (and "versions").
    let line = text.lines().find(|line| line.contains("version")).unwrap_or(&text);
    let text = line.rsplit_once("version").map_or(line, |(_, after)| after);
    text.split(|c: char| c.is_whitespace() || c == '/')
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()) && word.contains('.'))
        .unwrap_or("unknown")
        .to_owned()
}
