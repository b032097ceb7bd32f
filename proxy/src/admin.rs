//! The admin API (node-local, 127.0.0.1:15000), the Prometheus endpoint (15020) and the
//! readiness endpoint (15021), as plain hyper 1 HTTP/1.1 servers.
//!
//! JSON (pretty) is the default so scripts and `jq` work; `?format=table` renders `/captured`
//! and `/connections` as aligned text for people (what `nodeway inspect` prints). Handlers are
//! synchronous and never panic on bad input: an unknown path is a 404, a bad method a 405.
//!
//! The admin port is on the node's loopback, which every host process and hostNetwork pod shares,
//! so reading is open but acting is not: the two mutations (`POST /logging?...`, `POST
//! /quitquitquit`) need `Authorization: Bearer <token>` with the token the agent writes 0600 into
//! its run directory (`admin-token`): only root on the node (or who mounts that directory) can
//! stop the data plane or change what it logs. A GET never changes anything.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::connections::{ConnectionView, Connections};
use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, UNKNOWN};

/// Sets the log filter from an EnvFilter-style directive; Ok carries a message for the caller.
pub type SetLogLevelFn = dyn Fn(&str) -> Result<String, String> + Send + Sync;

/// Whether an endpoint of a cluster is ejected by outlier detection: `Some(true)` ejected,
/// `Some(false)` passing, `None` no runtime state (shown as `OK`).
pub type OutlierFn = dyn Fn(&str, std::net::SocketAddr) -> Option<bool> + Send + Sync;
/// A cluster's runtime state as JSON (`None`: it has carried no traffic yet).
pub type ClusterRuntimeFn = dyn Fn(&str) -> Option<Value> + Send + Sync;

/// Everything the admin API reads or acts on. The agent owns capture state, configuration and
/// logging, so those are callbacks rather than types this crate would have to know.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub connections: Arc<Connections>,
    /// The `/captured` document (its fields: README, "Deploy on Kubernetes").
    pub captured: Arc<dyn Fn() -> Value + Send + Sync>,
    pub config_dump: Arc<dyn Fn() -> Value + Send + Sync>,
    /// The `/certs` document: `{"certificates": [CertInfo...]}`.
    pub certs: Arc<dyn Fn() -> Value + Send + Sync>,
    /// The authorization policies in force.
    pub policies: Arc<dyn Fn() -> Arc<crate::authz::PolicyStore> + Send + Sync>,
    /// The mesh's workloads and services (from the file, or from xDS).
    pub workloads: Arc<dyn Fn() -> Arc<crate::workload::WorkloadIndex> + Send + Sync>,
    pub services: Arc<dyn Fn() -> Arc<crate::service::ServiceIndex> + Send + Sync>,
    /// The xDS client's state (`XdsClient::dump`), `null` without a control plane.
    pub xds: Arc<dyn Fn() -> Value + Send + Sync>,
    /// The L7 model in force: route tables, clusters, load assignments (from the file or xDS).
    pub l7: Arc<dyn Fn() -> Arc<crate::l7::L7Config> + Send + Sync>,
    /// The outlier-detection state of an endpoint, for `/endpoints`.
    pub outlier: Arc<OutlierFn>,
    /// A cluster's runtime state (counters, endpoints' ejections), for `/clusters`.
    pub cluster_runtime: Arc<ClusterRuntimeFn>,
    /// Applies an EnvFilter-style directive ("debug", "info,nodeway=trace"); Ok carries a
    /// message for the caller, Err why the directive was rejected.
    pub set_log_level: Arc<SetLogLevelFn>,
    pub current_log_level: Arc<dyn Fn() -> String + Send + Sync>,
    pub ready: Arc<AtomicBool>,
    /// Notified (notify_one) by POST /quitquitquit.
    pub shutdown: Arc<Notify>,
    /// The bearer token the mutations need; None refuses every mutation.
    pub admin_token: Option<AdminToken>,
}

/// The admin API's credential for mutations; compared in constant time.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl AdminToken {
    pub fn new(token: impl Into<Arc<str>>) -> Self {
        AdminToken(token.into())
    }

    fn admits(&self, presented: Option<&str>) -> bool {
        let Some(p) = presented else { return false };
        let (a, b) = (self.0.as_bytes(), p.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminState {
    /// A state with empty documents and a no-op logger, for tests and early start-up; replace
    /// the callbacks the agent provides.
    pub fn new(metrics: Arc<Metrics>, connections: Arc<Connections>) -> Self {
        Self {
            metrics,
            connections,
            captured: Arc::new(|| json!({})),
            config_dump: Arc::new(|| json!({})),
            certs: Arc::new(|| json!({"certificates": []})),
            policies: Arc::new(|| Arc::new(crate::authz::PolicyStore::default())),
            workloads: Arc::new(|| Arc::new(crate::workload::WorkloadIndex::default())),
            services: Arc::new(|| Arc::new(crate::service::ServiceIndex::default())),
            xds: Arc::new(|| Value::Null),
            l7: Arc::new(|| Arc::new(crate::l7::L7Config::default())),
            outlier: Arc::new(|_, _| None),
            cluster_runtime: Arc::new(|_| None),
            set_log_level: Arc::new(|_| Err("log level changes are not supported".to_string())),
            current_log_level: Arc::new(|| "info".to_string()),
            ready: Arc::new(AtomicBool::new(false)),
            shutdown: Arc::new(Notify::new()),
            admin_token: None,
        }
    }
}

/// Endpoints listed by `/`: (path, description).
const ENDPOINTS: &[(&str, &str)] = &[
    (
        "/captured",
        "captured pods, their netns, eBPF programs, attachments and map entries",
    ),
    ("/connections", "live proxied connections with byte counts"),
    ("/config_dump", "the agent's current configuration"),
    ("/certs", "workload certificates: identity, serial, validity, issuer"),
    ("/policies", "authorization policies in force"),
    (
        "/workloads",
        "workloads of the mesh: name, namespace, identity, addresses, node, protocol",
    ),
    ("/services", "services of the mesh: hostname, VIPs, ports"),
    (
        "/routes",
        "HTTP route tables (RouteConfiguration): virtual hosts, domains, routes",
    ),
    ("/clusters", "upstream clusters with their endpoints"),
    ("/endpoints", "every cluster's endpoints with health and outlier status"),
    (
        "/xds",
        "the control-plane connection, last ACK/NACK per type (resources: /config_dump)",
    ),
    (
        "/logging",
        "show the log level; POST ?level=debug (or ?nodeway=debug) changes it (admin token)",
    ),
    ("/healthz/ready", "200 once every configured pod is captured, else 503"),
    ("/quitquitquit", "POST: graceful exit (admin token)"),
    ("/stats/prometheus", "Prometheus metrics (also /metrics)"),
];

type Body = Full<Bytes>;

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve_admin(listener: TcpListener, state: Arc<AdminState>) {
    serve(listener, "admin", move |req| admin_route(&state, req)).await
}

/// Serves `/stats/prometheus` and `/metrics` (port 15020).
pub async fn serve_stats(listener: TcpListener, metrics: Arc<Metrics>) {
    serve(listener, "stats", move |req| {
        match (req.method.clone(), req.path.as_str()) {
            (Method::GET | Method::HEAD, "/stats/prometheus" | "/metrics") => metrics_response(&metrics),
            (_, "/stats/prometheus" | "/metrics") => method_not_allowed("GET, HEAD"),
            _ => not_found(&req.path),
        }
    })
    .await
}

/// `istioctl proxy-config secret`-like table of the certificates the node holds.
pub fn certs_table(doc: &Value) -> String {
    let empty = Vec::new();
    let certs = doc["certificates"].as_array().unwrap_or(&empty);
    let rows: Vec<[String; 5]> = certs
        .iter()
        .map(|c| {
            let f = |k: &str| c[k].as_str().unwrap_or("-").to_string();
            [f("identity"), f("serial"), f("notBefore"), f("notAfter"), f("issuer")]
        })
        .collect();
    let header = ["IDENTITY", "SERIAL", "NOT-BEFORE", "NOT-AFTER", "ISSUER"];
    let widths: Vec<usize> = (0..5)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in std::iter::once(header.map(String::from)).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{v:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Serves `/healthz/ready` (port 15021).
pub async fn serve_readiness(listener: TcpListener, ready: Arc<AtomicBool>) {
    serve(listener, "readiness", move |req| {
        match (req.method.clone(), req.path.as_str()) {
            (Method::GET | Method::HEAD, "/healthz/ready") => readiness_response(&ready),
            (_, "/healthz/ready") => method_not_allowed("GET, HEAD"),
            _ => not_found(&req.path),
        }
    })
    .await
}

/// The parts of a request the handlers look at, decoded once.
struct Req {
    method: Method,
    /// Path without a trailing slash (except "/").
    path: String,
    query: Vec<(String, String)>,
    /// The `Authorization: Bearer` credential, if any.
    bearer: Option<String>,
}

impl Req {
    fn from_hyper<B>(req: &Request<B>) -> Self {
        let raw = req.uri().path();
        let path = if raw.len() > 1 {
            raw.trim_end_matches('/').to_string()
        } else {
            "/".to_string()
        };
        Self {
            method: req.method().clone(),
            path: if path.is_empty() { "/".to_string() } else { path },
            query: parse_query(req.uri().query().unwrap_or("")),
            bearer: req
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| t.trim().to_string()),
        }
    }

    fn param(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn table(&self) -> bool {
        matches!(self.param("format"), Some("table" | "text"))
    }
}

/// Accept loop shared by the three servers: one task per connection, errors logged and survived.
async fn serve<F>(listener: TcpListener, name: &'static str, handler: F)
where
    F: Fn(Req) -> Response<Body> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(true);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning, the listener itself is still fine.
                tracing::warn!(server = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(Req::from_hyper(&req))) }
            });
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(server = name, %peer, error = %e, "http connection ended with error");
            }
        });
    }
}

fn admin_route(state: &AdminState, req: Req) -> Response<Body> {
    let read_only = matches!(req.method, Method::GET | Method::HEAD);
    match req.path.as_str() {
        "/" if read_only => index(&req),
        "/captured" if read_only => {
            let doc = (state.captured)();
            view(&req, || captured_table(&doc), || doc.clone())
        }
        "/connections" if read_only => connections_view(state, &req),
        "/config_dump" if read_only => json_response(StatusCode::OK, &(state.config_dump)()),
        "/certs" if read_only => {
            let doc = (state.certs)();
            view(&req, || certs_table(&doc), || doc.clone())
        }
        "/policies" if read_only => {
            let store = (state.policies)();
            let policies = store.all();
            view(&req, || policies_table(&policies), || json!({ "policies": policies }))
        }
        "/workloads" if read_only => {
            let index = (state.workloads)();
            let workloads: Vec<&crate::workload::Workload> = index.all().map(AsRef::as_ref).collect();
            view(
                &req,
                || workloads_table(&workloads),
                || json!({ "workloads": workloads }),
            )
        }
        "/services" if read_only => services_view(state, &req),
        "/routes" if read_only => {
            let l7 = (state.l7)();
            let routes: Vec<&crate::route::RouteTable> = l7.routes.values().map(AsRef::as_ref).collect();
            view(&req, || routes_table(&l7), || json!({ "routes": routes }))
        }
        "/clusters" if read_only => clusters_view(state, &req),
        "/endpoints" if read_only => {
            let l7 = (state.l7)();
            let rows = endpoint_rows(&l7, state.outlier.as_ref());
            view(&req, || endpoints_table(&rows), || json!({ "endpoints": rows }))
        }
        "/xds" if read_only => xds_view(state, &req),
        "/logging" if read_only || req.method == Method::POST => logging(state, &req),
        "/healthz/ready" if read_only => readiness_response(&state.ready),
        "/quitquitquit" if req.method == Method::POST => quit(state, &req),
        "/stats/prometheus" | "/metrics" if read_only => metrics_response(&state.metrics),
        _ => wrong_method_or_not_found(&req.path),
    }
}

/// A document answered as a text table with `?format=table`, else as JSON.
fn view(req: &Req, table: impl FnOnce() -> String, doc: impl FnOnce() -> Value) -> Response<Body> {
    if req.table() {
        text(StatusCode::OK, table())
    } else {
        json_response(StatusCode::OK, &doc())
    }
}

/// The known paths that exist under another method answer 405 with `Allow`; the rest 404.
fn wrong_method_or_not_found(path: &str) -> Response<Body> {
    match path {
        "/quitquitquit" => method_not_allowed("POST"),
        "/logging" => method_not_allowed("GET, HEAD, POST"),
        p if ENDPOINTS.iter().any(|(known, _)| *known == p) || p == "/" || p == "/metrics" => {
            method_not_allowed("GET, HEAD")
        }
        p => not_found(p),
    }
}

fn connections_view(state: &AdminState, req: &Req) -> Response<Body> {
    let conns = state.connections.snapshot();
    if req.table() {
        return text(StatusCode::OK, connections_table(&conns));
    }
    // Serialized straight from the struct so fields keep their documented order.
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        connections: &'a [ConnectionView],
    }
    json_response(StatusCode::OK, &Doc { connections: &conns })
}

fn services_view(state: &AdminState, req: &Req) -> Response<Body> {
    let index = (state.services)();
    // Endpoints: the workloads that name the service (istiod's Workload.services).
    let mut endpoints: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let workloads = (state.workloads)();
    for w in workloads.all() {
        for s in &w.services {
            *endpoints.entry(s.as_str()).or_default() += 1;
        }
    }
    let services: Vec<(&crate::service::Service, usize)> = index
        .all()
        .map(|s| (s.as_ref(), endpoints.get(s.key().as_str()).copied().unwrap_or(0)))
        .collect();
    let doc = || {
        let docs: Vec<Value> = services
            .iter()
            .map(|(s, n)| {
                let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
                v["endpoints"] = json!(n);
                v
            })
            .collect();
        json!({ "services": docs })
    };
    view(req, || services_table(&services), doc)
}

fn clusters_view(state: &AdminState, req: &Req) -> Response<Body> {
    let l7 = (state.l7)();
    let doc = || {
        let clusters: Vec<Value> = l7
            .clusters
            .values()
            .map(|c| {
                let mut v = serde_json::to_value(c.as_ref()).unwrap_or(Value::Null);
                v["endpoints"] = serde_json::to_value(l7.endpoints(c)).unwrap_or(Value::Null);
                if let Some(rt) = (state.cluster_runtime)(&c.name) {
                    v["runtime"] = rt;
                }
                v
            })
            .collect();
        json!({ "clusters": clusters })
    };
    view(req, || clusters_table(&l7), doc)
}

/// The control-plane connection; the resources themselves are on `/config_dump`.
fn xds_view(state: &AdminState, req: &Req) -> Response<Body> {
    let mut doc = (state.xds)();
    if req.table() {
        return text(StatusCode::OK, xds_table(&doc));
    }
    if let Some(o) = doc.as_object_mut() {
        o.remove("resources");
    }
    json_response(StatusCode::OK, &json!({ "xds": doc }))
}

fn quit(state: &AdminState, req: &Req) -> Response<Body> {
    if let Err(refused) = authorize(state, req) {
        return refused;
    }
    tracing::info!("shutdown requested through /quitquitquit");
    state.shutdown.notify_one();
    text(StatusCode::OK, "OK\n".to_string())
}

/// One row per policy, like `istioctl ztunnel-config policies`.
fn policies_table(policies: &[&crate::authz::Policy]) -> String {
    let rows = policies
        .iter()
        .map(|p| {
            vec![
                p.namespace.clone(),
                p.name.clone(),
                p.scope.as_str().to_string(),
                format!("{}{}", p.action.as_str(), if p.dry_run { " (dry run)" } else { "" }),
                p.rules.len().to_string(),
            ]
        })
        .collect();
    render_table(&["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES"], rows)
}

/// One row per workload, like `istioctl ztunnel-config workloads`.
fn workloads_table(workloads: &[&crate::workload::Workload]) -> String {
    let rows = workloads
        .iter()
        .map(|w| {
            let ips: Vec<String> = w.ips.iter().map(ToString::to_string).collect();
            vec![
                w.namespace.clone(),
                w.name.clone(),
                ips.join(","),
                w.node.clone(),
                w.service_account.clone(),
                format!("{:?}", w.protocol).to_uppercase(),
            ]
        })
        .collect();
    render_table(
        &[
            "NAMESPACE",
            "POD NAME",
            "ADDRESS",
            "NODE",
            "SERVICE ACCOUNT",
            "PROTOCOL",
        ],
        rows,
    )
}

/// One row per subscribed type: resources held, last ACK, last NACK and its error.
fn xds_table(doc: &Value) -> String {
    if doc.is_null() {
        return "no control plane (--xds-address not given): the mesh view comes from the config file\n".to_string();
    }
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| "-".to_string());
    let mut out = format!(
        "address: {}  node: {}  connected: {}  connects: {}\n",
        s(&doc["address"]),
        s(&doc["node"]),
        doc["connected"],
        doc["connects"]
    );
    if let Some(e) = doc["lastError"].as_str() {
        out += &format!("last stream error: {e}\n");
    }
    let rows = doc["types"]
        .as_object()
        .map(|types| {
            types
                .iter()
                .map(|(t, st)| {
                    vec![
                        t.rsplit('/').next().unwrap_or(t).to_string(),
                        st["resources"].to_string(),
                        s(&st["lastAck"]["version"]),
                        s(&st["lastAck"]["nonce"]),
                        s(&st["lastNack"]["nonce"]),
                        s(&st["lastNack"]["error"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out += &render_table(
        &[
            "TYPE",
            "RESOURCES",
            "ACKED VERSION",
            "ACKED NONCE",
            "NACKED NONCE",
            "NACK ERROR",
        ],
        rows,
    );
    out
}

/// One row per route, like `istioctl proxy-config routes`.
pub fn routes_table(l7: &crate::l7::L7Config) -> String {
    use crate::route::PathMatch;
    let mut rows = Vec::new();
    for (name, table) in &l7.routes {
        for vh in &table.virtual_hosts {
            // Istio lists every domain with and without the port: the port-less ones say it all.
            let mut domains: Vec<&str> = vh
                .domains
                .iter()
                .map(String::as_str)
                .filter(|d| d.rsplit_once(':').is_none_or(|(_, p)| p.parse::<u16>().is_err()))
                .collect();
            if domains.is_empty() {
                domains = vh.domains.iter().map(String::as_str).collect();
            }
            let domains = match domains.len() {
                0 => "-".to_string(),
                1 | 2 => domains.join(", "),
                n => format!("{}, {} + {} more...", domains[0], domains[1], n - 2),
            };
            let mut push = |matcher: String, vs: String| {
                rows.push(vec![name.clone(), vh.name.clone(), domains.clone(), matcher, vs]);
            };
            if vh.routes.is_empty() {
                push("-".to_string(), "-".to_string());
            }
            for r in &vh.routes {
                let mut matcher = match &r.matcher.path {
                    PathMatch::Prefix(p) => format!("{p}*"),
                    PathMatch::Exact(p) => p.clone(),
                    PathMatch::Regex(re) => format!("regex {}", re.as_str()),
                    PathMatch::SeparatedPrefix(p) => format!("{p}/*"),
                    PathMatch::Any => "*".to_string(),
                };
                // istioctl shows the path only; the header names tell routes on one path apart.
                if !r.matcher.headers.is_empty() {
                    let names: Vec<&str> = r.matcher.headers.iter().map(|h| h.name.as_str()).collect();
                    matcher = format!("{matcher} [{}]", names.join(","));
                }
                push(matcher, r.istio_config.clone().unwrap_or_else(|| "-".to_string()));
            }
        }
    }
    render_table(&["NAME", "VHOST NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE"], rows)
}

/// One row per cluster, like `istioctl proxy-config clusters`: Istio's
/// `direction|port|subset|fqdn` cluster names split into their parts.
pub fn clusters_table(l7: &crate::l7::L7Config) -> String {
    use crate::cluster::Discovery;
    let rows = l7
        .clusters
        .values()
        .map(|c| {
            let parts: Vec<&str> = c.name.split('|').collect();
            let (fqdn, port, subset, direction) = match parts[..] {
                [direction, port, subset, fqdn] => (fqdn, port, subset, direction),
                _ => (c.name.as_str(), "-", "-", "-"),
            };
            let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
            let kind = match c.discovery {
                Discovery::Static => "STATIC",
                Discovery::Eds { .. } => "EDS",
                Discovery::OriginalDst => "ORIGINAL_DST",
                Discovery::Dns(ref d) => match d.mode {
                    crate::cluster::dns::DnsMode::Strict => "STRICT_DNS",
                    crate::cluster::dns::DnsMode::Logical => "LOGICAL_DNS",
                },
            };
            vec![
                dash(fqdn),
                dash(port),
                dash(subset),
                dash(direction),
                kind.to_string(),
                c.istio_config.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    render_table(
        &[
            "SERVICE FQDN",
            "PORT",
            "SUBSET",
            "DIRECTION",
            "TYPE",
            "DESTINATION RULE",
        ],
        rows,
    )
}

/// One endpoint of one cluster, as `/endpoints` shows it.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRow {
    pub endpoint: std::net::SocketAddr,
    pub status: crate::cluster::Health,
    /// `OK`, or `FAILED` when outlier detection has ejected the endpoint.
    pub outlier_check: &'static str,
    pub cluster: String,
    pub weight: u32,
    pub priority: u32,
}

pub fn endpoint_rows(l7: &crate::l7::L7Config, outlier: &OutlierFn) -> Vec<EndpointRow> {
    l7.clusters
        .values()
        .flat_map(|c| {
            l7.endpoints(c).iter().map(|e| EndpointRow {
                endpoint: e.address,
                status: e.health,
                outlier_check: if outlier(&c.name, e.address) == Some(true) {
                    "FAILED"
                } else {
                    "OK"
                },
                cluster: c.name.clone(),
                weight: e.weight,
                priority: e.priority,
            })
        })
        .collect()
}

/// Like `istioctl proxy-config endpoints`.
fn endpoints_table(rows: &[EndpointRow]) -> String {
    let rows = rows
        .iter()
        .map(|r| {
            let status = match r.status {
                crate::cluster::Health::Healthy => "HEALTHY",
                crate::cluster::Health::Degraded => "DEGRADED",
                crate::cluster::Health::Unhealthy => "UNHEALTHY",
            };
            vec![
                r.endpoint.to_string(),
                status.to_string(),
                r.outlier_check.to_string(),
                r.cluster.clone(),
            ]
        })
        .collect();
    render_table(&["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"], rows)
}

/// One row per service, like `istioctl ztunnel-config services`.
fn services_table(services: &[(&crate::service::Service, usize)]) -> String {
    let rows = services
        .iter()
        .map(|(s, endpoints)| {
            let vips: Vec<String> = s.vips.iter().map(|v| v.address.to_string()).collect();
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("{}:{}", p.service_port, p.target_port))
                .collect();
            vec![
                s.namespace.clone(),
                s.hostname.clone(),
                vips.join(","),
                ports.join(","),
                endpoints.to_string(),
            ]
        })
        .collect();
    render_table(
        &["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "PORTS", "ENDPOINTS"],
        rows,
    )
}

fn index(req: &Req) -> Response<Body> {
    if req.table() {
        let rows = ENDPOINTS
            .iter()
            .map(|(p, d)| vec![p.to_string(), d.to_string()])
            .collect();
        text(StatusCode::OK, render_table(&["ENDPOINT", "DESCRIPTION"], rows))
    } else {
        let list: Vec<Value> = ENDPOINTS
            .iter()
            .map(|(p, d)| json!({ "path": p, "description": d }))
            .collect();
        json_response(StatusCode::OK, &json!({ "endpoints": list }))
    }
}

/// `level=X` sets the default level; any other `target=level` pair (except `format`) becomes a
/// per-target directive, as Envoy's `/logging?<logger>=<level>`.
fn logging(state: &AdminState, req: &Req) -> Response<Body> {
    let directives: Vec<String> = req
        .query
        .iter()
        .filter(|(k, _)| k != "format")
        .map(|(k, v)| {
            if k == "level" {
                v.clone()
            } else if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    if !directives.is_empty() && req.method != Method::POST {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "error": "changing the log level needs POST (with the admin token); GET only shows it" }),
        );
    }
    if let (false, Err(refused)) = (directives.is_empty(), authorize(state, req)) {
        return refused;
    }
    if directives.is_empty() {
        let level = (state.current_log_level)();
        return if req.table() {
            text(StatusCode::OK, format!("level: {level}\n"))
        } else {
            json_response(StatusCode::OK, &json!({ "level": level }))
        };
    }
    let directive = directives.join(",");
    match (state.set_log_level)(&directive) {
        Ok(message) => {
            tracing::info!(%directive, "log level changed through /logging");
            let level = (state.current_log_level)();
            if req.table() {
                text(StatusCode::OK, format!("level: {level}\n{message}\n"))
            } else {
                json_response(StatusCode::OK, &json!({ "level": level, "message": message }))
            }
        }
        Err(error) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "error": error, "directive": directive }),
        ),
    }
}

/// A mutation goes ahead only with the admin token; else 401 saying where the token is.
#[allow(clippy::result_large_err)]
fn authorize(state: &AdminState, req: &Req) -> Result<(), Response<Body>> {
    match &state.admin_token {
        Some(t) if t.admits(req.bearer.as_deref()) => Ok(()),
        Some(_) => {
            tracing::warn!(path = %req.path, "admin mutation refused: missing or wrong admin token");
            let mut r = json_response(
                StatusCode::UNAUTHORIZED,
                &json!({ "error": format!(
                    "{} {} needs `Authorization: Bearer <token>`: the token is in the agent's run directory (admin-token, readable by root)",
                    req.method, req.path
                ) }),
            );
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"nodeway-admin\""),
            );
            Err(r)
        }
        None => Err(json_response(
            StatusCode::FORBIDDEN,
            &json!({ "error": "this admin API has no token configured: mutations are disabled" }),
        )),
    }
}

fn readiness_response(ready: &AtomicBool) -> Response<Body> {
    if ready.load(Ordering::Acquire) {
        text(StatusCode::OK, "ready\n".to_string())
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string())
    }
}

fn metrics_response(metrics: &Metrics) -> Response<Body> {
    response(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, metrics.encode())
}

fn not_found(path: &str) -> Response<Body> {
    text(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {path} (GET / lists them)\n"),
    )
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}\n"),
    );
    resp.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    response(status, "text/plain; charset=utf-8", body)
}

fn json_response<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    let mut body = serde_json::to_string_pretty(value).unwrap_or_else(|e| {
        // Our documents always serialize; answer rather than panic if one ever does not.
        json!({ "error": e.to_string() }).to_string()
    });
    body.push('\n');
    response(status, "application/json", body)
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Splits `a=1&b=x%2Cy` into decoded pairs; malformed escapes are kept literally.
fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn render_table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows.iter()) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(widths.len()) {
            if i + 1 == widths.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count()) + 2;
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A JSON field as a table cell: strings bare, arrays comma-joined, missing/null as "-".
fn cell(v: &Value, key: &str) -> String {
    display(v.get(key).unwrap_or(&Value::Null))
}

fn display(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) if a.is_empty() => "-".to_string(),
        Value::Array(a) => a.iter().map(display).collect::<Vec<_>>().join(","),
        Value::Object(_) => v.to_string(),
    }
}

/// The `/captured` document as text: a header, then pods, programs and kernel statistics.
/// Tolerates any missing field, since the agent's document grows over time.
pub fn captured_table(doc: &Value) -> String {
    let mut out = String::new();
    for (label, key) in [
        ("Node", "node"),
        ("Mode", "mode"),
        ("Pin dir", "pinDir"),
        ("Cgroup", "cgroup"),
    ] {
        if let Some(v) = doc.get(key) {
            let _ = writeln!(out, "{:<9}{}", format!("{label}:"), display(v));
        }
    }
    if let Some(src) = doc.get("source").filter(|s| s.is_object()) {
        let flag = |key: &str, yes: &str, no: &str| if src[key] == true { yes } else { no }.to_string();
        let mut line = format!(
            "{}: {}, {}, {} API errors",
            display(&src["kind"]),
            flag("synced", "synced", "not synced yet"),
            flag("connected", "connected", "API server unreachable"),
            src["apiErrors"].as_u64().unwrap_or(0)
        );
        if let Some(e) = src["lastError"].as_str() {
            let _ = write!(line, " (last {}: {e})", display(&src["lastErrorAt"]));
        }
        let _ = writeln!(out, "{:<9}{line}", "Source:");
    }
    if !out.is_empty() {
        out.push('\n');
    }

    let empty = Vec::new();
    let pods = doc.get("pods").and_then(Value::as_array).unwrap_or(&empty);
    let rows = pods
        .iter()
        .map(|p| {
            vec![
                cell(p, "namespace"),
                cell(p, "name"),
                cell(p, "captured"),
                cell(p, "netns"),
                cell(p, "netnsCookie"),
                cell(p, "ips"),
                cell(p, "since"),
                cell(p, "reason"),
            ]
        })
        .collect();
    out.push_str(&render_table(
        &[
            "NAMESPACE",
            "NAME",
            "CAPTURED",
            "NETNS",
            "COOKIE",
            "IPS",
            "SINCE",
            "REASON",
        ],
        rows,
    ));

    let programs = doc.get("programs").and_then(Value::as_array).unwrap_or(&empty);
    if !programs.is_empty() {
        out.push('\n');
        let rows = programs
            .iter()
            .map(|p| vec![cell(p, "name"), cell(p, "attachedTo"), cell(p, "link")])
            .collect();
        out.push_str(&render_table(&["PROGRAM", "ATTACHED-TO", "LINK"], rows));
    }

    if let Some(stats) = doc.get("stats").and_then(Value::as_object) {
        if !stats.is_empty() {
            out.push('\n');
            let rows = stats.iter().map(|(k, v)| vec![k.clone(), display(v)]).collect();
            out.push_str(&render_table(&["STAT", "VALUE"], rows));
        }
    }
    out
}

/// The live connections as text.
pub fn connections_table(conns: &[ConnectionView]) -> String {
    let rows = conns
        .iter()
        .map(|c| {
            vec![
                c.direction.as_str().to_string(),
                c.pod.clone(),
                c.source.clone(),
                c.destination.clone(),
                workload(&c.source_namespace, &c.source_workload),
                workload(&c.destination_namespace, &c.destination_workload),
                c.bytes_sent.to_string(),
                c.bytes_received.to_string(),
                age(c.duration_ms),
            ]
        })
        .collect();
    render_table(
        &[
            "DIRECTION",
            "POD",
            "SOURCE",
            "DESTINATION",
            "SRC-WORKLOAD",
            "DST-WORKLOAD",
            "SENT",
            "RECEIVED",
            "AGE",
        ],
        rows,
    )
}

fn workload(namespace: &str, name: &str) -> String {
    if namespace == UNKNOWN && name == UNKNOWN {
        UNKNOWN.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

/// kubectl-style age: 850ms, 42s, 3m12s, 2h5m, 4d3h.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connections::{ConnectionInfo, Direction};
    use crate::metrics::TcpLabels;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    struct Reply {
        status: u16,
        headers: String,
        body: String,
    }

    /// A raw HTTP/1.1 exchange, so tests also cover what a non-hyper client sees.
    async fn raw(addr: std::net::SocketAddr, request: &str) -> Reply {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("timely reply")
            .expect("read");
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Reply {
            status,
            headers: head.to_ascii_lowercase(),
            body: body.to_string(),
        }
    }

    async fn get(addr: std::net::SocketAddr, target: &str) -> Reply {
        raw(
            addr,
            &format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    const TOKEN: &str = "0123456789abcdef";

    async fn post(addr: std::net::SocketAddr, target: &str) -> Reply {
        post_as(addr, target, Some(TOKEN)).await
    }

    async fn post_as(addr: std::net::SocketAddr, target: &str, token: Option<&str>) -> Reply {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        raw(
            addr,
            &format!("POST {target} HTTP/1.1\r\nHost: test\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    fn captured_doc() -> Value {
        json!({
            "node": "node-a", "mode": "ebpf", "pinDir": "/sys/fs/bpf/nodeway",
            "cgroup": "/sys/fs/cgroup",
            "programs": [{"name": "connect4", "attachedTo": "/sys/fs/cgroup", "link": "/sys/fs/bpf/nodeway/connect4"}],
            "pods": [
                {"name": "client-1", "namespace": "demo", "captured": true, "reason": "captured",
                 "since": "2024-01-01T00:00:00.000Z", "netns": "nwt-1-client", "netnsCookie": 4097,
                 "ips": ["198.18.1.2", "fd00::2"], "slot": 1},
                {"name": "odd", "captured": false}
            ],
            "stats": {"outbound_redirected": 12, "inbound_redirected": 3}
        })
    }

    struct Fixture {
        addr: std::net::SocketAddr,
        state: Arc<AdminState>,
        level: Arc<Mutex<String>>,
    }

    async fn start_admin() -> Fixture {
        let metrics = Arc::new(Metrics::new());
        let connections = Arc::new(Connections::new(metrics.clone()));
        let level = Arc::new(Mutex::new("info".to_string()));
        let mut state = AdminState::new(metrics, connections);
        state.admin_token = Some(AdminToken::new(TOKEN));
        state.captured = Arc::new(captured_doc);
        state.config_dump = Arc::new(|| json!({"node": "node-a", "pods": []}));
        let l = level.clone();
        state.set_log_level = Arc::new(move |d: &str| {
            if d.contains("bogus") {
                return Err(format!("invalid directive {d:?}"));
            }
            *l.lock().unwrap_or_else(|p| p.into_inner()) = d.to_string();
            Ok(format!("log level set to {d}"))
        });
        let l = level.clone();
        state.current_log_level = Arc::new(move || l.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let state = Arc::new(state);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve_admin(listener, state.clone()));
        Fixture { addr, state, level }
    }

    #[tokio::test]
    async fn index_and_not_found() {
        let f = start_admin().await;
        let r = get(f.addr, "/").await;
        assert_eq!(r.status, 200);
        let v: Value = serde_json::from_str(&r.body).expect("json");
        let paths: Vec<&str> = v["endpoints"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|e| e["path"].as_str())
            .collect();
        assert!(paths.contains(&"/captured") && paths.contains(&"/quitquitquit"));
        let r = get(f.addr, "/?format=table").await;
        assert!(r.body.starts_with("ENDPOINT"), "{}", r.body);
        let r = get(f.addr, "/nope").await;
        assert_eq!(r.status, 404);
        assert!(r.body.contains("/nope"));
    }

    #[tokio::test]
    async fn captured_json_and_table() {
        let f = start_admin().await;
        let r = get(f.addr, "/captured").await;
        assert_eq!(r.status, 200);
        assert!(r.headers.contains("content-type: application/json"));
        let v: Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(v, captured_doc());
        assert!(r.body.contains("\n  \"node\""), "pretty printed");

        let r = get(f.addr, "/captured/?format=table").await;
        assert_eq!(r.status, 200);
        assert!(r.headers.contains("text/plain"));
        let b = &r.body;
        assert!(b.contains("Node:    node-a"), "{b}");
        assert!(
            b.contains("NAMESPACE  NAME      CAPTURED  NETNS         COOKIE  IPS"),
            "{b}"
        );
        assert!(
            b.contains("demo       client-1  true      nwt-1-client  4097    198.18.1.2,fd00::2"),
            "{b}"
        );
        assert!(b.contains("-          odd       false     -"), "{b}");
        assert!(b.contains("PROGRAM   ATTACHED-TO     LINK"), "{b}");
        assert!(b.contains("outbound_redirected  12"), "{b}");
    }

    #[test]
    fn captured_table_shows_the_source() {
        let mut doc = captured_doc();
        doc["source"] = json!({"kind": "kubernetes", "synced": true, "connected": false, "apiErrors": 3,
            "lastError": "pods watch: connection refused", "lastErrorAt": "2024-01-01T00:00:00.000Z"});
        let t = captured_table(&doc);
        assert!(
            t.contains("Source:  kubernetes: synced, API server unreachable, 3 API errors (last 2024-01-01T00:00:00.000Z: pods watch: connection refused)"),
            "{t}"
        );
        doc["source"] = json!({"kind": "kubernetes", "synced": false, "connected": true, "apiErrors": 0});
        assert!(captured_table(&doc).contains("kubernetes: not synced yet, connected, 0 API errors\n"));
        assert!(!captured_table(&captured_doc()).contains("Source:"));
    }

    #[test]
    fn captured_table_tolerates_anything() {
        for doc in [json!(null), json!({}), json!([1, 2]), json!({"pods": "x", "stats": 3})] {
            let t = captured_table(&doc);
            assert!(t.contains("NAMESPACE"), "{t}");
        }
    }

    #[tokio::test]
    async fn connections_json_and_table() {
        let f = start_admin().await;
        let r = get(f.addr, "/connections").await;
        assert_eq!(
            serde_json::from_str::<Value>(&r.body).expect("json"),
            json!({"connections": []})
        );

        let mut labels = TcpLabels::new("source");
        labels.source_workload = "client".into();
        labels.source_workload_namespace = "demo".into();
        let guard = f.state.connections.open(ConnectionInfo {
            direction: Direction::Outbound,
            pod: "demo/client-1".into(),
            source: "198.18.1.2:40000".parse().expect("addr"),
            destination: "198.18.1.3:8080".parse().expect("addr"),
            labels,
        });
        guard.add_received(11);
        guard.add_sent(22);
        let r = get(f.addr, "/connections").await;
        let v: Value = serde_json::from_str(&r.body).expect("json");
        let c = &v["connections"][0];
        let pos = |k: &str| r.body.find(&format!("\"{k}\"")).unwrap_or(usize::MAX);
        assert!(
            pos("id") < pos("direction") && pos("direction") < pos("bytesSent"),
            "documented order: {}",
            r.body
        );
        assert_eq!(c["direction"], "outbound");
        assert_eq!(c["sourceWorkload"], "client");
        assert_eq!(c["bytesReceived"], 11);
        assert_eq!(c["bytesSent"], 22);

        let r = get(f.addr, "/connections?format=table").await;
        let mut lines = r.body.lines();
        let header = lines.next().expect("header");
        assert!(header.starts_with("DIRECTION  POD"), "{header}");
        assert!(header.ends_with("SENT  RECEIVED  AGE"), "{header}");
        let row = lines.next().expect("row");
        assert!(
            row.starts_with("outbound   demo/client-1  198.18.1.2:40000  198.18.1.3:8080"),
            "{row}"
        );
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[4..8], ["demo/client", "unknown", "22", "11"], "{row}");
        drop(guard);
    }

    #[tokio::test]
    async fn logging_show_and_set() {
        let f = start_admin().await;
        let r = get(f.addr, "/logging").await;
        assert_eq!(serde_json::from_str::<Value>(&r.body).expect("json")["level"], "info");
        let r = post(f.addr, "/logging?level=debug").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(*f.level.lock().expect("lock"), "debug");
        let r = post(f.addr, "/logging?nodeway=trace").await;
        assert_eq!(r.status, 200);
        assert_eq!(*f.level.lock().expect("lock"), "nodeway=trace");
        let r = post(f.addr, "/logging?level=info%2Cnodeway%3Ddebug").await;
        assert_eq!(
            serde_json::from_str::<Value>(&r.body).expect("json")["level"],
            "info,nodeway=debug"
        );
        // A GET never changes the level; a POST without the token (or a wrong one) neither.
        let r = get(f.addr, "/logging?level=trace").await;
        assert_eq!(r.status, 405, "{}", r.body);
        for token in [None, Some("0123456789abcdeX"), Some("short")] {
            let r = post_as(f.addr, "/logging?level=trace", token).await;
            assert_eq!(r.status, 401, "{token:?}: {}", r.body);
            assert!(r.headers.contains("www-authenticate: bearer"), "{}", r.headers);
            assert!(r.body.contains("admin-token"), "{}", r.body);
        }
        assert_eq!(*f.level.lock().expect("lock"), "info,nodeway=debug");
        let r = post(f.addr, "/logging?level=bogus").await;
        assert_eq!(r.status, 400);
        assert!(r.body.contains("invalid directive"));
        assert_eq!(*f.level.lock().expect("lock"), "info,nodeway=debug");
        let r = get(f.addr, "/logging?format=table").await;
        assert_eq!(r.body, "level: info,nodeway=debug\n");
    }

    #[tokio::test]
    async fn readiness_quit_and_metrics() {
        let f = start_admin().await;
        let r = get(f.addr, "/healthz/ready").await;
        assert_eq!((r.status, r.body.as_str()), (503, "not ready\n"));
        f.state.ready.store(true, Ordering::Release);
        let r = get(f.addr, "/healthz/ready").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

        let r = get(f.addr, "/quitquitquit").await;
        assert_eq!(r.status, 405);
        assert!(r.headers.contains("allow: post"));
        let notified = f.state.shutdown.clone();
        let waiter = tokio::spawn(async move { notified.notified().await });
        let r = post_as(f.addr, "/quitquitquit", None).await;
        assert_eq!(r.status, 401, "{}", r.body);
        let r = post_as(f.addr, "/quitquitquit", Some("wrong-token-0000")).await;
        assert_eq!(r.status, 401, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "a refused /quitquitquit must not stop anything");
        let r = post(f.addr, "/quitquitquit").await;
        assert_eq!((r.status, r.body.as_str()), (200, "OK\n"));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("shutdown notified")
            .expect("task");

        f.state.metrics.set_captured_pods(2);
        for path in ["/stats/prometheus", "/metrics"] {
            let r = get(f.addr, path).await;
            assert_eq!(r.status, 200);
            assert!(r
                .headers
                .contains("content-type: application/openmetrics-text; version=1.0.0"));
            assert!(r.body.contains("nodeway_captured_pods 2"), "{}", r.body);
        }
        let r = get(f.addr, "/config_dump").await;
        assert_eq!(serde_json::from_str::<Value>(&r.body).expect("json")["node"], "node-a");
        let r = post(f.addr, "/captured").await;
        assert_eq!(r.status, 405);
    }

    #[tokio::test]
    async fn survives_garbage_and_keeps_serving() {
        let f = start_admin().await;
        for junk in [
            "BLAH\r\n\r\n",
            "GET\r\n\r\n",
            "\0\0\0\0\r\n\r\n",
            "GET /%zz%?%%=%&&=&level HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET /logging?%ff%fe=%c3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ] {
            let _ = raw(f.addr, junk).await;
        }
        // A client that connects and goes away without a byte.
        drop(TcpStream::connect(f.addr).await.expect("connect"));
        let r = get(f.addr, "/healthz/ready").await;
        assert_eq!(r.status, 503);
    }

    #[tokio::test]
    async fn keep_alive_serves_several_requests() {
        let f = start_admin().await;
        let r = raw(
            f.addr,
            "GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 503);
        assert!(r.body.contains("HTTP/1.1 404"), "{}", r.body);
    }

    #[tokio::test]
    async fn stats_and_readiness_servers() {
        let metrics = Arc::new(Metrics::new());
        metrics.inc_capture_failures();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stats = l.local_addr().expect("addr");
        tokio::spawn(serve_stats(l, metrics));
        let ready = Arc::new(AtomicBool::new(false));
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let readiness = l.local_addr().expect("addr");
        tokio::spawn(serve_readiness(l, ready.clone()));

        for path in ["/stats/prometheus", "/metrics"] {
            let r = get(stats, path).await;
            assert_eq!(r.status, 200);
            assert!(r.body.contains("nodeway_capture_failures_total 1"));
        }
        assert_eq!(get(stats, "/captured").await.status, 404);
        assert_eq!(post(stats, "/metrics").await.status, 405);
        assert_eq!(get(readiness, "/healthz/ready").await.status, 503);
        ready.store(true, Ordering::Release);
        assert_eq!(get(readiness, "/healthz/ready").await.status, 200);
        assert_eq!(get(readiness, "/metrics").await.status, 404);
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("level=info%2Cnodeway%3Ddebug&format=table&x"),
            vec![
                ("level".into(), "info,nodeway=debug".into()),
                ("format".into(), "table".into()),
                ("x".into(), String::new())
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("a+b%20c%"), "a b c%");
    }

    #[test]
    fn ages() {
        assert_eq!(age(850), "850ms");
        assert_eq!(age(42_000), "42s");
        assert_eq!(age(192_000), "3m12s");
        assert_eq!(age(7_500_000), "2h5m");
        assert_eq!(age(356_400_000), "4d3h");
    }

    #[tokio::test]
    async fn routes_clusters_endpoints_json_and_tables() {
        use envoy_types::pb::envoy::config::{cluster::v3 as cv3, endpoint::v3 as ev3, route::v3 as rv3};
        let name = "outbound|8080|v2|web.demo.svc.cluster.local";
        let rc: rv3::RouteConfiguration = crate::envoy_json::from_json(&json!({
            "name": "8080",
            "virtualHosts": [{"name": "web.demo.svc.cluster.local:8080",
                "domains": ["web.demo.svc.cluster.local", "web.demo.svc.cluster.local:8080", "web", "web:8080", "198.19.0.1"],
                "routes": [
                    {"match": {"prefix": "/", "headers": [{"name": "x-version", "stringMatch": {"exact": "v2"}}]},
                     "route": {"cluster": name},
                     "metadata": {"filterMetadata": {"istio": {"config": "/apis/networking.istio.io/v1alpha3/namespaces/demo/virtual-service/web"}}}},
                    {"match": {"path": "/exact"}, "route": {"cluster": name}}
                ]}]
        }))
        .expect("route json");
        let c: cv3::Cluster = crate::envoy_json::from_json(&json!({
            "name": name, "type": "EDS", "edsClusterConfig": {"serviceName": name},
            "metadata": {"filterMetadata": {"istio": {"config": "/apis/networking.istio.io/v1alpha3/namespaces/demo/destination-rule/web"}}}
        }))
        .expect("cluster json");
        let cla: ev3::ClusterLoadAssignment = crate::envoy_json::from_json(&json!({
            "clusterName": name,
            "endpoints": [{"lbEndpoints": [
                {"endpoint": {"address": {"socketAddress": {"address": "198.18.0.3", "portValue": 8080}}}},
                {"endpoint": {"address": {"socketAddress": {"address": "198.18.0.4", "portValue": 8080}}}, "healthStatus": "UNHEALTHY"}
            ]}]
        }))
        .expect("cla json");
        let mut l7 = crate::l7::L7Config::default();
        l7.routes.insert(
            "8080".into(),
            Arc::new(crate::route::route_configuration(&rc).expect("route")),
        );
        l7.clusters
            .insert(name.into(), Arc::new(crate::cluster::cluster(&c).expect("cluster")));
        l7.assignments.insert(
            name.into(),
            Arc::new(crate::cluster::load_assignment(&cla).expect("cla")),
        );
        let l7 = Arc::new(l7);
        let f = start_admin().await;
        let mut state = AdminState::new(f.state.metrics.clone(), f.state.connections.clone());
        state.l7 = Arc::new(move || l7.clone());
        state.outlier = Arc::new(|_, a| Some(a.port() == 8080 && a.ip().to_string() == "198.18.0.3"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve_admin(listener, Arc::new(state)));

        let r = get(addr, "/routes?format=table").await;
        assert_eq!(r.status, 200);
        let lines: Vec<&str> = r.body.lines().collect();
        assert!(
            lines[0].starts_with("NAME") && lines[0].contains("VHOST NAME") && lines[0].ends_with("VIRTUAL SERVICE"),
            "{}",
            r.body
        );
        assert!(
            lines[1].starts_with("8080")
                && lines[1].contains("web.demo.svc.cluster.local, web + 1 more...")
                && lines[1].contains("/* [x-version]")
                && lines[1].ends_with("web.demo"),
            "{}",
            r.body
        );
        assert!(lines[2].contains("/exact") && lines[2].ends_with('-'), "{}", r.body);
        let r = get(addr, "/routes").await;
        let doc: Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(
            doc["routes"][0]["virtualHosts"][0]["routes"][0]["istioConfig"], "web.demo",
            "{doc}"
        );

        let r = get(addr, "/clusters?format=table").await;
        assert!(r.body.starts_with("SERVICE FQDN"), "{}", r.body);
        let row = r.body.lines().nth(1).expect("a row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "web.demo.svc.cluster.local",
                "8080",
                "v2",
                "outbound",
                "EDS",
                "web.demo"
            ],
            "{}",
            r.body
        );
        let doc: Value = serde_json::from_str(&get(addr, "/clusters").await.body).expect("json");
        assert_eq!(doc["clusters"][0]["endpoints"][1]["health"], "UNHEALTHY", "{doc}");

        let r = get(addr, "/endpoints?format=table").await;
        let lines: Vec<Vec<&str>> = r.body.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[1], ["198.18.0.3:8080", "HEALTHY", "FAILED", name], "{}", r.body);
        assert_eq!(lines[2], ["198.18.0.4:8080", "UNHEALTHY", "OK", name], "{}", r.body);
        let doc: Value = serde_json::from_str(&get(addr, "/endpoints").await.body).expect("json");
        assert_eq!(doc["endpoints"][0]["outlierCheck"], "FAILED", "{doc}");
    }
}
