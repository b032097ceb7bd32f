//! TLS for HBONE: TLS 1.3, ALPN `h2`, both sides present SPIFFE certificates.
//!
//! The client checks the chain *and* that the server is the identity the destination workload is
//! expected to have (SPIFFE certificates carry no DNS names, so the stock name check can't apply).
//! The server checks the chain and the trust domain, and records the client's identity.
use std::sync::{Arc, Mutex};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ResolvesServerCert, WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::identity::{identity_of, manager::CertManager, Identity, WorkloadCert};

pub const ALPN_H2: &[u8] = b"h2";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn roots(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, rustls::Error> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    Ok(Arc::new(store))
}

fn certified_key(cert: &WorkloadCert, p: &CryptoProvider) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let key = p.key_provider.load_private_key(cert.key())?;
    Ok(Arc::new(CertifiedKey::new(cert.chain.clone(), key)))
}

/// Client side: present `own`'s certificate; accept only a server with identity `expected`.
pub fn client_config(own: &WorkloadCert, expected: Identity) -> Result<Arc<ClientConfig>, rustls::Error> {
    let p = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: roots(&own.roots)?,
        expected,
        provider: p.clone(),
    });
    let mut c = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(own.chain.clone(), own.key())?;
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(c))
}

/// Server side for one pod: its current certificate (renewals are picked up per handshake),
/// clients must present a certificate chaining to the roots.
fn server_config(
    certs: Arc<CertManager>,
    identity: Identity,
    trust_roots: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let p = provider();
    let verifier = Arc::new(PodClientVerifier {
        certs: certs.clone(),
        identity: identity.clone(),
        startup: webpki_client_verifier(roots(trust_roots)?, &p)?,
        provider: p.clone(),
        current: Mutex::new(None),
    });
    let mut c = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(PodCertResolver {
            certs,
            identity,
            provider: p,
        }));
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(c))
}

/// One pod's HBONE TLS server side. A handshake waits for the pod's certificate while it is
/// still being issued (the pod was captured a moment ago, or the agent just started), as
/// ztunnel's inbound fetches the certificate before it answers: a peer that connects right
/// after capture is served, not refused for want of a certificate. The wait is bounded by the
/// caller's handshake timeout; without a certificate the connection is refused (fail closed).
#[derive(Clone)]
pub struct PodAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    certs: Arc<CertManager>,
    identity: Identity,
}

impl PodAcceptor {
    pub fn new(
        certs: Arc<CertManager>,
        identity: Identity,
        trust_roots: &[CertificateDer<'static>],
    ) -> Result<Self, rustls::Error> {
        let config = server_config(certs.clone(), identity.clone(), trust_roots)?;
        Ok(PodAcceptor {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            certs,
            identity,
        })
    }

    /// Whether the pod has a certificate to present.
    pub fn has_certificate(&self) -> bool {
        self.certs.cached(&self.identity).is_some()
    }

    /// The handshake, once the pod has a certificate.
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.certs.issued(&self.identity).await;
        self.acceptor.accept(io).await
    }
}

fn webpki_client_verifier(
    roots: Arc<RootCertStore>,
    p: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
    WebPkiClientVerifier::builder_with_provider(roots, p.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

/// Checks a client's chain against the roots of the pod's current certificate (those its CA
/// sent with it, and the mesh root file as read then), so a root rotation takes effect with the
/// next certificate, without a restart; before the first certificate, against the roots known
/// at start. The verifier of one certificate is kept until the certificate changes.
struct PodClientVerifier {
    certs: Arc<CertManager>,
    identity: Identity,
    startup: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
    current: Mutex<Option<CertVerifier>>,
}

/// A certificate, and the verifier built from its roots.
type CertVerifier = (Arc<WorkloadCert>, Arc<dyn ClientCertVerifier>);

impl std::fmt::Debug for PodClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodClientVerifier")
            .field("identity", &self.identity)
            .finish()
    }
}

impl PodClientVerifier {
    fn verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let Some(cert) = self.certs.cached(&self.identity) else {
            return Ok(self.startup.clone());
        };
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, v)) = &*current {
            if Arc::ptr_eq(c, &cert) {
                return Ok(v.clone());
            }
        }
        let v = webpki_client_verifier(roots(&cert.roots)?, &self.provider)?;
        *current = Some((cert, v.clone()));
        Ok(v)
    }
}

impl ClientCertVerifier for PodClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // Hints are optional; peers present their one workload certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()?.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct PodCertResolver {
    certs: Arc<CertManager>,
    identity: Identity,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertManager")
    }
}

impl ResolvesServerCert for PodCertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let c = self.certs.cached(&self.identity)?;
        certified_key(&c, &self.provider).ok()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| rustls::Error::General(format!("{e}")))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate: {e:?}")))?;
        let got = identity_of(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if got != self.expected {
            return Err(rustls::Error::General(format!(
                "server identity {got} is not the destination's expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("HBONE requires TLS 1.3".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The SPIFFE identity of the peer of a finished handshake.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, String> {
    let leaf = certs.and_then(|c| c.first()).ok_or("no client certificate")?;
    identity_of(leaf).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::dev_ca::DevCa;
    use rustls::{ClientConnection, ServerConnection};
    use std::time::Duration;

    /// A TLS handshake in memory; the first error either side reports.
    fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("pod").map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut c = ClientConnection::new(client, name)?;
        let mut s = ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            if !buf.is_empty() {
                s.read_tls(&mut &buf[..])
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            if !buf.is_empty() {
                c.read_tls(&mut &buf[..])
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("handshake made no progress".into()))
    }

    #[tokio::test]
    async fn the_server_trusts_the_roots_of_its_current_certificate() {
        let day = Duration::from_secs(86400);
        let (old, new) = (
            DevCa::new("cluster.local", day).unwrap(),
            DevCa::new("cluster.local", day).unwrap(),
        );
        let server_id = Identity::new("cluster.local", "demo", "server");
        let client_id = Identity::new("cluster.local", "demo", "client");
        // The pod's certificate comes from the new root; the agent started knowing only the old.
        let certs = CertManager::new(Arc::new(new));
        certs.get(&server_id).await.unwrap();
        let server = server_config(certs.clone(), server_id.clone(), &[old.root_der()]).unwrap();

        let new_client = certs.get(&client_id).await.unwrap();
        handshake(client_config(&new_client, server_id.clone()).unwrap(), server.clone())
            .expect("a client of the rotated root is accepted without a restart");

        let mut old_client = old.issue(&client_id).unwrap();
        // The old client trusts the new root for the server, so only the server decides here.
        old_client.roots = new_client.roots.clone();
        let err = handshake(client_config(&old_client, server_id).unwrap(), server).unwrap_err();
        // Both test roots carry the same name: the old chain fails on the signature.
        assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err:?}");
    }
}
