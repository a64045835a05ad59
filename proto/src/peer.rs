//! Who is on the other end of a mutual TLS connection, by its certificate.
//!
//! A name a caller declares (the `x-berth-client` header) is only a claim;
//! the certificate a TLS peer proved it holds the key of is not. Servers use
//! it twice:
//!
//! - the audit logs record it beside the claim, as `[NAME] CLAIM`: the part
//!   in brackets is what the server checked, and comes first so that no
//!   claim can pass for it;
//! - an allow-list (`--tls-allow`) says which certificates may call a TCP
//!   listener at all, so that a certificate the CA signed for one program
//!   (the CSI driver's, say) cannot drive another's API (a volume server's).
//!
//! A certificate's name is its subject's common name, or, when it has none
//! (cert-manager's Certificates usually have none), its first DNS name.
//! Unix sockets carry no certificate: they are local and mode 0600, and the
//! allow-list does not apply to them.

use std::sync::Arc;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The longest certificate name kept (a DNS name's limit).
pub const MAX_NAME_BYTES: usize = 253;

/// The name a DER certificate goes by: its subject's CN, else its first DNS
/// name, else its first IP address; `None` when it has none of them or does
/// not parse. Characters outside `[A-Za-z0-9.-_:*@]` become `?`, so the name
/// can be quoted in a log line and cannot hold the brackets that mark it.
pub fn cert_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .find_map(|a| a.as_str().ok().map(str::to_string));
    let san = || {
        let names = cert.subject_alternative_name().ok()??;
        let dns = names.value.general_names.iter().find_map(|g| match g {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        });
        dns.or_else(|| {
            names.value.general_names.iter().find_map(|g| match g {
                GeneralName::IPAddress(b) => ip(b),
                _ => None,
            })
        })
    };
    let name = cn.filter(|c| !c.is_empty()).or_else(san)?;
    Some(
        name.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || ".-_:*@".contains(c) {
                    c
                } else {
                    '?'
                }
            })
            .take(MAX_NAME_BYTES)
            .collect(),
    )
}

fn ip(b: &[u8]) -> Option<String> {
    if let Ok(a) = <[u8; 4]>::try_from(b) {
        return Some(std::net::Ipv4Addr::from(a).to_string());
    }
    <[u8; 16]>::try_from(b)
        .ok()
        .map(|a| std::net::Ipv6Addr::from(a).to_string())
}

/// Whether the request came over TLS, and if so the name of the certificate
/// its peer presented (`Some(None)`: TLS, but a certificate without a name).
pub fn peer<T>(r: &tonic::Request<T>) -> Option<Option<String>> {
    let certs = r.peer_certs()?;
    Some(certs.first().and_then(|c| cert_name(c)))
}

/// The flag that lets a gRPC API listen on TCP without certificates.
pub const INSECURE_TCP_FLAG: &str = "--insecure-plaintext-tcp";

/// Whether a gRPC API (`what`, e.g. "the metadata API") may listen on `addr`
/// over TCP. Without mutual TLS nothing tells one caller from another: any
/// user of the node (and of the network, past loopback) could list grants
/// with their tokens, create, export and delete volumes, and the audit log
/// would record whatever name the caller claims. So plain TCP is refused
/// unless asked for by the loudly named [`INSECURE_TCP_FLAG`]; the unix
/// sockets (0600, root's) are the local way in.
pub fn plaintext_tcp(
    what: &str,
    addr: Option<std::net::SocketAddr>,
    tls: bool,
    insecure: bool,
) -> Result<(), String> {
    let Some(addr) = addr else { return Ok(()) };
    if tls {
        return Ok(());
    }
    if !insecure {
        return Err(format!(
            "{what} on TCP {addr} needs certificates (--tls-dir): without them any local user could call it as anyone. Use the unix socket, give --tls-dir, or accept that risk with {INSECURE_TCP_FLAG}"
        ));
    }
    tracing::warn!(
        %addr,
        "{what} listens on TCP WITHOUT AUTHENTICATION ({INSECURE_TCP_FLAG}): anyone who can reach {addr} can call it as anyone"
    );
    Ok(())
}

/// The certificate names that may call a server over TLS; empty, any
/// certificate the CA signed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow(Arc<Vec<String>>);

impl Allow {
    /// Any certificate the CA signed.
    pub fn any() -> Allow {
        Allow::default()
    }

    /// A comma-separated list of names (`berth-csi,berth-volume-server`). A
    /// name ending in `*` allows every name that starts with what precedes
    /// it (`berth-admin-*`).
    pub fn parse(list: &str) -> Result<Allow, String> {
        let mut names = Vec::new();
        for n in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let stem = n.strip_suffix('*').unwrap_or(n);
            if n.len() > MAX_NAME_BYTES
                || stem.contains('*')
                || !stem
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_:@".contains(c))
            {
                return Err(format!(
                    "{}: not a certificate name (letters, digits, . - _ : @, and a final *)",
                    crate::validate::quote(n)
                ));
            }
            names.push(n.to_string());
        }
        if names.is_empty() && !list.trim().is_empty() {
            return Err(format!(
                "{}: names no certificate",
                crate::validate::quote(list)
            ));
        }
        Ok(Allow(Arc::new(names)))
    }

    /// A list is checked only over TLS: one given to a server without
    /// certificates is a mistake to refuse, not a rule to ignore.
    pub fn needs_tls(&self, tls: bool) -> Result<(), String> {
        if tls || self.is_any() {
            Ok(())
        } else {
            Err(
                "a list of allowed certificates (--tls-allow) needs certificates (--tls-dir)"
                    .into(),
            )
        }
    }

    pub fn is_any(&self) -> bool {
        self.0.is_empty()
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// Whether a certificate of this name may call.
    pub fn permits(&self, name: &str) -> bool {
        self.is_any()
            || self.0.iter().any(|a| match a.strip_suffix('*') {
                Some(stem) => name.starts_with(stem),
                None => a == name,
            })
    }

    /// Refuses a TLS request whose certificate is not allowed, with
    /// PermissionDenied naming the certificate and the list. Requests that
    /// did not come over TLS are not this check's to refuse.
    #[allow(clippy::result_large_err)]
    pub fn check<T>(&self, r: &tonic::Request<T>) -> Result<(), tonic::Status> {
        if self.is_any() {
            return Ok(());
        }
        match peer(r) {
            None => Ok(()),
            Some(Some(n)) if self.permits(&n) => Ok(()),
            Some(n) => Err(tonic::Status::permission_denied(format!(
                "certificate {} may not call this server (allowed: {})",
                n.as_deref()
                    .map_or_else(|| "without a name".into(), crate::validate::quote),
                self.0.join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate with this subject CN (if any) and SANs.
    fn cert(cn: Option<&str>, sans: &[&str]) -> Vec<u8> {
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        p.self_signed(&key).expect("sign").der().to_vec()
    }

    #[test]
    fn a_certificate_is_named_by_cn_then_dns_then_ip() {
        let cases: &[(Option<&str>, &[&str], Option<&str>)] = &[
            (Some("berth-admin"), &["other.example"], Some("berth-admin")),
            // cert-manager's usual shape: no subject, DNS names only.
            (
                None,
                &["berth-csi", "berth-csi.berth-system.svc"],
                Some("berth-csi"),
            ),
            (
                None,
                &["10.0.0.7", "berth-metadata"],
                Some("berth-metadata"),
            ),
            (None, &["10.0.0.7"], Some("10.0.0.7")),
            (None, &["::1"], Some("::1")),
            (Some(""), &["fallback"], Some("fallback")),
            (None, &[], None),
            // Nothing that could pass for the audit's brackets, or break a line.
            (Some("evil] [berth-admin"), &[], Some("evil???berth-admin")),
            (Some("line\nbreak"), &[], Some("line?break")),
        ];
        for (cn, sans, want) in cases {
            let got = cert_name(&cert(*cn, sans));
            assert_eq!(got.as_deref(), *want, "cn {cn:?}, sans {sans:?}");
        }
        let long = "a".repeat(400);
        let got = cert_name(&cert(Some(&long), &[])).expect("named");
        assert_eq!(got.len(), MAX_NAME_BYTES);
        assert_eq!(cert_name(b"not a certificate"), None);
        assert_eq!(cert_name(&[]), None);
    }

    #[test]
    fn allow_lists_parse_and_permit_exactly_their_names() {
        let a = Allow::parse("berth-csi, berth-volume-server,berth-admin-*").expect("parse");
        assert_eq!(a.names().len(), 3);
        for (name, ok) in [
            ("berth-csi", true),
            ("berth-volume-server", true),
            ("berth-admin-alice", true),
            ("berth-admin-", true),
            ("berth-admin", false),
            ("berth-csi2", false),
            ("berth-cs", false),
            ("BERTH-CSI", false),
            ("", false),
        ] {
            assert_eq!(a.permits(name), ok, "{name:?}");
        }
        let any = Allow::parse("").expect("empty");
        assert!(any.is_any() && any.permits("whoever") && any == Allow::any());
        for bad in [
            "a*b",
            "*x*",
            "has space",
            "a,b c",
            "semi;colon",
            ",",
            " , ",
            "x]",
        ] {
            assert!(Allow::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Allow::parse(&"a".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn only_tls_requests_are_checked() {
        // No TLS connect info (a unix socket, or in-process): not this
        // check's to refuse, whatever the list.
        let r = tonic::Request::new(());
        assert!(Allow::parse("berth-csi").expect("parse").check(&r).is_ok());
        assert_eq!(peer(&r), None);
        assert_eq!(crate::caller(&r), "local");
        let mut r = tonic::Request::new(());
        crate::name_caller(&mut r, "berthctl:alice");
        assert_eq!(crate::caller(&r), "berthctl:alice");
    }
}
