//! L7 on the inbound side, as an Istio sidecar's inbound listener: a pod's connection to an HTTP
//! port (one with a route table, or behind a service port that has one) or to a pod with HTTP
//! authorization policies is served as HTTP, request by request. Each request is authorized
//! (a denial is Envoy's `403 RBAC: access denied`, flag `RBAC`), passed to the app in the
//! downstream's HTTP version, and reported with `reporter="destination"` in the request metrics
//! and the access log, so Kiali and dashboards see both ends as they do with sidecars.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use http::{header, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};
use tracing::debug;

use super::{
    authority_of, bridge_upgrade, ensure_request_id, full_static, is_grpc,
    observe::{AccessLog, Observed, Report},
};
use crate::{
    authz::RequestAttrs, connections::ConnectionInfo, identity::Identity, inbound::Inbound as PodProxy, metrics::TcpLabels,
    service::Service, upstream::Body,
};

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

struct Inbound {
    pod: Arc<PodProxy>,
    peer: SocketAddr,
    identity: Option<Identity>,
    dst: SocketAddr,
    /// The connection's Istio labels (`reporter="destination"`, peers, principals).
    labels: TcpLabels,
    /// The connection to the app: the one opened before serving is used by the first request,
    /// in that request's HTTP version; a closed one is reopened.
    app: Mutex<(Option<TcpStream>, Option<Sender>)>,
}

/// Serves `downstream` as HTTP until it closes; `app` is the (already connected) socket to the
/// application. The connection stays in the connection table while it lasts.
pub async fn serve<D>(
    downstream: D,
    app: TcpStream,
    pod: Arc<PodProxy>,
    identity: Option<Identity>,
    info: ConnectionInfo,
) where
    D: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (peer, dst) = (info.source, info.destination);
    let labels = info.labels.clone();
    let _guard = pod.connections.open(info);
    let ctx = Arc::new(Inbound {
        pod,
        peer,
        identity,
        dst,
        labels,
        app: Mutex::new((Some(app), None)),
    });
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().half_close(true);
    builder.http2().max_concurrent_streams(1024);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(downstream), service)
        .await
    {
        debug!(%peer, %dst, error = %e, "inbound HTTP connection ended with an error");
    }
}

async fn handle(ctx: Arc<Inbound>, mut req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    ensure_request_id(req.headers_mut());
    let authority = authority_of(&req);
    let mut log = AccessLog::for_request(&req, &authority, ctx.peer, ctx.dst);
    log.upstream_cluster = Some(format!("inbound|{}||", ctx.dst.port()));
    let mut labels = ctx.labels.clone();
    if let Some(s) = destination_service(&ctx.pod, &authority, ctx.dst.port()) {
        labels.destination_service = s.hostname.clone();
        labels.destination_service_name = s.name.clone();
        labels.destination_service_namespace = s.namespace.clone();
    }
    let mut report = Report {
        metrics: ctx.pod.connections.metrics().clone(),
        labels,
        request_protocol: if is_grpc(req.headers()) { "grpc" } else { "http" },
        log,
        started,
        access_log: ctx.pod.access_log,
    };
    if ctx.pod.needs_http_authz() {
        let attrs = RequestAttrs {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            host: crate::route::strip_port(&authority).to_ascii_lowercase(),
            headers: req.headers().clone(),
        };
        let arrival = crate::inbound::Arrival {
            peer: ctx.peer,
            peer_identity: ctx.identity.clone(),
            dst: ctx.dst,
        };
        if ctx.pod.authorize(&arrival, Some(attrs)).is_err() {
            let mut r = Response::new(full_static("RBAC: access denied"));
            *r.status_mut() = StatusCode::FORBIDDEN;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
            return observed(r, report, "RBAC");
        }
    }
    report.log.upstream_host = Some(ctx.dst.to_string());

    // An upgrade (WebSocket) is passed to the app and, after its 101, bridged byte for byte.
    let downstream_upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let req = req.map(|b| b.map_err(|e| Box::new(e) as _).boxed());
    match send(&ctx, req).await {
        Ok(mut resp) => {
            if let (Some(down), StatusCode::SWITCHING_PROTOCOLS) = (downstream_upgrade, resp.status()) {
                bridge_upgrade(down, hyper::upgrade::on(&mut resp));
            }
            observed(resp.map(|b| b.map_err(|e| Box::new(e) as _).boxed()), report, "-")
        }
        Err((flag, why)) => {
            debug!(pod = %ctx.pod.name(), dst = %ctx.dst, error = %why, "request to the application failed");
            observed(unavailable(), report, flag)
        }
    }
}

/// Sends one request to the app, on the connection made for this downstream connection (opened
/// again if the app closed it). HTTP/1.1 requests arrive one at a time, HTTP/2 ones share it.
/// An error carries Envoy's flag: `UF` when no connection could be made, `UC` when it broke.
async fn send(ctx: &Inbound, req: Request<Body>) -> Result<Response<Incoming>, (&'static str, String)> {
    let version = req.version();
    let mut app = ctx.app.lock().await;
    let usable = match &app.1 {
        Some(Sender::H1(s)) => version != Version::HTTP_2 && !s.is_closed(),
        Some(Sender::H2(s)) => version == Version::HTTP_2 && !s.is_closed(),
        None => false,
    };
    if !usable {
        let stream = match app.0.take() {
            Some(s) => s,
            None => ctx.pod.dialer.connect(ctx.dst).await.map_err(|e| ("UF", e.to_string()))?,
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        app.1 = Some(if version == Version::HTTP_2 {
            let (s, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| ("UF", format!("HTTP/2 handshake: {e}")))?;
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = http1::handshake(io)
                .await
                .map_err(|e| ("UF", format!("HTTP/1.1 handshake: {e}")))?;
            tokio::spawn(conn.with_upgrades());
            Sender::H1(s)
        });
    }
    let sent = match app.1.as_mut() {
        Some(Sender::H1(s)) => {
            s.ready().await.map_err(|e| ("UC", e.to_string()))?;
            s.send_request(req)
        }
        Some(Sender::H2(s)) => {
            let mut s = s.clone();
            drop(app);
            return s.send_request(req).await.map_err(|e| ("UC", e.to_string()));
        }
        None => return Err(("UF", "no connection".into())),
    };
    drop(app);
    sent.await.map_err(|e| ("UC", e.to_string()))
}

/// Reports the request (metrics, access log) with `flag` when the response body ends.
fn observed(resp: Response<Body>, mut report: Report, flag: &str) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    report.log.response_flags = flag.to_string();
    report.log.response_code = parts.status.as_u16();
    Response::from_parts(parts, Observed::new(body, report).boxed())
}

fn unavailable() -> Response<Body> {
    let mut r = Response::new(full_static("upstream connect error or disconnect/reset before headers"));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r
}

/// The service a request to this pod was for, as Istio's destination reporter names it: the
/// service the authority names (FQDN, short name, or VIP), else the one service of the pod
/// whose target port this is; `None` leaves the labels `unknown`.
fn destination_service(pod: &PodProxy, authority: &str, port: u16) -> Option<Arc<Service>> {
    let services = pod.state.services();
    let host = crate::route::strip_port(authority).to_ascii_lowercase();
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        if let Some(s) = services.by_vip(ip) {
            return Some(s.clone());
        }
    }
    // `name.namespace.svc.<domain>`: the resource is keyed `namespace/hostname`.
    if let Some(ns) = host.split('.').nth(1) {
        if let Some(s) = services.get(&format!("{ns}/{host}")) {
            return Some(s.clone());
        }
    }
    let workload = pod.mesh_workload();
    let own: Vec<&Arc<Service>> = workload.services.iter().filter_map(|k| services.get(k)).collect();
    let short = |s: &Service| {
        host == s.name
            || host == format!("{}.{}", s.name, s.namespace)
            || host.starts_with(&format!("{}.{}.", s.name, s.namespace))
    };
    if let Some(s) = own.iter().find(|s| short(s)) {
        return Some((*s).clone());
    }
    let mut by_port = own.iter().filter(|s| {
        s.ports
            .iter()
            .any(|p| p.target_port == port || (p.target_port == 0 && p.service_port == port))
    });
    match (by_port.next(), by_port.next()) {
        (Some(s), None) => Some((*s).clone()),
        _ => None,
    }
}
