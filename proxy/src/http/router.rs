//! Envoy's router for a captured pod's outbound HTTP: the `RouteConfiguration` named after the
//! destination port picks a virtual host by authority and the first matching route; the fault
//! filter runs first; then a direct response, a redirect, or the request goes to the route's
//! (weighted) cluster: rewritten and with header changes ([`super::headers`]), mirrored
//! ([`super::shadow`]), attempted ([`super::upstream_request`]) and retried
//! ([`super::retry`]) under the route timeout. Replies of its own come from
//! [`super::local_reply`].
use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{header, request::Parts, HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{
    authority_of,
    body::{boxed, empty, full, BufferLimits, RequestBody},
    fault,
    flags::ResponseFlag,
    headers::{self, Levels},
    local_reply::LocalReply,
    observe::{AccessLog, Exchange, Reporter},
    retry::{Decision, RetryState},
    rewrite, server, shadow,
    upstream_request::{Head, UpstreamRequest},
};
use crate::{
    cluster::{Cluster, UpstreamProtocol},
    connections::Drain,
    l7::L7Config,
    metrics::TcpLabels,
    route::{Action, DirectResponse, HashPolicy, Redirect, RequestView, Route, RouteAction, RouteTable, VirtualHost},
    upstream::{Body, ClusterState, Connect, Held, RequestGuard, UpstreamError, Upstreams},
};

/// What the router needs from the pod whose requests it routes, looked up per request (the pod
/// composition implements it; tests fake it).
pub trait Outbound: Send + Sync {
    /// The current routes, clusters and endpoints.
    fn l7(&self) -> Arc<L7Config>;
    /// Upstream runtime state (pools, breakers, outlier detection), by cluster.
    fn upstreams(&self) -> &Upstreams;
    /// Opens the pod's byte streams to endpoints.
    fn connector(&self) -> &dyn Connect;
    /// Fills in the labels of the workload at `endpoint` (and the principals and
    /// `mutual_tls` when it is reached over HBONE).
    fn label_destination(&self, endpoint: SocketAddr, labels: &mut TcpLabels);
}

/// One downstream connection the router serves.
pub struct Downstream {
    pub source: Arc<dyn Outbound>,
    /// The connection's original destination (a service VIP or a pod).
    pub dst: SocketAddr,
    /// The route table that serves it (its listener's RDS name; Istio names it after the port).
    pub route_config: String,
    /// The app's address as the destination sees it (the pod's IP).
    pub peer: SocketAddr,
    /// The connection's Istio labels (`reporter="source"`, the source workload).
    pub labels: TcpLabels,
    pub reporter: Reporter,
    /// Request bodies buffered for retries and mirrors.
    pub buffer: BufferLimits,
    /// Timeouts and stream cap of the downstream connection.
    pub server: server::ServerLimits,
    /// The node's shutdown: the connection closes gracefully.
    pub drain: Drain,
}

/// Serves one redirected outbound connection as HTTP until the client closes it.
pub async fn serve<IO>(io: IO, conn: Arc<Downstream>)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (dst, drain, limits) = (conn.dst, conn.drain.clone(), conn.server);
    let handle = move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { route(&conn, req).await }
    };
    if let Err(e) = server::serve_connection(io, handle, limits, drain).await {
        debug!(%dst, error = %e, "downstream HTTP connection ended with an error");
    }
}

/// The route a request matched, with the tables it came from.
struct Matched<'a> {
    l7: &'a L7Config,
    table: &'a RouteTable,
    vhost: &'a VirtualHost,
    route: &'a Route,
}

/// Routes one request.
pub async fn route(conn: &Downstream, mut req: Request<Incoming>) -> Response<Body> {
    headers::ensure_request_id(req.headers_mut());
    let authority = authority_of(&req);
    let mut ex = Exchange::new(
        AccessLog::for_request(
            &req,
            &authority,
            conn.peer,
            conn.dst,
            conn.reporter.access_log.is_some(),
        ),
        conn.labels.clone(),
        headers::is_grpc(req.headers()),
        conn.reporter.clone(),
    );
    // Two Host headers make the authority ambiguous: refused as a protocol error, as Envoy does.
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return ex.reply(LocalReply::MultipleHosts);
    }
    let l7 = conn.source.l7();
    let Some(table) = l7.routes.get(conn.route_config.as_str()) else {
        return ex.reply(LocalReply::NoRoute);
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    let view = RequestView {
        method: req.method().as_str(),
        path: &path,
        authority: &authority,
        scheme: "http",
        headers: req.headers(),
    };
    let Some((vhost, route)) = table.virtual_host(&authority).and_then(|v| Some((v, v.route(&view)?))) else {
        return ex.reply(LocalReply::NoRoute);
    };
    if !route.name.is_empty() && ex.logging() {
        ex.log.route_name = Some(route.name.clone());
    }
    // The cluster is picked with the route, before any filter runs, as Envoy's connection
    // manager does: a fault's local reply is labelled with the route's destination service.
    let picked = match &route.action {
        Action::Route(ra) => Some(pick_weighted(ra)),
        _ => None,
    };
    if let Some(wc) = picked {
        if ex.logging() {
            ex.log.upstream_cluster = Some(wc.name.clone());
        }
        ex.labels.set_destination_cluster(&wc.name);
    }
    // Fault injection comes first, as the fault filter sits before the router.
    if let Some(f) = &route.fault {
        let injected = fault::inject(f, &view).await;
        if let Some(flag) = injected.flag() {
            ex.flag(flag);
        }
        if let Some(abort) = injected.abort {
            return ex.reply(abort);
        }
    }
    let m = Matched {
        l7: &l7,
        table,
        vhost,
        route,
    };
    match (&route.action, picked) {
        (Action::DirectResponse(d), _) => direct_response(ex, d, &Levels::new(None, route, vhost, table)),
        (Action::Redirect(r), _) => redirect(ex, r, &m, &path, &authority),
        (Action::Route(ra), Some(wc)) => forward(conn, ex, req, &m, (ra, wc), &authority).await,
        (Action::Route(_), None) => ex.reply(LocalReply::NoRoute),
    }
}

fn direct_response(ex: Exchange, d: &DirectResponse, levels: &Levels<'_>) -> Response<Body> {
    let mut resp = Response::new(match &d.body {
        Some(b) => full(bytes::Bytes::from(b.clone())),
        None => empty(),
    });
    *resp.status_mut() = StatusCode::from_u16(d.status).unwrap_or(StatusCode::OK);
    if d.body.is_some() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    levels.response(resp.headers_mut());
    ex.finish(resp)
}

fn redirect(ex: Exchange, r: &Redirect, m: &Matched<'_>, path: &str, authority: &str) -> Response<Body> {
    let location = rewrite::redirect_location(r, m.route, path, authority);
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Levels::new(None, m.route, m.vhost, m.table).response(resp.headers_mut());
    ex.finish(resp)
}

/// A request on its way to a cluster.
struct Forward<'a> {
    conn: &'a Downstream,
    m: &'a Matched<'a>,
    levels: Levels<'a>,
    cluster: Arc<ClusterState>,
    head: Head,
    /// An `Upgrade` the route allows (Istio enables `websocket`): HTTP/1.1 upstream, no
    /// retries, and after a 101 the two connections are bridged byte for byte.
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The attempt in flight (endpoint, sent at): when the route timeout cuts it off, the access
    /// log and the destination labels still name the endpoint, as Envoy's do.
    in_flight: std::sync::Mutex<Option<(SocketAddr, tokio::time::Instant)>>,
}

/// Sends a routed request to its cluster and answers with what came back.
async fn forward(
    conn: &Downstream,
    mut ex: Exchange,
    mut req: Request<Incoming>,
    m: &Matched<'_>,
    (ra, wc): (&RouteAction, &crate::route::WeightedCluster),
    downstream_authority: &str,
) -> Response<Body> {
    let (config, cluster, guard) = match cluster_state(conn, m.l7, &wc.name) {
        Ok(c) => c,
        Err(reply) => return ex.reply(reply),
    };
    let upgrade = headers::upgrade(req.headers())
        .is_some_and(|u| ra.upgrades.iter().any(|a| a.eq_ignore_ascii_case(u)))
        .then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let levels = Levels::new(Some(wc), m.route, m.vhost, m.table);
    let authority = wc
        .host_rewrite
        .as_ref()
        .or(ra.host_rewrite.as_ref())
        .map_or(downstream_authority, String::as_str)
        .to_owned();
    let Ok(head) = upstream_head(
        parts,
        m,
        ra,
        &levels,
        &authority,
        upgrade.is_some(),
        config.upstream_protocol,
    ) else {
        return ex.reply(LocalReply::BadRewrite);
    };
    let f = Forward {
        conn,
        m,
        levels,
        cluster,
        head,
        upgrade,
        in_flight: std::sync::Mutex::new(None),
    };
    let retry = f
        .upgrade
        .is_none()
        .then(|| ra.retry_policy.as_deref().or(m.vhost.retry_policy.as_deref()))
        .flatten();
    let mut body = if f.upgrade.is_none() && (retry.is_some() || !ra.mirrors.is_empty()) {
        RequestBody::buffer(boxed(body), &conn.buffer).await
    } else {
        RequestBody::stream(boxed(body))
    };
    if let Some(b) = body.buffered() {
        ex.log.bytes_received = b.bytes.len() as u64;
        shadow::mirror(conn, m.l7, ra, &f.head, b);
    }
    let hash = request_hash(ra, &f.head, conn.peer);
    let deadline = ra.timeout.map(|t| tokio::time::Instant::now() + t);
    let attempts = f.attempts(&mut body, RetryState::new(retry), hash);
    let attempted = match deadline {
        Some(d) => tokio::time::timeout_at(d, attempts)
            .await
            .unwrap_or(Attempted::GlobalTimeout),
        None => attempts.await,
    };
    f.respond(ex, attempted, guard, deadline)
}

/// The route's cluster, its runtime state, and a request admitted (`max_requests`); or why not.
fn cluster_state(conn: &Downstream, l7: &L7Config, name: &str) -> Result<Admitted, LocalReply> {
    let cluster = l7.cluster(name).ok_or(LocalReply::NoCluster)?;
    // Synced when the config changed: a lookup, no reconciling on the request path.
    let state = conn.source.upstreams().get(name).ok_or(LocalReply::NoCluster)?;
    let guard = state.admit_request().map_err(|_| LocalReply::Overflow)?;
    Ok((cluster.clone(), state, guard))
}

type Admitted = (Arc<Cluster>, Arc<ClusterState>, RequestGuard);

/// The request as it goes upstream: rewrites and header changes, then hop-by-hop headers out.
fn upstream_head(
    parts: Parts,
    m: &Matched<'_>,
    ra: &RouteAction,
    levels: &Levels<'_>,
    authority: &str,
    upgrade: bool,
    protocol: UpstreamProtocol,
) -> Result<Head, http::Error> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let new_path = rewrite::rewrite_path(m.route, ra, path);
    let version = upstream_version(protocol, parts.version, upgrade);
    let mut h = parts.headers;
    // An app cannot vouch for a client certificate: Envoy's default `SANITIZE`, which an Istio
    // sidecar's outbound side keeps.
    h.remove("x-forwarded-client-cert");
    levels.request(&mut h);
    headers::strip_hop_by_hop(&mut h, upgrade);
    h.insert(header::HOST, headers::value(authority));
    h.entry("x-forwarded-proto").or_insert(HeaderValue::from_static("http"));
    let uri = rewrite::build_uri(authority, &new_path)?;
    Ok(Head {
        method: parts.method,
        uri,
        headers: h,
        version,
    })
}

fn upstream_version(protocol: UpstreamProtocol, downstream: Version, upgrade: bool) -> Version {
    match protocol {
        _ if upgrade => Version::HTTP_11,
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
        UpstreamProtocol::Downstream if downstream == Version::HTTP_2 => Version::HTTP_2,
        UpstreamProtocol::Downstream => Version::HTTP_11,
    }
}

/// How the attempts ended.
enum Attempted {
    NoHealthy,
    GlobalTimeout,
    Done(Box<Last>),
}

/// The last attempt.
struct Last {
    result: Result<Response<Body>, UpstreamError>,
    endpoint: SocketAddr,
    attempts: u32,
    upstream_time: Duration,
    /// Why it was not retried although `retry_on` matched (URX, UO).
    flag: Option<ResponseFlag>,
}

impl Forward<'_> {
    /// Attempts until one is kept: picks an endpoint (avoiding tried ones when the policy says
    /// so), sends, and asks the retry state.
    async fn attempts(&self, body: &mut RequestBody, mut retry: RetryState<'_>, hash: Option<u64>) -> Attempted {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut _slot = None;
        loop {
            let attempt = retry.start_attempt();
            let policy = retry.policy();
            let exclude = if policy.is_some_and(|r| r.avoid_previous_hosts) {
                &tried[..]
            } else {
                &[]
            };
            let Some(endpoint) = self.cluster.pick_for(
                self.conn.dst,
                hash,
                exclude,
                policy.map_or(1, |r| r.host_selection_max_attempts),
            ) else {
                return Attempted::NoHealthy;
            };
            tried.push(endpoint);
            let upstream = UpstreamRequest {
                cluster: &self.cluster,
                via: self.conn.source.connector(),
                endpoint,
                per_try_timeout: policy.and_then(|r| r.per_try_timeout),
            };
            let count = self.m.vhost.include_request_attempt_count.then_some(attempt);
            let sent = tokio::time::Instant::now();
            *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()) = Some((endpoint, sent));
            let result = upstream
                .send(self.head.version, self.head.request(body.take(), count))
                .await;
            match retry.decide(&result, body.replayable(), &self.cluster) {
                Decision::Retry { backoff, slot } => {
                    drop(result);
                    _slot = Some(slot);
                    tokio::time::sleep(backoff).await;
                }
                Decision::Done { flag } => {
                    return Attempted::Done(Box::new(Last {
                        result,
                        endpoint,
                        attempts: attempt,
                        upstream_time: sent.elapsed(),
                        flag,
                    }))
                }
            }
        }
    }

    /// The endpoint that served (or was serving) the request, for the log and the labels.
    fn chose(&self, ex: &mut Exchange, endpoint: SocketAddr) {
        if ex.logging() {
            ex.log.upstream_host = Some(endpoint.to_string());
        }
        self.conn.source.label_destination(endpoint, &mut ex.labels);
    }

    /// The response to the client: the upstream's (header changes applied, an upgrade
    /// bridged), or a local reply for a failure.
    fn respond(
        self,
        mut ex: Exchange,
        attempted: Attempted,
        guard: RequestGuard,
        deadline: Option<tokio::time::Instant>,
    ) -> Response<Body> {
        let last = match attempted {
            Attempted::NoHealthy => return ex.reply(LocalReply::NoHealthyUpstream),
            Attempted::GlobalTimeout => {
                let cut = *self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((endpoint, sent)) = cut {
                    self.chose(&mut ex, endpoint);
                    ex.log.upstream_service_time = Some(millis(sent.elapsed()));
                }
                return ex.reply(LocalReply::Timeout);
            }
            Attempted::Done(last) => *last,
        };
        self.chose(&mut ex, last.endpoint);
        if let Some(flag) = last.flag {
            ex.flag(flag);
        }
        let mut resp = match last.result {
            Ok(resp) => resp,
            Err(e) => {
                debug!(error = %e, "upstream request failed");
                if let UpstreamError::ConnectFailure(reason) = &e {
                    ex.log.upstream_transport_failure_reason = Some(reason.clone());
                }
                return ex.reply(LocalReply::for_error(&e));
            }
        };
        let upgraded = self.upgrade.is_some() && resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (Some(down), true) = (self.upgrade, upgraded) {
            server::bridge_upgrade(down, hyper::upgrade::on(&mut resp));
        }
        let ms = millis(last.upstream_time);
        ex.log.upstream_service_time = Some(ms);
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, upgraded);
        self.levels.response(&mut parts.headers);
        if self.m.vhost.include_attempt_count_in_response {
            parts
                .headers
                .insert("x-envoy-attempt-count", HeaderValue::from(last.attempts));
        }
        parts
            .headers
            .insert("x-envoy-upstream-service-time", HeaderValue::from(ms));
        // The request stays active (max_requests) and under the route timeout until its
        // response body is done.
        ex.finish(Response::from_parts(parts, Held::wrap(body, guard, deadline)))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn pick_weighted(ra: &RouteAction) -> &crate::route::WeightedCluster {
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

/// The hash for RING_HASH / MAGLEV from the route's hash policies, as Envoy computes it:
/// xxHash64 of each value, combined `(acc << 1) ^ h`, until a terminal policy yields.
fn request_hash(ra: &RouteAction, head: &Head, source: SocketAddr) -> Option<u64> {
    let (headers, path) = (&head.headers, head.uri.path_and_query().map_or("/", |p| p.as_str()));
    let mut acc: Option<u64> = None;
    for hp in &ra.hash_policy {
        let (value, terminal): (Option<String>, bool) = match hp {
            HashPolicy::Header { name, terminal } => (headers::header_str(headers, name), *terminal),
            HashPolicy::QueryParameter { name, terminal } => (query_param(path, name), *terminal),
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

fn query_param(path: &str, name: &str) -> Option<String> {
    path.split_once('?').and_then(|(_, q)| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| v.to_string())
        })
    })
}

#[cfg(test)]
mod tests;
