//! Workload identities (SPIFFE IDs) and their certificates.
//!
//! One node proxy holds a certificate per identity of the pods it serves; each connection uses
//! the certificate of its own pod (source for outbound, destination for inbound), which is what
//! makes one process look like many sidecars on the wire.
use std::{
    fmt,
    future::Future,
    pin::Pin,
    str::FromStr,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;

pub mod dev_ca;
pub mod istio_ca;
pub mod manager;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE workload identity (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)")]
    BadSpiffeId(String),
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("certificate: {0}")]
    Certificate(String),
}

/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::BadSpiffeId(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

/// A workload's certificate chain (leaf first), its key, and the trust roots it validates peers
/// against.
pub struct WorkloadCert {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
    pub roots: Vec<CertificateDer<'static>>,
    pub info: CertInfo,
}

/// What `/certs` shows of a certificate.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    pub identity: String,
    pub serial: String,
    pub issuer: String,
    pub not_before: String,
    pub not_after: String,
    #[serde(skip)]
    pub not_before_time: SystemTime,
    #[serde(skip)]
    pub not_after_time: SystemTime,
}

impl WorkloadCert {
    /// Builds from DER; reads validity, serial and issuer from the leaf and checks that its URI SAN
    /// is `identity`.
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: Vec<u8>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, IdentityError> {
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::Certificate("empty chain".into()))?;
        let info = cert_info(leaf)?;
        if info.identity != identity.to_string() {
            return Err(IdentityError::Certificate(format!(
                "leaf certificate is for {} but {} was requested",
                info.identity, identity
            )));
        }
        Ok(WorkloadCert {
            identity,
            chain,
            key_pkcs8,
            roots,
            info,
        })
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The chain (leaf first) and the key in PEM, for clients that take files' contents
    /// (a gRPC channel's client identity).
    pub fn to_pem(&self) -> (String, String) {
        let certs: Vec<pem::Pem> = self
            .chain
            .iter()
            .map(|c| pem::Pem::new("CERTIFICATE", c.to_vec()))
            .collect();
        let key = pem::Pem::new("PRIVATE KEY", self.key_pkcs8.clone());
        (pem::encode_many(&certs), pem::encode(&key))
    }

    /// When to renew: half-way through the validity, as Istio does.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .info
            .not_after_time
            .duration_since(self.info.not_before_time)
            .unwrap_or(Duration::ZERO);
        self.info.not_before_time + life / 2
    }
}

/// The SPIFFE identity in a certificate's URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    cert_info(cert)?.identity.parse()
}

pub fn cert_info(cert: &CertificateDer<'_>) -> Result<CertInfo, IdentityError> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(cert.as_ref()).map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let mut uri = None;
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                if u.starts_with("spiffe://") {
                    uri = Some(u.to_string());
                }
            }
        }
    }
    let identity = uri.ok_or_else(|| IdentityError::Certificate("no spiffe:// URI SAN".into()))?;
    let to_sys = |t: &ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    let nb = to_sys(&x.validity().not_before);
    let na = to_sys(&x.validity().not_after);
    Ok(CertInfo {
        identity,
        serial: x.raw_serial_as_string(),
        issuer: x.issuer().to_string(),
        not_before: crate::timefmt::format_rfc3339(nb),
        not_after: crate::timefmt::format_rfc3339(na),
        not_before_time: nb,
        not_after_time: na,
    })
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where certificates come from: the built-in dev CA, or the control plane's CA.
pub trait CertificateProvider: Send + Sync {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, IdentityError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_reject_junk() {
        let id: Identity = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "demo", "client"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/client");
        for bad in [
            "spiffe://cluster.local/ns/demo",
            "http://x/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/c",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
