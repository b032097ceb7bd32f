//! L7 on the outbound side: a captured pod's HTTP/1.1, h2c or gRPC connection to a port that has a
//! route table is served here, request by request, with Envoy's router semantics (the
//! `RouteConfiguration` named after the port, as an Istio sidecar's outbound listener uses it):
//! virtual host by authority, first matching route, fault injection, redirects, direct responses,
//! weighted clusters, rewrites and header changes, timeouts, retries and mirroring. Upstream
//! connections, load balancing, circuit breakers and outlier detection are [`crate::upstream`]'s.
//!
//! Local replies carry Envoy's response flags (`NR`, `UT`, `UO`, `UF`, `UH`, `NC`, `FI`, `DI`) in
//! the metrics and the access log, and on the `x-envoy-response-flags`-less wire they look like
//! Envoy's (same status codes and bodies).
pub mod inbound;
pub mod observe;
pub mod sniff;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use self::observe::{AccessLog, Observed, Report};
use crate::{
    cluster::Cluster,
    l7::L7Config,
    metrics::TcpLabels,
    metrics::TcpLabels as Labels,
    outbound::Outbound as PodProxy,
    route::{
        Action, AppendAction, DirectResponse, Fault, HashPolicy, HeaderMutations, PathMatch, Redirect, RedirectPath,
        RequestView, RetryPolicy, Route, RouteAction, RouteTable, VirtualHost, WeightedCluster,
    },
    upstream::{Body, Held, Outcome, UpstreamError},
    workload::Protocol,
};

/// Largest request body buffered so that it can be retried or mirrored; a bigger one is sent
/// once, without retries or mirrors (Envoy does the same past its buffer limit).
const RETRY_BUFFER_LIMIT: usize = 1 << 20;

/// One downstream connection's context.
struct Conn {
    pod: Arc<PodProxy>,
    /// The connection's original destination (a service VIP or a pod, and the port whose route
    /// table applies).
    dst: SocketAddr,
    /// The app's address as the destination sees it (the pod's IP).
    source: SocketAddr,
}

/// Serves one redirected outbound connection as HTTP until the client closes it.
pub async fn serve_outbound<C>(client: C, pod: Arc<PodProxy>, dst: SocketAddr, source: SocketAddr)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let conn = Arc::new(Conn { pod, dst, source });
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(conn, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
    // A client that half-closes after its request still gets the response.
    builder.http1().half_close(true);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(client), service)
        .await
    {
        debug!(%dst, error = %e, "downstream HTTP connection ended with an error");
    }
}

/// Per-request state that ends up in the metrics and the access log.
struct Exchange {
    log: AccessLog,
    labels: TcpLabels,
    grpc: bool,
    started: Instant,
}

async fn handle(conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let state = &conn.pod.state;
    let l7 = state.l7();
    ensure_request_id(req.headers_mut());
    let authority = authority_of(&req);
    let grpc = is_grpc(req.headers());
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut ex = Exchange {
        log: AccessLog::for_request(&req, &authority, conn.source, conn.dst),
        labels: Labels::between("source", Some(&conn.pod.workload), None),
        grpc,
        started,
    };

    // Two Host headers make the authority ambiguous: refused as a protocol error, as Envoy does.
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return local_reply(&conn, ex, StatusCode::BAD_REQUEST, "DPE", "multiple Host headers");
    }
    let Some(table) = l7.routes_for_port(conn.dst.port()).cloned() else {
        return local_reply(&conn, ex, StatusCode::NOT_FOUND, "NR", "");
    };
    let view = RequestView {
        method: req.method().as_str(),
        path: &path,
        authority: &authority,
        scheme: "http",
        headers: req.headers(),
    };
    let Some(vhost) = table.virtual_host(&authority) else {
        return local_reply(&conn, ex, StatusCode::NOT_FOUND, "NR", "");
    };
    let Some(route) = vhost.route(&view) else {
        return local_reply(&conn, ex, StatusCode::NOT_FOUND, "NR", "");
    };
    if !route.name.is_empty() {
        ex.log.route_name = Some(route.name.clone());
    }

    // Fault injection comes first, as the fault filter sits before the router.
    if let Some(fault) = &route.fault {
        if let Some(reply) = inject_fault(&conn, &mut ex, fault, &view).await {
            return reply;
        }
    }
    let levels = |wc| levels(wc, route, vhost, &table);
    match &route.action {
        Action::DirectResponse(d) => direct_response(&conn, ex, d, &levels(None)),
        Action::Redirect(r) => redirect(&conn, ex, r, route, &path, &authority, &levels(None)),
        Action::Route(ra) => {
            let wc = pick_weighted(ra);
            let mutations = levels(Some(wc));
            forward(&conn, ex, req, &l7, &table, vhost, route, ra, wc, &mutations).await
        }
    }
}

/// Header changes from the most specific level to the least.
fn levels<'a>(
    wc: Option<&'a WeightedCluster>,
    route: &'a Route,
    vhost: &'a VirtualHost,
    table: &'a RouteTable,
) -> Vec<&'a HeaderMutations> {
    let mut v = Vec::with_capacity(4);
    if let Some(wc) = wc {
        v.push(&wc.headers);
    }
    v.extend([&route.headers, &vhost.headers, &table.headers]);
    v
}

async fn inject_fault(conn: &Conn, ex: &mut Exchange, fault: &Fault, view: &RequestView<'_>) -> Option<Response<Body>> {
    if !fault.headers.iter().all(|h| h.matches(view)) {
        return None;
    }
    if let Some(d) = &fault.delay {
        if roll(d.per_million) {
            tokio::time::sleep(d.delay).await;
            ex.log.response_flags = "DI".to_string();
        }
    }
    let a = fault.abort.as_ref()?;
    if !roll(a.per_million) {
        return None;
    }
    let mut ex2 = Exchange {
        log: ex.log.clone(),
        labels: ex.labels.clone(),
        grpc: ex.grpc,
        started: ex.started,
    };
    ex2.log.response_flags = "FI".to_string();
    Some(match a.kind {
        crate::route::AbortKind::Http(status) => local_reply(
            conn,
            ex2,
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "FI",
            "fault filter abort",
        ),
        crate::route::AbortKind::Grpc(code) => {
            ex2.log.grpc_status = Some(code.to_string());
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::OK;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static("fault filter abort"));
            finish(conn, ex2, resp, "FI")
        }
    })
}

/// Per million.
fn roll(per_million: u32) -> bool {
    per_million >= 1_000_000 || fastrand::u32(0..1_000_000) < per_million
}

fn pick_weighted(ra: &RouteAction) -> &WeightedCluster {
    if ra.clusters.len() == 1 {
        return &ra.clusters[0];
    }
    let mut x = fastrand::u32(0..ra.total_weight.max(1));
    for c in &ra.clusters {
        if x < c.weight {
            return c;
        }
        x -= c.weight;
    }
    &ra.clusters[ra.clusters.len() - 1]
}

fn direct_response(conn: &Conn, ex: Exchange, d: &DirectResponse, levels: &[&HeaderMutations]) -> Response<Body> {
    let mut resp = Response::new(match &d.body {
        Some(b) => full(Bytes::from(b.clone())),
        None => empty(),
    });
    *resp.status_mut() = StatusCode::from_u16(d.status).unwrap_or(StatusCode::OK);
    if d.body.is_some() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    response_mutations(resp.headers_mut(), levels);
    finish(conn, ex, resp, "-")
}

fn redirect(
    conn: &Conn,
    ex: Exchange,
    r: &Redirect,
    route: &Route,
    path: &str,
    authority: &str,
    levels: &[&HeaderMutations],
) -> Response<Body> {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let (req_host, req_port) = split_authority(authority);
    let host = r.host.as_deref().unwrap_or(req_host);
    // Envoy keeps a non-default port unless the redirect changes scheme or sets one.
    let port = match (r.port, req_port) {
        (Some(p), _) => Some(p),
        (None, Some(p)) if r.scheme.is_none() && r.host.is_none() => Some(p),
        _ => None,
    }
    .filter(|p| !((scheme == "http" && *p == 80) || (scheme == "https" && *p == 443)));
    let (p_only, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut new_path = match &r.path {
        None => p_only.to_string(),
        Some(RedirectPath::Path(p)) => p.clone(),
        Some(RedirectPath::Prefix(pre)) => rewrite_prefix(&route.matcher.path, p_only, pre),
        Some(RedirectPath::Regex(rr)) => rr.pattern.replace_all(p_only, rr.substitution.as_str()).into_owned(),
    };
    let path_has_query = matches!(&r.path, Some(RedirectPath::Path(p)) if p.contains('?'));
    if let (Some(q), false, false) = (query, r.strip_query, path_has_query) {
        new_path.push('?');
        new_path.push_str(q);
    }
    let location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{new_path}"),
        None => format!("{scheme}://{host}{new_path}"),
    };
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    response_mutations(resp.headers_mut(), levels);
    finish(conn, ex, resp, "-")
}

/// `prefix_rewrite`: the part of the path the route matched is replaced (a whole-path match
/// replaces all of it).
fn rewrite_prefix(m: &PathMatch, path: &str, replacement: &str) -> String {
    let matched = match m {
        PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.len().min(path.len()),
        PathMatch::Exact(_) | PathMatch::Regex(_) => path.len(),
        PathMatch::Any => 0,
    };
    format!("{replacement}{}", &path[matched..])
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    conn: &Conn,
    mut ex: Exchange,
    mut req: Request<Incoming>,
    l7: &L7Config,
    table: &RouteTable,
    vhost: &VirtualHost,
    route: &Route,
    ra: &RouteAction,
    wc: &WeightedCluster,
    levels: &[&HeaderMutations],
) -> Response<Body> {
    let _ = table;
    ex.log.upstream_cluster = Some(wc.name.clone());
    set_destination_service(&mut ex.labels, &wc.name);
    let Some(cluster) = l7.cluster(&wc.name).cloned() else {
        return local_reply(conn, ex, StatusCode::SERVICE_UNAVAILABLE, "NC", "");
    };
    let endpoints = original_dst_endpoints(&cluster, conn.dst, l7);
    let cs = conn.pod.upstreams.cluster(&cluster, &endpoints);
    let Ok(request_guard) = cs.admit_request() else {
        return local_reply(
            conn,
            ex,
            StatusCode::SERVICE_UNAVAILABLE,
            "UO",
            "upstream connect error or disconnect/reset before headers. reset reason: overflow",
        );
    };

    // An `Upgrade` the route allows (Istio enables `websocket`) is passed through: HTTP/1.1
    // upstream, no retries, and after a 101 the two connections are bridged byte for byte.
    let downstream_upgrade = is_allowed_upgrade(req.headers(), ra).then(|| hyper::upgrade::on(&mut req));
    // The request as it goes upstream: rewrites and header changes, then hop-by-hop headers out.
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let new_path = rewrite_path(route, ra, &path);
    let authority = ex.log.authority.clone();
    let new_authority = wc
        .host_rewrite
        .clone()
        .or_else(|| ra.host_rewrite.clone())
        .unwrap_or(authority);
    request_mutations(&mut parts.headers, levels);
    strip_hop_by_hop(&mut parts.headers, ra);
    parts.headers.insert(header::HOST, header_value(&new_authority));
    parts
        .headers
        .entry("x-forwarded-proto")
        .or_insert(HeaderValue::from_static("http"));
    let version = match cluster.upstream_protocol {
        _ if downstream_upgrade.is_some() => Version::HTTP_11,
        crate::cluster::UpstreamProtocol::Http1 => Version::HTTP_11,
        crate::cluster::UpstreamProtocol::Http2 => Version::HTTP_2,
        crate::cluster::UpstreamProtocol::Downstream => {
            if parts.version == Version::HTTP_2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            }
        }
    };
    let uri = match build_uri(&new_authority, &new_path) {
        Ok(u) => u,
        Err(_) => return local_reply(conn, ex, StatusCode::BAD_REQUEST, "-", "bad rewritten path"),
    };

    let retry = match downstream_upgrade {
        Some(_) => None,
        None => ra.retry_policy.clone().or_else(|| vhost.retry_policy.clone()),
    };
    let needs_buffer = downstream_upgrade.is_none() && (retry.is_some() || !ra.mirrors.is_empty());
    let mut body = if needs_buffer {
        buffer_body(body).await
    } else {
        RequestBody::Stream(Some(body.map_err(|e| Box::new(e) as _).boxed()))
    };
    if let RequestBody::Buffered(b) = &body {
        ex.log.bytes_received = b.len() as u64;
    }

    // Mirrors: fire and forget, with `-shadow` on the authority; their answers are dropped.
    if let RequestBody::Buffered(b) = &body {
        for m in &ra.mirrors {
            if !roll(m.fraction_per_million) {
                continue;
            }
            let Some(mc) = l7.cluster(&m.cluster).cloned() else {
                continue;
            };
            let shadow_authority = if m.shadow_host_suffix {
                shadow_host(&new_authority)
            } else {
                new_authority.clone()
            };
            let Ok(uri) = build_uri(&shadow_authority, &new_path) else {
                continue;
            };
            let mut headers = parts.headers.clone();
            headers.insert(header::HOST, header_value(&shadow_authority));
            let (method, body) = (parts.method.clone(), b.clone());
            let mendpoints = original_dst_endpoints(&mc, conn.dst, l7);
            let mcs = conn.pod.upstreams.cluster(&mc, &mendpoints);
            let pod = conn.pod.clone();
            tokio::spawn(async move {
                let Ok(_guard) = mcs.admit_request() else { return };
                let Some(ep) = mcs.pick(None, &[], 1) else { return };
                let mut r = Request::new(full(body));
                *r.method_mut() = method;
                *r.uri_mut() = uri;
                *r.headers_mut() = headers;
                let result = mcs.send(&pod, ep, version, r).await;
                mcs.report(ep, outcome_of(&result));
                if let Ok(resp) = result {
                    let _ = resp.into_body().collect().await;
                }
            });
        }
    }

    let hash = request_hash(ra, &parts.headers, &new_path, conn.source);
    let (num_retries, per_try) = retry.as_ref().map_or((0, None), |r| (r.num_retries, r.per_try_timeout));
    let attempt_loop = async {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let exclude: &[SocketAddr] = if retry.as_ref().is_some_and(|r| r.avoid_previous_hosts) {
                &tried
            } else {
                &[]
            };
            let attempts = retry.as_ref().map_or(1, |r| r.host_selection_max_attempts);
            let Some(ep) = cs.pick(hash, exclude, attempts) else {
                return Attempt::NoHealthy;
            };
            tried.push(ep);
            let mut r = Request::new(body.take());
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = uri.clone();
            *r.headers_mut() = parts.headers.clone();
            if vhost.include_request_attempt_count {
                r.headers_mut()
                    .insert("x-envoy-attempt-count", HeaderValue::from(attempt));
            }
            let sent = Instant::now();
            let result = match per_try {
                Some(t) => match tokio::time::timeout(t, cs.send(&conn.pod, ep, version, r)).await {
                    Ok(r) => r,
                    Err(_) => Err(UpstreamError::Reset("per-try timeout".into())),
                },
                None => cs.send(&conn.pod, ep, version, r).await,
            };
            let timed_out =
                per_try.is_some() && matches!(&result, Err(UpstreamError::Reset(m)) if m == "per-try timeout");
            let outcome = if timed_out {
                Outcome::Timeout
            } else {
                outcome_of(&result)
            };
            cs.report(ep, outcome);
            let retriable = retry
                .as_ref()
                .is_some_and(|rp| attempt <= num_retries && should_retry(rp, &result, timed_out) && body.replayable());
            if retriable {
                if let Ok(_retry_guard) = cs.admit_retry() {
                    drop(result);
                    let rp = retry.as_ref().map(|r| (r.backoff_base, r.backoff_max));
                    if let Some((base, max)) = rp {
                        tokio::time::sleep(backoff(base, max, attempt)).await;
                    }
                    continue;
                }
            }
            return Attempt::Done {
                result,
                endpoint: ep,
                attempts: attempt,
                timed_out,
                upstream_time: sent.elapsed(),
            };
        }
    };
    let deadline = ra.timeout.map(|t| tokio::time::Instant::now() + t);
    let outcome = match deadline {
        Some(d) => tokio::time::timeout_at(d, attempt_loop)
            .await
            .unwrap_or(Attempt::GlobalTimeout),
        None => attempt_loop.await,
    };
    match outcome {
        Attempt::NoHealthy => local_reply(conn, ex, StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream"),
        Attempt::GlobalTimeout => local_reply(conn, ex, StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout"),
        Attempt::Done {
            result,
            endpoint,
            attempts,
            timed_out,
            upstream_time,
        } => {
            ex.log.upstream_host = Some(endpoint.to_string());
            set_destination_workload(&mut ex.labels, conn, endpoint);
            let attempt_header = vhost.include_attempt_count_in_response.then_some(attempts);
            match result {
                Ok(mut resp) => {
                    if let (Some(down), StatusCode::SWITCHING_PROTOCOLS) = (downstream_upgrade, resp.status()) {
                        bridge_upgrade(down, hyper::upgrade::on(&mut resp));
                    }
                    ex.log.upstream_service_time = Some(u64::try_from(upstream_time.as_millis()).unwrap_or(u64::MAX));
                    let (mut rparts, rbody) = resp.into_parts();
                    strip_hop_by_hop(&mut rparts.headers, ra);
                    response_mutations(&mut rparts.headers, levels);
                    if let Some(n) = attempt_header {
                        rparts.headers.insert("x-envoy-attempt-count", HeaderValue::from(n));
                    }
                    rparts.headers.insert(
                        "x-envoy-upstream-service-time",
                        HeaderValue::from(u64::try_from(upstream_time.as_millis()).unwrap_or(u64::MAX)),
                    );
                    if let Some(s) = rparts.headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
                        ex.log.grpc_status = Some(s.to_string());
                    }
                    // The request stays active (max_requests) and under the route timeout until
                    // its response body is done.
                    let resp = Response::from_parts(rparts, Held::wrap(rbody, request_guard, deadline));
                    finish(conn, ex, resp, "-")
                }
                Err(_) if timed_out => {
                    local_reply(conn, ex, StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout")
                }
                Err(UpstreamError::Overflow) => local_reply(
                    conn,
                    ex,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UO",
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                ),
                Err(UpstreamError::ConnectFailure(reason)) => {
                    ex.log.upstream_transport_failure_reason = Some(reason);
                    local_reply(
                        conn,
                        ex,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UF",
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                    )
                }
                Err(e) => {
                    debug!(error = %e, "upstream request failed");
                    local_reply(
                        conn,
                        ex,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UC",
                        "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                    )
                }
            }
        }
    }
}

// Built once per request and matched at once: boxing the response would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    NoHealthy,
    GlobalTimeout,
    Done {
        result: Result<Response<Body>, UpstreamError>,
        endpoint: SocketAddr,
        attempts: u32,
        timed_out: bool,
        upstream_time: Duration,
    },
}

enum RequestBody {
    Buffered(Bytes),
    Stream(Option<Body>),
}

/// How long a request body may take to arrive whole to be buffered for retries and mirrors. A
/// unary call or a small upload is done at once; a stream (gRPC streaming, a slow upload) is
/// not waited for: it is sent as it comes, without retries, as Envoy does past its buffer.
const BUFFER_WAIT: Duration = Duration::from_millis(100);

async fn buffer_body(mut body: Incoming) -> RequestBody {
    let deadline = tokio::time::Instant::now() + BUFFER_WAIT;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    let mut trailers = None;
    loop {
        if size > RETRY_BUFFER_LIMIT {
            break;
        }
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => {
                if trailers.is_none() {
                    let mut all = bytes::BytesMut::with_capacity(size);
                    for c in &chunks {
                        all.extend_from_slice(c);
                    }
                    return RequestBody::Buffered(all.freeze());
                }
                break;
            }
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => {
                    size += d.len();
                    chunks.push(d);
                }
                Err(f) => {
                    // Trailers (gRPC clients rarely send them): stream, keep them.
                    trailers = f.into_trailers().ok();
                }
            },
            Ok(Some(Err(e))) => {
                debug!(error = %e, "request body failed while buffering");
                break;
            }
            Err(_) => break,
        }
    }
    let prefix = chunks
        .into_iter()
        .map(|c| Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(c)));
    let prefix = prefix.chain(trailers.map(|t| Ok(Frame::trailers(t))));
    let head = http_body_util::StreamBody::new(futures_util_iter(prefix));
    let rest = body.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
    RequestBody::Stream(Some(Chain { head: Some(head), rest }.boxed()))
}

fn futures_util_iter<I: Iterator>(i: I) -> tokio_stream::Iter<I> {
    tokio_stream::iter(i)
}

/// A body that yields `head`'s frames, then `rest`'s.
struct Chain<H, R> {
    head: Option<H>,
    rest: R,
}

impl<H, R> hyper::body::Body for Chain<H, R>
where
    H: hyper::body::Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>> + Unpin,
    R: hyper::body::Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>> + Unpin,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(h) = this.head.as_mut() {
            match std::pin::Pin::new(h).poll_frame(cx) {
                std::task::Poll::Ready(None) => this.head = None,
                other => return other,
            }
        }
        std::pin::Pin::new(&mut this.rest).poll_frame(cx)
    }
}

impl RequestBody {
    fn take(&mut self) -> Body {
        match self {
            RequestBody::Buffered(b) => full(b.clone()),
            RequestBody::Stream(s) => s.take().unwrap_or_else(empty),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered(_))
    }
}

fn outcome_of(r: &Result<Response<Body>, UpstreamError>) -> Outcome {
    match r {
        Ok(resp) => Outcome::Status(resp.status().as_u16()),
        Err(UpstreamError::ConnectFailure(_)) => Outcome::ConnectFailure,
        Err(UpstreamError::Overflow) => Outcome::Status(503),
        Err(_) => Outcome::Reset,
    }
}

/// Envoy's `retry_on` conditions.
fn should_retry(rp: &RetryPolicy, r: &Result<Response<Body>, UpstreamError>, timed_out: bool) -> bool {
    let on = &rp.retry_on;
    match r {
        Ok(resp) => {
            let s = resp.status().as_u16();
            if (on.five_xx && s >= 500)
                || (on.gateway_error && (502..=504).contains(&s))
                || (on.retriable_4xx && s == 409)
                || (on.retriable_status_codes && rp.retriable_status_codes.contains(&s))
            {
                return true;
            }
            let grpc = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            matches!(
                grpc,
                Some(1) if on.grpc_cancelled
            ) || matches!(grpc, Some(4) if on.grpc_deadline_exceeded)
                || matches!(grpc, Some(8) if on.grpc_resource_exhausted)
                || matches!(grpc, Some(13) if on.grpc_internal)
                || matches!(grpc, Some(14) if on.grpc_unavailable)
        }
        Err(_) if timed_out => on.five_xx || on.gateway_error || on.reset,
        Err(UpstreamError::ConnectFailure(_)) => on.connect_failure || on.five_xx || on.gateway_error || on.reset,
        // An overflowing pool is a local 503: retriable like one.
        Err(UpstreamError::Overflow) => {
            on.five_xx || on.gateway_error || on.retriable_status_codes && rp.retriable_status_codes.contains(&503)
        }
        Err(UpstreamError::Reset(m)) | Err(UpstreamError::Protocol(m)) => {
            on.five_xx || on.reset || (on.refused_stream && m.contains("refused"))
        }
    }
}

/// Full jitter over an exponentially growing window, as Envoy's back-off.
fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let window = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(max);
    let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(fastrand::u64(0..ms))
}

/// The hash for RING_HASH / MAGLEV from the route's hash policies, as Envoy computes it:
/// xxHash64 of each value, combined `(acc << 1) ^ h`, until a terminal policy yields.
fn request_hash(ra: &RouteAction, headers: &HeaderMap, path: &str, source: SocketAddr) -> Option<u64> {
    let mut acc: Option<u64> = None;
    for hp in &ra.hash_policy {
        let (value, terminal): (Option<String>, bool) = match hp {
            HashPolicy::Header { name, terminal } => (header_str(headers, name), *terminal),
            HashPolicy::QueryParameter { name, terminal } => (
                path.split_once('?').and_then(|(_, q)| {
                    q.split('&').find_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == name).then(|| v.to_string())
                    })
                }),
                *terminal,
            ),
            HashPolicy::SourceIp { terminal } => (Some(source.ip().to_string()), *terminal),
        };
        if let Some(v) = value {
            let h = crate::upstream::lb::xxhash64(v.as_bytes(), 0);
            acc = Some(acc.map_or(h, |a| a.rotate_left(1) ^ h));
            if terminal {
                break;
            }
        }
    }
    acc
}

/// PassthroughCluster (ORIGINAL_DST): the connection's own destination is the endpoint.
fn original_dst_endpoints(cluster: &Cluster, dst: SocketAddr, l7: &L7Config) -> Vec<crate::cluster::Endpoint> {
    match cluster.discovery {
        crate::cluster::Discovery::OriginalDst => vec![crate::cluster::Endpoint {
            address: dst,
            weight: 1,
            priority: 0,
            health: crate::cluster::Health::Healthy,
        }],
        _ => l7.endpoints(cluster).to_vec(),
    }
}

fn rewrite_path(route: &Route, ra: &RouteAction, path: &str) -> String {
    let (p, q) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut out = if let Some(pre) = &ra.prefix_rewrite {
        rewrite_prefix(&route.matcher.path, p, pre)
    } else if let Some(rr) = &ra.regex_rewrite {
        rr.pattern.replace_all(p, rr.substitution.as_str()).into_owned()
    } else {
        return path.to_string();
    };
    if out.is_empty() {
        out.push('/');
    }
    if let Some(q) = q {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn build_uri(authority: &str, path: &str) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
}

/// `reviews:9080` → `reviews-shadow:9080`, as Envoy's mirror does.
fn shadow_host(authority: &str) -> String {
    let (host, port) = split_authority(authority);
    match port {
        Some(p) => format!("{host}-shadow:{p}"),
        None => format!("{host}-shadow"),
    }
}

fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let host = crate::route::strip_port(authority);
    let port = authority[host.len()..].strip_prefix(':').and_then(|p| p.parse().ok());
    (host, port)
}

/// Applies header changes, most specific level first; with OVERWRITE a less specific level
/// (applied later) wins, as in Envoy by default.
fn request_mutations(h: &mut HeaderMap, levels: &[&HeaderMutations]) {
    for m in levels {
        apply(h, &m.request_remove, &m.request_add);
    }
}

fn response_mutations(h: &mut HeaderMap, levels: &[&HeaderMutations]) {
    for m in levels {
        apply(h, &m.response_remove, &m.response_add);
    }
}

fn apply(h: &mut HeaderMap, remove: &[String], add: &[crate::route::HeaderAdd]) {
    for name in remove {
        h.remove(name.as_str());
    }
    for a in add {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(a.name.as_bytes()),
            HeaderValue::from_str(&a.value),
        ) else {
            continue;
        };
        match a.action {
            AppendAction::AppendIfExistsOrAdd => {
                h.append(name, value);
            }
            AppendAction::AddIfAbsent => {
                h.entry(name).or_insert(value);
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                h.insert(name, value);
            }
            AppendAction::OverwriteIfExists => {
                if h.contains_key(&name) {
                    h.insert(name, value);
                }
            }
        }
    }
}

fn is_allowed_upgrade(h: &HeaderMap, ra: &RouteAction) -> bool {
    h.get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|u| ra.upgrades.iter().any(|a| a.eq_ignore_ascii_case(u)))
}

/// Copies bytes both ways between the upgraded downstream and upstream connections.
pub(crate) fn bridge_upgrade(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (down, up) = match tokio::join!(down, up) {
            (Ok(d), Ok(u)) => (d, u),
            (Err(e), _) | (_, Err(e)) => {
                debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let (mut d, mut u) = (TokioIo::new(down), TokioIo::new(up));
        if let Err(e) = crate::transport::copy::bidirectional(&mut d, &mut u).await {
            debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}

/// Connection-level headers are not forwarded (RFC 9110 §7.6.1); `Upgrade` only when the route
/// allows that upgrade.
fn strip_hop_by_hop(h: &mut HeaderMap, ra: &RouteAction) {
    let upgrade_allowed = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|u| ra.upgrades.iter().any(|a| a.eq_ignore_ascii_case(u)));
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(upgrade_allowed && n == header::UPGRADE))
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        h.remove(n);
    }
    if !upgrade_allowed {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

fn set_destination_service(labels: &mut TcpLabels, cluster: &str) {
    // outbound|9080|v1|reviews.default.svc.cluster.local
    let mut parts = cluster.split('|');
    if let (Some("outbound"), Some(_port), Some(_subset), Some(fqdn)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    {
        labels.destination_service = fqdn.to_string();
        let mut labels_of = fqdn.split('.');
        labels.destination_service_name = labels_of.next().unwrap_or("unknown").to_string();
        labels.destination_service_namespace = labels_of.next().unwrap_or("unknown").to_string();
    }
}

fn set_destination_workload(labels: &mut TcpLabels, conn: &Conn, endpoint: SocketAddr) {
    let workloads = conn.pod.state.workloads();
    if let Some(w) = workloads.by_ip(endpoint.ip()) {
        labels.set_destination_workload(w);
        if let (Some(h), Protocol::Hbone) = (&conn.pod.hbone, w.protocol) {
            labels.set_mutual_tls(&conn.pod.identity, &w.identity(&h.trust_domain));
        }
    }
}

/// A reply nodeway makes itself, with Envoy's status, body and flag.
fn local_reply(conn: &Conn, mut ex: Exchange, status: StatusCode, flag: &str, body: &'static str) -> Response<Body> {
    if ex.grpc && status != StatusCode::OK {
        // gRPC clients read grpc-status, as Envoy maps local replies for them.
        let code = match status.as_u16() {
            404 => 12,
            504 => 4,
            503 => 14,
            429 => 14,
            _ => 2,
        };
        ex.log.grpc_status = Some(code.to_string());
        let mut resp = Response::new(empty());
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(code));
        h.insert("grpc-message", HeaderValue::from_static(body));
        ex.log.response_code = 200;
        return finish(conn, ex, resp, flag);
    }
    let mut resp = Response::new(if body.is_empty() {
        empty()
    } else {
        full(Bytes::from_static(body.as_bytes()))
    });
    *resp.status_mut() = status;
    if !body.is_empty() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    finish(conn, ex, resp, flag)
}

/// Wraps the response body so the request is reported (metrics, access log) when it ends.
fn finish(conn: &Conn, mut ex: Exchange, resp: Response<Body>, flag: &str) -> Response<Body> {
    if flag != "-" && ex.log.response_flags == "-" {
        ex.log.response_flags = flag.to_string();
    } else if flag != "-" && ex.log.response_flags != flag {
        ex.log.response_flags = format!("{},{flag}", ex.log.response_flags);
    }
    if ex.log.response_code == 0 || resp.status() != StatusCode::OK {
        ex.log.response_code = resp.status().as_u16();
    }
    let report = Report {
        metrics: conn.pod.connections.metrics().clone(),
        labels: ex.labels,
        request_protocol: if ex.grpc { "grpc" } else { "http" },
        log: ex.log,
        started: ex.started,
        access_log: conn.pod.access_log,
    };
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Observed::new(body, report).boxed())
}

pub(crate) fn ensure_request_id(h: &mut HeaderMap) {
    if !h.contains_key("x-request-id") {
        let id = format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            fastrand::u32(..),
            fastrand::u16(..),
            fastrand::u16(..0x1000),
            0x8000 | fastrand::u16(..0x4000),
            fastrand::u64(..1 << 48)
        );
        if let Ok(v) = HeaderValue::from_str(&id) {
            h.insert("x-request-id", v);
        }
    }
}

pub(crate) fn authority_of<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| header_str(req.headers(), "host"))
        .unwrap_or_default()
}

pub(crate) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

pub(crate) fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

pub(crate) fn version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/?",
    }
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// A fixed body, for local replies.
pub(crate) fn full_static(s: &'static str) -> Body {
    full(Bytes::from_static(s.as_bytes()))
}

fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_and_authority_split() {
        assert_eq!(shadow_host("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow_host("reviews"), "reviews-shadow");
        assert_eq!(split_authority("a.b:80"), ("a.b", Some(80)));
    }

    #[test]
    fn backoff_stays_in_window() {
        for attempt in 1..10 {
            let d = backoff(Duration::from_millis(25), Duration::from_millis(250), attempt);
            assert!(d < Duration::from_millis(250), "{d:?}");
        }
    }

    #[test]
    fn prefix_rewrite_replaces_the_matched_part() {
        assert_eq!(
            rewrite_prefix(&PathMatch::Prefix("/api/".into()), "/api/v1/x", "/"),
            "/v1/x"
        );
        assert_eq!(
            rewrite_prefix(&PathMatch::Prefix("/old".into()), "/old/x", "/new"),
            "/new/x"
        );
        assert_eq!(rewrite_prefix(&PathMatch::Exact("/a".into()), "/a", "/b"), "/b");
    }
}
