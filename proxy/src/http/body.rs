//! Bodies: fixed ones for local replies, and the downstream request body as the router keeps
//! it: buffered whole (so that it can be retried and mirrored) when it is small and quick, else
//! streamed once.
use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Frame;
use tracing::debug;

use crate::upstream::Body;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which request bodies are buffered so that they can be retried or mirrored: those that end
/// within `wait` and `max` bytes. A bigger one, or a stream (gRPC streaming, a slow upload), is
/// sent as it comes, once, without retries or mirrors (Envoy does the same past its buffer
/// limit). Set from [`crate::config::Config`].
#[derive(Clone, Copy, Debug)]
pub struct BufferLimits {
    pub max: usize,
    pub wait: Duration,
}

impl Default for BufferLimits {
    fn default() -> Self {
        BufferLimits {
            max: RETRY_BUFFER_LIMIT,
            wait: Duration::from_millis(100),
        }
    }
}

/// The default of [`BufferLimits::max`].
pub const RETRY_BUFFER_LIMIT: usize = 1 << 20;

pub fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

/// Any body as the upstream side's boxed body.
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// The downstream request body as the router holds it.
pub enum RequestBody {
    /// Whole: every attempt and mirror gets a copy.
    Buffered(Bytes),
    /// Sent once, by the first attempt.
    Stream(Option<Body>),
}

impl RequestBody {
    /// Streams `body` as it comes.
    pub fn stream(body: Body) -> Self {
        RequestBody::Stream(Some(body))
    }

    /// Buffers `body` if it ends within `limits`, else streams it (the part read so far first).
    pub async fn buffer(mut body: Body, limits: BufferLimits) -> Self {
        let deadline = tokio::time::Instant::now() + limits.wait;
        let mut head: Vec<Frame<Bytes>> = Vec::new();
        let mut size = 0usize;
        let mut trailers = false;
        while size <= limits.max {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(None) if !trailers => return RequestBody::Buffered(concat(head, size)),
                Ok(None) => break,
                Ok(Some(Ok(frame))) => {
                    size += frame.data_ref().map_or(0, Bytes::len);
                    // Trailers (gRPC clients rarely send them): stream, keep them.
                    trailers |= frame.is_trailers();
                    head.push(frame);
                }
                Ok(Some(Err(e))) => {
                    debug!(error = %e, "request body failed while buffering");
                    break;
                }
                Err(_) => break,
            }
        }
        RequestBody::stream(Chain { head, rest: body }.into_body())
    }

    /// The body for one more attempt or mirror (a stream only once, then empty).
    pub fn take(&mut self) -> Body {
        match self {
            RequestBody::Buffered(b) => full(b.clone()),
            RequestBody::Stream(s) => s.take().unwrap_or_else(empty),
        }
    }

    /// Whether another attempt can send the same body.
    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered(_))
    }

    pub fn buffered(&self) -> Option<&Bytes> {
        match self {
            RequestBody::Buffered(b) => Some(b),
            RequestBody::Stream(_) => None,
        }
    }
}

fn concat(frames: Vec<Frame<Bytes>>, size: usize) -> Bytes {
    let mut all = bytes::BytesMut::with_capacity(size);
    for f in &frames {
        if let Some(d) = f.data_ref() {
            all.extend_from_slice(d);
        }
    }
    all.freeze()
}

/// The frames read while trying to buffer, then the rest of the body.
struct Chain {
    /// In reverse order: the next frame is popped from the end.
    head: Vec<Frame<Bytes>>,
    rest: Body,
}

impl Chain {
    fn into_body(mut self) -> Body {
        self.head.reverse();
        BodyExt::boxed(self)
    }
}

impl hyper::body::Body for Chain {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.head.pop() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_bodies_are_buffered_and_replayable() {
        let mut b = RequestBody::buffer(full(Bytes::from_static(b"hello")), BufferLimits::default()).await;
        assert!(b.replayable());
        for _ in 0..2 {
            let got = b.take().collect().await.expect("body").to_bytes();
            assert_eq!(&got[..], b"hello");
        }
    }

    #[tokio::test]
    async fn big_bodies_stream_once_and_whole() {
        let big = Bytes::from(vec![b'x'; RETRY_BUFFER_LIMIT * 2]);
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = big
            .chunks(64 * 1024)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = http_body_util::StreamBody::new(tokio_stream::iter(chunks)).boxed();
        let mut b = RequestBody::buffer(body, BufferLimits::default()).await;
        assert!(!b.replayable());
        let got = b.take().collect().await.expect("body").to_bytes();
        assert_eq!(got.len(), big.len());
        assert!(b.take().collect().await.expect("body").to_bytes().is_empty());
    }

    #[tokio::test]
    async fn trailers_are_kept() {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"x"))), Ok(Frame::trailers(t))];
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames)).boxed();
        let mut b = RequestBody::buffer(body, BufferLimits::default()).await;
        assert!(!b.replayable());
        let got = b.take().collect().await.expect("body");
        assert_eq!(
            got.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
    }
}
