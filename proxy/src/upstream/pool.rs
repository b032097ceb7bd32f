//! Connection pools of one cluster, keyed by (endpoint, HTTP version, source pod), sharing the
//! cluster's `max_connections` and `max_pending_requests` circuit breakers.
//!
//! HTTP/1.1 connections carry one request at a time: a connection is taken out of the idle list
//! for a request and put back once hyper says it is ready again (response body finished). HTTP/2
//! connections stay listed and are multiplexed. A connection's slot is held by the task driving
//! it, so the count falls exactly when the connection really closes.
use http_body_util::BodyExt;
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::{Duration, Instant},
};

use http::{header, HeaderValue, Request, Response, Uri, Version};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;

use super::{inc, ActiveGuard, Body, ClusterState, Connect, UpstreamError};
use crate::cluster::Limits;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    endpoint: SocketAddr,
    http2: bool,
    source: String,
}

pub(super) struct Pool {
    state: Mutex<PoolState>,
    /// Wakes pending requests: a connection became idle, was added, or closed.
    changed: Notify,
    next_id: AtomicU64,
    /// An unused connection is closed after this.
    idle_timeout: Duration,
}

impl Pool {
    pub(super) fn new(idle_timeout: Duration) -> Self {
        Pool {
            state: Mutex::default(),
            changed: Notify::new(),
            next_id: AtomicU64::new(0),
            idle_timeout,
        }
    }
}

#[derive(Default)]
struct PoolState {
    /// Connections open or being opened.
    total: u32,
    pending: u32,
    idle_h1: HashMap<PoolKey, Vec<IdleH1>>,
    h2: HashMap<PoolKey, Vec<Arc<H2Conn>>>,
    reaper: bool,
}

struct IdleH1 {
    id: u64,
    sender: http1::SendRequest<Body>,
    served: u32,
    since: Instant,
}

struct H2Conn {
    id: u64,
    sender: http2::SendRequest<Body>,
    served: AtomicU32,
    active: AtomicU32,
    last_used: Mutex<Instant>,
}

enum Lease {
    H1 {
        id: u64,
        sender: http1::SendRequest<Body>,
        served: u32,
    },
    H2(Arc<H2Conn>),
}

enum Checkout {
    Reused(Lease),
    /// No usable connection; a slot to open one is held.
    Open(Slot),
}

/// One unit of `max_connections`; released on drop (the connection's driver task owns it).
struct Slot {
    pool: Arc<Pool>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut s = self.pool.lock();
            s.total = s.total.saturating_sub(1);
        }
        self.pool.changed.notify_waiters();
    }
}

struct PendingGuard<'a>(&'a Pool);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.pending = s.pending.saturating_sub(1);
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (connections, pending requests) right now.
    pub(super) fn gauges(&self) -> (u32, u32) {
        let s = self.lock();
        (s.total, s.pending)
    }

    /// Drops idle connections to endpoints no longer in the cluster.
    pub(super) fn retain_endpoints(&self, keep: &[SocketAddr]) {
        let mut s = self.lock();
        s.idle_h1.retain(|k, _| keep.contains(&k.endpoint));
        s.h2.retain(|k, _| keep.contains(&k.endpoint));
    }

    /// A free connection for `key`, or a slot to open one, waiting as a pending request when
    /// neither is available (at most `max_pending_requests` wait; beyond that: overflow).
    async fn checkout(
        self: &Arc<Self>,
        key: &PoolKey,
        limits: &Limits,
        cluster: &ClusterState,
    ) -> Result<Checkout, UpstreamError> {
        let per_conn = limits.max_requests_per_connection;
        let mut pending: Option<PendingGuard<'_>> = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if !s.reaper {
                    s.reaper = true;
                    tokio::spawn(reap(Arc::downgrade(self)));
                }
                if key.http2 {
                    if let Some(conns) = s.h2.get_mut(key) {
                        conns.retain(|c| !c.sender.is_closed());
                        let usable = conns
                            .iter()
                            .position(|c| per_conn == 0 || c.served.load(Ordering::Relaxed) < per_conn);
                        if let Some(i) = usable {
                            let c = conns[i].clone();
                            let served = c.served.fetch_add(1, Ordering::Relaxed) + 1;
                            if per_conn != 0 && served >= per_conn {
                                // Used up: unlisted, it closes once its streams finish.
                                conns.swap_remove(i);
                            }
                            return Ok(Checkout::Reused(Lease::H2(c)));
                        }
                    }
                } else if let Some(idle) = s.idle_h1.get_mut(key) {
                    while let Some(c) = idle.pop() {
                        if c.sender.is_closed() || !c.sender.is_ready() || c.since.elapsed() >= self.idle_timeout {
                            continue; // dropped: its driver task ends and frees the slot
                        }
                        return Ok(Checkout::Reused(Lease::H1 {
                            id: c.id,
                            sender: c.sender,
                            served: c.served,
                        }));
                    }
                }
                if s.total < limits.max_connections {
                    s.total += 1;
                    drop(s);
                    inc(&cluster.stats.cx_total);
                    return Ok(Checkout::Open(Slot { pool: self.clone() }));
                }
                // At the connection limit: an idle connection of another key gives way.
                let other = s.idle_h1.values_mut().find(|v| !v.is_empty()).and_then(Vec::pop);
                if pending.is_none() {
                    if s.pending >= limits.max_pending_requests {
                        drop(s);
                        drop(other);
                        inc(&cluster.stats.rq_pending_overflow);
                        return Err(UpstreamError::Overflow);
                    }
                    s.pending += 1;
                    drop(s);
                    pending = Some(PendingGuard(self));
                    inc(&cluster.stats.cx_overflow);
                    inc(&cluster.stats.rq_pending_total);
                }
                drop(other);
            }
            notified.await;
        }
    }

    fn put_idle(&self, key: PoolKey, id: u64, sender: http1::SendRequest<Body>, served: u32) {
        self.lock().idle_h1.entry(key).or_default().push(IdleH1 {
            id,
            sender,
            served,
            since: Instant::now(),
        });
        self.changed.notify_waiters();
    }

    fn add_h2(&self, key: PoolKey, conn: Arc<H2Conn>) {
        self.lock().h2.entry(key).or_default().push(conn);
        self.changed.notify_waiters();
    }

    /// The connection `id` ended: forget it (its slot is released by the caller).
    fn closed(&self, key: &PoolKey, id: u64) {
        let mut s = self.lock();
        if let Some(v) = s.idle_h1.get_mut(key) {
            v.retain(|c| c.id != id);
        }
        if let Some(v) = s.h2.get_mut(key) {
            v.retain(|c| c.id != id);
        }
    }

    /// Closes idle connections past the pool's idle timeout.
    fn evict_idle(&self) {
        let mut s = self.lock();
        for v in s.idle_h1.values_mut() {
            v.retain(|c| c.since.elapsed() < self.idle_timeout && !c.sender.is_closed());
        }
        for v in s.h2.values_mut() {
            v.retain(|c| {
                let idle = c.active.load(Ordering::Relaxed) == 0
                    && c.last_used.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= self.idle_timeout;
                !idle && !c.sender.is_closed()
            });
        }
        s.idle_h1.retain(|_, v| !v.is_empty());
        s.h2.retain(|_, v| !v.is_empty());
    }
}

/// Runs while the pool exists.
async fn reap(pool: Weak<Pool>) {
    loop {
        let Some(every) = pool.upgrade().map(|p| p.idle_timeout / 4) else {
            return;
        };
        tokio::time::sleep(every.max(Duration::from_millis(10))).await;
        match pool.upgrade() {
            Some(p) => p.evict_idle(),
            None => return,
        }
    }
}

/// Why a send failed, and whether the request came back unsent (safe to try on another
/// connection).
enum SendFailure {
    Unsent(Box<Request<Body>>, hyper::Error),
    Failed(UpstreamError),
}

fn classify(e: &hyper::Error) -> UpstreamError {
    UpstreamError::from_hyper(e)
}

impl ClusterState {
    /// Sends one request to `endpoint` over a pooled connection of `via`'s source, opening one
    /// with `via` when none is free. Waits as a pending request when the connection limit is
    /// reached (Err(Overflow) beyond `max_pending_requests`). The request's headers are sent as
    /// given (the caller has dropped hop-by-hop ones); only its form is fitted to `version`.
    pub async fn send(
        &self,
        via: &dyn Connect,
        endpoint: SocketAddr,
        version: Version,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let config = self.config();
        let key = PoolKey {
            endpoint,
            http2: version == Version::HTTP_2,
            source: via.source().to_string(),
        };
        inc(&self.stats.rq_total);
        let mut active = Some(ActiveGuard::new(self.host_stats(endpoint)));
        let mut req = prepare(req, key.http2, endpoint);
        // A reused connection may turn out closed before the request left; hyper hands the
        // request back and it goes on another (at most a few times, then on a fresh one).
        for _ in 0..3 {
            let lease = match self.pool.checkout(&key, &config.limits, self).await? {
                Checkout::Reused(lease) => lease,
                Checkout::Open(slot) => {
                    let lease = self.open(slot, &key, config.connect_timeout, via).await?;
                    return match self.send_on(lease, &key, req, &mut active).await {
                        Ok(r) => Ok(r),
                        Err(SendFailure::Unsent(_, e)) => Err(classify(&e)),
                        Err(SendFailure::Failed(e)) => Err(e),
                    };
                }
            };
            match self.send_on(lease, &key, req, &mut active).await {
                Ok(r) => return Ok(r),
                Err(SendFailure::Unsent(r, e)) => match classify(&e) {
                    // The upstream declined it: that is for the route's retry policy to judge.
                    UpstreamError::RefusedStream => return Err(UpstreamError::RefusedStream),
                    _ => {
                        tracing::debug!(cluster = %self.name, %endpoint, error = %e, "pooled connection unusable, retrying on another");
                        req = *r;
                    }
                },
                Err(SendFailure::Failed(e)) => return Err(e),
            }
        }
        Err(UpstreamError::Reset("no usable connection".into()))
    }

    /// Opens a connection for `key` (connect + HTTP handshake within `timeout`) and spawns its
    /// driver, which holds `slot` until the connection ends.
    async fn open(
        &self,
        slot: Slot,
        key: &PoolKey,
        timeout: Duration,
        via: &dyn Connect,
    ) -> Result<Lease, UpstreamError> {
        let id = self.pool.next_id.fetch_add(1, Ordering::Relaxed);
        let fail = |e: String| {
            inc(&self.stats.cx_connect_fail);
            UpstreamError::ConnectFailure(e)
        };
        let io = match tokio::time::timeout(timeout, via.connect(key.endpoint)).await {
            Ok(Ok(io)) => TokioIo::new(io),
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(_) => return Err(fail(format!("connect timed out after {timeout:?}"))),
        };
        let pool = self.pool.clone();
        let k = key.clone();
        if key.http2 {
            let handshake = http2::Builder::new(TokioExecutor::new()).handshake(io);
            let (sender, conn) = match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(fail(e.to_string())),
                Err(_) => return Err(fail("HTTP/2 handshake timed out".into())),
            };
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(endpoint = %k.endpoint, error = %e, "upstream HTTP/2 connection ended");
                }
                pool.closed(&k, id);
                drop(slot);
            });
            let c = Arc::new(H2Conn {
                id,
                sender,
                served: AtomicU32::new(1),
                active: AtomicU32::new(0),
                last_used: Mutex::new(Instant::now()),
            });
            let per_conn = self.config().limits.max_requests_per_connection;
            if per_conn != 1 {
                self.pool.add_h2(key.clone(), c.clone());
            }
            Ok(Lease::H2(c))
        } else {
            let (sender, conn) = match tokio::time::timeout(timeout, http1::handshake(io)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(fail(e.to_string())),
                Err(_) => return Err(fail("HTTP/1.1 handshake timed out".into())),
            };
            tokio::spawn(async move {
                // `with_upgrades`: a 101 (WebSocket) hands the connection to the router's bridge.
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(endpoint = %k.endpoint, error = %e, "upstream HTTP/1.1 connection ended");
                }
                pool.closed(&k, id);
                drop(slot);
            });
            Ok(Lease::H1 { id, sender, served: 0 })
        }
    }

    /// Sends on a leased connection; an HTTP/1.1 connection goes back to the pool once hyper
    /// reports it ready (the response body is done), and `active` (taken on success) lasts until
    /// then; for HTTP/2 until the response head.
    async fn send_on(
        &self,
        lease: Lease,
        key: &PoolKey,
        req: Request<Body>,
        active: &mut Option<ActiveGuard>,
    ) -> Result<Response<Body>, SendFailure> {
        match lease {
            Lease::H1 { id, mut sender, served } => {
                let served = served + 1;
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        let active = active.take();
                        let per_conn = self.config().limits.max_requests_per_connection;
                        let pool = self.pool.clone();
                        let key = key.clone();
                        tokio::spawn(async move {
                            let ready = sender.ready().await.is_ok();
                            drop(active);
                            if ready && (per_conn == 0 || served < per_conn) {
                                pool.put_idle(key, id, sender, served);
                            }
                        });
                        Ok(resp.map(|b| b.map_err(|e| Box::new(e) as _).boxed()))
                    }
                    Err(mut e) => match e.take_message() {
                        Some(req) => Err(SendFailure::Unsent(Box::new(req), e.into_error())),
                        None => Err(SendFailure::Failed(classify(e.error()))),
                    },
                }
            }
            Lease::H2(conn) => {
                conn.active.fetch_add(1, Ordering::Relaxed);
                let mut sender = conn.sender.clone();
                let result = sender.try_send_request(req).await;
                conn.active.fetch_sub(1, Ordering::Relaxed);
                *conn.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                match result {
                    Ok(resp) => {
                        // Active on the endpoint until the response body ends.
                        let held = active.take();
                        Ok(resp.map(|b| super::Held::wrap(b.map_err(|e| Box::new(e) as _).boxed(), held, None)))
                    }
                    Err(mut e) => match e.take_message() {
                        Some(req) => Err(SendFailure::Unsent(Box::new(req), e.into_error())),
                        None => Err(SendFailure::Failed(classify(e.error()))),
                    },
                }
            }
        }
    }
}

/// Fits the request to the upstream version: HTTP/1.1 in origin form with a Host header;
/// HTTP/2 with scheme and authority in the URI. Hop-by-hop headers are the caller's (the HTTP
/// layer's one `hop_by_hop` function): an upgrade it allows keeps `Connection`/`Upgrade`.
fn prepare(mut req: Request<Body>, http2: bool, endpoint: SocketAddr) -> Request<Body> {
    let uri = req.uri().clone();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    if http2 {
        *req.version_mut() = Version::HTTP_2;
        let authority = uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| endpoint.to_string());
        let scheme = uri.scheme_str().unwrap_or("http").to_string();
        if let Ok(u) = Uri::builder()
            .scheme(scheme.as_str())
            .authority(authority)
            .path_and_query(path)
            .build()
        {
            *req.uri_mut() = u;
        }
        // The authority is in the URI now: HTTP/2 has no Host header.
        req.headers_mut().remove(header::HOST);
    } else {
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            if let Some(Ok(v)) = uri.authority().map(|a| HeaderValue::from_str(a.as_str())) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        if uri.authority().is_some() {
            if let Ok(u) = path.parse::<Uri>() {
                *req.uri_mut() = u;
            }
        }
    }
    req
}
