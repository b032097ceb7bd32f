//! Bodies: fixed ones for local replies, and the downstream request body as the router keeps
//! it: buffered whole (so that it can be retried and mirrored) when it is small and quick, else
//! streamed once.
use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Frame;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::upstream::Body;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which request bodies are buffered so that they can be retried or mirrored: those that end
/// within `wait` and `max` bytes, while the node's [`BufferBudget`] has room for them. A bigger
/// one, a stream (gRPC streaming, a slow upload), or one the budget cannot hold is sent as it
/// comes, once, without retries or mirrors (Envoy does the same past its buffer limit:
/// `retry_or_shadow_abandoned`). Set from [`crate::config::Config`].
#[derive(Clone, Debug)]
pub struct BufferLimits {
    pub max: usize,
    pub wait: Duration,
    pub budget: Arc<BufferBudget>,
}

impl Default for BufferLimits {
    fn default() -> Self {
        BufferLimits {
            max: RETRY_BUFFER_LIMIT,
            wait: Duration::from_millis(100),
            budget: BufferBudget::new(BUFFER_BUDGET, Gauge::default(), Counter::default()),
        }
    }
}

/// The default of [`BufferLimits::max`].
pub const RETRY_BUFFER_LIMIT: usize = 1 << 20;
/// The default of the node's [`BufferBudget`].
pub const BUFFER_BUDGET: usize = 64 << 20;

/// Bytes of request bodies the whole node may hold buffered at once: a semaphore of bytes that
/// every buffering request draws from frame by frame and gives back when its body is gone.
#[derive(Debug)]
pub struct BufferBudget {
    bytes: Arc<Semaphore>,
    /// `nodeway_buffer_budget_reserved_bytes`.
    reserved: Gauge,
    /// `nodeway_buffer_budget_exhausted_total`: bodies sent without retries or mirrors because
    /// the budget was spent.
    exhausted: Counter,
}

impl BufferBudget {
    pub fn new(bytes: usize, reserved: Gauge, exhausted: Counter) -> Arc<Self> {
        Arc::new(BufferBudget {
            bytes: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
            reserved,
            exhausted,
        })
    }

    fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            permit: None,
        }
    }
}

/// Bytes drawn from the budget; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BufferBudget>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Reservation {
    /// Draws `n` more bytes; `false` when the budget has not that many left.
    fn grow(&mut self, n: usize) -> bool {
        let Ok(n32) = u32::try_from(n) else { return false };
        let Ok(more) = self.budget.bytes.clone().try_acquire_many_owned(n32) else {
            return false;
        };
        self.budget.reserved.inc_by(i64::from(n32));
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(p) = &self.permit {
            self.budget
                .reserved
                .dec_by(i64::try_from(p.num_permits()).unwrap_or(i64::MAX));
        }
    }
}

/// A whole request body, and its bytes drawn from the budget for as long as a copy lives
/// (attempts and mirrors hold one).
#[derive(Clone, Debug)]
pub struct Buffered {
    pub bytes: Bytes,
    _held: Arc<Reservation>,
}

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
    Buffered(Buffered),
    /// Sent once, by the first attempt.
    Stream(Option<Body>),
}

impl RequestBody {
    /// Streams `body` as it comes.
    pub fn stream(body: Body) -> Self {
        RequestBody::Stream(Some(body))
    }

    /// Buffers `body` if it ends within `limits`, else streams it (the part read so far first).
    pub async fn buffer(mut body: Body, limits: &BufferLimits) -> Self {
        let deadline = tokio::time::Instant::now() + limits.wait;
        let mut head: Vec<Frame<Bytes>> = Vec::new();
        let mut size = 0usize;
        let mut trailers = false;
        let mut held = limits.budget.reservation();
        while size <= limits.max {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(None) if !trailers => {
                    return RequestBody::Buffered(Buffered {
                        bytes: concat(head, size),
                        _held: Arc::new(held),
                    })
                }
                Ok(None) => break,
                Ok(Some(Ok(frame))) => {
                    let n = frame.data_ref().map_or(0, Bytes::len);
                    size += n;
                    // Trailers (gRPC clients rarely send them): stream, keep them.
                    trailers |= frame.is_trailers();
                    head.push(frame);
                    if !held.grow(n) {
                        limits.budget.exhausted.inc();
                        debug!("buffer budget spent: request sent without retries or mirrors");
                        break;
                    }
                }
                Ok(Some(Err(e))) => {
                    debug!(error = %e, "request body failed while buffering");
                    break;
                }
                Err(_) => break,
            }
        }
        let held = Some(held);
        RequestBody::stream(Chain { head, rest: body, held }.into_body())
    }

    /// The body for one more attempt or mirror (a stream only once, then empty).
    pub fn take(&mut self) -> Body {
        match self {
            RequestBody::Buffered(b) => full(b.bytes.clone()),
            RequestBody::Stream(s) => s.take().unwrap_or_else(empty),
        }
    }

    /// Whether another attempt can send the same body.
    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered(_))
    }

    pub fn buffered(&self) -> Option<&Buffered> {
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
    /// The head's bytes in the budget, given back once the head is sent.
    held: Option<Reservation>,
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
        self.held = None;
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_bodies_are_buffered_and_replayable() {
        let mut b = RequestBody::buffer(full(Bytes::from_static(b"hello")), &BufferLimits::default()).await;
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
        let mut b = RequestBody::buffer(body, &BufferLimits::default()).await;
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
        let mut b = RequestBody::buffer(body, &BufferLimits::default()).await;
        assert!(!b.replayable());
        let got = b.take().collect().await.expect("body");
        assert_eq!(
            got.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
    }
}
