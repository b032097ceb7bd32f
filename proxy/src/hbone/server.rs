//! The HBONE server: TLS with the pod's certificate, then HTTP/2 `CONNECT`s. Each valid CONNECT
//! is handed to a [`ConnectHandler`], which admits it (200) or refuses it with a status.
use std::{fmt::Display, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::{keepalive, stream::H2Stream, HboneConfig};
use crate::{
    identity::Identity,
    transport::{
        self,
        h2::Http2Guards,
        idle::{Activity, IdleLimits},
        Serving,
    },
};

/// A CONNECT stream, after the 200.
pub type HboneStream = H2Stream;

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

    /// Sets up an admitted tunnel and returns what serves it until it ends (see
    /// [`Serving`]).
    fn serve(
        self: Arc<Self>,
        req: ConnectRequest,
        admitted: Self::Admitted,
        stream: HboneStream,
    ) -> impl Future<Output = Serving> + Send;

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
    let first = IdleLimits {
        first_request: settings.first_connect_timeout,
        idle: None,
    };
    let accept = accept_connects(tls, peer, peer_identity, &settings, handler, &activity);
    tokio::select! {
        () = accept => {}
        _ = activity.expired(first) => debug!(%peer, "no CONNECT in time: HBONE connection closed"),
    }
}

/// Runs the HTTP/2 connection (and its keepalive), handing each request to its own task, until
/// the connection ends.
async fn accept_connects<H: ConnectHandler, T>(
    tls: T,
    peer: SocketAddr,
    peer_identity: Identity,
    settings: &ServerSettings,
    handler: Arc<H>,
    activity: &Arc<Activity>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let c = &settings.config;
    let mut conn = match http2_builder(c, &settings.http2_guards)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(conn) => conn,
        Err(e) => return debug!(%peer, error = %e, "HBONE HTTP/2 handshake failed"),
    };
    let alive = match conn.ping_pong() {
        Some(p) => keepalive::until_dead(p, c.keepalive_interval, c.keepalive_timeout),
        None => return,
    };
    let accept = async {
        while let Some(next) = conn.accept().await {
            match next {
                Ok((req, respond)) => {
                    drop(activity.start());
                    let (h, id) = (handler.clone(), peer_identity.clone());
                    tokio::spawn(transport::set_up_then_serve(handle_connect(req, respond, peer, id, h)));
                }
                Err(e) => return debug!(%peer, error = %e, "HBONE connection ended"),
            }
        }
    };
    tokio::select! {
        () = accept => {}
        () = alive => debug!(%peer, "HBONE peer did not answer the keepalive: connection closed"),
    }
}

/// A refused request's body (and trailers) is read before the answer, within bounds, so the
/// stream's remaining frames are still checked as HTTP/2 requires (a malformed trailer gets its
/// `PROTOCOL_ERROR`, not a race with the closed stream) and a client that sends its body first
/// sees the answer rather than a reset.
async fn drain_refused_request(mut body: RecvStream) {
    const LIMIT: usize = 64 << 10;
    const WAIT: Duration = Duration::from_secs(1);
    let drain = async {
        let mut read = 0;
        while let Some(Ok(chunk)) = body.data().await {
            read += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
            if read > LIMIT {
                return;
            }
        }
        let _ = body.trailers().await;
    };
    let _ = tokio::time::timeout(WAIT, drain).await;
}

fn http2_builder(c: &HboneConfig, g: &Http2Guards) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(c.stream_window)
        .initial_connection_window_size(c.connection_window)
        .max_frame_size(c.max_frame_size)
        .max_concurrent_streams(c.max_streams)
        .max_header_list_size(g.max_header_list_size)
        .max_pending_accept_reset_streams(g.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(g.max_local_error_reset_streams))
        .max_send_buffer_size(super::MAX_SEND_BUFFER);
    b
}

/// A refusal: its status, and a short `text/plain` body saying why (what a user with curl sees).
fn send_refusal(mut respond: SendResponse<Bytes>, code: StatusCode, why: &str) -> Serving {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(mut body) = respond.send_response(r, false) {
        let _ = body.send_data(Bytes::from(format!("{why}\n")), true);
    }
    transport::served()
}

async fn handle_connect<H: ConnectHandler>(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    peer_identity: Identity,
    handler: Arc<H>,
) -> Serving {
    if req.method() != Method::CONNECT {
        let why = format!("HBONE request {} is not CONNECT", req.method());
        handler.refused(peer, Refusal::NotConnect, &why);
        drain_refused_request(req.into_body()).await;
        let why = format!("{why}: this is an HBONE port, only CONNECT is served");
        return send_refusal(respond, StatusCode::METHOD_NOT_ALLOWED, &why);
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        let why = format!("HBONE CONNECT {} has no IP:port target", req.uri());
        handler.refused(peer, Refusal::BadTarget, &why);
        return send_refusal(respond, StatusCode::BAD_REQUEST, &why);
    };
    let connect = ConnectRequest {
        peer,
        peer_identity,
        target,
    };
    let admitted = match handler.admit(&connect).await {
        Ok(a) => a,
        Err(r) => {
            let why = format!("HBONE CONNECT {target} refused: {}", r.reason);
            return send_refusal(respond, r.status, &why);
        }
    };
    match respond.send_response(Response::new(()), false) {
        Ok(send) => {
            handler
                .serve(connect, admitted, H2Stream::new(send, req.into_body()))
                .await
        }
        Err(e) => {
            debug!(%peer, error = %e, "HBONE CONNECT answered too late: the stream is gone");
            transport::served()
        }
    }
}
