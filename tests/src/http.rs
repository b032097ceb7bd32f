//! HTTP in pods, for the L7 tests: a backend that says who answered and what it saw, and clients
//! whose sockets are made inside a pod (so a captured pod's requests go through nodeway).
//!
//! The backend ([`HttpBackend`], [`Pod::http_backend`]) serves HTTP/1.1 and h2c (prior knowledge)
//! on one port, and a real gRPC health service (`grpc.health.v1.Health`) to requests with
//! `content-type: application/grpc`. Every answer carries `x-backend: <name>`; plain HTTP answers
//! are JSON: `{"backend", "method", "path", "authority", "protocol", "headers", "status",
//! "body_len"}`. Per request, the query controls it: `status=NNN` (200..=599), `delay_ms=N`
//! (at most [`MAX_DELAY`]), `body_delay_ms=N` (the head at once, the body N ms later, at most
//! [`MAX_DELAY`]), `body_bytes=N` (N bytes of `x` instead of JSON, at most
//! [`MAX_BODY_BYTES`]). Per backend: [`HttpBackend::set_status`].
//!
//! The clients are blocking (for blocking tests; not for use inside an async runtime) and every
//! request is bounded in time ([`DEFAULT_TIMEOUT`] unless the request says otherwise), so a hung
//! proxy fails a test instead of hanging it.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context as TaskContext, Poll},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST},
    service::service_fn,
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tonic::codegen::Service;
use tonic_health::{
    pb::{health_check_response::ServingStatus as GrpcServingStatus, health_client::HealthClient, HealthCheckRequest},
    server::HealthReporter,
    ServingStatus,
};

use crate::Pod;

/// Longest `delay_ms` the backend honours.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// Largest `body_bytes` the backend honours, and the largest request body it reads.
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// Bound of one client request (connecting included) unless [`HttpRequest::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of a whole [`concurrent`] run.
pub const CONCURRENT_CAP: Duration = Duration::from_secs(20);
/// Most requests one [`concurrent`] run sends.
pub const CONCURRENT_MAX: usize = 10_000;
/// Largest response body a client reads.
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// The backend keeps at most this many entries of [`HttpBackend::received`] (the first ones).
const LOG_LIMIT: usize = 50_000;

// ---------------------------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------------------------

/// One request as the backend received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.x).
    pub authority: String,
    /// `HTTP/1.1`, `HTTP/1.0` or `HTTP/2`.
    pub protocol: String,
    pub headers: HeaderMap,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Shared {
    name: String,
    /// Status forced by [`HttpBackend::set_status`]; 0: none.
    status: AtomicU32,
    requests: AtomicU64,
    connections: AtomicU64,
    log: Mutex<Vec<Received>>,
}

/// An HTTP/1.1 + h2c + gRPC-health server on 0.0.0.0:`port` in a pod, until dropped.
pub struct HttpBackend {
    pub name: String,
    /// The pod's address and the port.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    reporter: HealthReporter,
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Pod {
    /// An [`HttpBackend`] named `name` on 0.0.0.0:`port` in this pod.
    pub fn http_backend(&self, port: u16, name: &str) -> Result<HttpBackend> {
        HttpBackend::start(self, port, name)
    }

    /// Sends `req` to `target` over a new connection made inside this pod.
    pub fn http_request(&self, target: SocketAddr, req: HttpRequest) -> Result<HttpResponse> {
        block_in_pod(self, move || async move { one_shot(target, req).await })?
    }

    /// `GET path` over HTTP/1.1 to `target` from inside this pod.
    pub fn http_get(&self, target: SocketAddr, path: &str) -> Result<HttpResponse> {
        self.http_request(target, HttpRequest::get(path))
    }
}

impl HttpBackend {
    /// Binds 0.0.0.0:`port` inside the pod's network namespace, then serves on a runtime of its own.
    pub fn start(pod: &Pod, port: u16, name: &str) -> Result<Self> {
        let listener = pod
            .run(move || std::net::TcpListener::bind(("0.0.0.0", port)))?
            .with_context(|| format!("binding 0.0.0.0:{port} in {}", pod.netns))?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            status: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        });
        let (reporter, health) = tonic_health::server::health_reporter();
        // The listener's socket is the pod's; the runtime's threads need not be in the pod.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("http-backend-{name}"))
            .enable_all()
            .build()
            .context("backend runtime")?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("http-backend-{name}"))
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return eprintln!("http backend {}: {e}", s.name),
                    };
                    let accept = async {
                        loop {
                            let stream = match listener.accept().await {
                                Ok((stream, _)) => stream,
                                Err(_) => {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    continue;
                                }
                            };
                            s.connections.fetch_add(1, Ordering::Relaxed);
                            let _ = stream.set_nodelay(true);
                            let (s, health) = (s.clone(), health.clone());
                            tokio::spawn(async move {
                                let svc = service_fn(move |req| serve_request(s.clone(), health.clone(), req));
                                let _ = auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
                // Not graceful: clients may still hold connections (or wait on a delay); ending
                // the runtime drops every connection task.
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(HttpBackend {
            name: name.to_string(),
            addr: pod.addr(port),
            shared,
            reporter,
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `Some(code)`: every request (gRPC too) is answered with `code` (and the usual JSON) until
    /// `set_status(None)`; it wins over the query's `status=`.
    pub fn set_status(&self, status: Option<u16>) {
        self.shared.status.store(status.map_or(0, u32::from), Ordering::SeqCst);
    }

    /// What the gRPC health service answers for the server as a whole (service `""`); initially
    /// serving. Blocking: not for use inside an async runtime.
    pub fn set_grpc_status(&self, status: ServingStatus) {
        self.handle.block_on(self.reporter.set_service_status("", status));
    }

    /// Requests received (gRPC included).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The requests received, in order of arrival (the first 50 000).
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.log).clone()
    }

    /// Forgets the requests and connections counted and logged so far.
    pub fn clear(&self) {
        lock(&self.shared.log).clear();
        self.shared.requests.store(0, Ordering::SeqCst);
        self.shared.connections.store(0, Ordering::SeqCst);
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type ServerResponse = Response<tonic::body::Body>;

async fn serve_request<H>(
    shared: Arc<Shared>,
    mut health: H,
    req: Request<Incoming>,
) -> Result<ServerResponse, Infallible>
where
    H: Service<Request<Incoming>, Response = ServerResponse, Error = Infallible>,
{
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let protocol = match req.version() {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let uri_authority = req.uri().authority().map(|a| a.to_string());
    let host = req.headers().get(HOST).and_then(|v| v.to_str().ok()).map(String::from);
    let authority = if req.version() == Version::HTTP_2 {
        uri_authority.or(host)
    } else {
        host.or(uri_authority)
    }
    .unwrap_or_default();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    {
        let mut log = lock(&shared.log);
        if log.len() < LOG_LIMIT {
            log.push(Received {
                method: req.method().to_string(),
                path: path.clone(),
                authority: authority.clone(),
                protocol: protocol.to_string(),
                headers: req.headers().clone(),
            });
        }
    }
    let forced = shared.status.load(Ordering::SeqCst);
    let grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc && forced == 0 {
        let mut resp = match health.call(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        if let Ok(v) = HeaderValue::from_str(&shared.name) {
            resp.headers_mut().insert("x-backend", v);
        }
        return Ok(resp);
    }

    let mut status = StatusCode::OK;
    let mut delay = Duration::ZERO;
    let mut body_bytes = None;
    let mut body_delay = Duration::ZERO;
    for (k, v) in path
        .split_once('?')
        .map_or("", |(_, q)| q)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        match k {
            "status" => {
                if let Some(s) = v.parse().ok().filter(|s| (200..=599).contains(s)) {
                    status = StatusCode::from_u16(s).unwrap_or(status);
                }
            }
            "delay_ms" => {
                if let Ok(ms) = v.parse() {
                    delay = Duration::from_millis(ms).min(MAX_DELAY);
                }
            }
            "body_delay_ms" => {
                if let Ok(ms) = v.parse() {
                    body_delay = Duration::from_millis(ms).min(MAX_DELAY);
                }
            }
            "body_bytes" => body_bytes = v.parse::<usize>().ok().map(|n| n.min(MAX_BODY_BYTES)),
            _ => {}
        }
    }
    if forced != 0 {
        status = StatusCode::from_u16(forced as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let (parts, body) = req.into_parts();
    let body_len = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (content_type, body) = match body_bytes {
        Some(n) => ("application/octet-stream", vec![b'x'; n]),
        None => {
            let mut headers: BTreeMap<String, String> = BTreeMap::new();
            for (name, value) in &parts.headers {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                headers
                    .entry(name.as_str().to_string())
                    .and_modify(|v| {
                        v.push_str(", ");
                        v.push_str(&value);
                    })
                    .or_insert(value);
            }
            let json = serde_json::json!({
                "backend": shared.name,
                "method": parts.method.as_str(),
                "path": path,
                "authority": authority,
                "protocol": protocol,
                "headers": headers,
                "status": status.as_u16(),
                "body_len": body_len,
            });
            ("application/json", json.to_string().into_bytes())
        }
    };
    let body = Bytes::from(body);
    let mut resp = if body_delay.is_zero() {
        Response::new(tonic::body::Body::new(Full::new(body)))
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            tokio::time::sleep(body_delay).await;
            let _ = tx.send(Ok::<_, Infallible>(hyper::body::Frame::data(body))).await;
        });
        let later = tokio_stream::wrappers::ReceiverStream::new(rx);
        Response::new(tonic::body::Body::new(http_body_util::StreamBody::new(later)))
    };
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&shared.name) {
        resp.headers_mut().insert("x-backend", v);
    }
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A request to send; build with [`HttpRequest::get`] or [`HttpRequest::new`] and the methods.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub method: Method,
    /// Path and query, starting with `/`.
    pub path: String,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2); `None`: the target address.
    pub authority: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// `HTTP_11`, or `HTTP_2` (h2c with prior knowledge). [`HttpConnection::send`] ignores it.
    pub version: Version,
    /// Bound of the whole request, connecting and reading the body included.
    pub timeout: Duration,
}

impl HttpRequest {
    pub fn new(method: Method, path: &str) -> Self {
        HttpRequest {
            method,
            path: path.to_string(),
            authority: None,
            headers: Vec::new(),
            body: Vec::new(),
            version: Version::HTTP_11,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn get(path: &str) -> Self {
        HttpRequest::new(Method::GET, path)
    }

    pub fn authority(mut self, authority: impl Into<String>) -> Self {
        self.authority = Some(authority.into());
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// h2c with prior knowledge.
    pub fn http2(self) -> Self {
        self.version(Version::HTTP_2)
    }

    pub fn version(mut self, version: Version) -> Self {
        self.version = version;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// A response, read whole.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// From the start of the request (connecting included for one-shot requests) to the body's end.
    pub elapsed: Duration,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-backend` header: which [`HttpBackend`] answered.
    pub fn backend(&self) -> Option<&str> {
        self.header("x-backend")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn try_json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("{}: not JSON: {}", self.status, self.text()))
    }

    /// The body as JSON; panics (with the body) when it is not.
    pub fn json(&self) -> serde_json::Value {
        self.try_json().unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// Runs the future `f` makes on a current-thread runtime on a thread inside the pod's network
/// namespace: every socket the future (and the tasks it spawns) makes is the pod's.
fn block_in_pod<F, Fut, R>(pod: &Pod, f: F) -> Result<R>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = R>,
    R: Send + 'static,
{
    pod.run(move || -> Result<R> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("client runtime")?;
        Ok(rt.block_on(f()))
    })?
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

async fn handshake(stream: tokio::net::TcpStream, version: Version) -> Result<Sender> {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if version == Version::HTTP_2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .context("h2 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::handshake(io).await.context("HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Sender::H1(sender))
    }
}

impl Sender {
    fn version(&self) -> Version {
        match self {
            Sender::H1(_) => Version::HTTP_11,
            Sender::H2(_) => Version::HTTP_2,
        }
    }

    async fn send(&mut self, target: SocketAddr, req: &HttpRequest, start: Instant) -> Result<HttpResponse> {
        let authority = req.authority.clone().unwrap_or_else(|| target.to_string());
        let h2 = self.version() == Version::HTTP_2;
        let uri: Uri = if h2 {
            format!("http://{authority}{}", req.path).parse()
        } else {
            req.path.parse()
        }
        .with_context(|| format!("bad path {:?} or authority {authority:?}", req.path))?;
        let mut builder = Request::builder()
            .method(req.method.clone())
            .uri(uri)
            .version(self.version());
        if !h2 && !req.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            builder = builder.header(HOST, authority.as_str());
        }
        for (k, v) in &req.headers {
            builder = builder.header(HeaderName::from_bytes(k.as_bytes())?, HeaderValue::from_str(v)?);
        }
        let request = builder.body(Full::new(Bytes::from(req.body.clone())))?;
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await.context("connection not ready")?;
                s.send_request(request).await?
            }
            Sender::H2(s) => {
                s.ready().await.context("connection not ready")?;
                s.send_request(request).await?
            }
        };
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the response body: {e}"))?
            .to_bytes();
        Ok(HttpResponse {
            status: parts.status.as_u16(),
            version: parts.version,
            headers: parts.headers,
            body: body.to_vec(),
            elapsed: start.elapsed(),
        })
    }
}

/// A new connection (made by the caller's thread, which must be in the pod), one request.
async fn one_shot(target: SocketAddr, req: HttpRequest) -> Result<HttpResponse> {
    let start = Instant::now();
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        let mut sender = handshake(stream, req.version).await?;
        sender.send(target, &req, start).await
    };
    match tokio::time::timeout(req.timeout, exchange).await {
        Ok(r) => r.with_context(|| format!("{} {} to {target}", req.method, req.path)),
        Err(_) => bail!(
            "{} {} to {target}: no response within {:?}",
            req.method,
            req.path,
            req.timeout
        ),
    }
}

/// One client connection, made inside a pod, for many requests one after another (keep-alive in
/// HTTP/1.1, one h2c connection in HTTP/2).
pub struct HttpConnection {
    rt: Option<tokio::runtime::Runtime>,
    sender: Sender,
    target: SocketAddr,
}

impl HttpConnection {
    pub fn open(pod: &Pod, target: SocketAddr, version: Version) -> Result<Self> {
        let stream = pod
            .connect(target)?
            .with_context(|| format!("connecting to {target} from {}", pod.name))?;
        stream.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("client runtime")?;
        let sender = rt.block_on(async move {
            let stream = tokio::net::TcpStream::from_std(stream)?;
            match tokio::time::timeout(DEFAULT_TIMEOUT, handshake(stream, version)).await {
                Ok(r) => r,
                Err(_) => bail!("handshake with {target}: no answer within {DEFAULT_TIMEOUT:?}"),
            }
        })?;
        Ok(HttpConnection {
            rt: Some(rt),
            sender,
            target,
        })
    }

    pub fn version(&self) -> Version {
        self.sender.version()
    }

    /// Sends `req` on this connection (its `version` is ignored) and reads the response.
    pub fn send(&mut self, req: HttpRequest) -> Result<HttpResponse> {
        let rt = self.rt.as_ref().context("connection closed")?;
        let (sender, target) = (&mut self.sender, self.target);
        rt.block_on(async {
            let start = Instant::now();
            match tokio::time::timeout(req.timeout, sender.send(target, &req, start)).await {
                Ok(r) => r.with_context(|| format!("{} {} to {target}", req.method, req.path)),
                Err(_) => bail!(
                    "{} {} to {target}: no response within {:?}",
                    req.method,
                    req.path,
                    req.timeout
                ),
            }
        })
    }
}

impl Drop for HttpConnection {
    fn drop(&mut self) {
        // Not a blocking drop: also fine where a runtime is running.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Sends `total` requests (`make(i)` is the i-th), each on a new connection made inside `pod`, at
/// most `in_flight` at a time. Every result is kept, in order (failures as errors); whatever is
/// not done after [`CONCURRENT_CAP`] is an error. At most [`CONCURRENT_MAX`] requests.
pub fn concurrent<F>(
    pod: &Pod,
    target: SocketAddr,
    in_flight: usize,
    total: usize,
    make: F,
) -> Result<Vec<Result<HttpResponse>>>
where
    F: Fn(usize) -> HttpRequest + Send + Sync + 'static,
{
    if total > CONCURRENT_MAX {
        bail!("{total} requests: at most {CONCURRENT_MAX}");
    }
    let in_flight = in_flight.clamp(1, total.max(1));
    block_in_pod(pod, move || async move {
        let make = Arc::new(make);
        let next = Arc::new(AtomicUsize::new(0));
        let results: Arc<Mutex<Vec<Option<Result<HttpResponse>>>>> =
            Arc::new(Mutex::new((0..total).map(|_| None).collect()));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..in_flight {
            let (make, next, results) = (make.clone(), next.clone(), results.clone());
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        break;
                    }
                    let r = one_shot(target, make(i)).await;
                    lock(&results)[i] = Some(r);
                }
            });
        }
        let _ = tokio::time::timeout(CONCURRENT_CAP, async { while workers.join_next().await.is_some() {} }).await;
        workers.abort_all();
        let out = std::mem::take(&mut *lock(&results));
        out.into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|| Err(anyhow!("request {i}: not done within {CONCURRENT_CAP:?}"))))
            .collect()
    })
}

/// Connects (from the thread it runs on: in [`block_in_pod`], the pod's) for tonic's channel.
#[derive(Clone)]
struct PodConnector {
    target: SocketAddr,
}

impl Service<Uri> for PodConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let target = self.target;
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(target).await?;
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(stream))
        })
    }
}

/// A gRPC `grpc.health.v1.Health/Check` (service `""`) from inside `pod` to `target`, with
/// `:authority` `authority` (`None`: the target address). Outer error: no channel (connecting,
/// h2 handshake) or the [`DEFAULT_TIMEOUT`] passed; inner: the call's gRPC status.
pub fn grpc_health_check(
    pod: &Pod,
    target: SocketAddr,
    authority: Option<&str>,
) -> Result<Result<GrpcServingStatus, tonic::Status>> {
    let authority = authority.map_or_else(|| target.to_string(), str::to_string);
    block_in_pod(pod, move || async move {
        let call = async {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
                .with_context(|| format!("authority {authority:?}"))?
                .connect_timeout(Duration::from_secs(5));
            let channel = endpoint
                .connect_with_connector(PodConnector { target })
                .await
                .with_context(|| format!("gRPC channel to {target}"))?;
            let mut client = HealthClient::new(channel);
            let reply = client
                .check(HealthCheckRequest { service: String::new() })
                .await
                .map(|r| GrpcServingStatus::try_from(r.into_inner().status).unwrap_or(GrpcServingStatus::Unknown));
            anyhow::Ok(reply)
        };
        match tokio::time::timeout(DEFAULT_TIMEOUT, call).await {
            Ok(r) => r,
            Err(_) => bail!("gRPC health check to {target}: no answer within {DEFAULT_TIMEOUT:?}"),
        }
    })?
}
