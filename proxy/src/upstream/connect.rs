//! How the upstream side gets byte streams: a [`Connect`] per source. The pools never learn what
//! is behind it (a TCP socket from a pod's netns, an HBONE tunnel, an in-memory pipe in tests).
use std::{future::Future, io, net::SocketAddr, pin::Pin};

use tokio::io::{AsyncRead, AsyncWrite};

/// Any upstream byte stream: TCP from the pod's netns, or an HBONE tunnel.
pub type BoxIo = Box<dyn Io>;

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection being opened.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send + 'a>>;

/// Opens byte streams for one source (a captured pod): whether that is HBONE or TCP is the
/// connector's business.
pub trait Connect: Send + Sync {
    /// Pools are keyed by it: one source's connections are never used by another.
    fn source(&self) -> &str;
    fn connect(&self, endpoint: SocketAddr) -> Connecting<'_>;
}
