//! The TLS workload behind every target, as a sidecar's inbound side: mTLS on a mesh PKI of the harness's own
//! (nginx needs its key in a file), the certificates naming their workloads by SPIFFE URI alone, as Istio's do.
//!
//! - [`BackendKind::Nginx`], the default: a third-party server, nginx serving HTTP/1.1 over TLS as a real
//!   workload would: `GET /r` answers [`RESPONSE_BODY`], `GET /bulk` a file of [`BULK_FILE_BYTES`].
//! - [`BackendKind::Own`]: the harness's rustls server. The client's first byte picks the mode: [`ECHO`] sends
//!   back what it reads; [`SINK`] reads length-prefixed batches up to an empty one and answers with the byte
//!   count. The count ends the exchange, so bulk needs no half-close, which not every peer passes on alike.

use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use crossgate_mtls::{SIDECAR_ALPN, WorkloadTls};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::Resumption;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::sys::Account;
use crate::targets::{self, free_port};

pub const ECHO: u8 = b'E';
pub const SINK: u8 = b'S';

/// nginx's answer to `GET /r`: a small RPC's response body.
pub const RESPONSE_BODY: &[u8; 64] = b"crossgate-bench: a small response body, sixty-four bytes long...";
/// nginx's answer to `GET /bulk`, fetched again and again over one connection in the bulk phases.
pub const BULK_FILE_BYTES: u64 = 16 << 20;
/// The harness's threads that run its own backend, for their CPU time.
pub const OWN_BACKEND_THREADS: &[&str] = &["bench-backend"];

/// The workload behind the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// nginx serving HTTP/1.1 over TLS (a small response; a 16 MiB file for bulk).
    Nginx,
    /// The harness's rustls echo and sink server.
    Own,
}

impl BackendKind {
    /// What a sidecar offers: Istio's mTLS ALPNs, and the application's protocol where there is one (nginx
    /// refuses a hello without a protocol it speaks).
    pub fn client_alpn(self) -> Vec<&'static [u8]> {
        let mut alpn = SIDECAR_ALPN.to_vec();
        if self == BackendKind::Nginx {
            alpn.push(b"http/1.1");
        }
        alpn
    }
}

/// A root CA and the two workloads' certificates, in memory for rustls and as PEM files for nginx.
pub struct Pki {
    pub server_spiffe: String,
    server: WorkloadTls,
    client: WorkloadTls,
}

impl Pki {
    /// Writes `ca.pem`, `server.pem` and `server.key` into `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Not rcgen's default name, which the workloads would share: OpenSSL takes a certificate whose subject
        // is its issuer's for self-signed.
        ca.distinguished_name = DistinguishedName::new();
        ca.distinguished_name.push(DnType::OrganizationName, "crossgate-bench");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let mut roots = RootCertStore::empty();
        roots.add(issuer.der().clone())?;
        let roots = Arc::new(roots);
        let workload = |sa: &str| -> anyhow::Result<(String, WorkloadTls, String, String)> {
            let spiffe = format!("spiffe://cluster.local/ns/bench/sa/{sa}");
            let mut params = CertificateParams::default();
            // Istio's workload certificates have no subject, only the SPIFFE URI.
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(spiffe.clone().try_into()?)];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let tls = WorkloadTls::new(vec![cert.der().clone()], der, Arc::clone(&roots))?;
            Ok((spiffe, tls, cert.pem(), key.serialize_pem()))
        };
        let (server_spiffe, server, server_pem, server_key) = workload("echo")?;
        let (_, client, _, _) = workload("client")?;
        std::fs::write(dir.join("ca.pem"), issuer.pem())?;
        std::fs::write(dir.join("server.pem"), server_pem)?;
        std::fs::write(dir.join("server.key"), server_key)?;
        Ok(Pki { server_spiffe, server, client })
    }

    /// A sidecar's client: presents the client workload, offers `alpn`, checks the server's SPIFFE identity,
    /// and makes a full handshake on every connection (no resumption), as a sidecar opening a new connection.
    pub fn client_config(&self, alpn: &[&[u8]]) -> anyhow::Result<Arc<ClientConfig>> {
        let mut config = ClientConfig::clone(&*self.client.client_config(&self.server_spiffe, alpn)?);
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// What every backend of a run shares: its kind, the PKI, and for nginx the files it serves.
pub struct Setup {
    pub kind: BackendKind,
    pub pki: Pki,
    nginx: Option<PathBuf>,
    dir: crossgate_proxy::testing::gateway::TempDir,
}

impl Setup {
    pub fn new(kind: BackendKind) -> anyhow::Result<Setup> {
        let dir = crossgate_proxy::testing::gateway::TempDir::new("bench-backend");
        let pki = Pki::new(dir.path())?;
        let nginx = match kind {
            BackendKind::Own => None,
            BackendKind::Nginx => {
                std::fs::write(dir.path().join("bulk"), vec![0x5a; BULK_FILE_BYTES as usize])?;
                Some(targets::which("nginx").context(
                    "the nginx backend needs nginx (benches/install-peers.sh); --backend own runs without it",
                )?)
            }
        };
        Ok(Setup { kind, pki, nginx, dir })
    }

    /// A fresh backend on a fresh port: the own one serves on `runtime`, nginx in processes of its own.
    pub fn start(&self, runtime: &Runtime, nofile: u64) -> anyhow::Result<Backend> {
        let Some(program) = &self.nginx else {
            let acceptor = TlsAcceptor::from(self.pki.server.server_config(&SIDECAR_ALPN)?);
            return Ok(runtime.block_on(Backend::own(acceptor))?);
        };
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let status = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let dir = crossgate_proxy::testing::gateway::TempDir::new("nginx-backend");
        std::fs::write(dir.path().join("nginx.conf"), self.nginx_config(address, status, nofile, dir.path()))?;
        let args = targets::nginx_args(dir.path());
        let child = targets::spawn(program, &args, dir.path())?;
        Ok(Backend { address, serving: Serving::Nginx { child, status, queries: AtomicU64::new(0), dir } })
    }

    /// nginx as a workload: mTLS against the mesh root, keep-alive for as long as a run, no access log.
    fn nginx_config(&self, address: SocketAddr, status: SocketAddr, nofile: u64, dir: &Path) -> String {
        let files = self.dir.path().display();
        let body = std::str::from_utf8(RESPONSE_BODY).expect("ASCII");
        format!(
            r#"{main}
http {{
    access_log off;
    server_tokens off;
    default_type application/octet-stream;
    keepalive_requests 1000000000;
    keepalive_timeout 3600s;
    server {{
        listen {address} ssl reuseport;
        ssl_certificate {files}/server.pem;
        ssl_certificate_key {files}/server.key;
        ssl_client_certificate {files}/ca.pem;
        ssl_verify_client on;
        ssl_session_tickets off;
        location = /r {{ return 200 "{body}"; }}
        location = /bulk {{ root {files}; }}
    }}
    server {{
        listen {status};
        location / {{ stub_status; }}
    }}
}}
"#,
            main = targets::nginx_main("auto", nofile, dir),
        )
    }
}

/// A backend on 127.0.0.1.
#[derive(Debug)]
pub struct Backend {
    pub address: SocketAddr,
    serving: Serving,
}

#[derive(Debug)]
enum Serving {
    Own {
        accepted: Arc<AtomicU64>,
        task: JoinHandle<()>,
    },
    /// nginx, with the stub_status port that counts its accepted connections (each query one of them).
    Nginx {
        child: Child,
        status: SocketAddr,
        queries: AtomicU64,
        dir: crossgate_proxy::testing::gateway::TempDir,
    },
}

impl Backend {
    async fn own(acceptor: TlsAcceptor) -> io::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(serve(acceptor.clone(), stream));
                    }
                    // Out of descriptors for a moment: the client sees the refusal, the backend goes on.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                }
            }
        });
        Ok(Backend { address, serving: Serving::Own { accepted, task } })
    }

    /// TCP connections accepted so far: a refused SNI must not move it.
    pub fn accepted(&self) -> anyhow::Result<u64> {
        match &self.serving {
            Serving::Own { accepted, .. } => Ok(accepted.load(Ordering::Relaxed)),
            Serving::Nginx { status, queries, .. } => {
                let mut stream = std::net::TcpStream::connect(status)?;
                let queries = queries.fetch_add(1, Ordering::Relaxed) + 1;
                stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut page = String::new();
                stream.read_to_string(&mut page)?;
                // "server accepts handled requests\n A H R": A counts this query's connection too.
                let accepts = page
                    .lines()
                    .skip_while(|line| !line.contains("accepts"))
                    .nth(1)
                    .and_then(|line| line.split_whitespace().next()?.parse::<u64>().ok())
                    .with_context(|| format!("no accepts count in nginx's status page: {page:?}"))?;
                Ok(accepts - queries)
            }
        }
    }

    /// Whether nginx exited, with the end of its log.
    pub fn exit_report(&mut self) -> Option<String> {
        match &mut self.serving {
            Serving::Own { .. } => None,
            Serving::Nginx { child, dir, .. } => targets::exit_report(child, dir.path()),
        }
    }

    /// Whose CPU time is the backend's.
    pub fn account(&self) -> Account {
        match &self.serving {
            Serving::Own { .. } => Account::Threads(OWN_BACKEND_THREADS),
            Serving::Nginx { child, .. } => Account::Tree(child.id()),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        match &mut self.serving {
            Serving::Own { task, .. } => task.abort(),
            Serving::Nginx { child, .. } => targets::stop(child),
        }
    }
}

async fn serve(acceptor: TlsAcceptor, stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut tls = acceptor.accept(stream).await?;
    match tls.read_u8().await? {
        ECHO => {
            // Small: echo carries small requests, and 10,000 idle tunnels hold one buffer each.
            let mut buf = vec![0; 4096];
            loop {
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                tls.write_all(&buf[..n]).await?;
                tls.flush().await?;
            }
        }
        SINK => {
            let mut buf = vec![0; 64 * 1024];
            let mut total = 0u64;
            loop {
                let mut left = tls.read_u64().await?;
                if left == 0 {
                    break;
                }
                total += left;
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    match tls.read(&mut buf[..want]).await? {
                        0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                        n => left -= n as u64,
                    }
                }
            }
            tls.write_u64(total).await?;
            tls.flush().await
        }
        mode => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown mode {mode:#x}"))),
    }
}
