//! Is the client speaking HTTP? A port with a route table is expected to, but Istio users also
//! send other protocols to such ports by mistake; a short peek decides, as Envoy's
//! `http_inspector` does, and anything else stays L4.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::transport::copy::{ReadChunks, WriteChunks};

/// How long to wait for the client's first bytes. Client-first protocols (HTTP) send at once; a
/// server-first protocol would otherwise wait for the proxy forever.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];
/// The HTTP/2 connection preface (h2c with prior knowledge, gRPC).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http,
    Other,
    /// Nothing arrived in time (or the client closed).
    Nothing,
}

pub async fn sniff(stream: &TcpStream) -> Sniffed {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Sniffed::Nothing,
            Ok(Ok(n)) => n,
        };
        match classify(&buf[..n]) {
            Some(s) => return s,
            // A prefix of a method or the preface: wait for more (peek returns what is queued).
            None if n < buf.len() => {
                if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(2)))
                    .await
                    .is_err()
                {
                    return Sniffed::Nothing;
                }
            }
            None => return Sniffed::Other,
        }
    }
}

/// [`sniff`] for a stream that cannot be peeked (an HBONE tunnel): the bytes read to decide
/// are put back in front of it.
pub async fn sniff_stream<T: AsyncRead + Unpin>(mut io: T) -> (Sniffed, Prefixed<T>) {
    let mut buf = Vec::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let sniffed = loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break Sniffed::Nothing,
            Ok(Ok(_)) => {}
        }
        match classify(&buf) {
            Some(s) => break s,
            None if buf.len() < buf.capacity() => {}
            None => break Sniffed::Other,
        }
    };
    (sniffed, Prefixed { prefix: buf, at: 0, io })
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    at: usize,
    io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The put-back bytes come first, as one chunk; then the stream's own.
impl<T: ReadChunks> ReadChunks for Prefixed<T> {
    fn owns_chunks(&self) -> bool {
        self.io.owns_chunks()
    }

    fn poll_read_chunk(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let mut prefix = Bytes::from(std::mem::take(&mut this.prefix));
            prefix.advance(std::mem::take(&mut this.at));
            return Poll::Ready(Ok(prefix));
        }
        Pin::new(&mut this.io).poll_read_chunk(cx)
    }
}

impl<T: WriteChunks> WriteChunks for Prefixed<T> {
    fn poll_write_chunk(mut self: Pin<&mut Self>, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_chunk(cx, chunk)
    }
}

/// `Some` once the bytes decide it; `None` while they could still become an HTTP request.
pub fn classify(b: &[u8]) -> Option<Sniffed> {
    let could_be = |pat: &[u8]| {
        let n = b.len().min(pat.len());
        b[..n] == pat[..n]
    };
    if METHODS.iter().any(|m| b.starts_with(m)) || b.starts_with(H2_PREFACE) {
        return Some(Sniffed::Http);
    }
    if METHODS.iter().any(|m| could_be(m)) || could_be(H2_PREFACE) {
        return None;
    }
    Some(Sniffed::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose reads are its own chunks (as an HBONE stream's DATA frames).
    struct Frames(Vec<Bytes>);

    impl AsyncRead for Frames {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if let Some(b) = self.0.pop() {
                buf.put_slice(&b);
            }
            Poll::Ready(Ok(()))
        }
    }

    impl ReadChunks for Frames {
        fn owns_chunks(&self) -> bool {
            true
        }
        fn poll_read_chunk(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
            Poll::Ready(Ok(self.0.pop().unwrap_or_default()))
        }
    }

    /// The sniffed bytes come back first as one chunk, then the stream's own chunks, then EOF.
    #[tokio::test]
    async fn put_back_bytes_lead_the_chunks() {
        let frames = Frames(vec![Bytes::from_static(b" world"), Bytes::from_static(b"hello")]);
        let (sniffed, mut s) = sniff_stream(frames).await;
        assert_eq!(sniffed, Sniffed::Other);
        assert!(s.owns_chunks());
        let mut chunks = Vec::new();
        loop {
            let c = std::future::poll_fn(|cx| Pin::new(&mut s).poll_read_chunk(cx))
                .await
                .unwrap();
            if c.is_empty() {
                break;
            }
            chunks.push(c);
        }
        assert_eq!(chunks.concat(), b"hello world");
    }

    #[test]
    fn methods_and_preface_are_http() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Sniffed::Http));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Sniffed::Http));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Sniffed::Other), "TLS");
        assert_eq!(classify(b"hello world"), Some(Sniffed::Other));
        assert_eq!(classify(b"GETX"), Some(Sniffed::Other));
    }

    #[tokio::test]
    async fn sniffed_bytes_are_put_back() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GE").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tokio::io::AsyncWriteExt::write_all(&mut a, b"T / HTTP/1.1\r\n")
                .await
                .unwrap();
            a
        });
        let (s, mut p) = sniff_stream(b).await;
        assert_eq!(s, Sniffed::Http);
        let _a = writer.await.unwrap();
        let mut got = [0u8; 16];
        p.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");

        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"\x16\x03\x01")
            .await
            .unwrap();
        let (s, mut p) = sniff_stream(b).await;
        assert_eq!(s, Sniffed::Other);
        let mut got = [0u8; 3];
        p.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x16\x03\x01");
    }
}
