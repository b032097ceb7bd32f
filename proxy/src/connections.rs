//! The live connection table behind `/connections`, and the byte accounting that feeds both it
//! and Istio's TCP metrics.
//!
//! A forwarder calls [`Connections::open`] once per proxied connection and keeps the returned
//! [`ConnectionGuard`] alive for the connection's lifetime; dropping it removes the entry and
//! counts the close. Byte counting is designed for the copy loop: the guard's counter handles are
//! resolved once at open, so each read costs two relaxed atomic adds.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{Metrics, TcpLabels, TcpSeries};
pub use crate::timefmt::format_rfc3339;

/// Which side of the mesh this proxy half serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic leaving a captured pod (reporter "source").
    Outbound,
    /// Traffic arriving at a captured pod (reporter "destination").
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// Istio's `reporter` label value for this side.
    pub fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
    }
}

/// What the forwarder knows about a connection when it accepts it.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub direction: Direction,
    /// "namespace/name" of the captured pod this proxy side serves.
    pub pod: String,
    pub source: SocketAddr,
    /// The original destination (before redirection).
    pub destination: SocketAddr,
    pub labels: TcpLabels,
}

/// One connection as `/connections` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionView {
    pub id: u64,
    pub direction: Direction,
    pub pod: String,
    pub source: String,
    pub destination: String,
    pub source_workload: String,
    pub source_namespace: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    /// destination -> source.
    pub bytes_sent: u64,
    /// source -> destination.
    pub bytes_received: u64,
    /// RFC 3339, UTC, millisecond precision.
    pub start_time: String,
    pub duration_ms: u64,
}

/// Per-connection byte counts plus the Prometheus series they also feed (shared with the other
/// connections of its label set).
#[derive(Debug)]
struct ByteCounts {
    received: AtomicU64,
    sent: AtomicU64,
    series: Arc<TcpSeries>,
}

impl ByteCounts {
    #[inline]
    fn add(&self, flow: Flow, n: u64) {
        match flow {
            Flow::Received => {
                self.received.fetch_add(n, Ordering::Relaxed);
                self.series.counters.received_bytes.inc_by(n);
            }
            Flow::Sent => {
                self.sent.fetch_add(n, Ordering::Relaxed);
                self.series.counters.sent_bytes.inc_by(n);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// source -> destination.
    Received,
    /// destination -> source.
    Sent,
}

/// A connection's row; its labels are its series'.
#[derive(Debug)]
struct Entry {
    direction: Direction,
    pod: String,
    source: SocketAddr,
    destination: SocketAddr,
    started: SystemTime,
    started_at: Instant,
    bytes: Arc<ByteCounts>,
}

#[derive(Debug)]
struct Inner {
    metrics: Arc<Metrics>,
    /// Turns true when the node starts draining: HTTP connections then close gracefully.
    drain: tokio::sync::watch::Sender<bool>,
    next_id: AtomicU64,
    /// Entries are boxed: a map's buckets are allocated ahead of its entries (up to twice as many
    /// as it holds, and each growth leaves the old table behind in the allocator), so inline
    /// entries would cost each connection their size again in spare buckets.
    table: Mutex<HashMap<u64, Box<Entry>>>,
}

impl Inner {
    /// A poisoned lock only means another task panicked mid-update of a plain map; the map is
    /// still usable, and telemetry must not take the proxy down.
    fn table(&self) -> MutexGuard<'_, HashMap<u64, Box<Entry>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The node's live connection table. Cheap to clone; clones share the table.
#[derive(Clone, Debug)]
pub struct Connections {
    inner: Arc<Inner>,
}

impl Connections {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                metrics,
                drain: tokio::sync::watch::Sender::new(false),
                next_id: AtomicU64::new(1),
                table: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The node is shutting down: HTTP connections finish their requests in flight, then close
    /// (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY), so the drain does not wait on idle
    /// keep-alive clients. L4 connections carry on until they end.
    pub fn start_drain(&self) {
        self.inner.drain.send_replace(true);
    }

    /// Becomes true when [`Connections::start_drain`] is called.
    pub fn drain_signal(&self) -> Drain {
        Drain(Some(self.inner.drain.subscribe()))
    }

    /// Registers a new connection and counts it opened. Keep the guard for the connection's
    /// lifetime: dropping it removes the entry and counts it closed.
    pub fn open(&self, info: ConnectionInfo) -> ConnectionGuard {
        let ConnectionInfo {
            direction,
            pod,
            source,
            destination,
            labels,
        } = info;
        let series = self.inner.metrics.tcp_series(labels);
        series.counters.opened.inc();
        let bytes = Arc::new(ByteCounts {
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            series,
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Box::new(Entry {
            direction,
            pod,
            source,
            destination,
            started: SystemTime::now(),
            started_at: Instant::now(),
            bytes: bytes.clone(),
        });
        self.inner.table().insert(id, entry);
        ConnectionGuard {
            id,
            table: self.inner.clone(),
            bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.inner.table().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live connections, oldest first.
    pub fn snapshot(&self) -> Vec<ConnectionView> {
        let table = self.inner.table();
        let mut views: Vec<ConnectionView> = table
            .iter()
            .map(|(&id, e)| {
                let l = &e.bytes.series.labels;
                ConnectionView {
                    id,
                    direction: e.direction,
                    pod: e.pod.clone(),
                    source: e.source.to_string(),
                    destination: e.destination.to_string(),
                    source_workload: l.source_workload.clone(),
                    source_namespace: l.source_workload_namespace.clone(),
                    destination_workload: l.destination_workload.clone(),
                    destination_namespace: l.destination_workload_namespace.clone(),
                    bytes_sent: e.bytes.sent.load(Ordering::Relaxed),
                    bytes_received: e.bytes.received.load(Ordering::Relaxed),
                    start_time: format_rfc3339(e.started),
                    duration_ms: u64::try_from(e.started_at.elapsed().as_millis()).unwrap_or(u64::MAX),
                }
            })
            .collect();
        drop(table);
        views.sort_by_key(|v| v.id);
        views
    }
}

/// Waits for the node's drain to start.
#[derive(Clone, Debug)]
pub struct Drain(Option<tokio::sync::watch::Receiver<bool>>);

impl Drain {
    /// A signal that never fires (tests, callers without a node).
    pub fn never() -> Drain {
        Drain(None)
    }

    /// Returns once draining has started; never, if it cannot.
    pub async fn started(self) {
        if let Some(mut rx) = self.0 {
            if rx.wait_for(|d| *d).await.is_ok() {
                return;
            }
        }
        std::future::pending::<()>().await;
    }
}

/// Keeps a connection in the table; dropping it removes the entry and counts the close.
#[derive(Debug)]
pub struct ConnectionGuard {
    id: u64,
    table: Arc<Inner>,
    bytes: Arc<ByteCounts>,
}

impl ConnectionGuard {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Counts `n` bytes source -> destination.
    #[inline]
    pub fn add_received(&self, n: u64) {
        self.bytes.add(Flow::Received, n);
    }

    /// Counts `n` bytes destination -> source.
    #[inline]
    pub fn add_sent(&self, n: u64) {
        self.bytes.add(Flow::Sent, n);
    }

    pub fn received(&self) -> u64 {
        self.bytes.received.load(Ordering::Relaxed)
    }

    pub fn sent(&self) -> u64 {
        self.bytes.sent.load(Ordering::Relaxed)
    }

    /// Wraps the source-side stream (the client): bytes read from it count as received.
    pub fn count_source<S>(&self, stream: S) -> Counted<S> {
        Counted::new(stream, self.received_counter())
    }

    /// Wraps the client of a connection served request by request (HTTP): bytes read from it
    /// count as received, bytes written to it as sent.
    pub fn count_downstream<S>(&self, stream: S) -> Counted<S> {
        Counted {
            inner: stream,
            counter: self.received_counter(),
            written: Some(self.sent_counter()),
        }
    }

    /// Wraps the destination-side stream (the upstream): bytes read from it count as sent.
    pub fn count_destination<S>(&self, stream: S) -> Counted<S> {
        Counted::new(stream, self.sent_counter())
    }

    /// A handle counting source -> destination bytes; outlives the guard harmlessly.
    pub fn received_counter(&self) -> ByteCounter {
        ByteCounter {
            bytes: self.bytes.clone(),
            flow: Flow::Received,
        }
    }

    /// A handle counting destination -> source bytes.
    pub fn sent_counter(&self) -> ByteCounter {
        ByteCounter {
            bytes: self.bytes.clone(),
            flow: Flow::Sent,
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.table.table().remove(&self.id);
        self.bytes.series.counters.closed.inc();
    }
}

/// Counts bytes of one direction of one connection (entry and Prometheus counter together).
#[derive(Clone, Debug)]
pub struct ByteCounter {
    bytes: Arc<ByteCounts>,
    flow: Flow,
}

impl ByteCounter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.bytes.add(self.flow, n);
    }
}

/// A stream wrapper that counts the bytes READ from it, so that
/// `copy_bidirectional(&mut guard.count_source(client), &mut guard.count_destination(upstream))`
/// attributes client reads to "received" and upstream reads to "sent" without touching the
/// copy loop. Writes pass through uncounted (each byte is counted once, where it enters).
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    counter: ByteCounter,
    /// Also counts the bytes written (a stream that is both ends of the accounting: the
    /// downstream of an HTTP connection, whose upstream side is many requests).
    written: Option<ByteCounter>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, counter: ByteCounter) -> Self {
        Self {
            inner,
            counter,
            written: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// What counts the bytes read from the stream and, if anything, the bytes written to it.
    pub fn counters(&self) -> (&ByteCounter, Option<&ByteCounter>) {
        (&self.counter, self.written.as_ref())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let n = buf.filled().len().saturating_sub(before);
            if n > 0 {
                this.counter.add(n as u64);
            }
        }
        res
    }
}

impl<S> Counted<S> {
    #[inline]
    fn count_written(&self, res: &Poll<io::Result<usize>>) {
        if let (Some(w), Poll::Ready(Ok(n))) = (&self.written, res) {
            w.add(*n as u64);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.count_written(&res);
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.count_written(&res);
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn info(direction: Direction) -> ConnectionInfo {
        let mut labels = TcpLabels::new(direction.reporter());
        labels.source_workload = "client".into();
        labels.source_workload_namespace = "demo".into();
        labels.destination_workload = "server".into();
        labels.destination_workload_namespace = "demo".into();
        ConnectionInfo {
            direction,
            pod: "demo/client-1".into(),
            source: "198.18.1.2:40000".parse().expect("addr"),
            destination: "198.18.1.3:8080".parse().expect("addr"),
            labels,
        }
    }

    fn sample(text: &str, prefix: &str) -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // leap day 2024
        assert_eq!(format_rfc3339(t), "2024-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_rfc3339(t), "2000-02-29T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(format_rfc3339(t), "2099-12-31T23:59:59.000Z");
    }

    #[test]
    fn open_count_and_close() {
        let metrics = Arc::new(Metrics::new());
        let conns = Connections::new(metrics.clone());
        let g = conns.open(info(Direction::Outbound));
        let g2 = conns.open(info(Direction::Inbound));
        g.add_received(100);
        g.add_received(5);
        g.add_sent(7);
        assert_eq!((g.received(), g.sent()), (105, 7));

        let snap = conns.snapshot();
        assert_eq!(snap.len(), 2);
        let v = &snap[0];
        assert_eq!(v.id, g.id());
        assert_eq!(v.direction, Direction::Outbound);
        assert_eq!(v.pod, "demo/client-1");
        assert_eq!(v.source, "198.18.1.2:40000");
        assert_eq!(v.destination, "198.18.1.3:8080");
        assert_eq!(v.source_workload, "client");
        assert_eq!(v.destination_namespace, "demo");
        assert_eq!((v.bytes_received, v.bytes_sent), (105, 7));
        assert!(v.start_time.ends_with('Z') && v.start_time.len() == 24);

        let json = serde_json::to_value(&snap[1]).expect("json");
        assert_eq!(json["direction"], "inbound");
        for key in [
            "id",
            "pod",
            "source",
            "destination",
            "sourceWorkload",
            "sourceNamespace",
            "destinationWorkload",
            "destinationNamespace",
            "bytesSent",
            "bytesReceived",
            "startTime",
            "durationMs",
        ] {
            assert!(json.get(key).is_some(), "missing {key}: {json}");
        }

        let text = metrics.encode();
        let out = "istio_tcp_connections_opened_total{reporter=\"source\"";
        assert_eq!(sample(&text, out), Some(1), "{text}");
        assert_eq!(
            sample(&text, "istio_tcp_received_bytes_total{reporter=\"source\""),
            Some(105)
        );
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total{reporter=\"source\""), Some(7));

        drop(g);
        assert_eq!(conns.len(), 1);
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total{reporter=\"source\""),
            Some(1)
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total{reporter=\"destination\""),
            Some(0)
        );
        drop(g2);
        assert!(conns.is_empty());
    }

    #[test]
    fn ids_are_unique_and_snapshot_sorted() {
        let conns = Connections::new(Arc::new(Metrics::new()));
        let guards: Vec<_> = (0..5).map(|_| conns.open(info(Direction::Outbound))).collect();
        let ids: Vec<u64> = conns.snapshot().iter().map(|v| v.id).collect();
        let want: Vec<u64> = guards.iter().map(|g| g.id()).collect();
        assert_eq!(ids, want);
    }

    #[tokio::test]
    async fn counted_streams_attribute_directions_in_copy_bidirectional() {
        let metrics = Arc::new(Metrics::new());
        let conns = Connections::new(metrics.clone());
        let guard = conns.open(info(Direction::Outbound));

        // client <-> [proxy_client_side | proxy_upstream_side] <-> server
        let (mut client, proxy_client_side) = tokio::io::duplex(64);
        let (proxy_upstream_side, mut server) = tokio::io::duplex(64);
        let mut a = guard.count_source(proxy_client_side);
        let mut b = guard.count_destination(proxy_upstream_side);
        let copier = tokio::spawn(async move {
            let res = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            (res, a, b)
        });

        let request = vec![b'q'; 1000];
        let response = vec![b'r'; 300];
        let server_task = tokio::spawn(async move {
            let mut got = vec![0u8; 1000];
            server.read_exact(&mut got).await.expect("server read");
            server.write_all(&[b'r'; 300]).await.expect("server write");
            server.shutdown().await.expect("server shutdown");
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.expect("server eof");
            got
        });
        client.write_all(&request).await.expect("client write");
        let mut got = vec![0u8; response.len()];
        client.read_exact(&mut got).await.expect("client read");
        assert_eq!(got, response);
        client.shutdown().await.expect("client shutdown");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("client eof");
        assert_eq!(server_task.await.expect("server task"), request);

        let (res, _a, _b) = copier.await.expect("copier");
        assert_eq!(res.expect("copy"), (1000, 300));
        assert_eq!(guard.received(), 1000);
        assert_eq!(guard.sent(), 300);
        let text = metrics.encode();
        assert_eq!(sample(&text, "istio_tcp_received_bytes_total{"), Some(1000));
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total{"), Some(300));
    }

    #[tokio::test]
    async fn a_downstream_counts_both_directions() {
        let conns = Connections::new(Arc::new(Metrics::new()));
        let guard = conns.open(info(Direction::Outbound));
        let (mut client, proxy_side) = tokio::io::duplex(64);
        let mut d = guard.count_downstream(proxy_side);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("client write");
        let mut req = [0u8; 18];
        d.read_exact(&mut req).await.expect("proxy read");
        d.write_all(b"HTTP/1.1 200 OK\r\n").await.expect("proxy write");
        assert_eq!((guard.received(), guard.sent()), (18, 17));
    }

    #[test]
    fn counter_outliving_guard_is_harmless() {
        let conns = Connections::new(Arc::new(Metrics::new()));
        let g = conns.open(info(Direction::Inbound));
        let c = g.sent_counter();
        drop(g);
        c.add(10);
        assert!(conns.is_empty());
    }
}
