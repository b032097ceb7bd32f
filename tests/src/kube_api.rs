//! An in-test Kubernetes API server: Namespaces and Pods over plain HTTP on 127.0.0.1, with real
//! list responses and real watch streams (chunked JSON lines, resumable from a resourceVersion),
//! so the agent's kube-rs controller runs unchanged against it. It can be made unreachable and
//! brought back on the same port (kept reserved meanwhile). Runs on its own runtime thread, for blocking tests.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::watch, task::AbortHandle};

/// The API server's objects and their history (every change, for watches that resume).
struct Store {
    rv: u64,
    /// (resource, namespace, name) -> object; namespace "" for cluster-scoped.
    objects: BTreeMap<(String, String, String), Value>,
    /// (resourceVersion, resource, event type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    /// Requests seen, as "METHOD path?query".
    requests: Vec<String>,
}

struct Shared {
    store: Mutex<Store>,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    /// Accept loop and every connection, aborted by `stop`.
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    /// While stopped: the port, bound but not listening (connections are refused), so that no
    /// other process (an agent binding port 0, say) takes it before `resume`.
    reserve: Mutex<Option<socket2::Socket>>,
    kubeconfig: PathBuf,
}

impl FakeApiServer {
    /// Starts on a free port and writes a kubeconfig for it into `dir`.
    pub fn start(dir: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("fake API server runtime")?;
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                objects: BTreeMap::new(),
                history: Vec::new(),
                requests: Vec::new(),
            }),
            changed,
        });
        let listener = listen(&rt, SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr()?;
        let kubeconfig = dir.join("kubeconfig.yaml");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n"
            ),
        )?;
        let server = FakeApiServer {
            shared,
            addr,
            rt,
            tasks: Arc::new(Mutex::new(Vec::new())),
            reserve: Mutex::new(None),
            kubeconfig,
        };
        server.serve(listener);
        Ok(server)
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let tasks = self.tasks.clone();
        let accept = self.rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = shared.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(shared.clone(), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
                lock(&tasks).push(conn.abort_handle());
            }
        });
        lock(&self.tasks).push(accept.abort_handle());
    }

    /// Unreachable: closes the listener and every open connection (watches end mid-stream);
    /// the port stays reserved for `resume`. Panics (failing the test) if it cannot.
    pub fn stop(&self) {
        if let Err(e) = self.try_stop() {
            panic!("stopping the fake API server: {e:#}");
        }
    }

    fn try_stop(&self) -> Result<()> {
        let reserve = reuseport_socket(self.addr).with_context(|| format!("reserving {}", self.addr))?;
        *lock(&self.reserve) = Some(reserve);
        let tasks: Vec<AbortHandle> = lock(&self.tasks).drain(..).collect();
        tasks.iter().for_each(AbortHandle::abort);
        // Until the listener is gone, connections could still be accepted.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !tasks.iter().all(AbortHandle::is_finished) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "its tasks did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Reachable again on the same port, with the same objects and history.
    pub fn resume(&self) -> Result<()> {
        let listener = listen(&self.rt, self.addr).with_context(|| format!("re-binding {}", self.addr))?;
        lock(&self.reserve).take();
        self.serve(listener);
        Ok(())
    }

    /// Creates or replaces an object of `resource` ("namespaces" or "pods"): ADDED or MODIFIED.
    pub fn apply(&self, resource: &str, mut obj: Value) {
        let mut s = self.shared.lock();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(resource, &obj);
        let kind = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key, obj.clone());
        s.history.push((rv, resource.to_string(), kind, obj));
        drop(s);
        self.shared.changed.send_replace(rv);
    }

    /// Deletes an object: DELETED.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let mut s = self.shared.lock();
        let Some(mut obj) = s
            .objects
            .remove(&(resource.to_string(), namespace.to_string(), name.to_string()))
        else {
            return;
        };
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push((rv, resource.to_string(), "DELETED", obj));
        drop(s);
        self.shared.changed.send_replace(rv);
    }

    /// The object as stored (to modify and re-apply).
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&(resource.to_string(), namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Requests served so far ("GET /api/v1/pods?...").
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn key_of(resource: &str, obj: &Value) -> (String, String, String) {
    let m = &obj["metadata"];
    (
        resource.to_string(),
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// A namespace, labelled `istio.io/dataplane-mode=ambient` when `ambient`.
pub fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"kubernetes.io/metadata.name": name, "istio.io/dataplane-mode": "ambient"})
    } else {
        json!({"kubernetes.io/metadata.name": name})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels}})
}

/// A Running pod on `node` with one IP.
pub fn pod(name: &str, namespace: &str, uid: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": "default", "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, v: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// What a request asks for: resource, namespace (for namespaced paths) and query parameters.
struct Query {
    resource: String,
    namespace: Option<String>,
    params: BTreeMap<String, String>,
}

fn parse(req: &Request<hyper::body::Incoming>) -> Option<Query> {
    let path = req.uri().path();
    let rest = path.strip_prefix("/api/v1/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (resource, namespace) = match parts.as_slice() {
        [r] => (r.to_string(), None),
        ["namespaces", ns, r] => (r.to_string(), Some(ns.to_string())),
        _ => return None,
    };
    let params = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), percent_decode(v)))
        })
        .collect();
    Some(Query {
        resource,
        namespace,
        params,
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `obj` passes the request's namespace, field and label selectors (the subset kube-rs
/// and the agent use: `a=b` terms, comma-separated).
fn matches(q: &Query, obj: &Value) -> bool {
    if let Some(ns) = &q.namespace {
        if obj["metadata"]["namespace"].as_str() != Some(ns) {
            return false;
        }
    }
    let field_ok = q.params.get("fieldSelector").is_none_or(|sel| {
        sel.split(',').filter(|t| !t.is_empty()).all(|term| {
            let Some((path, want)) = term.split_once('=') else {
                return false;
            };
            let mut v = obj;
            for seg in path.split('.') {
                v = &v[seg];
            }
            v.as_str() == Some(want.trim_start_matches('='))
        })
    });
    let label_ok = q.params.get("labelSelector").is_none_or(|sel| {
        sel.split(',')
            .filter(|t| !t.is_empty())
            .all(|term| match term.split_once('=') {
                Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v.trim_start_matches('=')),
                None => obj["metadata"]["labels"].get(term).is_some(),
            })
    });
    field_ok && label_ok
}

async fn handle(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    shared.lock().requests.push(format!("{} {target}", req.method()));
    let Some(q) = parse(&req) else {
        return Ok(full(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("fake API server: no {target}")}),
        ));
    };
    if req.method() != hyper::Method::GET {
        return Ok(full(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 405, "message": "read-only fake"}),
        ));
    }
    let kind = match q.resource.as_str() {
        "namespaces" => "Namespace",
        "pods" => "Pod",
        other => {
            return Ok(full(
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("fake API server: no resource {other}")}),
            ))
        }
    };
    if matches!(q.params.get("watch").map(String::as_str), Some("true" | "1")) {
        return Ok(watch_stream(shared, q));
    }
    let s = shared.lock();
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|((r, _, _), obj)| *r == q.resource && matches(&q, obj))
        .map(|(_, o)| o.clone())
        .collect();
    Ok(full(
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
    ))
}

/// Every change after the request's resourceVersion, then live changes, as JSON lines; ends after
/// `timeoutSeconds` (at most 290, as the API server does).
fn watch_stream(shared: Arc<Shared>, q: Query) -> Response<Body> {
    let mut since: u64 = q
        .params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = q
        .params
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290u64)
        .min(290);
    let mut changed = shared.changed.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            let batch: Vec<Value> = {
                let s = shared.lock();
                let b = s
                    .history
                    .iter()
                    .filter(|(rv, r, _, obj)| *rv > since && *r == q.resource && matches(&q, obj))
                    .map(|(_, _, t, obj)| json!({"type": t, "object": obj}))
                    .collect();
                since = since.max(s.rv);
                b
            };
            for ev in batch {
                let line = format!("{ev}\n");
                if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A TCP socket bound to `addr` with SO_REUSEPORT, which the listener and the reserve of a
/// stopped server share; sockets without it (every other listener here) cannot bind the port.
fn reuseport_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

fn listen(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = reuseport_socket(addr)?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    let _runtime = rt.enter();
    TcpListener::from_std(s.into())
}
