//! How the upstream side gets byte streams: a [`Connect`] per source. The pools never learn what
//! is behind it (a TCP socket from a pod's netns, an HBONE tunnel, an in-memory pipe in tests).
use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::transport::copy::{ReadChunks, WriteChunks};

/// Any upstream byte stream: TCP from the pod's netns, or an HBONE tunnel.
pub type BoxIo = Box<dyn Io>;

pub trait Io: AsyncRead + AsyncWrite + ReadChunks + WriteChunks + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + ReadChunks + WriteChunks + Send + Unpin + 'static> Io for T {}

/// A boxed stream keeps its chunks (a tunnel's frames pass the copy loop without a copy).
impl ReadChunks for BoxIo {
    fn owns_chunks(&self) -> bool {
        (**self).owns_chunks()
    }

    fn poll_read_chunk(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        Pin::new(&mut **self.get_mut()).poll_read_chunk(cx)
    }
}

impl WriteChunks for BoxIo {
    fn poll_write_chunk(self: Pin<&mut Self>, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<usize>> {
        Pin::new(&mut **self.get_mut()).poll_write_chunk(cx, chunk)
    }
}

/// A connection being opened.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send + 'a>>;

/// Opens byte streams for one source (a captured pod): whether that is HBONE or TCP is the
/// connector's business.
pub trait Connect: Send + Sync {
    /// Pools are keyed by it: one source's connections are never used by another.
    fn source(&self) -> &str;
    fn connect(&self, endpoint: SocketAddr) -> Connecting<'_>;
}
