//! Workload mTLS as Istio's sidecars do it, from a certificate chain, its key and the mesh roots: rustls
//! configurations for the mesh's workloads (`crossgate-e2e`) and for the test peers of the gateway
//! (`crossgate_proxy::testing`).
//!
//! Trust is the mesh's roots alone: each side checks that the peer's chain ends at a root; the client also
//! checks the server's SPIFFE identity (Istio's secure naming). Neither looks at the SNI, which carries the
//! gateway's routing key (`outbound_.PORT_._.HOST`), so a gateway on the path can route but never impersonate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig};

/// What a sidecar offers for TCP traffic; the east-west gateway routes only connections offering an Istio ALPN.
pub const SIDECAR_ALPN: [&[u8]; 2] = [b"istio-peer-exchange", b"istio"];

const SPIFFE_SCHEME: &str = "spiffe://";

/// Why a workload's TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no mesh root to trust: every peer would be refused")]
    NoRoots,
    #[error("{0:?} is not a SPIFFE identity (spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT)")]
    NotSpiffe(String),
    #[error("the certificate chain and key are not a usable pair: {0}")]
    ChainAndKey(rustls::Error),
    #[error("the crypto provider supports no safe TLS version: {0}")]
    ProtocolVersions(rustls::Error),
    #[error("cannot check client certificates: {0}")]
    ClientVerifier(VerifierBuilderError),
}

/// A workload's certificate chain (its leaf first) and key, and the mesh roots it trusts.
#[derive(Debug, Clone)]
pub struct WorkloadTls {
    chain: Vec<CertificateDer<'static>>,
    /// Shared: a key is not `Clone`, and test peers clone identities.
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
}

impl WorkloadTls {
    /// Refuses empty `roots`: a workload trusting no root would refuse every peer.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Arc<RootCertStore>,
    ) -> Result<WorkloadTls, ConfigError> {
        if roots.is_empty() {
            return Err(ConfigError::NoRoots);
        }
        Ok(WorkloadTls { chain, key: Arc::new(key), roots })
    }

    /// A server that presents this workload's chain, offers `alpn`, and requires a client certificate
    /// chaining to the mesh roots.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, ConfigError> {
        let provider = crypto_provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&self.roots), Arc::clone(&provider))
            .build()
            .map_err(ConfigError::ClientVerifier)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ConfigError::ProtocolVersions)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(ConfigError::ChainAndKey)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A sidecar client: presents this workload's chain, offers `alpn`, and accepts a server whose chain ends
    /// at the mesh roots and whose certificate names `server_identity` (a SPIFFE URI), whatever SNI is sent.
    pub fn client_config(&self, server_identity: &str, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, ConfigError> {
        if !server_identity.starts_with(SPIFFE_SCHEME) {
            return Err(ConfigError::NotSpiffe(server_identity.to_owned()));
        }
        let provider = crypto_provider();
        let verifier = SpiffeVerifier {
            roots: Arc::clone(&self.roots),
            identity: server_identity.to_owned(),
            algorithms: provider.signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ConfigError::ProtocolVersions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(ConfigError::ChainAndKey)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// The process's provider if one was installed, else aws-lc-rs, the one every crossgate crate builds with.
/// The verifier needs the provider's algorithms, so the configurations name it rather than rely on a default.
fn crypto_provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default().cloned().unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// The SPIFFE URIs among a DER certificate's subject alternative names (none if it does not parse).
pub fn spiffe_ids(cert: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert) else { return Vec::new() };
    let Ok(Some(names)) = cert.subject_alternative_name() else { return Vec::new() };
    names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(SPIFFE_SCHEME) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// Checks the server's chain against the mesh roots and its SPIFFE identity, whatever name was sent as SNI.
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

/// The server's certificate chains to the roots but belongs to another workload.
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

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const HELLOWORLD: &str = "spiffe://cluster.local/ns/sample/sa/helloworld";
    const SLEEP: &str = "spiffe://cluster.local/ns/sample/sa/sleep";
    /// What a sidecar sends as SNI through an east-west gateway: a routing key, not a name in any certificate.
    const ROUTING_KEY: &str = "outbound_.5000_._.helloworld.sample.svc.cluster.local";

    struct Root(CertifiedIssuer<'static, KeyPair>);

    impl Root {
        fn new(name: &str) -> Root {
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::OrganizationName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            Root(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
        }

        /// A workload certificate as Istio issues them: no subject, its SPIFFE URI as its only name.
        fn workload(&self, spiffe: &str) -> WorkloadTls {
            self.workload_trusting(spiffe, self)
        }

        /// The same, from a workload that trusts `trusted` instead.
        fn workload_trusting(&self, spiffe: &str, trusted: &Root) -> WorkloadTls {
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.0).unwrap();
            let mut roots = RootCertStore::empty();
            roots.add(trusted.0.der().clone()).unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            WorkloadTls::new(vec![cert.der().clone()], key, Arc::new(roots)).unwrap()
        }
    }

    /// What each side of a handshake over a real TCP connection ended with: the client's error, or the
    /// identity the server sent and the ALPN agreed; the server's error, or the client's identity.
    struct Outcome {
        client: Result<(Vec<String>, Option<Vec<u8>>), std::io::Error>,
        server: Result<Vec<String>, std::io::Error>,
    }

    /// `client` connects to `server` with SNI `sni`, expecting `server_identity`, offering the sidecar's ALPNs;
    /// a byte goes each way so that each side has seen the other's verdict on its certificate.
    async fn handshake(client: &WorkloadTls, server: &WorkloadTls, server_identity: &str, sni: &str) -> Outcome {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server.server_config(&SIDECAR_ALPN).unwrap());
        let connector = TlsConnector::from(client.client_config(server_identity, &SIDECAR_ALPN).unwrap());
        let server_name = ServerName::try_from(sni.to_owned()).unwrap();
        let serve = async {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            tls.write_all(b"s").await?;
            tls.read_u8().await?;
            let peer = tls.get_ref().1.peer_certificates().and_then(|certs| certs.first().cloned());
            Ok(peer.map(|cert| spiffe_ids(&cert)).unwrap_or_default())
        };
        let call = async {
            let tcp = tokio::net::TcpStream::connect(address).await?;
            let mut tls = connector.connect(server_name, tcp).await?;
            tls.write_all(b"c").await?;
            tls.read_u8().await?;
            let session = tls.get_ref().1;
            let peer = session.peer_certificates().and_then(|certs| certs.first().cloned());
            Ok((peer.map(|cert| spiffe_ids(&cert)).unwrap_or_default(), session.alpn_protocol().map(<[u8]>::to_vec)))
        };
        let (client, server) = tokio::join!(call, serve);
        Outcome { client, server }
    }

    /// The certificate error inside a failed handshake.
    fn certificate_error_of(error: &std::io::Error) -> &CertificateError {
        match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(certificate)) => certificate,
            _ => panic!("not a certificate error: {error}"),
        }
    }

    #[tokio::test]
    async fn the_right_identity_is_accepted_both_ways() {
        let root = Root::new("cluster.local");
        let (client, server) = (root.workload(SLEEP), root.workload(HELLOWORLD));
        let outcome = handshake(&client, &server, HELLOWORLD, ROUTING_KEY).await;
        let (server_seen, alpn) = outcome.client.unwrap();
        assert_eq!(server_seen, [HELLOWORLD]);
        assert_eq!(alpn.as_deref(), Some(SIDECAR_ALPN[0]));
        assert_eq!(outcome.server.unwrap(), [SLEEP]);
    }

    #[tokio::test]
    async fn the_sni_is_ignored() {
        let root = Root::new("cluster.local");
        let (client, server) = (root.workload(SLEEP), root.workload(HELLOWORLD));
        // A routing key, a DNS name the certificate does not carry, and an IP address (rustls then sends no SNI).
        for sni in [ROUTING_KEY, "istiod.istio-system.svc", "127.0.0.1"] {
            let outcome = handshake(&client, &server, HELLOWORLD, sni).await;
            assert_eq!(outcome.client.unwrap().0, [HELLOWORLD], "SNI {sni}");
            assert!(outcome.server.is_ok(), "SNI {sni}");
        }
    }

    #[tokio::test]
    async fn a_wrong_identity_is_refused_naming_both() {
        let root = Root::new("cluster.local");
        let (client, impostor) = (root.workload(SLEEP), root.workload(SLEEP));
        let outcome = handshake(&client, &impostor, HELLOWORLD, ROUTING_KEY).await;
        let error = outcome.client.expect_err("an impostor is refused");
        let CertificateError::Other(OtherError(reason)) = certificate_error_of(&error) else {
            panic!("not an identity error: {error}");
        };
        assert_eq!(reason.to_string(), format!("the server is [{SLEEP:?}], not {HELLOWORLD}"));
        assert!(outcome.server.is_err(), "the server sees the client give up");
    }

    #[tokio::test]
    async fn a_server_chain_from_another_root_is_refused() {
        let ours = Root::new("cluster.local");
        let client = ours.workload(SLEEP);
        // Another mesh's root: by its name, webpki finds no issuer; under our root's name, the signature fails.
        for (name, expected) in
            [("other.mesh", CertificateError::UnknownIssuer), ("cluster.local", CertificateError::BadSignature)]
        {
            let theirs = Root::new(name);
            let server = theirs.workload_trusting(HELLOWORLD, &ours);
            let outcome = handshake(&client, &server, HELLOWORLD, ROUTING_KEY).await;
            let error = outcome.client.expect_err("another mesh's server is refused");
            assert_eq!(certificate_error_of(&error), &expected, "root {name}");
        }
    }

    #[tokio::test]
    async fn a_client_chain_from_another_root_is_refused() {
        let ours = Root::new("cluster.local");
        let server = ours.workload(HELLOWORLD);
        let client = Root::new("other.mesh").workload_trusting(SLEEP, &ours);
        let outcome = handshake(&client, &server, HELLOWORLD, ROUTING_KEY).await;
        let error = outcome.server.expect_err("another mesh's client is refused");
        assert_eq!(certificate_error_of(&error), &CertificateError::UnknownIssuer);
    }

    #[test]
    fn spiffe_ids_are_the_spiffe_uris_alone() {
        let mut params = CertificateParams::new(vec!["helloworld.sample.svc".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::URI("https://example.com/".try_into().unwrap()));
        params.subject_alt_names.push(SanType::URI(HELLOWORLD.try_into().unwrap()));
        let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        assert_eq!(spiffe_ids(cert.der()), [HELLOWORLD]);
        assert!(spiffe_ids(b"not a certificate").is_empty());
    }

    #[test]
    fn configurations_refuse_what_could_never_work() {
        let workload = Root::new("cluster.local").workload(SLEEP);
        let (chain, key) = (workload.chain.clone(), workload.key.clone_key());
        let no_roots = WorkloadTls::new(chain, key, Arc::new(RootCertStore::empty()));
        assert!(matches!(no_roots, Err(ConfigError::NoRoots)));
        let dns_name = workload.client_config("helloworld.sample.svc", &SIDECAR_ALPN);
        assert!(matches!(dns_name, Err(ConfigError::NotSpiffe(name)) if name == "helloworld.sample.svc"));
        let other_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(KeyPair::generate().unwrap().serialize_der()));
        let mismatched = WorkloadTls { key: Arc::new(other_key), ..workload };
        assert!(matches!(mismatched.server_config(&SIDECAR_ALPN), Err(ConfigError::ChainAndKey(_))));
        assert!(matches!(mismatched.client_config(HELLOWORLD, &SIDECAR_ALPN), Err(ConfigError::ChainAndKey(_))));
    }
}
