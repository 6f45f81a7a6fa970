//! Certificates in Istio's `Makefile.selfsigned.mk` layout: a root CA (`root-cert.pem`, `root-key.pem`) and
//! per-cluster intermediates (`NAME/ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`) that drop
//! into each cluster's `cacerts` secret, so that every cluster's workloads chain to one root; and leaf
//! certificates for the control channel (server and client).

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("cannot issue the certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("{0} is not a valid name for a certificate: {1}")]
    Name(String, String),
}

/// A CA as files on disk: its certificate and key.
pub struct CaFiles {
    pub cert_pem: String,
    pub key_pem: String,
}

fn write(path: &Path, contents: &str) -> Result<(), CertError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|error| CertError::Io { path: dir.to_owned(), error })?;
    }
    fs::write(path, contents).map_err(|error| CertError::Io { path: path.to_owned(), error })
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|error| CertError::Io { path: path.to_owned(), error })
}

fn ca_params(common_name: &str, locality: Option<&str>, days: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.distinguished_name.push(DnType::OrganizationName, "Istio");
    params.distinguished_name.push(DnType::CommonName, common_name);
    if let Some(locality) = locality {
        params.distinguished_name.push(DnType::LocalityName, locality);
    }
    params.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(days);
    params
}

/// `root-cert.pem` and `root-key.pem` in `dir` (10 years, as Istio's Makefile).
pub fn root_ca(dir: &Path) -> Result<CaFiles, CertError> {
    let key = KeyPair::generate()?;
    let cert = ca_params("Root CA", None, 3650).self_signed(&key)?;
    let files = CaFiles { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
    write(&dir.join("root-cert.pem"), &files.cert_pem)?;
    write(&dir.join("root-key.pem"), &files.key_pem)?;
    Ok(files)
}

/// The root in `dir`, as written by [`root_ca`].
pub fn load_root(dir: &Path) -> Result<CaFiles, CertError> {
    Ok(CaFiles { cert_pem: read(&dir.join("root-cert.pem"))?, key_pem: read(&dir.join("root-key.pem"))? })
}

fn issuer(ca: &CaFiles) -> Result<Issuer<'static, KeyPair>, CertError> {
    let key = KeyPair::from_pem(&ca.key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&ca.cert_pem, key)?)
}

/// `NAME/{ca-cert,ca-key,root-cert,cert-chain}.pem` under `dir`, signed by the root in `dir` (2 years, as
/// Istio's Makefile; the intermediate names istiod, as Istio's does).
pub fn intermediate(dir: &Path, name: &str) -> Result<CaFiles, CertError> {
    if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
        return Err(CertError::Name(name.to_owned(), "it must be a plain directory name".to_owned()));
    }
    let root = load_root(dir)?;
    let key = KeyPair::generate()?;
    let mut params = ca_params("Intermediate CA", Some(name), 730);
    params.subject_alt_names.push(SanType::DnsName("istiod.istio-system.svc".try_into()?));
    let cert = params.signed_by(&key, &issuer(&root)?)?;
    let out = dir.join(name);
    let files = CaFiles { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
    write(&out.join("ca-cert.pem"), &files.cert_pem)?;
    write(&out.join("ca-key.pem"), &files.key_pem)?;
    write(&out.join("root-cert.pem"), &root.cert_pem)?;
    write(&out.join("cert-chain.pem"), &format!("{}{}", files.cert_pem, root.cert_pem))?;
    Ok(files)
}

/// A leaf for the control channel or a workload, signed by the intermediate in `ca_dir` (as written by
/// [`intermediate`]): `cert.pem` (leaf then intermediate), `key.pem` and `ca.pem` (the root) in `out`.
/// Usable as a server and as a client certificate.
pub fn leaf(ca_dir: &Path, dns_names: &[String], uris: &[String], days: i64, out: &Path) -> Result<(), CertError> {
    let ca = CaFiles { cert_pem: read(&ca_dir.join("ca-cert.pem"))?, key_pem: read(&ca_dir.join("ca-key.pem"))? };
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    for uri in uris {
        let uri = uri.clone().try_into().map_err(|e: rcgen::Error| CertError::Name(uri.clone(), e.to_string()))?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer(&ca)?)?;
    write(&out.join("cert.pem"), &format!("{}{}", cert.pem(), ca.cert_pem))?;
    write(&out.join("key.pem"), &key.serialize_pem())?;
    write(&out.join("ca.pem"), &read(&ca_dir.join("root-cert.pem"))?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("crossgate-certs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn writes_istio_cacerts_layout_that_chains_to_one_root() {
        let dir = temp_dir("layout");
        root_ca(&dir).unwrap();
        intermediate(&dir, "cluster1").unwrap();
        intermediate(&dir, "cluster2").unwrap();
        for file in ["root-cert.pem", "root-key.pem"] {
            assert!(dir.join(file).exists(), "{file}");
        }
        let root = read(&dir.join("root-cert.pem")).unwrap();
        for cluster in ["cluster1", "cluster2"] {
            let ca = read(&dir.join(cluster).join("ca-cert.pem")).unwrap();
            assert_eq!(read(&dir.join(cluster).join("root-cert.pem")).unwrap(), root);
            assert_eq!(read(&dir.join(cluster).join("cert-chain.pem")).unwrap(), format!("{ca}{root}"));
            assert!(read(&dir.join(cluster).join("ca-key.pem")).unwrap().contains("PRIVATE KEY"));
        }
        // A leaf from each intermediate verifies against the shared root, with rustls' own verifier.
        leaf(&dir.join("cluster1"), &["crossgate-control.istio-system.svc".to_owned()], &[], 1, &dir.join("leaf1"))
            .unwrap();
        let chain: Vec<_> = rustls_pemfile_certs(&read(&dir.join("leaf1/cert.pem")).unwrap());
        assert_eq!(chain.len(), 2, "leaf then intermediate");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls_pemfile_certs(&root).remove(0)).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder(std::sync::Arc::new(roots)).build().unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let name = rustls::pki_types::ServerName::try_from("crossgate-control.istio-system.svc").unwrap();
        verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], rustls::pki_types::UnixTime::now()).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).map(Result::unwrap).collect()
    }

    #[test]
    fn intermediate_needs_a_root_and_a_plain_name() {
        let dir = temp_dir("missing");
        assert!(matches!(intermediate(&dir, "cluster1"), Err(CertError::Io { .. })));
        assert!(matches!(intermediate(&dir, "../x"), Err(CertError::Name(..))));
    }
}
