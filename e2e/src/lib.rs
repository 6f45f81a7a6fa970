//! What the mesh's workloads share (`crossgate-helloworld`, the server, and `crossgate-sleep`, the sidecar-like
//! client): mTLS as Istio's sidecars do it (crossgate-mtls: the peer's chain checked against the mesh root, the
//! server's SPIFFE identity checked, the SNI ignored), from the files `crossgate-control certs leaf` writes, and
//! the little HTTP/1.1 they speak. The end-to-end tests are in tests/.

use std::io;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use crossgate_mtls::{SIDECAR_ALPN, WorkloadTls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What the server accepts: the sidecar's ALPNs, and plain HTTP/1.1 for a client that is not a sidecar.
pub const SERVER_ALPN: [&[u8]; 3] = [SIDECAR_ALPN[0], SIDECAR_ALPN[1], b"http/1.1"];

/// An HTTP head larger than this is refused: both sides only ever send a few short lines.
const MAX_HEAD: usize = 8 * 1024;

/// A workload's certificate chain, key and the mesh root, as `crossgate-control certs leaf` writes them.
pub struct Identity {
    tls: WorkloadTls,
}

impl Identity {
    /// Reads `cert.pem` (the leaf, then its intermediate), `key.pem` and `ca.pem` (the root) in `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Identity> {
        let path = |name: &str| dir.join(name);
        let chain = CertificateDer::pem_file_iter(path("cert.pem"))
            .and_then(Iterator::collect)
            .with_context(|| format!("cannot read certificates from {}", path("cert.pem").display()))?;
        let key = PrivateKeyDer::from_pem_file(path("key.pem"))
            .with_context(|| format!("cannot read a private key from {}", path("key.pem").display()))?;
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_file_iter(path("ca.pem"))
            .with_context(|| format!("cannot read the root from {}", path("ca.pem").display()))?
        {
            roots.add(root?).context("the root in ca.pem does not parse")?;
        }
        let tls = WorkloadTls::new(chain, key, Arc::new(roots))
            .with_context(|| format!("{} holds no certificate", path("ca.pem").display()))?;
        Ok(Identity { tls })
    }

    /// A server that requires a client certificate chaining to the mesh root.
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        Ok(self.tls.server_config(&SERVER_ALPN)?)
    }

    /// A sidecar client: presents this identity, offers the sidecar's ALPNs, and accepts a server whose chain
    /// ends at the mesh root and whose certificate names `server_identity` (a SPIFFE URI).
    pub fn client_config(&self, server_identity: &str) -> anyhow::Result<Arc<ClientConfig>> {
        Ok(self.tls.client_config(server_identity, &SIDECAR_ALPN)?)
    }
}

/// Reads an HTTP/1.1 head up to its blank line: the head as text and the bytes read past it (the body's
/// start).
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            buf.truncate(end);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "HTTP head over 8 KiB"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the end of the HTTP head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` in an HTTP head.
pub fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// The byte at `offset` of a `/stream` body: a period of 251 (a prime) so that a lost, repeated or reordered
/// chunk of any power-of-two size shows.
pub fn stream_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}
