//! TLS for HBONE: TLS 1.3, ALPN `h2`, both sides present SPIFFE certificates.
//!
//! The client checks the chain *and* that the server is the identity the destination workload is
//! expected to have (SPIFFE certificates carry no DNS names, so the stock name check can't apply).
//! The server checks the chain and the trust domain, and records the client's identity.
use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{ResolvesServerCert, WebPkiClientVerifier},
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
pub fn server_config(
    certs: Arc<CertManager>,
    identity: Identity,
    trust_roots: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let p = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(trust_roots)?, p.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
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
