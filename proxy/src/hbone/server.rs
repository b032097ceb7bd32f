//! The HBONE server: TLS with the pod's certificate, then HTTP/2 `CONNECT`s. Each valid CONNECT
//! is handed to a [`ConnectHandler`], which admits it (200) or refuses it with a status.
use std::{fmt::Display, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::HboneConfig;
use crate::{
    identity::Identity,
    transport::{
        h2::Http2Guards,
        idle::{Activity, IdleLimits},
    },
};

/// A CONNECT stream, after the 200.
pub type HboneStream = TokioIo<hyper::upgrade::Upgraded>;

/// One CONNECT as the server saw it.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The TCP peer (the source node's address).
    pub peer: SocketAddr,
    /// The peer's SPIFFE identity, from its certificate.
    pub peer_identity: Identity,
    /// The CONNECT authority: where the tunnel should lead.
    pub target: SocketAddr,
}

/// Why the server refused a connection or a stream before any handler saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    TlsHandshake,
    TrustDomain,
    PeerIdentity,
    NotConnect,
    BadTarget,
}

impl Refusal {
    /// The `reason` label of `nodeway_inbound_refused_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::TrustDomain => "trust_domain",
            Refusal::PeerIdentity => "peer_identity",
            Refusal::NotConnect => "not_connect",
            Refusal::BadTarget => "connect_target",
        }
    }
}

/// A CONNECT the handler refused: its status, and why in a few words (the peer sees them as the
/// body, as curl users expect from a refusal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
}

/// What a pod does with the tunnels it is offered.
pub trait ConnectHandler: Send + Sync + 'static {
    /// What admission hands to [`ConnectHandler::serve`] (e.g. the connection to the app).
    type Admitted: Send + 'static;

    /// Decides a CONNECT before it is answered: `Ok` → 200, `Err(rejection)` → its status, a
    /// body saying why, and no stream. Refusals are the handler's to log and count.
    fn admit(&self, req: &ConnectRequest) -> impl Future<Output = Result<Self::Admitted, Rejection>> + Send;

    /// Serves an admitted tunnel until it ends.
    fn serve(
        self: Arc<Self>,
        req: ConnectRequest,
        admitted: Self::Admitted,
        stream: HboneStream,
    ) -> impl Future<Output = ()> + Send;

    /// Logs and counts a refusal the server made on its own.
    fn refused(&self, peer: SocketAddr, reason: Refusal, detail: &dyn Display);
}

/// TLS and HTTP/2 settings of one pod's HBONE server.
pub struct ServerSettings {
    pub tls: super::tls::PodAcceptor,
    pub trust_domain: String,
    pub config: HboneConfig,
    /// After the TLS handshake, the first CONNECT must arrive within this (a peer that never
    /// speaks HTTP/2 is disconnected).
    pub first_connect_timeout: Duration,
    /// Header-list size and reset-stream bounds (rapid reset, CONTINUATION floods).
    pub http2_guards: Http2Guards,
}

/// Serves one pod's HBONE socket until the task is aborted (pod released).
pub async fn serve<H: ConnectHandler>(listener: TcpListener, settings: Arc<ServerSettings>, handler: Arc<H>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Many streams share the connection: a small response must not wait for the ACK of
        // another stream's data (Nagle).
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve_connection(tcp, peer, settings.clone(), handler.clone()));
    }
}

async fn serve_connection<H: ConnectHandler>(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    settings: Arc<ServerSettings>,
    handler: Arc<H>,
) {
    let c = &settings.config;
    let tls = match tokio::time::timeout(c.handshake_timeout, settings.tls.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return handler.refused(
                peer,
                Refusal::TlsHandshake,
                &format!("HBONE TLS handshake refused: {e}"),
            );
        }
        Err(_) if !settings.tls.has_certificate() => {
            let why = "HBONE TLS handshake refused: the pod has no certificate yet (timeout)";
            return handler.refused(peer, Refusal::TlsHandshake, &why);
        }
        Err(_) => return handler.refused(peer, Refusal::TlsHandshake, &"HBONE TLS handshake refused: timeout"),
    };
    let peer_identity = match super::tls::peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(id) if id.trust_domain == settings.trust_domain => id,
        Ok(id) => {
            let why = format!("HBONE peer {id} is not in trust domain {}", settings.trust_domain);
            return handler.refused(peer, Refusal::TrustDomain, &why);
        }
        Err(e) => return handler.refused(peer, Refusal::PeerIdentity, &format!("HBONE peer identity: {e}")),
    };
    // Tunnels outlive their CONNECT: only the first one is waited for; idle pooled connections
    // are the client's to close, dead ones the keepalive's.
    let activity = Activity::new();
    let (h, seen) = (handler.clone(), activity.clone());
    let service = hyper::service::service_fn(move |req| {
        drop(seen.start());
        let (h, peer_identity) = (h.clone(), peer_identity.clone());
        async move { Ok::<_, std::convert::Infallible>(handle_connect(req, peer, peer_identity, h).await) }
    });
    let conn = http2_builder(c, &settings.http2_guards).serve_connection(TokioIo::new(tls), service);
    let first = IdleLimits {
        first_request: settings.first_connect_timeout,
        idle: None,
    };
    tokio::select! {
        r = conn => if let Err(e) = r {
            debug!(%peer, error = %e, "HBONE connection ended");
        },
        _ = activity.expired(first) => debug!(%peer, "no CONNECT in time: HBONE connection closed"),
    }
}

/// A refused request's body (and trailers) is read before the answer, within bounds, so the
/// stream's remaining frames are still checked as HTTP/2 requires (a malformed trailer gets its
/// `PROTOCOL_ERROR`, not a race with the closed stream) and a client that sends its body first
/// sees the answer rather than a reset.
async fn drain_refused_request(body: hyper::body::Incoming) {
    use http_body_util::BodyExt;
    const LIMIT: usize = 64 << 10;
    const WAIT: Duration = Duration::from_secs(1);
    let _ = tokio::time::timeout(WAIT, http_body_util::Limited::new(body, LIMIT).collect()).await;
}

fn http2_builder(c: &HboneConfig, g: &Http2Guards) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(c.stream_window)
        .initial_connection_window_size(c.connection_window)
        .max_frame_size(c.max_frame_size)
        .max_concurrent_streams(c.max_streams)
        .max_header_list_size(g.max_header_list_size)
        .max_pending_accept_reset_streams(g.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(g.max_local_error_reset_streams)
        .keep_alive_interval(c.keepalive_interval)
        .keep_alive_timeout(c.keepalive_timeout);
    b
}

/// The body of every HBONE reply: empty, or a short text saying why a request was refused.
pub type ReplyBody = Full<Bytes>;

fn reply(code: StatusCode) -> Response<ReplyBody> {
    let mut r = Response::new(Full::default());
    *r.status_mut() = code;
    r
}

/// A refusal with a short `text/plain` body saying why (what a user with curl sees).
fn refuse(code: StatusCode, why: &str) -> Response<ReplyBody> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{why}\n"))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle_connect<H: ConnectHandler>(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    peer_identity: Identity,
    handler: Arc<H>,
) -> Response<ReplyBody> {
    if req.method() != Method::CONNECT {
        let why = format!("HBONE request {} is not CONNECT", req.method());
        handler.refused(peer, Refusal::NotConnect, &why);
        drain_refused_request(req.into_body()).await;
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{why}: this is an HBONE port, only CONNECT is served"),
        );
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        let why = format!("HBONE CONNECT {} has no IP:port target", req.uri());
        handler.refused(peer, Refusal::BadTarget, &why);
        return refuse(StatusCode::BAD_REQUEST, &why);
    };
    let connect = ConnectRequest {
        peer,
        peer_identity,
        target,
    };
    let admitted = match handler.admit(&connect).await {
        Ok(a) => a,
        Err(r) => return refuse(r.status, &format!("HBONE CONNECT {target} refused: {}", r.reason)),
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(up) => handler.serve(connect, admitted, TokioIo::new(up)).await,
            Err(e) => debug!(%peer, error = %e, "HBONE upgrade failed"),
        }
    });
    reply(StatusCode::OK)
}
