//! The downstream side's HTTP server, one builder for outbound and inbound alike: HTTP/1.1 and
//! h2c by the first bytes, upgrades passed through.
use std::error::Error as StdError;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::{connections::Drain, upstream::Body};

/// Concurrent HTTP/2 streams per downstream connection.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Serves `io` as HTTP with `service` until the client closes it, or, once `drain` fires,
/// until the requests in flight are done.
pub async fn serve_connection<IO, S>(io: IO, service: S, drain: Drain) -> Result<(), Box<dyn StdError + Send + Sync>>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    // A client that half-closes after its request still gets the response.
    builder.http1().half_close(true);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        () = drain.started() => conn.as_mut().graceful_shutdown(),
    }
    conn.await
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
