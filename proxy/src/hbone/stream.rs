//! One HBONE tunnel: an HTTP/2 CONNECT stream as a byte stream, driven on `h2` directly.
//!
//! Through [`ReadChunks`]/[`WriteChunks`] the copy loop moves owned `Bytes`: a received DATA
//! frame is written to the socket from its own buffer, and a socket read becomes a DATA frame
//! without a copy (as ztunnel's tunnels do). hyper's upgraded stream copied both ways, and
//! allocated a buffer per write: 7.3% of the proxy's samples, plus 2.8% for the reads, in
//! `bench hbone` profiles. `AsyncRead`/`AsyncWrite` (for HTTP over a tunnel, and the sniff)
//! copy as hyper did.
use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::transport::copy::{ReadChunks, WriteChunks};

/// A CONNECT stream after its 200, either side.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received, not yet read through `AsyncRead`.
    pending: Bytes,
    /// END_STREAM sent.
    shut: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            shut: false,
        }
    }

    /// The next non-empty DATA frame, empty at END_STREAM. Its bytes are given back to the
    /// peer's window at once: the stream holds at most this one frame (bounded by
    /// `HboneConfig::max_frame_size`), and h2 no more than the window.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        loop {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(Bytes::new())),
                Some(Ok(b)) if b.is_empty() => continue,
                Some(Ok(b)) => {
                    let _ = self.recv.flow_control().release_capacity(b.len());
                    return Poll::Ready(Ok(b));
                }
                Some(Err(e)) => return Poll::Ready(read_error(e)),
            }
        }
    }

    /// How many of `want` bytes the peer's windows take now; 0 once the stream cannot send.
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if want == 0 {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Ok(0)),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
                // The stream's reset says why.
                Some(Err(_)) => return self.poll_reset_error(cx),
            }
        }
    }

    /// Queues `data` (within the room [`H2Stream::poll_room`] gave) as one DATA frame.
    fn poll_send(&mut self, cx: &mut Context<'_>, data: Bytes) -> Poll<io::Result<usize>> {
        let n = data.len();
        match self.send.send_data(data, false) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => self.poll_reset_error(cx),
        }
    }

    /// Why sending failed, from the peer's RST_STREAM.
    fn poll_reset_error<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        Poll::Ready(Err(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => io::ErrorKind::BrokenPipe.into(),
            Ok(reason) => io::Error::other(h2::Error::from(reason)),
            Err(e) => to_io(e),
        }))
    }
}

/// A reset that ends the stream normally is an EOF, as hyper reads it.
fn read_error(e: h2::Error) -> io::Result<Bytes> {
    match e.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(Bytes::new()),
        Some(Reason::STREAM_CLOSED) => Err(io::Error::new(io::ErrorKind::BrokenPipe, e)),
        _ => Err(to_io(e)),
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            self.pending = ready!(self.poll_frame(cx))?;
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(self.poll_room(cx, buf.len()))?;
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        // The copy lands in a buffer h2 keeps until the frame is written.
        self.poll_send(cx, Bytes::copy_from_slice(&buf[..n]))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes queued frames out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shut {
            return Poll::Ready(Ok(()));
        }
        if self.send.send_data(Bytes::new(), true).is_ok() {
            self.shut = true;
            return Poll::Ready(Ok(()));
        }
        self.poll_reset_error(cx)
    }
}

impl ReadChunks for H2Stream {
    fn owns_chunks(&self) -> bool {
        true
    }

    fn poll_read_chunk(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(std::mem::take(&mut self.pending)));
        }
        self.poll_frame(cx)
    }
}

impl WriteChunks for H2Stream {
    fn poll_write_chunk(mut self: Pin<&mut Self>, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<usize>> {
        let n = ready!(self.poll_room(cx, chunk.len()))?;
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        self.poll_send(cx, chunk.split_to(n))
    }
}
