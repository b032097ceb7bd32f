//! `--ca dev`: a certificate authority inside the agent, for local mode and tests. It generates a
//! root at start (written to disk so peers and users can trust it) and issues ECDSA P-256 leaves
//! with the workload's SPIFFE ID as URI SAN.
use std::{path::Path, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;

use super::{BoxFuture, CertificateProvider, Identity, IdentityError, WorkloadCert};

pub struct DevCa {
    trust_domain: String,
    cert: rcgen::Certificate,
    /// The root as written on disk (what peers trust); equal in subject and key to `cert`.
    root: CertificateDer<'static>,
    root_pem: String,
    key: KeyPair,
    ttl: Duration,
}

fn ca_err(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Ca(e.to_string())
}

impl DevCa {
    pub fn new(trust_domain: &str, ttl: Duration) -> Result<Self, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "nodeway dev CA");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(365);
        let cert = params.self_signed(&key).map_err(ca_err)?;
        let (root, root_pem) = (cert.der().clone(), cert.pem());
        Ok(DevCa {
            trust_domain: trust_domain.into(),
            cert,
            root,
            root_pem,
            key,
            ttl,
        })
    }

    /// Loads the CA from `dir` (`root-cert.pem`, `root-key.pem`), or creates it there. Nodes that
    /// share the directory share the root, so their workloads trust each other. The key is the
    /// mesh's root of trust: the directory is made 0700 and the key 0600 (also when an older
    /// version left them readable), so only root on the node can read it.
    pub fn load_or_create(dir: &Path, trust_domain: &str, ttl: Duration) -> Result<Self, IdentityError> {
        let (cert_path, key_path) = (dir.join("root-cert.pem"), dir.join("root-key.pem"));
        let io = |p: &Path, e: std::io::Error| IdentityError::Ca(format!("{}: {e}", p.display()));
        if cert_path.exists() && key_path.exists() {
            private(dir, 0o700).map_err(|e| io(dir, e))?;
            private(&key_path, 0o600).map_err(|e| io(&key_path, e))?;
            let root_pem = std::fs::read_to_string(&cert_path).map_err(|e| io(&cert_path, e))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(|e| io(&key_path, e))?;
            let bad = |p: &Path, e: &dyn std::fmt::Display| IdentityError::Ca(format!("{}: {e}", p.display()));
            let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, &e))?;
            let params = CertificateParams::from_ca_cert_pem(&root_pem).map_err(|e| bad(&cert_path, &e))?;
            let cert = params.self_signed(&key).map_err(ca_err)?;
            let root = rustls_pemfile::certs(&mut root_pem.as_bytes())
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| bad(&cert_path, &"no certificate"))?;
            return Ok(DevCa {
                trust_domain: trust_domain.into(),
                cert,
                root,
                root_pem,
                key,
                ttl,
            });
        }
        let ca = Self::new(trust_domain, ttl)?;
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        private(dir, 0o700).map_err(|e| io(dir, e))?;
        write_private(&key_path, ca.key.serialize_pem().as_bytes()).map_err(|e| io(&key_path, e))?;
        std::fs::write(&cert_path, ca.root_pem()).map_err(|e| io(&cert_path, e))?;
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// Writes the root certificate (PEM) so other nodes and tools can trust this CA.
    pub fn write_root(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.root_pem())
    }

    /// Issues a leaf valid for the configured TTL from now (back-dated a little for clock skew).
    pub fn issue(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        let now = time::OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(self.ttl).map_err(ca_err)?;
        self.issue_valid(id, now - time::Duration::seconds(10), now + ttl)
    }

    /// Issues a leaf with explicit validity (tests use it for expired / not-yet-valid certs).
    pub fn issue_valid(
        &self,
        id: &Identity,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<WorkloadCert, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
        let mut params = CertificateParams::default();
        let uri = id.to_string().try_into().map_err(ca_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let leaf = params.signed_by(&key, &self.cert, &self.key).map_err(ca_err)?;
        WorkloadCert::new(
            id.clone(),
            vec![leaf.der().clone()],
            key.serialize_der(),
            vec![self.root_der()],
        )
    }

    /// Signs a CSR the way an Istio CA does: the certificate carries only the SPIFFE URI SAN of the
    /// identity the caller may have (`allowed`; default: the CSR's own), for `ttl` from now.
    /// Returns the leaf as PEM. The in-test Istio CA server uses this.
    pub fn sign_csr(&self, csr_pem: &str, allowed: Option<&str>, ttl: Duration) -> Result<String, IdentityError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IdentityError::Ca(format!("CSR: {e}")))?;
        let requested = csr.params.subject_alt_names.iter().find_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_owned()),
            _ => None,
        });
        let id: Identity = match allowed.or(requested.as_deref()) {
            Some(s) => s.parse()?,
            None => return Err(IdentityError::Ca("CSR has no SPIFFE URI SAN".into())),
        };
        let now = time::OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(ttl).map_err(ca_err)?;
        let p = &mut csr.params;
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(ca_err)?)];
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::NoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = now - time::Duration::seconds(10);
        p.not_after = now + ttl;
        let leaf = csr.signed_by(&self.cert, &self.key).map_err(ca_err)?;
        Ok(leaf.pem())
    }

    /// A TLS server certificate and key (PEM) for `names` (DNS names or IP addresses), for
    /// services that workloads reach with this root as trust anchor (the in-test Istio CA).
    pub fn serving_cert(&self, names: &[&str]) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).map_err(ca_err)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(30);
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(ca_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

impl CertificateProvider for DevCa {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, IdentityError>> {
        Box::pin(async move { self.issue(id) })
    }
}

/// Narrows `path`'s mode to `mode` (never widens it).
fn private(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let current = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if current & !mode != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(current & mode))?;
    }
    Ok(())
}

/// Creates `path` 0600 from the start (no window in which the key is readable), then fills it.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    private(path, 0o600)?;
    f.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_spiffe_leaves_chained_to_the_root() {
        let ca = DevCa::new("cluster.local", Duration::from_secs(3600)).unwrap();
        let id = Identity::new("cluster.local", "demo", "client");
        let c = ca.issue(&id).unwrap();
        assert_eq!(super::super::identity_of(&c.chain[0]).unwrap(), id);
        assert!(c.info.issuer.contains("nodeway dev CA"), "{}", c.info.issuer);
        let life = c.info.not_after_time.duration_since(c.info.not_before_time).unwrap();
        assert_eq!(life, Duration::from_secs(3610));
        assert!(c.refresh_at() > c.info.not_before_time && c.refresh_at() < c.info.not_after_time);
        assert!(ca.root_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn a_shared_directory_gives_one_root() {
        let dir = std::env::temp_dir().join(format!("nodeway-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = DevCa::load_or_create(&dir, "td", Duration::from_secs(60)).unwrap();
        let b = DevCa::load_or_create(&dir, "td", Duration::from_secs(60)).unwrap();
        assert_eq!(a.root_der(), b.root_der());
        // A leaf of b verifies against a's root.
        let leaf = b.issue(&Identity::new("td", "n", "s")).unwrap();
        let root = a.root_der();
        let anchor = webpki::anchor_from_trusted_cert(&root).unwrap();
        let ee = webpki::EndEntityCert::try_from(&leaf.chain[0]).unwrap();
        let algs = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        ee.verify_for_usage(
            algs,
            &[anchor],
            &[],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_root_key_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = std::env::temp_dir().join(format!("nodeway-ca-perm-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        DevCa::load_or_create(&dir, "td", Duration::from_secs(60)).unwrap();
        let key = dir.join("root-key.pem");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            mode(&dir.join("root-cert.pem")) & 0o044,
            0o044,
            "the root cert stays public"
        );
        // What an older version left behind is narrowed when loaded.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        DevCa::load_or_create(&dir, "td", Duration::from_secs(60)).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir), 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
