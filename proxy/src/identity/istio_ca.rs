//! `--ca istio`: workload certificates from Istio's CA (`istiod:15012`), the way ztunnel gets them.
//!
//! For every identity a captured pod needs, a fresh ECDSA P-256 key and a CSR whose only SAN is the
//! SPIFFE URI go to `istio.v1.auth.IstioCertificateService/CreateCertificate`, over TLS checked
//! against the mesh root, with the node's bearer token. A node proxy asks on behalf of pods, so
//! the request names the pod's identity in `ImpersonatedIdentity` metadata, as ztunnel does.
//! Renewal at half-life and retry with backoff are the [`super::manager::CertManager`]'s.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::CertificateDer;
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use super::{BoxFuture, CertificateProvider, Identity, IdentityError, WorkloadCert};

/// The generated `istio.v1.auth` messages, client and server.
pub mod pb {
    tonic::include_proto!("istio.v1.auth");
}

use pb::istio_certificate_service_client::IstioCertificateServiceClient;

/// How long one CreateCertificate call may take before it counts as failed (and is retried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct IstioCaConfig {
    /// `https://istiod.istio-system.svc:15012`
    pub address: String,
    /// PEM file of the mesh root: verifies the CA's serving certificate, and peers.
    pub root_cert: PathBuf,
    /// Bearer token, re-read for every request (projected tokens rotate).
    pub token_file: Option<PathBuf>,
    /// Sent as the `ClusterID` header, which istiod uses to pick the cluster that vouches for the token.
    pub cluster_id: String,
    /// Name checked in the CA's serving certificate, when the address is not it.
    pub tls_server_name: Option<String>,
    /// Requested certificate lifetime.
    pub ttl: Duration,
}

pub struct IstioCa {
    client: IstioCertificateServiceClient<Channel>,
    config: IstioCaConfig,
    roots: Vec<CertificateDer<'static>>,
}

fn ca_err(what: impl std::fmt::Display) -> IdentityError {
    IdentityError::Ca(what.to_string())
}

/// Every certificate of a PEM file or string.
pub fn pem_certs(pem: &str, what: &dyn std::fmt::Display) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_err(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(ca_err(format!("{what}: no PEM certificate in it")));
    }
    Ok(certs)
}

impl IstioCa {
    /// Checks the address and the root file now; the connection itself is made on first use,
    /// so an unreachable CA is retried rather than fatal.
    pub fn new(config: IstioCaConfig) -> Result<Self, IdentityError> {
        let root_pem = read(&config.root_cert)?;
        let roots = pem_certs(&root_pem, &config.root_cert.display())?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&root_pem));
        if let Some(name) = &config.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        let endpoint = Endpoint::from_shared(config.address.clone())
            .map_err(|e| ca_err(format!("CA address {:?}: {e}", config.address)))?
            .connect_timeout(REQUEST_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .tls_config(tls)
            .map_err(|e| ca_err(format!("CA address {:?}: TLS: {e}", config.address)))?;
        Ok(IstioCa {
            client: IstioCertificateServiceClient::new(endpoint.connect_lazy()),
            config,
            roots,
        })
    }

    /// The mesh root(s) from `root_cert`.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    async fn request(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(ca_err)?)];
        let csr = params.serialize_request(&key).map_err(ca_err)?.pem().map_err(ca_err)?;

        let ttl = i64::try_from(self.config.ttl.as_secs()).unwrap_or(i64::MAX);
        let impersonated = prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
        };
        let mut req = tonic::Request::new(pb::IstioCertificateRequest {
            csr,
            validity_duration: ttl,
            metadata: Some(prost_types::Struct {
                fields: BTreeMap::from([("ImpersonatedIdentity".to_string(), impersonated)]),
            }),
        });
        let cluster = MetadataValue::try_from(self.config.cluster_id.as_str()).map_err(|_| {
            ca_err(format!(
                "cluster id {:?} is not a valid header value",
                self.config.cluster_id
            ))
        })?;
        req.metadata_mut().insert("clusterid", cluster);
        if let Some(path) = &self.config.token_file {
            let token = read(path)?;
            let bearer = MetadataValue::try_from(format!("Bearer {}", token.trim()))
                .map_err(|_| ca_err(format!("{}: the token is not a valid header value", path.display())))?;
            req.metadata_mut().insert("authorization", bearer);
        }

        let resp = self
            .client
            .clone()
            .create_certificate(req)
            .await
            .map_err(|s| {
                ca_err(format!(
                    "{} refused the CSR for {id}: {}: {}",
                    self.config.address,
                    s.code(),
                    s.message()
                ))
            })?
            .into_inner();
        let (chain, mut roots) = split_response(&resp.cert_chain, &self.config.address)?;
        if chain.is_empty() {
            return Err(ca_err(format!(
                "{} returned no certificate for {id}",
                self.config.address
            )));
        }
        // The mesh root file stays trusted as well (re-read now: a rotated file counts from the
        // next certificate on), so a CA whose chain ends in an intermediate still works.
        let file_roots = match read(&self.config.root_cert) {
            Ok(pem) => pem_certs(&pem, &self.config.root_cert.display())?,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-read the mesh root; keeping the one read at start");
                self.roots.clone()
            }
        };
        for r in file_roots {
            if !roots.contains(&r) {
                roots.push(r);
            }
        }
        WorkloadCert::new(id.clone(), chain, key.serialize_der(), roots).map_err(|e| {
            ca_err(format!(
                "{} answered the CSR for {id} with an unusable certificate: {e}",
                self.config.address
            ))
        })
    }
}

/// istiod answers `[leaf, chain..., root bundle]`: the last element is the trust bundle (one PEM
/// element that may hold several roots, e.g. during a root rotation), everything before it the
/// certificate chain, leaf first. A single element is the chain alone. Chain certificates that
/// are also in the bundle (istiod's plugged-in `cert-chain.pem` ends in the root) are not sent
/// to peers. Returns (chain, roots).
fn split_response(
    elements: &[String],
    ca: &str,
) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>), IdentityError> {
    let parse = |i: usize, pem: &String| pem_certs(pem, &format_args!("{ca}: element {i} of the certificate response"));
    match elements {
        [] => Ok((Vec::new(), Vec::new())),
        [only] => Ok((parse(0, only)?, Vec::new())),
        [chain @ .., bundle] => {
            let roots = parse(chain.len(), bundle)?;
            let mut certs = Vec::new();
            for (i, pem) in chain.iter().enumerate() {
                certs.extend(parse(i, pem)?.into_iter().filter(|c| !roots.contains(c)));
            }
            Ok((certs, roots))
        }
    }
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|e| ca_err(format!("{}: {e}", path.display())))
}

impl CertificateProvider for IstioCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, IdentityError>> {
        Box::pin(self.request(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, IsCa};

    fn ca(name: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.self_signed(&key).unwrap().pem()
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        pem_certs(pem, &"test").unwrap().remove(0)
    }

    #[test]
    fn last_element_is_a_bundle_of_every_root() {
        let (leaf, inter, old_root, new_root) = (ca("leaf"), ca("inter"), ca("old"), ca("new"));
        // istiod with plugged-in certs: [leaf, cert-chain.pem (intermediate + root), root bundle].
        let resp = vec![
            leaf.clone(),
            format!("{inter}{old_root}"),
            format!("{old_root}{new_root}"),
        ];
        let (chain, roots) = split_response(&resp, "istiod").unwrap();
        assert_eq!(chain, vec![der(&leaf), der(&inter)], "roots are not sent as chain");
        assert_eq!(
            roots,
            vec![der(&old_root), der(&new_root)],
            "both roots of a rotation are trusted"
        );
    }

    #[test]
    fn a_single_element_is_the_chain() {
        let (leaf, inter) = (ca("leaf"), ca("inter"));
        let (chain, roots) = split_response(&[format!("{leaf}{inter}")], "istiod").unwrap();
        assert_eq!(chain, vec![der(&leaf), der(&inter)]);
        assert!(roots.is_empty());
    }

    #[test]
    fn an_element_without_a_certificate_is_named() {
        let err = split_response(&[ca("leaf"), "garbage".into()], "istiod").unwrap_err();
        assert!(err.to_string().contains("element 1"), "{err}");
    }
}
