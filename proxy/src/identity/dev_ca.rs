//! `--ca dev`: a certificate authority inside the agent, for local mode and tests. It generates a
//! root at start (written to disk so peers and users can trust it) and issues ECDSA P-256 leaves
//! with the workload's SPIFFE ID as URI SAN.
//!
//! The root is rolled over before it expires, the way CAs do it without a gap: at 2/3 of its
//! lifetime the next root is created and published (`next-root-cert.pem`), and every leaf
//! issued from then on trusts it; it starts signing one leaf TTL later, once every leaf in use
//! trusts it; the old root stays trusted (`retired-roots.pem`) until it expires, and no leaf
//! outlives the root that signed it. Each issuance re-reads the directory, so agents sharing it
//! pick up each other's rotation, and pods' trust bundles follow with their next leaf (the
//! HBONE client and server verify against the roots of the pod's current certificate).
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::CertificateDer;

use super::{BoxFuture, CertificateProvider, Identity, IdentityError, WorkloadCert};

/// How long a root is valid unless configured otherwise.
pub const DEFAULT_ROOT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Roots are valid from a little before they are made (clock skew between nodes).
const BACKDATE: Duration = Duration::from_secs(300);

/// What the CA reads the time from (tests move it).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// A root certificate and its key.
struct Root {
    /// What leaves are signed by (rcgen's handle; subject and key equal to `der`'s).
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The certificate as published (what peers trust).
    der: CertificateDer<'static>,
    pem: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// A root that signs no more, trusted until it expires.
struct Retired {
    der: CertificateDer<'static>,
    pem: String,
    not_after: SystemTime,
}

struct Roots {
    signer: Root,
    /// Published and trusted, signing from [`Step::Promote`] on.
    next: Option<Root>,
    retired: Vec<Retired>,
    /// The public files these were read from or written as (to notice another writer).
    files: Vec<u8>,
}

/// What the rotation schedule says to do now.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Keep,
    /// 2/3 of the signing root's lifetime is over: publish the next root.
    CreateNext,
    /// Every leaf issued before the next root existed has expired (or the signer has): it signs.
    Promote,
}

/// `signer` is (made, expires): 2/3 of the time in between is counted from when it was made,
/// not from its back-dated start.
fn step(now: SystemTime, signer: (SystemTime, SystemTime), next_since: Option<SystemTime>, leaf_ttl: Duration) -> Step {
    let (nb, na) = signer;
    match next_since {
        Some(since) if now >= since + leaf_ttl || now >= na => Step::Promote,
        Some(_) => Step::Keep,
        None => {
            let life = na.duration_since(nb).unwrap_or(Duration::ZERO);
            if now >= nb + life * 2 / 3 {
                Step::CreateNext
            } else {
                Step::Keep
            }
        }
    }
}

pub struct DevCa {
    trust_domain: String,
    ttl: Duration,
    root_lifetime: Duration,
    dir: Option<PathBuf>,
    clock: Clock,
    roots: RwLock<Roots>,
}

fn ca_err(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Ca(e.to_string())
}

fn io_err(p: &Path, e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Ca(format!("{}: {e}", p.display()))
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl Root {
    fn generate(trust_domain: &str, now: SystemTime, lifetime: Duration) -> Result<Root, IdentityError> {
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
        // Whole seconds: what the certificate can say, so the schedule reads the same back.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(unix_secs(now));
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + lifetime);
        let cert = params.self_signed(&key).map_err(ca_err)?;
        let (der, pem) = (cert.der().clone(), cert.pem());
        Ok(Root {
            cert,
            key,
            der,
            pem,
            not_before: now - BACKDATE,
            not_after: now + lifetime,
        })
    }

    /// A root from its PEM files; the key must be the certificate's.
    fn from_pem(cert_pem: &str, key_pem: &str, cert_path: &Path, key_path: &Path) -> Result<Root, IdentityError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| io_err(key_path, e))?;
        let der = first_cert(cert_pem).ok_or_else(|| io_err(cert_path, "no certificate"))?;
        let (nb, na, spki) = validity_and_key(&der).map_err(|e| io_err(cert_path, e))?;
        if spki != key.public_key_raw() {
            return Err(io_err(key_path, format!("is not the key of {}", cert_path.display())));
        }
        let params = CertificateParams::from_ca_cert_pem(cert_pem).map_err(|e| io_err(cert_path, e))?;
        let cert = params.self_signed(&key).map_err(ca_err)?;
        Ok(Root {
            cert,
            key,
            der,
            pem: cert_pem.to_string(),
            not_before: nb,
            not_after: na,
        })
    }

    /// When it was made (its validity starts [`BACKDATE`] earlier).
    fn since(&self) -> SystemTime {
        self.not_before + BACKDATE
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn first_cert(pem: &str) -> Option<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes()).next().and_then(Result::ok)
}

/// A certificate's validity and raw public key.
fn validity_and_key(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime, Vec<u8>), String> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
    let to_sys = |t: &ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    let v = x.validity();
    Ok((
        to_sys(&v.not_before),
        to_sys(&v.not_after),
        x.public_key().subject_public_key.data.to_vec(),
    ))
}

/// The files of a CA directory.
struct Files {
    root_cert: PathBuf,
    root_key: PathBuf,
    next_cert: PathBuf,
    next_key: PathBuf,
    retired: PathBuf,
    lock: PathBuf,
}

impl Files {
    fn of(dir: &Path) -> Files {
        Files {
            root_cert: dir.join("root-cert.pem"),
            root_key: dir.join("root-key.pem"),
            next_cert: dir.join("next-root-cert.pem"),
            next_key: dir.join("next-root-key.pem"),
            retired: dir.join("retired-roots.pem"),
            lock: dir.join(".lock"),
        }
    }

    /// The public files' contents: what changes when anyone rotates.
    fn public(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for p in [&self.root_cert, &self.next_cert, &self.retired] {
            v.extend(std::fs::read(p).unwrap_or_default());
            v.push(0);
        }
        v
    }

    fn read(&self) -> Result<Roots, IdentityError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| io_err(p, e));
        let files = self.public();
        let signer = Root::from_pem(
            &read(&self.root_cert)?,
            &read(&self.root_key)?,
            &self.root_cert,
            &self.root_key,
        )?;
        let next = if self.next_cert.exists() && self.next_key.exists() {
            Some(Root::from_pem(
                &read(&self.next_cert)?,
                &read(&self.next_key)?,
                &self.next_cert,
                &self.next_key,
            )?)
        } else {
            None
        };
        let mut retired = Vec::new();
        if self.retired.exists() {
            let text = read(&self.retired)?;
            for pem in pem_blocks(&text) {
                let der = first_cert(pem).ok_or_else(|| io_err(&self.retired, "not a certificate"))?;
                let (_, na, _) = validity_and_key(&der).map_err(|e| io_err(&self.retired, e))?;
                retired.push(Retired {
                    der,
                    pem: pem.to_string(),
                    not_after: na,
                });
            }
        }
        Ok(Roots {
            signer,
            next,
            retired,
            files,
        })
    }

    /// Writes `roots` (keys 0600 and first, so a reader never finds a certificate without its
    /// key); each file is replaced whole.
    fn write(&self, roots: &mut Roots) -> Result<(), IdentityError> {
        match &roots.next {
            Some(n) => {
                write_file(&self.next_key, n.key.serialize_pem().as_bytes(), 0o600)?;
                write_file(&self.next_cert, n.pem.as_bytes(), 0o644)?;
            }
            None => {
                for p in [&self.next_cert, &self.next_key] {
                    if p.exists() {
                        std::fs::remove_file(p).map_err(|e| io_err(p, e))?;
                    }
                }
            }
        }
        let retired: String = roots
            .retired
            .iter()
            .map(|r| format!("{}\n", r.pem.trim_end()))
            .collect();
        write_file(&self.retired, retired.as_bytes(), 0o644)?;
        write_file(&self.root_key, roots.signer.key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&self.root_cert, roots.signer.pem.as_bytes(), 0o644)?;
        roots.files = self.public();
        Ok(())
    }
}

/// The PEM blocks of a file of concatenated certificates, each with its END line.
fn pem_blocks(text: &str) -> Vec<&str> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut v = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(END) {
        let (block, tail) = rest.split_at(i + END.len());
        let block = block.trim_start();
        if !block.is_empty() {
            v.push(block);
        }
        rest = tail;
    }
    v
}

/// Replaces `path` by a file of mode `mode` holding `data` (written aside, then renamed: a
/// reader sees the old or the new file, never half of one).
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let tmp = path.with_extension("pem.tmp");
    write_private(&tmp, data).map_err(|e| io_err(&tmp, e))?;
    if mode != 0o600 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

impl DevCa {
    pub fn new(trust_domain: &str, ttl: Duration) -> Result<Self, IdentityError> {
        Self::in_memory(trust_domain, ttl, DEFAULT_ROOT_LIFETIME, Arc::new(SystemTime::now))
    }

    /// A CA whose roots live in memory only, valid `root_lifetime` each, reading time from
    /// `clock`.
    pub fn in_memory(
        trust_domain: &str,
        ttl: Duration,
        root_lifetime: Duration,
        clock: Clock,
    ) -> Result<Self, IdentityError> {
        let signer = Root::generate(trust_domain, clock(), root_lifetime)?;
        Ok(DevCa {
            trust_domain: trust_domain.into(),
            ttl,
            root_lifetime,
            dir: None,
            clock,
            roots: RwLock::new(Roots {
                signer,
                next: None,
                retired: Vec::new(),
                files: Vec::new(),
            }),
        })
    }

    /// Loads the CA from `dir` (`root-cert.pem`, `root-key.pem`), or creates it there. Nodes that
    /// share the directory share the root, so their workloads trust each other. The key is the
    /// mesh's root of trust: the directory is made 0700 and the key 0600 (also when an older
    /// version left them readable), so only root on the node can read it.
    pub fn load_or_create(dir: &Path, trust_domain: &str, ttl: Duration) -> Result<Self, IdentityError> {
        Self::load_or_create_with(dir, trust_domain, ttl, DEFAULT_ROOT_LIFETIME, Arc::new(SystemTime::now))
    }

    /// [`DevCa::load_or_create`] with new roots valid `root_lifetime`, reading time from `clock`.
    pub fn load_or_create_with(
        dir: &Path,
        trust_domain: &str,
        ttl: Duration,
        root_lifetime: Duration,
        clock: Clock,
    ) -> Result<Self, IdentityError> {
        let f = Files::of(dir);
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        private(dir, 0o700).map_err(|e| io_err(dir, e))?;
        let lock = lock(&f.lock)?;
        let roots = if f.root_cert.exists() && f.root_key.exists() {
            for p in [&f.root_key, &f.next_key] {
                if p.exists() {
                    private(p, 0o600).map_err(|e| io_err(p, e))?;
                }
            }
            f.read()?
        } else {
            let mut roots = Roots {
                signer: Root::generate(trust_domain, clock(), root_lifetime)?,
                next: None,
                retired: Vec::new(),
                files: Vec::new(),
            };
            f.write(&mut roots)?;
            roots
        };
        // `rotate` takes the lock again (a second open file: flock would wait for this one).
        drop(lock);
        let ca = DevCa {
            trust_domain: trust_domain.into(),
            ttl,
            root_lifetime,
            dir: Some(dir.to_path_buf()),
            clock,
            roots: RwLock::new(roots),
        };
        ca.rotate()?;
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root that signs now.
    pub fn root_der(&self) -> CertificateDer<'static> {
        self.read().signer.der.clone()
    }

    pub fn root_pem(&self) -> String {
        self.read().signer.pem.clone()
    }

    /// Every root a peer's certificate may chain to now: the signing one, the next one, and
    /// retired ones until they expire.
    pub fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        let r = self.read();
        bundle(&r, (self.clock)())
    }

    /// Writes the root certificate (PEM) so other nodes and tools can trust this CA.
    pub fn write_root(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.root_pem())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Roots> {
        self.roots.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the roots up to date: another agent's rotation in the shared directory is read,
    /// then the schedule applied (and written back, under the directory's lock).
    fn rotate(&self) -> Result<(), IdentityError> {
        let now = (self.clock)();
        let files = self.dir.as_deref().map(Files::of);
        let _lock = match &files {
            Some(f) => Some(lock(&f.lock)?),
            None => None,
        };
        let mut r = self.roots.write().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &files {
            if f.public() != r.files {
                *r = f.read()?;
            }
        }
        let before = (r.next.is_some(), r.retired.len(), r.signer.der.clone());
        r.retired.retain(|x| x.not_after > now);
        let since = r.next.as_ref().map(Root::since);
        match step(now, (r.signer.since(), r.signer.not_after), since, self.ttl) {
            Step::Keep => {}
            Step::CreateNext => {
                r.next = Some(Root::generate(&self.trust_domain, now, self.root_lifetime)?);
                tracing::info!("dev CA: next root published; it signs once every leaf in use trusts it");
            }
            Step::Promote => {
                if let Some(next) = r.next.take() {
                    let old = std::mem::replace(&mut r.signer, next);
                    r.retired.push(Retired {
                        der: old.der,
                        pem: old.pem,
                        not_after: old.not_after,
                    });
                    tracing::info!("dev CA: root rotated; the old root stays trusted until it expires");
                }
            }
        }
        let changed = before != (r.next.is_some(), r.retired.len(), r.signer.der.clone());
        if let (Some(f), true) = (&files, changed) {
            f.write(&mut r)?;
        }
        Ok(())
    }

    /// Issues a leaf valid for the configured TTL from now (back-dated a little for clock skew),
    /// never beyond its root, with the current trust bundle.
    pub fn issue(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        let (not_before, not_after) = self.leaf_validity(self.ttl);
        self.issue_valid(id, not_before, not_after)
    }

    /// The validity of a leaf signed now for `ttl`: back-dated a little for clock skew, and
    /// never beyond the signing root (a leaf that outlives its root fails verification once
    /// the root expires, whatever the leaf says). Rotates the root first when it is due.
    fn leaf_validity(&self, ttl: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
        if let Err(e) = self.rotate() {
            // The current root still signs; the rotation is tried again at the next issuance.
            tracing::warn!(error = %e, "dev CA: rotating the root failed");
        }
        let now = (self.clock)();
        let root_ends = self.read().signer.not_after;
        let not_after = now.checked_add(ttl).map_or(root_ends, |t| t.min(root_ends));
        (offset(now - Duration::from_secs(10)), offset(not_after))
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
        let r = self.read();
        let leaf = params.signed_by(&key, &r.signer.cert, &r.signer.key).map_err(ca_err)?;
        let roots = bundle(&r, (self.clock)());
        drop(r);
        WorkloadCert::new(id.clone(), vec![leaf.der().clone()], key.serialize_der(), roots)
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
        let (not_before, not_after) = self.leaf_validity(ttl);
        let p = &mut csr.params;
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(ca_err)?)];
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::NoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = not_before;
        p.not_after = not_after;
        let r = self.read();
        let leaf = csr.signed_by(&r.signer.cert, &r.signer.key).map_err(ca_err)?;
        Ok(leaf.pem())
    }

    /// A TLS server certificate and key (PEM) for `names` (DNS names or IP addresses), for
    /// services that workloads reach with this root as trust anchor (the in-test Istio CA).
    pub fn serving_cert(&self, names: &[&str]) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).map_err(ca_err)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        (params.not_before, params.not_after) = self.leaf_validity(Duration::from_secs(30 * 24 * 3600));
        let r = self.read();
        let cert = params.signed_by(&key, &r.signer.cert, &r.signer.key).map_err(ca_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The roots trusted at `now`: signer, next, unexpired retired ones.
fn bundle(r: &Roots, now: SystemTime) -> Vec<CertificateDer<'static>> {
    std::iter::once(r.signer.der.clone())
        .chain(r.next.as_ref().map(|n| n.der.clone()))
        .chain(r.retired.iter().filter(|x| x.not_after > now).map(|x| x.der.clone()))
        .collect()
}

/// Holds the CA directory's lock (agents sharing it rotate one at a time) until dropped.
fn lock(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, IdentityError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| io_err(path, e))
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

    /// A clock tests move by hand, in whole seconds from a fixed start.
    fn test_clock() -> (Clock, Arc<std::sync::atomic::AtomicU64>) {
        let secs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let start = SystemTime::now();
        let s = secs.clone();
        let clock: Clock = Arc::new(move || start + Duration::from_secs(s.load(std::sync::atomic::Ordering::SeqCst)));
        (clock, secs)
    }

    /// Whether `leaf` chains to one of `roots` at `at`.
    fn verifies(leaf: &WorkloadCert, roots: &[CertificateDer<'static>], at: SystemTime) -> bool {
        let anchors: Vec<_> = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
            .collect();
        let ee = webpki::EndEntityCert::try_from(&leaf.chain[0]).unwrap();
        let algs = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        let t = rustls::pki_types::UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        ee.verify_for_usage(algs, &anchors, &[], t, webpki::KeyUsage::client_auth(), None, None)
            .is_ok()
    }

    #[test]
    fn the_schedule_publishes_at_two_thirds_and_signs_after_one_leaf_ttl() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let ttl = Duration::from_secs(60);
        let root = (t(0), t(900));
        assert_eq!(step(t(599), root, None, ttl), Step::Keep);
        assert_eq!(step(t(600), root, None, ttl), Step::CreateNext);
        assert_eq!(step(t(659), root, Some(t(600)), ttl), Step::Keep);
        assert_eq!(step(t(660), root, Some(t(600)), ttl), Step::Promote);
        // A leaf TTL longer than the root's last third: promoted when the root expires.
        let long = Duration::from_secs(600);
        assert_eq!(step(t(899), root, Some(t(600)), long), Step::Keep);
        assert_eq!(step(t(900), root, Some(t(600)), long), Step::Promote);
    }

    #[test]
    fn a_short_lived_root_is_renewed_before_it_expires_without_a_gap() {
        let (clock, secs) = test_clock();
        let set = |s: u64| secs.store(s, std::sync::atomic::Ordering::SeqCst);
        let (ttl, life) = (Duration::from_secs(60), Duration::from_secs(900));
        let ca = DevCa::in_memory("td", ttl, life, clock.clone()).unwrap();
        let id = Identity::new("td", "ns", "sa");
        let first_root = ca.root_der();
        let a = ca.issue(&id).unwrap();
        assert_eq!(a.roots, vec![first_root.clone()]);
        // Made now, valid 900 s: 2/3 of it is over 600 s from now.
        set(599);
        assert_eq!(ca.trust_bundle().len(), 1);
        set(600);
        let b = ca.issue(&id).unwrap();
        assert_eq!(ca.root_der(), first_root, "the next root does not sign yet");
        assert_eq!(b.roots.len(), 2, "but every leaf from now on trusts it");
        let next_root = b.roots[1].clone();
        assert!(verifies(&b, std::slice::from_ref(&first_root), clock()));
        set(659);
        let late = ca.issue(&id).unwrap();
        assert_eq!(late.roots.len(), 2);
        assert_eq!(ca.root_der(), first_root);
        set(661);
        let c = ca.issue(&id).unwrap();
        assert_eq!(ca.root_der(), next_root, "one leaf TTL later it signs");
        assert!(
            verifies(&c, std::slice::from_ref(&next_root), clock())
                && !verifies(&c, std::slice::from_ref(&first_root), clock())
        );
        // Both sides of a handshake across the rotation accept each other: the last leaf of the
        // old root trusts the new one, the first of the new root still trusts the old one.
        assert!(verifies(&c, &late.roots, clock()));
        assert!(verifies(&late, &c.roots, clock()));
        // The leaf from before the next root existed (a) has expired by then.
        assert!(a.info.not_after_time < clock());
        // The old root is trusted until it expires, then dropped.
        set(899);
        assert_eq!(ca.trust_bundle().len(), 2);
        set(901);
        let d = ca.issue(&id).unwrap();
        assert_eq!(d.roots, vec![next_root.clone()]);
        assert_eq!(ca.trust_bundle(), vec![next_root]);
    }

    #[test]
    fn leaves_never_outlive_the_root_that_signs_them() {
        let (clock, secs) = test_clock();
        // Leaves of 600 s against a root's last third of 400 s: rotation waits for the root's end.
        let ca = DevCa::in_memory("td", Duration::from_secs(600), Duration::from_secs(900), clock.clone()).unwrap();
        let id = Identity::new("td", "ns", "sa");
        secs.store(700, std::sync::atomic::Ordering::SeqCst);
        let leaf = ca.issue(&id).unwrap();
        let root_end = clock() + Duration::from_secs(200);
        assert!(leaf.info.not_after_time <= root_end, "{:?}", leaf.info.not_after);
        assert!(verifies(&leaf, &[ca.root_der()], clock()));
        // The Istio-CA path (a CSR signed for 600 s) and a serving certificate (30 days) alike.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let signed = ca.sign_csr(&csr, None, Duration::from_secs(600)).unwrap();
        let (serving, _) = ca.serving_cert(&["istiod.test"]).unwrap();
        for pem in [signed, serving] {
            let (_, not_after, _) = validity_and_key(&first_cert(&pem).unwrap()).unwrap();
            assert!(
                not_after <= root_end,
                "{not_after:?} is after the root's end {root_end:?}"
            );
            assert!(
                not_after >= root_end - Duration::from_secs(1),
                "capped, not shortened further"
            );
        }
    }

    #[test]
    fn agents_sharing_a_directory_pick_up_each_others_rotation() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("nodeway-ca-rotate-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (clock, secs) = test_clock();
        let set = |s: u64| secs.store(s, std::sync::atomic::Ordering::SeqCst);
        let (ttl, life) = (Duration::from_secs(60), Duration::from_secs(900));
        let a = DevCa::load_or_create_with(&dir, "td", ttl, life, clock.clone()).unwrap();
        let b = DevCa::load_or_create_with(&dir, "td", ttl, life, clock.clone()).unwrap();
        let id = Identity::new("td", "ns", "sa");
        let first_root = a.root_der();
        set(600);
        let from_a = a.issue(&id).unwrap();
        assert_eq!(from_a.roots.len(), 2);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("next-root-key.pem")), 0o600);
        // b reads a's next root at its next issuance: its leaves trust it too.
        let from_b = b.issue(&id).unwrap();
        assert_eq!(from_b.roots, from_a.roots);
        set(661);
        let promoted = b.issue(&id).unwrap();
        let next_root = from_a.roots[1].clone();
        assert!(verifies(&promoted, std::slice::from_ref(&next_root), clock()));
        assert_eq!(a.issue(&id).unwrap().roots, promoted.roots, "a follows b's promotion");
        assert_eq!(a.root_der(), next_root);
        // What a restarted agent loads: the new root signing, the old one still trusted.
        let c = DevCa::load_or_create_with(&dir, "td", ttl, life, clock.clone()).unwrap();
        assert_eq!(c.root_der(), next_root);
        assert_eq!(c.trust_bundle(), vec![next_root.clone(), first_root]);
        assert_eq!(
            std::fs::read_to_string(dir.join("root-cert.pem")).unwrap(),
            c.root_pem(),
            "root-cert.pem is the signing root"
        );
        assert!(!dir.join("next-root-cert.pem").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_that_is_not_the_roots_is_refused() {
        let dir = std::env::temp_dir().join(format!("nodeway-ca-mismatch-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        DevCa::load_or_create(&dir, "td", Duration::from_secs(60)).unwrap();
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(dir.join("root-key.pem"), other.serialize_pem()).unwrap();
        let err = DevCa::load_or_create(&dir, "td", Duration::from_secs(60))
            .err()
            .unwrap();
        assert!(err.to_string().contains("is not the key of"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
