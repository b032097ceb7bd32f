//! The HBONE client: CONNECT streams over pooled mutual-TLS HTTP/2 connections.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::{keepalive, stream::H2Stream, tls, HboneConfig, HboneError, HBONE_PORT};
use crate::{
    identity::{manager::CertManager, Identity},
    transport::{
        copy::{ReadChunks, WriteChunks},
        PodDialer,
    },
};

/// Who opens a tunnel: the pod (pools are per pod), its identity and its dialer.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub name: &'a str,
    pub identity: &'a Identity,
    pub dialer: &'a PodDialer,
}

/// Identity material shared by every pod's HBONE client and server, and the client's pool.
pub struct HboneClient {
    pub certs: Arc<CertManager>,
    pub roots: Vec<CertificateDer<'static>>,
    pub trust_domain: String,
    pub config: HboneConfig,
    pool: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    /// One dial at a time per destination, as ztunnel's pool does: a burst of connects to a
    /// cold destination shares the first connection (up to `max_streams`) instead of racing as
    /// many TLS handshakes, which a peer's accept backlog and handshake limits turn into failures.
    dials: Mutex<HashMap<PoolKey, Arc<DialTurn>>>,
}

/// Whose turn it is to dial a destination; holds the last dial's failure, if it failed.
type DialTurn = tokio::sync::Mutex<Option<DialFailure>>;

struct DialFailure {
    at: tokio::time::Instant,
    reason: String,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: String,
    dst_identity: Identity,
    dst: SocketAddr,
}

struct PooledConn {
    sender: SendRequest<Bytes>,
    /// Set when the connection's task ended, or a stream found the connection unusable.
    closed: Arc<AtomicBool>,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl PooledConn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn usable(&self, max: usize) -> bool {
        !self.is_closed() && self.active.load(Ordering::Relaxed) < max
    }

    fn release(&self) {
        if self.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            *self.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// A CONNECT stream; holds its connection's stream count until dropped.
pub struct Tunnel {
    io: H2Stream,
    conn: Arc<PooledConn>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.conn.release();
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl ReadChunks for Tunnel {
    fn owns_chunks(&self) -> bool {
        self.io.owns_chunks()
    }

    fn poll_read_chunk(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        Pin::new(&mut self.io).poll_read_chunk(cx)
    }
}

impl WriteChunks for Tunnel {
    fn poll_write_chunk(mut self: Pin<&mut Self>, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_chunk(cx, chunk)
    }
}

impl HboneClient {
    pub fn new(
        certs: Arc<CertManager>,
        roots: Vec<CertificateDer<'static>>,
        trust_domain: String,
        config: HboneConfig,
    ) -> Self {
        HboneClient {
            certs,
            roots,
            trust_domain,
            config,
            pool: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
        }
    }

    /// Closes idle pooled connections every second, for as long as the returned task runs.
    pub fn start_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(me) = me.upgrade() else { return };
                me.reap();
            }
        })
    }

    fn reap(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        for conns in pool.values_mut() {
            conns.retain(|c| {
                let idle = c.active.load(Ordering::Relaxed) == 0
                    && c.idle_since.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= self.config.idle_timeout;
                !c.is_closed() && !idle
            });
        }
        pool.retain(|_, v| !v.is_empty());
        // A turn nobody waits for, of a destination with no connection, is forgotten.
        let mut dials = self.dials.lock().unwrap_or_else(|p| p.into_inner());
        dials.retain(|k, turn| Arc::strong_count(turn) > 1 || pool.contains_key(k));
    }

    /// Pooled HTTP/2 connections open now (for inspection and tests).
    pub fn pooled_connections(&self) -> usize {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Opens a CONNECT stream from `source` to `target` through `target`'s HBONE port,
    /// authenticating the destination as `dst_identity`.
    pub async fn connect(
        &self,
        source: Source<'_>,
        dst_identity: &Identity,
        target: SocketAddr,
    ) -> Result<Tunnel, HboneError> {
        self.connect_via(source, dst_identity, SocketAddr::new(target.ip(), HBONE_PORT), target)
            .await
    }

    /// Opens a CONNECT stream for `target` through the HBONE server at `dst` (another address,
    /// for a waypoint: it is asked for the original destination), authenticating it as
    /// `dst_identity`.
    pub async fn connect_via(
        &self,
        source: Source<'_>,
        dst_identity: &Identity,
        dst: SocketAddr,
        target: SocketAddr,
    ) -> Result<Tunnel, HboneError> {
        let key = PoolKey {
            source: source.name.to_string(),
            dst_identity: dst_identity.clone(),
            dst,
        };
        // A pooled connection may have died since it was listed: one more try on a fresh one.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let conn = match self.pooled(&key) {
                Some(c) => c,
                None => self.pooled_or_dial(source, &key).await?,
            };
            let opened = tokio::time::timeout(self.config.connect_timeout, open_stream(&conn, target)).await;
            let Ok(opened) = opened else {
                conn.release();
                return Err(HboneError::ConnectTimeout { target, dst });
            };
            match opened {
                Ok(io) => return Ok(Tunnel { io, conn }),
                Err(StreamError::Refused(status)) => {
                    conn.release();
                    return Err(HboneError::Refused { target, dst, status });
                }
                Err(StreamError::Http2(e)) => {
                    // A connection that failed (not just this stream reset) is not offered
                    // again (a GOAWAY, a dead peer): the retry dials anew.
                    if !e.is_reset() {
                        conn.closed.store(true, Ordering::Relaxed);
                    }
                    conn.release();
                    if attempt == 1 {
                        debug!(%dst, error = %e, "pooled HBONE connection unusable, dialling anew");
                        continue;
                    }
                    return Err(HboneError::Http2 { dst, source: e });
                }
            }
        }
    }

    /// A pooled connection with room for one more stream, already counted for it.
    fn pooled(&self, key: &PoolKey) -> Option<Arc<PooledConn>> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.get_mut(key)?;
        conns.retain(|c| !c.is_closed());
        let c = conns
            .iter()
            .find(|c| c.usable(self.config.max_streams as usize))?
            .clone();
        c.active.fetch_add(1, Ordering::Relaxed);
        Some(c)
    }

    /// Waits for the destination's dial turn: the first in line dials, those behind it take a
    /// stream on the connection it made. A dial that fails fails those who were waiting for it
    /// too (they would only repeat it), so a dead peer costs one timeout, not one per waiter.
    async fn pooled_or_dial(&self, source: Source<'_>, key: &PoolKey) -> Result<Arc<PooledConn>, HboneError> {
        let turn = self
            .dials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let queued = tokio::time::Instant::now();
        let mut last = turn.lock().await;
        if let Some(c) = self.pooled(key) {
            return Ok(c);
        }
        if let Some(failed) = last.as_ref().filter(|f| f.at >= queued) {
            return Err(HboneError::DialFailed {
                dst: key.dst,
                reason: failed.reason.clone(),
            });
        }
        let dialled = self.dial(source, key).await;
        *last = dialled.as_ref().err().map(|e| DialFailure {
            at: tokio::time::Instant::now(),
            reason: e.to_string(),
        });
        dialled
    }

    async fn dial(&self, source: Source<'_>, key: &PoolKey) -> Result<Arc<PooledConn>, HboneError> {
        let own = self
            .certs
            .get(source.identity)
            .await
            .map_err(|e| HboneError::Certificate {
                identity: source.identity.to_string(),
                reason: e.to_string(),
            })?;
        let tls_config = tls::client_config(&own, key.dst_identity.clone())?;
        let dst = key.dst;
        let tcp = source
            .dialer
            .connect(dst)
            .await
            .map_err(|e| HboneError::Connect { dst, source: e })?;
        let handshake = TlsConnector::from(tls_config).connect(ServerName::IpAddress(dst.ip().into()), tcp);
        let tls = tokio::time::timeout(self.config.handshake_timeout, handshake)
            .await
            .map_err(|_| HboneError::HandshakeTimeout(dst))?
            .map_err(|e| HboneError::Handshake { dst, source: e })?;
        let (sender, closed) = http2_handshake(tls, &self.config, dst).await?;
        let pooled = Arc::new(PooledConn {
            sender,
            closed,
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
        });
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(pooled.clone());
        Ok(pooled)
    }
}

/// HTTP/2 over the dialled TLS connection; its task runs until the connection ends (or the
/// keepalive finds the peer dead), then marks it closed.
async fn http2_handshake<T>(
    tls: T,
    c: &HboneConfig,
    dst: SocketAddr,
) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), HboneError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut conn) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(c.stream_window)
        .initial_connection_window_size(c.connection_window)
        .max_frame_size(c.max_frame_size)
        .max_send_buffer_size(super::MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| HboneError::Http2 { dst, source: e })?;
    let closed = Arc::new(AtomicBool::new(false));
    let ping = conn.ping_pong();
    let (interval, timeout, done) = (c.keepalive_interval, c.keepalive_timeout, closed.clone());
    tokio::spawn(async move {
        let alive = async {
            match ping {
                Some(p) => keepalive::until_dead(p, interval, timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn => if let Err(e) = r {
                debug!(%dst, error = %e, "HBONE connection closed");
            },
            () = alive => debug!(%dst, "HBONE peer did not answer the keepalive: connection closed"),
        }
        done.store(true, Ordering::Relaxed);
    });
    Ok((sender, closed))
}

enum StreamError {
    Refused(StatusCode),
    Http2(h2::Error),
}

/// One CONNECT on `conn` (its stream count already taken).
async fn open_stream(conn: &PooledConn, target: SocketAddr) -> Result<H2Stream, StreamError> {
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    // A socket address is always a valid authority.
    if let Ok(uri) = target.to_string().parse() {
        *req.uri_mut() = uri;
    }
    let mut sender = conn.sender.clone().ready().await.map_err(StreamError::Http2)?;
    let (response, send) = sender.send_request(req, false).map_err(StreamError::Http2)?;
    let res = response.await.map_err(StreamError::Http2)?;
    if res.status() != StatusCode::OK {
        return Err(StreamError::Refused(res.status()));
    }
    Ok(H2Stream::new(send, res.into_body()))
}
