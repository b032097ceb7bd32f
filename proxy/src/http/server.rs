//! The downstream side's HTTP server, one builder for outbound and inbound alike: HTTP/1.1 and
//! h2c by the first bytes, upgrades passed through, and the limits that keep a hostile or dead
//! client from holding a connection forever.
use std::{
    error::Error as StdError,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::{
    connections::Drain,
    transport::{
        h2::Http2Guards,
        idle::{Activity, Expired, IdleLimits, InFlight},
    },
    upstream::Body,
};

/// The limits of every downstream HTTP connection (set from [`crate::config::Config`]).
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// A request's headers must arrive whole within this; the first request's too (HTTP/2: the
    /// preface and the first HEADERS). A client that is slower is disconnected.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection; more are refused (`REFUSED_STREAM`).
    pub max_concurrent_streams: u32,
    /// HTTP/2 PING every `keepalive_interval`; no answer within `keepalive_timeout` closes.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Header-list size and reset-stream bounds of h2c connections.
    pub http2_guards: Http2Guards,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(3600),
            max_concurrent_streams: 1024,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            http2_guards: Http2Guards::default(),
        }
    }
}

/// How long a connection that expired without a request gets to close gracefully.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves `io` as HTTP, each request with `handle`, until the client closes it, the
/// connection expires (no request in time, idle), or, once `drain` fires, until the requests in
/// flight are done.
pub async fn serve_connection<IO, F, Fut>(
    io: IO,
    handle: F,
    limits: ServerLimits,
    drain: Drain,
) -> Result<(), Box<dyn StdError + Send + Sync>>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = builder(&limits);
    let activity = Activity::new();
    let counted = activity.clone();
    let handle = Arc::new(handle);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (handle, guard) = (handle.clone(), counted.start());
        async move { Ok::<_, std::convert::Infallible>(hold(handle(req).await, guard)) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle = IdleLimits {
        first_request: limits.header_read_timeout,
        idle: Some(limits.idle_timeout),
    };
    tokio::select! {
        r = conn.as_mut() => return r,
        () = drain.started() => conn.as_mut().graceful_shutdown(),
        why = activity.expired(idle) => {
            conn.as_mut().graceful_shutdown();
            if why == Expired::NoRequest {
                debug!("no request within the header-read timeout: connection closed");
                // No more time than a GOAWAY takes to send (an HTTP/2 client that connected
                // early and sent nothing yet is told to reconnect).
                return tokio::time::timeout(CLOSE_GRACE, conn).await.unwrap_or(Ok(()));
            }
        }
    }
    conn.await
}

/// The response body keeps its request in flight until it ends (or is dropped).
fn hold(resp: Response<Body>, guard: InFlight) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        Holding {
            inner: body,
            _guard: guard,
        }
        .boxed(),
    )
}

/// A response body and the guard it keeps.
struct Holding {
    inner: Body,
    _guard: InFlight,
}

impl hyper::body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn builder(limits: &ServerLimits) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_header_list_size(limits.http2_guards.max_header_list_size)
        .max_pending_accept_reset_streams(limits.http2_guards.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.http2_guards.max_local_error_reset_streams);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // A client that half-closes after its request still gets the response.
        .half_close(true);
    builder
}

/// Copies bytes both ways between the upgraded downstream and upstream connections.
pub fn bridge_upgrade(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn limits() -> ServerLimits {
        ServerLimits {
            header_read_timeout: Duration::from_millis(200),
            ..ServerLimits::default()
        }
    }

    /// A connection served with a handler that answers 200 "ok"; the client's end.
    fn connection(limits: ServerLimits) -> DuplexStream {
        let (near, far) = tokio::io::duplex(1 << 16);
        let handle = |_req: Request<Incoming>| async { Response::new(super::super::body::full("ok".into())) };
        tokio::spawn(serve_connection(far, handle, limits, Drain::never()));
        near
    }

    /// Reads until the server closes the connection (bounded, so a hang fails the test).
    async fn read_to_close(c: &mut DuplexStream) -> Vec<u8> {
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got)).await;
        read.expect("the server closes the connection").expect("read");
        got
    }

    #[tokio::test]
    async fn a_partial_request_line_is_disconnected_while_a_sibling_is_served() {
        let mut slow = connection(limits());
        slow.write_all(b"GET /slow HTT").await.unwrap();
        let mut good = connection(limits());
        good.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = String::from_utf8(read_to_close(&mut good).await).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        let got = read_to_close(&mut slow).await;
        assert!(!String::from_utf8_lossy(&got).contains("200"), "no request was served");
    }

    #[tokio::test]
    async fn a_partial_http2_preface_is_disconnected() {
        let mut slow = connection(limits());
        slow.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        read_to_close(&mut slow).await;
    }

    #[tokio::test]
    async fn a_second_request_whose_headers_stall_is_disconnected() {
        let mut c = connection(limits());
        c.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 256];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        c.write_all(b"GET /again HTTP/1.1\r\nhost:").await.unwrap();
        read_to_close(&mut c).await;
    }
}
