//! An Istio-shaped PKI: one root CA, and workload certificates that, like Istio's, name their workload by a
//! SPIFFE URI alone. The rustls configurations are crossgate-mtls's, as the mesh's workloads use: mTLS both
//! ways, Istio's ALPNs, the server's SPIFFE identity checked rather than the SNI (the `outbound_.` key).

use std::sync::Arc;

pub use crossgate_mtls::SIDECAR_ALPN;
use crossgate_mtls::WorkloadTls;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A root CA (the mesh's trust anchor).
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

/// A workload's certificate and key, and the root it trusts.
#[derive(Debug, Clone)]
pub struct WorkloadIdentity {
    /// e.g. `spiffe://cluster.local/ns/sample/sa/helloworld`: the certificate's only name, what peers check.
    pub spiffe: String,
    tls: WorkloadTls,
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

    /// A workload certificate for service account `sa` in `namespace`, as istiod issues them: no subject, the
    /// SPIFFE URI as the only subject alternative name, good for both ends of mTLS.
    pub fn workload(&self, namespace: &str, sa: &str) -> WorkloadIdentity {
        let spiffe = format!("spiffe://cluster.local/ns/{namespace}/sa/{sa}");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe.clone().try_into().expect("valid URI"))];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("key generation");
        let cert = params.signed_by(&key, &self.issuer).expect("signed workload cert");
        let mut roots = RootCertStore::empty();
        roots.add(self.root()).expect("root parses");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let tls = WorkloadTls::new(vec![cert.der().clone()], key, Arc::new(roots)).expect("one root");
        WorkloadIdentity { spiffe, tls }
    }
}

impl WorkloadIdentity {
    /// A server that requires a client certificate from the same mesh, offering Istio's ALPNs.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.tls.server_config(&SIDECAR_ALPN).expect("server configuration")
    }

    /// A sidecar client: presents this identity, offers `alpn`, and accepts a server whose certificate
    /// chains to the mesh root and names `server_spiffe`, whatever SNI is sent.
    pub fn client_config(&self, server_spiffe: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        self.tls.client_config(server_spiffe, alpn).expect("client configuration")
    }
}
