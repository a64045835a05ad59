//! Mutual TLS between Berth's programs, from one folder of PEM files.
//!
//! A program configured with `--tls-dir DIR` reads three files, named the
//! way cert-manager writes a Certificate's Secret (so the Secret mounts as
//! the folder unchanged):
//!
//! - `tls.crt`: this program's certificate (and any intermediates);
//! - `tls.key`: its private key;
//! - `ca.crt`: the CA that signs every Berth program's certificate.
//!
//! Its TCP listeners (gRPC, and NBD's STARTTLS) then accept only peers that
//! present a certificate signed by that CA, and it dials `https://`
//! endpoints presenting its own. Unix sockets stay plaintext: they are local,
//! mode 0600, and that is how `berth standalone` runs without certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";

/// The name volume servers' certificates carry and the metadata service
/// checks when it dials one: one Certificate serves every node of a
/// DaemonSet, whatever address each node advertises.
pub const VOLUME_SERVER_NAME: &str = "berth-volume-server";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS: {0}")]
    Config(String),
}

/// A program's certificate, key and CA, read and checked.
#[derive(Clone)]
pub struct TlsDir {
    pub dir: PathBuf,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    certs: Vec<CertificateDer<'static>>,
    ca: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for TlsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsDir").field("dir", &self.dir).finish()
    }
}

fn read(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), TlsError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(b) => Ok((path, b)),
        Err(e) => Err(TlsError::File {
            path,
            why: e.to_string(),
        }),
    }
}

fn read_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::File {
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsDir {
    /// Reads `dir`'s three files; a missing or unparsable one is named.
    pub fn load(dir: impl Into<PathBuf>) -> Result<TlsDir, TlsError> {
        let dir = dir.into();
        let (cert_path, cert_pem) = read(&dir, CERT_FILE)?;
        let (key_path, key_pem) = read(&dir, KEY_FILE)?;
        let (ca_path, ca_pem) = read(&dir, CA_FILE)?;
        let certs = read_certs(&cert_path, &cert_pem)?;
        let ca = read_certs(&ca_path, &ca_pem)?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
            path: key_path,
            why: format!("not a PEM private key: {e}"),
        })?;
        let t = TlsDir {
            dir,
            cert_pem,
            key_pem,
            ca_pem,
            certs,
            ca,
        };
        // A key that does not match the certificate fails here, not at the
        // first handshake.
        t.rustls_server()?;
        Ok(t)
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(&self.key_pem).expect("checked at load")
    }

    /// tonic's server side: this certificate, and a client certificate
    /// signed by the CA required of every peer.
    pub fn grpc_server(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// tonic's client side: the CA the server must be signed by, and this
    /// certificate to present. `server_name` replaces the endpoint's host as
    /// the name the server's certificate must carry.
    pub fn grpc_client(&self, server_name: Option<&str>) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match server_name {
            Some(n) => c.domain_name(n),
            None => c,
        }
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(|e| {
                TlsError::Config(format!("{}: {e}", self.dir.join(CA_FILE).display()))
            })?;
        }
        Ok(Arc::new(roots))
    }

    /// rustls' server side for NBD's STARTTLS: the same rules as gRPC's (a
    /// client certificate signed by the CA is required).
    pub fn rustls_server(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs.clone(), self.key())
            .map_err(|e| {
                TlsError::Config(format!(
                    "{} and {}: {e}",
                    self.dir.join(CERT_FILE).display(),
                    self.dir.join(KEY_FILE).display()
                ))
            })?;
        Ok(Arc::new(cfg))
    }

    /// rustls' client side (Berth's own NBD client, and tests): verifies the
    /// server against the CA and presents this certificate.
    pub fn rustls_client(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.certs.clone(), self.key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(cfg))
    }
}

/// A certificate to issue: the folder name it goes in, and the names (DNS
/// names or IP addresses) it is valid for.
#[derive(Debug, Clone)]
pub struct Issue {
    pub name: String,
    pub sans: Vec<String>,
}

impl std::str::FromStr for Issue {
    type Err = String;
    /// `NAME=SAN,SAN...` (`berth-metadata=berth-metadata.berth.svc,127.0.0.1`),
    /// or `NAME` alone, valid for NAME.
    fn from_str(s: &str) -> Result<Issue, String> {
        let (name, sans) = match s.split_once('=') {
            Some((n, rest)) => (n, rest.split(',').map(str::to_string).collect()),
            None => (s, vec![s.to_string()]),
        };
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !name.starts_with('.');
        if !ok {
            return Err(format!(
                "{name:?}: a certificate's name is 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
            ));
        }
        if sans.iter().any(|n: &String| n.is_empty()) {
            return Err(format!("{s:?}: an empty name"));
        }
        Ok(Issue {
            name: name.to_string(),
            sans,
        })
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| TlsError::File {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Makes a new CA and signs one certificate per `issue`, each usable as
/// server and client. Writes `out/ca.crt`, `out/ca.key` and, per issue,
/// `out/NAME/{tls.crt,tls.key,ca.crt}` (keys mode 0600). Refuses to
/// overwrite anything.
pub fn generate(out: &Path, issues: &[Issue], days: u32) -> Result<(), TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let gen = |e: rcgen::Error| TlsError::Config(e.to_string());
    let now = std::time::SystemTime::now();
    let until = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|e| TlsError::File {
            path: p.to_path_buf(),
            why: e.to_string(),
        })
    };
    mkdir(out)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "Berth CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now.into();
    ca.not_after = until.into();
    let ca_key = KeyPair::generate().map_err(gen)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    let ca_pem = ca_cert.pem();
    write_file(&out.join(CA_FILE), ca_pem.as_bytes(), 0o644)?;
    write_file(
        &out.join("ca.key"),
        ca_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    let issuer = Issuer::new(ca, ca_key);
    for i in issues {
        let mut p = CertificateParams::new(i.sans.clone()).map_err(gen)?;
        p.distinguished_name
            .push(DnType::CommonName, i.name.clone());
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = now.into();
        p.not_after = until.into();
        let key = KeyPair::generate().map_err(gen)?;
        let cert = p.signed_by(&key, &issuer).map_err(gen)?;
        let dir = out.join(&i.name);
        mkdir(&dir)?;
        write_file(&dir.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
        write_file(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&dir.join(CA_FILE), ca_pem.as_bytes(), 0o644)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_folders_load_and_bad_ones_are_named() {
        let d = tempfile::tempdir().expect("tmp");
        let issues: Vec<Issue> = ["a=localhost,127.0.0.1", "b"]
            .iter()
            .map(|s| s.parse().expect("issue"))
            .collect();
        generate(d.path(), &issues, 30).expect("generate");
        TlsDir::load(d.path().join("a")).expect("a loads");
        TlsDir::load(d.path().join("b")).expect("b loads");
        assert!(generate(d.path(), &issues, 30).is_err(), "never overwrites");
        // a's key with b's certificate: caught at load.
        std::fs::copy(d.path().join("b/tls.key"), d.path().join("a/tls.key.b")).expect("copy");
        std::fs::rename(d.path().join("a/tls.key.b"), d.path().join("a/tls.key")).expect("mv");
        let e = TlsDir::load(d.path().join("a")).expect_err("mismatched key");
        assert!(e.to_string().contains("tls.crt and"), "{e}");
        std::fs::write(d.path().join("b/ca.crt"), "junk").expect("write");
        let e = TlsDir::load(d.path().join("b")).expect_err("bad CA");
        assert!(e.to_string().contains("ca.crt"), "{e}");
        std::fs::remove_file(d.path().join("b/tls.crt")).expect("rm");
        let e = TlsDir::load(d.path().join("b")).expect_err("missing cert");
        assert!(e.to_string().contains("tls.crt"), "{e}");
        for bad in ["", "../x", ".hidden", "a/b", "x=,y"] {
            assert!(bad.parse::<Issue>().is_err(), "{bad:?} accepted");
        }
    }
}
