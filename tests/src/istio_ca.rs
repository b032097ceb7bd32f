//! An in-test Istio CA: `istio.v1.auth.IstioCertificateService` over TLS on 127.0.0.1, signing
//! with nodeway's dev CA, and recording what each request carried so tests can assert on it.
//! Runs on its own runtime thread, so blocking end-to-end tests can use it too.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use nodeway_proxy::identity::{
    dev_ca::DevCa,
    istio_ca::pb::{
        istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer},
        IstioCertificateRequest, IstioCertificateResponse,
    },
    Identity,
};
use tonic::{Request, Response, Status};

/// The name the CA's serving certificate carries, as istiod's does.
pub const CA_SERVER_NAME: &str = "istiod.istio-system.svc";

/// What one CreateCertificate call carried.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub impersonated_identity: Option<String>,
    pub validity_duration: i64,
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
}

#[derive(Default)]
struct Behaviour {
    seen: Vec<SeenRequest>,
    /// Refuse this many upcoming requests with UNAVAILABLE.
    fail_next: usize,
    /// Answer with a certificate for this identity instead of the requested one.
    substitute: Option<Identity>,
    /// The token a request must bear (istiod checks it; so do we).
    token: Option<String>,
}

#[derive(Clone)]
struct Service {
    ca: Arc<DevCa>,
    behaviour: Arc<Mutex<Behaviour>>,
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let header = |k: &str| req.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (authorization, cluster_id) = (header("authorization"), header("clusterid"));
        let msg = req.get_ref();
        let impersonated =
            msg.metadata
                .as_ref()
                .and_then(|m| match m.fields.get("ImpersonatedIdentity")?.kind.as_ref()? {
                    prost_types::value::Kind::StringValue(s) => Some(s.clone()),
                    _ => None,
                });
        let mut b = self.behaviour.lock().unwrap_or_else(|p| p.into_inner());
        b.seen.push(SeenRequest {
            impersonated_identity: impersonated.clone(),
            validity_duration: msg.validity_duration,
            authorization: authorization.clone(),
            cluster_id,
        });
        if b.fail_next > 0 {
            b.fail_next -= 1;
            return Err(Status::unavailable("test CA: failing on purpose"));
        }
        if let Some(t) = &b.token {
            if authorization.as_deref() != Some(&format!("Bearer {t}")) {
                return Err(Status::unauthenticated("test CA: missing or wrong bearer token"));
            }
        }
        let ttl = Duration::from_secs(msg.validity_duration.max(1) as u64);
        let wanted = match &b.substitute {
            Some(id) => Some(id.to_string()),
            None => impersonated,
        };
        let chain = self
            .ca
            .sign_csr(&msg.csr, wanted.as_deref(), ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![chain, self.ca.root_pem()],
        }))
    }
}

pub struct FakeIstioCa {
    pub addr: SocketAddr,
    /// The mesh root (PEM), what `--ca-root-cert` points at.
    pub root_cert: PathBuf,
    behaviour: Arc<Mutex<Behaviour>>,
    /// Serves until dropped.
    _server: crate::grpc::TlsGrpcServer,
}

impl FakeIstioCa {
    /// Starts on 127.0.0.1 (an ephemeral port) with a fresh root written into `dir`.
    pub fn start(dir: &Path, trust_domain: &str) -> Result<Self> {
        let ca = Arc::new(DevCa::new(trust_domain, Duration::from_secs(3600))?);
        let root_cert = dir.join("istio-root-cert.pem");
        ca.write_root(&root_cert).context("writing the test CA's root")?;
        let (cert_pem, key_pem) = ca.serving_cert(&[CA_SERVER_NAME, "127.0.0.1"])?;
        let behaviour = Arc::new(Mutex::new(Behaviour::default()));
        let service = Service {
            ca,
            behaviour: behaviour.clone(),
        };
        let server = crate::grpc::TlsGrpcServer::start("test CA", cert_pem, key_pem, move |server| {
            server.add_service(IstioCertificateServiceServer::new(service))
        })?;
        let addr = server.addr;
        Ok(FakeIstioCa {
            addr,
            root_cert,
            behaviour,
            _server: server,
        })
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.with(|b| b.seen.clone())
    }

    pub fn fail_next(&self, n: usize) {
        self.with(|b| b.fail_next = n)
    }

    pub fn substitute_identity(&self, id: Option<Identity>) {
        self.with(|b| b.substitute = id)
    }

    pub fn require_token(&self, token: &str) {
        self.with(|b| b.token = Some(token.to_owned()))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Behaviour) -> R) -> R {
        f(&mut self.behaviour.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
