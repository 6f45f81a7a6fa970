//! What the mesh's workloads share (`crossgate-helloworld`, the server, and `crossgate-sleep`, the sidecar-like
//! client): mTLS as Istio's sidecars do it, from the files `crossgate-control certs leaf` writes, and the
//! little HTTP/1.1 they speak. The end-to-end tests are in tests/.
//!
//! Trust is the mesh's root alone: each side checks that the peer's chain ends at `ca.pem`, the client also
//! checks the server's SPIFFE identity (Istio's secure naming). Neither looks at the SNI, which carries the
//! gateway's routing key, so a gateway on the path can route but never impersonate.

use std::io;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What a sidecar offers for TCP traffic; the east-west gateway routes only connections offering an Istio ALPN.
pub const SIDECAR_ALPN: [&[u8]; 2] = [b"istio-peer-exchange", b"istio"];
/// What the server accepts: the sidecar's ALPNs, and plain HTTP/1.1 for a client that is not a sidecar.
pub const SERVER_ALPN: [&[u8]; 3] = [b"istio-peer-exchange", b"istio", b"http/1.1"];

/// An HTTP head larger than this is refused: both sides only ever send a few short lines.
const MAX_HEAD: usize = 8 * 1024;

/// A workload's certificate chain, key and the mesh root, as `crossgate-control certs leaf` writes them.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
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
        Ok(Identity { chain, key, roots: Arc::new(roots) })
    }

    /// A server that requires a client certificate chaining to the mesh root.
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let verifier = WebPkiClientVerifier::builder(Arc::clone(&self.roots)).build()?;
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("the certificate and key do not match")?;
        config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A sidecar client: presents this identity, offers the sidecar's ALPNs, and accepts a server whose chain
    /// ends at the mesh root and whose certificate names `server_identity` (a SPIFFE URI).
    pub fn client_config(&self, server_identity: &str) -> anyhow::Result<Arc<ClientConfig>> {
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let verifier = SpiffeVerifier {
            roots: Arc::clone(&self.roots),
            identity: server_identity.to_owned(),
            algorithms: provider.signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .context("the certificate and key do not match")?;
        config.alpn_protocols = SIDECAR_ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// The SPIFFE URIs among a certificate's subject alternative names.
pub fn spiffe_ids(cert: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert) else { return Vec::new() };
    let Ok(Some(names)) = cert.subject_alternative_name() else { return Vec::new() };
    names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// Checks the server's chain against the mesh root and its SPIFFE identity, whatever name was sent as SNI.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    identity: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _sni: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(certificate_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(certificate_error)?;
        let found = spiffe_ids(end_entity);
        if found.contains(&self.identity) {
            Ok(ServerCertVerified::assertion())
        } else {
            let mismatch = WrongIdentity { expected: self.identity.clone(), found };
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(mismatch)))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// webpki's verdict as rustls reports it. A chain from another mesh ends in `UnknownIssuer`, or in
/// `BadSignature` when that mesh's root has the same name as ours (every `crossgate-control certs root-ca`
/// is "Root CA", as every Istio Makefile root is).
fn certificate_error(error: webpki::Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(match error {
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

/// The server's certificate chains to the root but belongs to another workload.
#[derive(Debug)]
struct WrongIdentity {
    expected: String,
    found: Vec<String>,
}

impl std::fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server is {:?}, not {}", self.found, self.expected)
    }
}

impl std::error::Error for WrongIdentity {}

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
