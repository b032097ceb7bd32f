//! Test fixtures for the router's parts, without a network namespace: backends behind an
//! in-memory [`Connect`] (a hyper server, or a scripted HTTP/2 peer, on the far end of a
//! `tokio::io::duplex`), a fake source pod, and a client on the router's own server builder.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU16, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

use super::{
    body::{empty, full},
    observe::Reporter,
    router::{Downstream, Outbound},
};
use crate::{
    cluster::{Cluster, Discovery, LbPolicy, Limits, UpstreamProtocol},
    l7::L7Config,
    metrics::{Metrics, TcpLabels},
    upstream::{Body, BoxIo, ClusterState, Connect, Connecting, Upstreams},
};

/// A response with `status` and headers.
pub fn response(status: u16, headers: &[(&str, &str)]) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().insert(
            header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

/// A standalone cluster's runtime state, with `max_retries`.
pub fn cluster_state(name: &str, max_retries: u32) -> Arc<ClusterState> {
    let c = Cluster {
        name: name.into(),
        discovery: Discovery::Static,
        lb_policy: LbPolicy::RoundRobin,
        connect_timeout: Duration::from_secs(1),
        limits: Limits {
            max_retries,
            ..Limits::default()
        },
        outlier_detection: None,
        load_assignment: None,
        upstream_protocol: UpstreamProtocol::Http1,
        istio_config: None,
    };
    Upstreams::new().cluster(&Arc::new(c), &[])
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Answers 200 with `x-backend` and its name (or `?status=`, `?delay_ms=`); a request with
    /// `Upgrade` gets a 101 and an echo.
    Http,
    /// An HTTP/2 peer that resets every stream with `REFUSED_STREAM`.
    RefuseH2,
}

struct Backend {
    name: String,
    kind: Kind,
    /// Overrides every answer's status when non-zero.
    status: AtomicU16,
    received: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
    /// When set, each answer waits for a permit (after the request is recorded).
    gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
}

/// Backends on made-up addresses (198.18.1.x:8080), reached through the in-memory connector.
#[derive(Clone, Default)]
pub struct Backends {
    by_addr: Arc<Mutex<HashMap<SocketAddr, Arc<Backend>>>>,
}

impl Backends {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&self, name: &str, kind: Kind) -> SocketAddr {
        let mut m = self.by_addr.lock().unwrap();
        let addr = SocketAddr::from(([198, 18, 1, m.len() as u8 + 1], 8080));
        let b = Backend {
            name: name.into(),
            kind,
            status: AtomicU16::new(0),
            received: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            gate: Mutex::new(None),
        };
        m.insert(addr, Arc::new(b));
        addr
    }

    pub fn http(&self, name: &str) -> SocketAddr {
        self.add(name, Kind::Http)
    }

    pub fn refuse_h2(&self, name: &str) -> SocketAddr {
        self.add(name, Kind::RefuseH2)
    }

    fn get(&self, name: &str) -> Arc<Backend> {
        let m = self.by_addr.lock().unwrap();
        m.values().find(|b| b.name == name).cloned().unwrap()
    }

    pub fn name_of(&self, addr: SocketAddr) -> Option<String> {
        self.by_addr.lock().unwrap().get(&addr).map(|b| b.name.clone())
    }

    pub fn received(&self, name: &str) -> Vec<Seen> {
        self.get(name).received.lock().unwrap().clone()
    }

    pub fn connections(&self, name: &str) -> usize {
        self.get(name).connections.load(Ordering::SeqCst)
    }

    /// Holds every answer of `name` until the returned semaphore gives it a permit.
    pub fn hold(&self, name: &str) -> Arc<tokio::sync::Semaphore> {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        *self.get(name).gate.lock().unwrap() = Some(gate.clone());
        gate
    }

    pub fn set_status(&self, name: &str, status: Option<u16>) {
        self.get(name).status.store(status.unwrap_or(0), Ordering::SeqCst);
    }
}

impl Connect for Backends {
    fn source(&self) -> &str {
        "demo/client"
    }

    fn connect(&self, endpoint: SocketAddr) -> Connecting<'_> {
        let backend = self.by_addr.lock().unwrap().get(&endpoint).cloned();
        Box::pin(async move {
            let Some(b) = backend else {
                return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
            };
            b.connections.fetch_add(1, Ordering::SeqCst);
            let (near, far) = tokio::io::duplex(1 << 16);
            match b.kind {
                Kind::Http => tokio::spawn(serve_backend(far, b)),
                Kind::RefuseH2 => tokio::spawn(refuse_streams(far)),
            };
            Ok(Box::new(near) as BoxIo)
        })
    }
}

async fn serve_backend(io: tokio::io::DuplexStream, b: Arc<Backend>) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let b = b.clone();
        async move { Ok::<_, Infallible>(answer(&b, req).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
}

async fn answer(b: &Backend, mut req: Request<Incoming>) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_string();
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(ms) = param("delay_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let authority = crate::http::authority_of(&req);
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    b.received.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        authority,
        version: parts.version,
        headers: parts.headers,
        body,
    });
    let gate = b.gate.lock().unwrap().clone();
    if let Some(g) = gate {
        let _permit = g.acquire().await;
    }
    if let Some(on) = upgrade {
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return response(101, &[("upgrade", "websocket"), ("connection", "upgrade")]);
    }
    let forced = b.status.load(Ordering::SeqCst);
    let status = if forced != 0 {
        forced
    } else {
        param("status").map_or(200, |s| s as u16)
    };
    let mut r = Response::new(full(Bytes::from(b.name.clone())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert("x-backend", b.name.parse().unwrap());
    if param("close") == Some(1) {
        r.headers_mut().insert(header::CONNECTION, "close".parse().unwrap());
    }
    r
}

async fn refuse_streams(io: tokio::io::DuplexStream) {
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((_req, mut respond))) = conn.accept().await {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
    }
}

/// A source pod for the router: a fixed L7 snapshot, its own upstream state, the backends.
pub struct Source {
    pub l7: Arc<L7Config>,
    pub upstreams: Upstreams,
    pub backends: Backends,
}

impl Outbound for Source {
    fn l7(&self) -> Arc<L7Config> {
        self.l7.clone()
    }

    fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    fn connector(&self) -> &dyn Connect {
        &self.backends
    }

    fn label_destination(&self, endpoint: SocketAddr, labels: &mut TcpLabels) {
        if let Some(name) = self.backends.name_of(endpoint) {
            labels.destination_workload = name;
        }
    }
}

/// The L7 config of `routes` (a route table "8080" with one virtual host for every domain)
/// and clusters `outbound|8080|<subset>|web` with the backends at `endpoints[subset]`, plus any
/// extra cluster JSON fields.
pub fn l7(routes: Value, clusters: &[(&str, &[SocketAddr], Value)]) -> L7Config {
    let table = json!({"name": "8080", "virtualHosts": [{"name": "web", "domains": ["*"], "routes": routes,
        "includeRequestAttemptCount": true}]});
    let mut cs = Vec::new();
    let mut eps = Vec::new();
    for (subset, addrs, extra) in clusters {
        let name = format!("outbound|8080|{subset}|web");
        let mut c =
            json!({"name": name, "type": "EDS", "edsClusterConfig": {"serviceName": name}, "connectTimeout": "1s"});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        cs.push(c);
        let lb: Vec<Value> = addrs
            .iter()
            .map(|a| json!({"endpoint": {"address": {"socketAddress": {"address": a.ip().to_string(), "portValue": a.port()}}}}))
            .collect();
        eps.push(json!({"clusterName": name, "endpoints": [{"lbEndpoints": lb}]}));
    }
    L7Config::from_json(&[table], &cs, &eps).expect("valid L7 config")
}

/// A downstream connection served by the router, and the client's side of it.
pub struct Client {
    pub source: Arc<Source>,
    pub metrics: Arc<Metrics>,
    sender: hyper::client::conn::http1::SendRequest<Body>,
    log: LogLines,
}

/// What the access log wrote, as the writer thread got it.
#[derive(Clone, Default)]
struct LogLines(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Client {
    pub async fn new(l7: L7Config, backends: Backends) -> Client {
        Self::with_buffer(l7, backends, crate::http::body::BufferLimits::default()).await
    }

    /// A client whose router buffers request bodies under `buffer`.
    pub async fn with_buffer(l7: L7Config, backends: Backends, buffer: crate::http::body::BufferLimits) -> Client {
        // As a config push does: the clusters' runtime state follows the model.
        let upstreams = Upstreams::new();
        upstreams.sync(&l7);
        let source = Arc::new(Source {
            l7: Arc::new(l7),
            upstreams,
            backends,
        });
        let metrics = Arc::new(Metrics::new());
        let log = LogLines::default();
        let sink = crate::http::access_log::AccessLogSink::with_writer(1024, Default::default(), log.clone()).unwrap();
        let conn = Downstream {
            source: source.clone(),
            dst: SocketAddr::from(([198, 19, 0, 10], 8080)),
            route_config: "8080".to_string(),
            peer: SocketAddr::from(([198, 18, 0, 1], 40000)),
            labels: TcpLabels::new("source"),
            reporter: Reporter {
                metrics: metrics.clone(),
                access_log: Some(sink),
            },
            buffer,
            server: crate::http::server::ServerLimits::default(),
            drain: crate::connections::Drain::never(),
        };
        let (near, far) = tokio::io::duplex(1 << 16);
        tokio::spawn(super::router::serve(far, Arc::new(conn)));
        let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(near)).await.unwrap();
        tokio::spawn(driver.with_upgrades());
        Client {
            source,
            metrics,
            sender,
            log,
        }
    }

    /// The access log's lines so far, parsed.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let bytes = self.log.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Sends a GET for `path` with `headers`; the response with its body read.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> (Response<()>, String) {
        let mut req = Request::get(path).header(header::HOST, "web:8080");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(empty()).unwrap()).await
    }

    pub async fn send(&mut self, req: Request<Body>) -> (Response<()>, String) {
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        (
            Response::from_parts(parts, ()),
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    pub async fn send_raw(&mut self, req: Request<Body>) -> Response<Incoming> {
        self.sender.ready().await.unwrap();
        self.sender.send_request(req).await.unwrap()
    }

    /// `istio_requests_total` summed over the series with all of `labels`.
    pub fn requests(&self, labels: &[(&str, &str)]) -> f64 {
        requests(&self.metrics, labels)
    }
}

/// `istio_requests_total` summed over the series with all of `labels`.
pub fn requests(metrics: &Metrics, labels: &[(&str, &str)]) -> f64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
