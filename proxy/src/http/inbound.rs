//! L7 on the inbound side: when an authorization policy with HTTP fields applies to a pod, its
//! inbound connections (plaintext or HBONE streams) are served as HTTP and every request is
//! checked; a denied one gets Envoy's `403 RBAC: access denied`, the rest go to the app over one
//! upstream connection per downstream connection.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
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

use crate::{authz::RequestAttrs, connections::ConnectionInfo, identity::Identity, pod::PodProxy, upstream::Body};

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

struct Inbound {
    pod: Arc<PodProxy>,
    peer: SocketAddr,
    identity: Option<Identity>,
    dst: SocketAddr,
    /// The connection to the app, opened with the first request in its HTTP version.
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
    let _guard = pod.state.connections.open(info);
    let ctx = Arc::new(Inbound {
        pod,
        peer,
        identity,
        dst,
        app: Mutex::new((Some(app), None)),
    });
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().half_close(true);
    if let Err(e) = builder.serve_connection(TokioIo::new(downstream), service).await {
        debug!(%peer, %dst, error = %e, "inbound HTTP connection ended with an error");
    }
}

async fn handle(ctx: Arc<Inbound>, req: Request<Incoming>) -> Response<Body> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let attrs = RequestAttrs {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        host: crate::route::strip_port(&authority).to_ascii_lowercase(),
    };
    if !ctx
        .pod
        .authorize_request(ctx.peer, ctx.identity.as_ref(), ctx.dst, attrs)
    {
        let mut r = Response::new(full("RBAC: access denied"));
        *r.status_mut() = StatusCode::FORBIDDEN;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
        return r;
    }
    let version = req.version();
    let req = req.map(|b| b.map_err(|e| Box::new(e) as _).boxed());
    let sent = {
        let mut app = ctx.app.lock().await;
        if app.1.is_none() {
            let Some(stream) = app.0.take() else {
                return bad_gateway();
            };
            let io = TokioIo::new(stream);
            let sender = if version == Version::HTTP_2 {
                match http2::handshake(TokioExecutor::new(), io).await {
                    Ok((s, conn)) => {
                        tokio::spawn(conn);
                        Sender::H2(s)
                    }
                    Err(e) => {
                        debug!(error = %e, "HTTP/2 to the application failed");
                        return bad_gateway();
                    }
                }
            } else {
                match http1::handshake(io).await {
                    Ok((s, conn)) => {
                        tokio::spawn(conn);
                        Sender::H1(s)
                    }
                    Err(e) => {
                        debug!(error = %e, "HTTP/1.1 to the application failed");
                        return bad_gateway();
                    }
                }
            };
            app.1 = Some(sender);
        }
        match app.1.as_mut() {
            Some(Sender::H1(s)) => {
                if s.ready().await.is_err() {
                    return bad_gateway();
                }
                s.send_request(req)
            }
            Some(Sender::H2(s)) => {
                let mut s = s.clone();
                drop(app);
                return match s.send_request(req).await {
                    Ok(resp) => resp.map(|b| b.map_err(|e| Box::new(e) as _).boxed()),
                    Err(e) => {
                        debug!(error = %e, "request to the application failed");
                        bad_gateway()
                    }
                };
            }
            None => return bad_gateway(),
        }
    };
    match sent.await {
        Ok(resp) => resp.map(|b| b.map_err(|e| Box::new(e) as _).boxed()),
        Err(e) => {
            debug!(error = %e, "request to the application failed");
            bad_gateway()
        }
    }
}

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(full("upstream connect error or disconnect/reset before headers"));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r
}

fn full(s: &'static str) -> Body {
    Full::new(Bytes::from_static(s.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}
