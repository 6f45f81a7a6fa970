//! An Istio-shaped PKI: one root CA, workload certificates carrying a SPIFFE identity, and the rustls
//! configurations sidecars use (mTLS both ways, Istio's ALPNs, the server identity checked by SAN rather than
//! by SNI, since the SNI is the `outbound_.` key).

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// What a sidecar offers for a TCP (or mTLS-detected) connection.
pub const SIDECAR_ALPN: [&[u8]; 2] = [b"istio-peer-exchange", b"istio"];

/// A root CA (the mesh's trust anchor).
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

/// A workload's certificate and key.
#[derive(Debug, Clone)]
pub struct WorkloadIdentity {
    /// e.g. `spiffe://cluster.local/ns/sample/sa/helloworld`.
    pub spiffe: String,
    /// The DNS name in the certificate, which peers verify instead of the SNI.
    pub dns_name: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub roots: Arc<RootCertStore>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::OrganizationName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("key generation");
        TestCa { issuer: CertifiedIssuer::self_signed(params, key).expect("self-signed CA") }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A workload certificate for service account `sa` in `namespace`.
    pub fn workload(&self, namespace: &str, sa: &str) -> WorkloadIdentity {
        let spiffe = format!("spiffe://cluster.local/ns/{namespace}/sa/{sa}");
        let dns_name = format!("{sa}.{namespace}.svc");
        let mut params = CertificateParams::new(vec![dns_name.clone()]).expect("valid DNS name");
        params.subject_alt_names.push(SanType::URI(spiffe.clone().try_into().expect("valid URI")));
        let key = KeyPair::generate().expect("key generation");
        let cert = params.signed_by(&key, &self.issuer).expect("signed workload cert");
        let mut roots = RootCertStore::empty();
        roots.add(self.root()).expect("root parses");
        WorkloadIdentity {
            spiffe,
            dns_name,
            chain: vec![cert.der().clone()],
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))),
            roots: Arc::new(roots),
        }
    }
}

impl WorkloadIdentity {
    /// A server that requires a client certificate from the same mesh, offering Istio's ALPNs.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let verifier = WebPkiClientVerifier::builder(Arc::clone(&self.roots)).build().expect("client verifier");
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .expect("server cert and key match");
        config.alpn_protocols = SIDECAR_ALPN.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A sidecar client: presents this identity, offers `alpn`, and accepts a server whose certificate
    /// chains to the mesh root and names `server_dns_name`.
    pub fn client_config(&self, server_dns_name: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let webpki = rustls::client::WebPkiServerVerifier::builder(Arc::clone(&self.roots)).build().expect("verifier");
        let verifier = IdentityVerifier {
            inner: webpki,
            identity: ServerName::try_from(server_dns_name.to_owned()).expect("valid DNS name"),
        };
        let mut config = ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .expect("client cert and key match");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// Verifies the chain against the mesh root and the certificate against a fixed identity, whatever SNI
/// was sent: Istio checks the peer's SAN, while the SNI carries the gateway routing key.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    identity: ServerName<'static>,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _sni: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.identity, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The SPIFFE URI inside a DER certificate: a short IA5String, so its length is the byte before it.
pub fn spiffe_of(cert: &[u8]) -> Option<String> {
    let start = cert.windows(9).position(|w| w == b"spiffe://")?;
    let len = usize::from(*cert.get(start.checked_sub(1)?)?);
    String::from_utf8(cert.get(start..start + len)?.to_vec()).ok()
}
