//! L7 on the inbound side, as an Istio sidecar's inbound listener: a pod's connection to an HTTP
//! port (one with a route table, or behind a service port that has one) or to a pod with HTTP
//! authorization policies is served as HTTP, request by request. Each request is authorized
//! (a denial is Envoy's `403 RBAC: access denied`, flag `RBAC`), passed to the app in the
//! downstream's HTTP version through the same upstream send path as routed requests (the
//! `inbound|<port>||` cluster), and reported with `reporter="destination"` in the request
//! metrics and the access log, so Kiali and dashboards see both ends as they do with sidecars.
use std::{net::SocketAddr, sync::Arc};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{
    authority_of,
    body::boxed,
    headers,
    local_reply::LocalReply,
    observe::{AccessLog, Exchange, Reporter},
    path, server,
};
use crate::{
    authz::RequestAttrs,
    connections::Drain,
    identity::Identity,
    metrics::TcpLabels,
    service::Service,
    upstream::{Body, ClusterState, Connect},
};

/// What inbound HTTP needs from the destination pod (the pod composition implements it; tests
/// fake it).
pub trait Inbound: Send + Sync {
    /// The pod's name, for logs.
    fn name(&self) -> String;
    /// Whether each request is authorized (a policy with HTTP fields applies).
    fn needs_request_authz(&self) -> bool;
    /// Applies the authorization policies to one request; a denial is logged and counted.
    fn authorize(&self, peer: SocketAddr, identity: Option<&Identity>, dst: SocketAddr, request: RequestAttrs) -> bool;
    /// The service a request for `authority` to `port` was for, as Istio's destination reporter
    /// names it; `None` leaves the labels `unknown`.
    fn destination_service(&self, authority: &str, port: u16) -> Option<Arc<Service>>;
}

/// One downstream connection to the pod's app.
pub struct Delivery {
    pub pod: Arc<dyn Inbound>,
    pub peer: SocketAddr,
    /// The peer's mTLS identity (`None`: plaintext).
    pub identity: Option<Identity>,
    /// The destination pod's own identity (`By=` of the `x-forwarded-client-cert` it gets).
    pub own_identity: Identity,
    /// The app's address (the pod's IP and the port dialled).
    pub dst: SocketAddr,
    /// The connection's Istio labels (`reporter="destination"`, peers, principals).
    pub labels: TcpLabels,
    pub reporter: Reporter,
    /// `inbound|<port>||`: the app's connections (a closed one is reopened).
    pub app: Arc<ClusterState>,
    /// Dials the app inside the pod.
    pub connector: Arc<dyn Connect>,
    /// Timeouts and stream cap of the downstream connection.
    pub server: server::ServerLimits,
    /// The node's shutdown: the connection closes gracefully.
    pub drain: Drain,
}

/// Serves `downstream` as HTTP until it closes.
pub async fn serve<IO>(downstream: IO, conn: Arc<Delivery>)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (peer, dst, drain, limits) = (conn.peer, conn.dst, conn.drain.clone(), conn.server);
    let handle = move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { deliver(&conn, req).await }
    };
    if let Err(e) = server::serve_connection(downstream, handle, limits, drain).await {
        debug!(%peer, %dst, error = %e, "inbound HTTP connection ended with an error");
    }
}

/// Authorizes one request and passes it to the app.
pub async fn deliver(conn: &Delivery, mut req: Request<Incoming>) -> Response<Body> {
    headers::ensure_request_id(req.headers_mut());
    // Normalized before anything looks at the path: authorization matches what the app gets.
    let normalized = normalize_uri(&mut req);
    let authority = authority_of(&req);
    let full_log = conn.reporter.access_log.is_some();
    let mut log = AccessLog::for_request(&req, &authority, conn.peer, conn.dst, full_log);
    if full_log {
        log.upstream_cluster = Some(format!("inbound|{}||", conn.dst.port()));
    }
    let mut labels = conn.labels.clone();
    if let Some(s) = conn.pod.destination_service(&authority, conn.dst.port()) {
        labels.destination_service = s.hostname.clone();
        labels.destination_service_name = s.name.clone();
        labels.destination_service_namespace = s.namespace.clone();
    }
    let mut ex = Exchange::new(log, labels, headers::is_grpc(req.headers()), conn.reporter.clone());
    if let Err(e) = normalized {
        debug!(pod = %conn.pod.name(), peer = %conn.peer, error = %e, "request path refused");
        return ex.reply(LocalReply::BadPath);
    }
    if let Err(reply) = check_authority(&req) {
        return ex.reply(reply);
    }
    let upgrade = match upgrade_verdict(req.headers()) {
        Upgrade::Refused => return ex.reply(LocalReply::UpgradeRefused),
        Upgrade::Allowed => Some(hyper::upgrade::on(&mut req)),
        Upgrade::None | Upgrade::Dropped => None,
    };
    if conn.pod.needs_request_authz() {
        let attrs = RequestAttrs {
            method: req.method().to_string(),
            path: path::authz_path(req.uri().path()),
            host: crate::route::strip_port(&authority).to_ascii_lowercase(),
            headers: req.headers().clone(),
        };
        if !conn.pod.authorize(conn.peer, conn.identity.as_ref(), conn.dst, attrs) {
            return ex.reply(LocalReply::RbacDenied);
        }
    }
    if ex.logging() {
        ex.log.upstream_host = Some(conn.dst.to_string());
    }
    // An allowed upgrade (WebSocket) is passed to the app and, after its 101, bridged byte for
    // byte.
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    set_peer_headers(&mut parts.headers, conn);
    let version = parts.version;
    let req = Request::from_parts(parts, boxed(body));
    match conn.app.send(conn.connector.as_ref(), conn.dst, version, req).await {
        Ok(mut resp) => {
            let upgraded = upgrade.is_some() && resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            if let (Some(down), true) = (upgrade, upgraded) {
                server::bridge_upgrade(down, hyper::upgrade::on(&mut resp));
            }
            headers::strip_hop_by_hop(resp.headers_mut(), upgraded);
            ex.finish(resp)
        }
        Err(e) => {
            debug!(pod = %conn.pod.name(), dst = %conn.dst, error = %e, "request to the application failed");
            ex.reply(LocalReply::for_error(&e))
        }
    }
}

/// What an inbound request's `Upgrade` gets. Istio's sidecar inbound allows WebSocket only
/// (`upgrade_configs: [websocket]`); `h2c` is dropped and the request served as plain HTTP/1.1,
/// as Envoy's codec does; anything else is refused with 403 (Envoy's `upgrade_failed`).
#[derive(Debug, PartialEq, Eq)]
enum Upgrade {
    None,
    Allowed,
    Dropped,
    Refused,
}

/// The upgrades the inbound side bridges.
const ALLOWED_UPGRADES: [&str; 1] = ["websocket"];

fn upgrade_verdict(h: &http::HeaderMap) -> Upgrade {
    if !h.contains_key(http::header::UPGRADE) {
        return Upgrade::None;
    }
    match headers::upgrade(h).map(str::trim) {
        Some(u) if ALLOWED_UPGRADES.iter().any(|a| a.eq_ignore_ascii_case(u)) => Upgrade::Allowed,
        Some(u) if u.eq_ignore_ascii_case("h2c") => Upgrade::Dropped,
        _ => Upgrade::Refused,
    }
}

/// One `Host` at most, and it names the same host as `:authority` (or an absolute URI's
/// authority): the app and authorization must not see two different hosts.
fn check_authority<B>(req: &Request<B>) -> Result<(), LocalReply> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(LocalReply::MultipleHosts);
    }
    match (req.uri().authority(), host) {
        (Some(a), Some(h)) if !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()) => {
            Err(LocalReply::AuthorityMismatch)
        }
        _ => Ok(()),
    }
}

/// Headers a peer could forge about itself never reach the app: the client's
/// `x-forwarded-client-cert` and `x-envoy-peer-metadata*` go. An mTLS peer's XFCC is set from
/// its verified certificate (`By=<this pod>;URI=<peer>`): Istio's sidecar inbound appends to the
/// client's (`APPEND_FORWARD`), which a plaintext or ztunnel peer could forge, so nodeway sets
/// it whole (Envoy's `SANITIZE_SET`).
fn set_peer_headers(h: &mut http::HeaderMap, conn: &Delivery) {
    h.remove("x-forwarded-client-cert");
    h.remove("x-envoy-peer-metadata");
    h.remove("x-envoy-peer-metadata-id");
    if let Some(peer) = &conn.identity {
        let xfcc = format!("By={};URI={}", conn.own_identity, peer);
        h.insert("x-forwarded-client-cert", headers::value(&xfcc));
    }
}

/// Replaces the request's path with its normalized form ([`path::normalize`]); the URI keeps
/// its scheme and authority (HTTP/2, absolute form).
fn normalize_uri<B>(req: &mut Request<B>) -> Result<(), path::PathError> {
    let Some(original) = req.uri().path_and_query().map(|p| p.as_str().to_string()) else {
        return Ok(());
    };
    let normalized = path::normalize(&original)?;
    if normalized == original {
        return Ok(());
    }
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(normalized.parse().map_err(|_| path::PathError::Unrepresentable)?);
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| path::PathError::Unrepresentable)?;
    Ok(())
}

#[cfg(test)]
mod tests;
