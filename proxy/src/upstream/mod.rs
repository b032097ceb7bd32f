//! The L7 upstream side: per-cluster runtime state that outlives config snapshots (endpoint
//! stats, outlier ejections, circuit breakers, connection pools) and host selection. The HTTP
//! router asks a [`ClusterState`] to admit a request, pick an endpoint, send, and report.
mod connect;
mod error;
pub mod lb;
mod pool;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, RwLock,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::{
    cluster::{Cluster, Endpoint, Health, LbPolicy, OutlierDetection},
    l7::L7Config,
};
pub use connect::{BoxIo, Connect, Connecting, Io};
pub use error::{Outcome, UpstreamError};
use lb::{Maglev, Ring, Weighted};

/// Request and response bodies toward upstreams.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A response body on its way down that keeps `hold` (an active-request slot, an endpoint's
/// LEAST_REQUEST count) until it ends, as Envoy counts a request active until its response is
/// complete, and that fails with [`RouteTimeout`] at `deadline` (Envoy's route timeout also
/// covers the response body; the stream is then reset).
pub struct Held<G> {
    inner: Body,
    hold: Option<G>,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<G: Send + Sync + Unpin + 'static> Held<G> {
    pub fn wrap(inner: Body, hold: G, deadline: Option<tokio::time::Instant>) -> Body {
        use http_body_util::BodyExt;
        Held {
            inner,
            hold: Some(hold),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        }
        .boxed()
    }
}

impl<G: Unpin> hyper::body::Body for Held<G> {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.hold = None,
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    if std::future::Future::poll(d.as_mut(), cx).is_ready() {
                        this.hold = None;
                        this.deadline = None;
                        return Poll::Ready(Some(Err(Box::new(RouteTimeout))));
                    }
                }
            }
            Poll::Ready(Some(Ok(_))) => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The route timeout passed while the response body was still arriving (flag UT).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("upstream request timeout")]
pub struct RouteTimeout;

/// A circuit breaker is open (Envoy's response flag UO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("upstream overflow (circuit breaker open)")]
pub struct Overflow;

/// Per-cluster runtime state kept across config updates, by cluster name. The set follows the
/// L7 model when it changes ([`Upstreams::sync`]); a request only looks its cluster up.
pub struct Upstreams {
    clusters: ArcSwap<HashMap<String, Entry>>,
    /// Serialises writers (config pushes); readers never wait.
    write: Mutex<()>,
    /// How long an unused pooled connection is kept ([`crate::config::Config::upstream_idle_timeout`]).
    idle_timeout: Duration,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self::with_idle_timeout(IDLE_TIMEOUT)
    }
}

#[derive(Clone)]
struct Entry {
    config: Arc<Cluster>,
    endpoints: Vec<Endpoint>,
    state: Arc<ClusterState>,
}

impl Entry {
    fn new(config: &Arc<Cluster>, endpoints: &[Endpoint], idle_timeout: Duration) -> Self {
        Entry {
            config: config.clone(),
            endpoints: endpoints.to_vec(),
            state: Arc::new(ClusterState::new(config.clone(), endpoints, idle_timeout)),
        }
    }

    /// This entry, refreshed when the config or the endpoints changed: stats and ejections of
    /// addresses that remain are kept, hash tables rebuilt.
    fn updated(&self, config: &Arc<Cluster>, endpoints: &[Endpoint]) -> Self {
        if Arc::ptr_eq(&self.config, config) && self.endpoints == endpoints {
            return self.clone();
        }
        self.state.refresh(config.clone(), endpoints);
        Entry {
            config: config.clone(),
            endpoints: endpoints.to_vec(),
            state: self.state.clone(),
        }
    }
}

impl Upstreams {
    pub fn new() -> Self {
        Self::default()
    }

    /// Clusters whose pools close a connection unused for `idle_timeout`.
    pub fn with_idle_timeout(idle_timeout: Duration) -> Self {
        Upstreams {
            clusters: ArcSwap::default(),
            write: Mutex::new(()),
            idle_timeout,
        }
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the cluster set that of `l7`: new clusters are created, changed ones refreshed,
    /// removed ones dropped (their pools close once their last requests finish).
    pub fn sync(&self, l7: &L7Config) {
        let _w = self.writer();
        let current = self.clusters.load();
        let next: HashMap<String, Entry> = l7
            .clusters
            .iter()
            .map(|(name, c)| {
                let endpoints = l7.endpoints(c);
                let e = match current.get(name) {
                    Some(e) => e.updated(c, endpoints),
                    None => Entry::new(c, endpoints, self.idle_timeout),
                };
                (name.clone(), e)
            })
            .collect();
        self.clusters.store(Arc::new(next));
    }

    /// The runtime state of the cluster `name`, if the config has it.
    pub fn get(&self, name: &str) -> Option<Arc<ClusterState>> {
        self.clusters.load().get(name).map(|e| e.state.clone())
    }

    /// The runtime state of `cluster` with `endpoints`, created or refreshed when they differ
    /// from what it has: one cluster set up outside a config push (tests, the inbound app
    /// cluster). The request path uses [`Upstreams::get`].
    pub fn cluster(&self, cluster: &Arc<Cluster>, endpoints: &[Endpoint]) -> Arc<ClusterState> {
        if let Some(e) = self.clusters.load().get(&cluster.name) {
            if Arc::ptr_eq(&e.config, cluster) && e.endpoints == endpoints {
                return e.state.clone();
            }
        }
        let _w = self.writer();
        let mut next = HashMap::clone(&self.clusters.load());
        let e = match next.get(&cluster.name) {
            Some(e) => e.updated(cluster, endpoints),
            None => Entry::new(cluster, endpoints, self.idle_timeout),
        };
        let state = e.state.clone();
        next.insert(cluster.name.clone(), e);
        self.clusters.store(Arc::new(next));
        state
    }

    /// For `/clusters`: every configured cluster, with endpoint runtime state.
    pub fn status(&self) -> Vec<ClusterStatus> {
        let mut out: Vec<ClusterStatus> = self.clusters.load().values().map(|e| e.state.status()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One cluster's runtime state.
    pub fn cluster_status(&self, name: &str) -> Option<ClusterStatus> {
        Some(self.get(name)?.status())
    }

    /// Whether outlier detection has `addr` of `cluster` ejected right now (`None`: unknown).
    pub fn ejected(&self, cluster: &str, addr: SocketAddr) -> Option<bool> {
        self.cluster_status(cluster)?
            .endpoints
            .iter()
            .find(|e| e.address == addr)
            .map(|e| e.ejected)
    }
}

/// Cluster counters (Envoy's `cluster.<name>.*` names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterCounters {
    pub upstream_rq_total: u64,
    pub upstream_rq_active: u64,
    pub upstream_rq_pending_total: u64,
    pub upstream_rq_pending_active: u64,
    pub upstream_rq_pending_overflow: u64,
    pub upstream_rq_retry: u64,
    pub upstream_rq_retry_overflow: u64,
    pub upstream_cx_total: u64,
    pub upstream_cx_active: u64,
    pub upstream_cx_connect_fail: u64,
    pub upstream_cx_overflow: u64,
    pub outlier_detection_ejections_enforced_total: u64,
    pub outlier_detection_ejections_active: u64,
    pub outlier_detection_ejections_overflow: u64,
    pub outlier_detection_ejections_detected_consecutive_5xx: u64,
    pub outlier_detection_ejections_detected_consecutive_gateway_failure: u64,
}

#[derive(Default)]
struct Stats {
    rq_total: AtomicU64,
    rq_pending_total: AtomicU64,
    rq_pending_overflow: AtomicU64,
    rq_retry: AtomicU64,
    rq_retry_overflow: AtomicU64,
    cx_total: AtomicU64,
    cx_connect_fail: AtomicU64,
    cx_overflow: AtomicU64,
    ejections_enforced: AtomicU64,
    ejections_overflow: AtomicU64,
    detected_5xx: AtomicU64,
    detected_gateway: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub name: String,
    pub counters: ClusterCounters,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    pub address: SocketAddr,
    pub weight: u32,
    pub priority: u32,
    pub health: Health,
    pub active_requests: u32,
    pub rq_total: u64,
    pub rq_error: u64,
    pub ejected: bool,
    /// Remaining ejection time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    pub times_ejected: u32,
}

/// Runtime stats of one endpoint address, carried over config refreshes.
#[derive(Default)]
struct HostStats {
    active: AtomicU32,
    rr_current: AtomicI64,
    rq_total: AtomicU64,
    rq_error: AtomicU64,
    outlier: Mutex<OutlierState>,
}

#[derive(Default)]
struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    /// When the last ejection ended: the ejection multiplier decays by one per `interval` since.
    unejected_at: Option<Instant>,
}

impl HostStats {
    fn outlier(&self) -> MutexGuard<'_, OutlierState> {
        self.outlier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether ejected at `now`; an expired ejection is lifted here (lazily, on use).
    fn ejected(&self, now: Instant) -> bool {
        let mut o = self.outlier();
        match o.ejected_until {
            Some(until) if until > now => true,
            Some(until) => {
                o.ejected_until = None;
                o.unejected_at = Some(until);
                false
            }
            None => false,
        }
    }
}

struct Host {
    endpoint: Endpoint,
    stats: Arc<HostStats>,
}

/// The endpoints of one config generation, grouped by priority, with the hash table (ring or
/// Maglev) of the last candidate set cached: candidates change only with health and ejections.
struct HostSet {
    hosts: Vec<Host>,
    by_addr: HashMap<SocketAddr, usize>,
    /// Host indices by priority, lowest priority number first.
    levels: Vec<Vec<usize>>,
    table: Mutex<Option<(Vec<usize>, Arc<HashTable>)>>,
}

enum HashTable {
    Ring(Ring),
    Maglev(Maglev),
}

impl HostSet {
    fn new(endpoints: &[Endpoint], previous: Option<&HostSet>) -> HostSet {
        let hosts: Vec<Host> = endpoints
            .iter()
            .map(|e| Host {
                endpoint: e.clone(),
                stats: previous
                    .and_then(|p| p.by_addr.get(&e.address).map(|&i| p.hosts[i].stats.clone()))
                    .unwrap_or_default(),
            })
            .collect();
        let by_addr = hosts.iter().enumerate().map(|(i, h)| (h.endpoint.address, i)).collect();
        let mut prios: Vec<u32> = hosts.iter().map(|h| h.endpoint.priority).collect();
        prios.sort_unstable();
        prios.dedup();
        let levels = prios
            .iter()
            .map(|p| (0..hosts.len()).filter(|&i| hosts[i].endpoint.priority == *p).collect())
            .collect();
        HostSet {
            hosts,
            by_addr,
            levels,
            table: Mutex::new(None),
        }
    }

    fn weighted(&self, indices: &[usize]) -> Vec<Weighted> {
        indices
            .iter()
            .map(|&i| Weighted {
                index: i,
                address: self.hosts[i].endpoint.address,
                weight: self.hosts[i].endpoint.weight,
            })
            .collect()
    }

    /// Envoy's host selection by health: the lowest priority with healthy (not ejected) hosts;
    /// else degraded ones; else panic mode: every host of the lowest priority.
    fn candidates(&self, ejected: &[bool]) -> Vec<usize> {
        for wanted in [Health::Healthy, Health::Degraded] {
            for level in &self.levels {
                let c: Vec<usize> = level
                    .iter()
                    .copied()
                    .filter(|&i| self.hosts[i].endpoint.health == wanted && !ejected[i])
                    .collect();
                if !c.is_empty() {
                    return c;
                }
            }
        }
        self.levels.first().cloned().unwrap_or_default()
    }

    fn hash_table(&self, candidates: &[usize], policy: LbPolicy) -> Arc<HashTable> {
        let mut cached = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, t)) = cached.as_ref() {
            if c == candidates {
                return t.clone();
            }
        }
        let w = self.weighted(candidates);
        let table = Arc::new(match policy {
            LbPolicy::Maglev { table_size } => HashTable::Maglev(Maglev::build(&w, table_size)),
            LbPolicy::RingHash {
                minimum_ring_size,
                maximum_ring_size,
            } => HashTable::Ring(Ring::build(&w, minimum_ring_size, maximum_ring_size)),
            _ => HashTable::Ring(Ring::build(&w, 0, 0)),
        });
        *cached = Some((candidates.to_vec(), table.clone()));
        table
    }
}

/// One cluster's runtime state.
pub struct ClusterState {
    name: String,
    config: RwLock<Arc<Cluster>>,
    hosts: RwLock<Arc<HostSet>>,
    active_requests: AtomicU32,
    active_retries: AtomicU32,
    stats: Stats,
    /// Serialises smooth round robin and ejection decisions (the cap counts all hosts).
    rr: Mutex<()>,
    eject: Mutex<()>,
    pool: Arc<pool::Pool>,
}

/// An admitted request; dropping it frees the slot.
pub struct RequestGuard {
    state: Arc<ClusterState>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.state.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An admitted retry; dropping it frees the slot.
pub struct RetryGuard {
    state: Arc<ClusterState>,
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.state.active_retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes a slot under `limit` or fails without side effects.
fn try_acquire(counter: &AtomicU32, limit: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
        .is_ok()
}

impl ClusterState {
    fn new(config: Arc<Cluster>, endpoints: &[Endpoint], idle_timeout: Duration) -> Self {
        ClusterState {
            name: config.name.clone(),
            config: RwLock::new(config),
            hosts: RwLock::new(Arc::new(HostSet::new(endpoints, None))),
            active_requests: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            stats: Stats::default(),
            rr: Mutex::new(()),
            eject: Mutex::new(()),
            pool: Arc::new(pool::Pool::new(idle_timeout)),
        }
    }

    fn refresh(&self, config: Arc<Cluster>, endpoints: &[Endpoint]) {
        let set = Arc::new(HostSet::new(endpoints, Some(&self.hosts())));
        let keep: Vec<SocketAddr> = endpoints.iter().map(|e| e.address).collect();
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        *self.hosts.write().unwrap_or_else(|p| p.into_inner()) = set;
        // ORIGINAL_DST clusters have no endpoints but do pool: only prune when there is a list.
        if !keep.is_empty() {
            self.pool.retain_endpoints(&keep);
        }
    }

    fn config(&self) -> Arc<Cluster> {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn hosts(&self) -> Arc<HostSet> {
        self.hosts.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// [`ClusterState::pick`], except that an ORIGINAL_DST cluster (PassthroughCluster) sends
    /// to the connection's own destination `dst`.
    pub fn pick_for(
        &self,
        dst: SocketAddr,
        hash: Option<u64>,
        exclude: &[SocketAddr],
        attempts: u32,
    ) -> Option<SocketAddr> {
        if matches!(self.config().discovery, crate::cluster::Discovery::OriginalDst) {
            return Some(dst);
        }
        self.pick(hash, exclude, attempts)
    }

    /// Circuit breaker `max_requests` (active requests across the cluster). Err → 503 UO.
    pub fn admit_request(self: &Arc<Self>) -> Result<RequestGuard, Overflow> {
        if try_acquire(&self.active_requests, self.config().limits.max_requests) {
            Ok(RequestGuard { state: self.clone() })
        } else {
            // Envoy counts requests-breaker overflows here too.
            inc(&self.stats.rq_pending_overflow);
            Err(Overflow)
        }
    }

    /// Circuit breaker `max_retries` (active retries). Err → no retry.
    pub fn admit_retry(self: &Arc<Self>) -> Result<RetryGuard, Overflow> {
        if try_acquire(&self.active_retries, self.config().limits.max_retries) {
            inc(&self.stats.rq_retry);
            Ok(RetryGuard { state: self.clone() })
        } else {
            inc(&self.stats.rq_retry_overflow);
            Err(Overflow)
        }
    }

    /// Chooses an endpoint: by priority and health (see [`HostSet::candidates`]), not ejected,
    /// by the cluster's policy; `hash` drives RING_HASH/MAGLEV (None → random). Hosts in
    /// `exclude` are avoided: dropped from the candidates for the non-hash policies, re-picked up
    /// to `attempts` times for the hash ones (Envoy's host_selection_retry_max_attempts).
    /// `None` only when the cluster has no endpoints.
    pub fn pick(&self, hash: Option<u64>, exclude: &[SocketAddr], attempts: u32) -> Option<SocketAddr> {
        let set = self.hosts();
        if set.hosts.is_empty() {
            return None;
        }
        let now = Instant::now();
        let ejected: Vec<bool> = set.hosts.iter().map(|h| h.stats.ejected(now)).collect();
        let all = set.candidates(&ejected);
        let policy = self.config().lb_policy;
        let addr = |i: usize| set.hosts[i].endpoint.address;
        match (policy, hash) {
            (LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. }, Some(hash)) => {
                let table = set.hash_table(&all, policy);
                let mut last = None;
                for attempt in 0..attempts.max(1) {
                    let i = match table.as_ref() {
                        HashTable::Ring(r) => r.get(hash, attempt),
                        HashTable::Maglev(m) => m.get(hash, attempt),
                    }?;
                    if !exclude.contains(&addr(i)) {
                        return Some(addr(i));
                    }
                    last = Some(addr(i));
                }
                last
            }
            _ => {
                let fresh: Vec<usize> = all.iter().copied().filter(|&i| !exclude.contains(&addr(i))).collect();
                let w = set.weighted(if fresh.is_empty() { &all } else { &fresh });
                let i = match policy {
                    LbPolicy::RoundRobin => {
                        let _g = self.rr.lock().unwrap_or_else(|p| p.into_inner());
                        lb::smooth_round_robin(&w, |i| &set.hosts[i].stats.rr_current)
                    }
                    LbPolicy::LeastRequest { choice_count } => {
                        lb::least_request(&w, choice_count, |i| set.hosts[i].stats.active.load(Ordering::Relaxed))
                    }
                    _ => lb::random(&w),
                }?;
                Some(addr(i))
            }
        }
    }

    /// Outlier detection input after each attempt. Local failures count as Envoy maps them
    /// (connect failure/reset → 503, timeout → 504): both for consecutive 5xx and gateway failures.
    pub fn report(&self, endpoint: SocketAddr, outcome: Outcome) {
        self.report_at(endpoint, outcome, Instant::now());
    }

    fn report_at(&self, endpoint: SocketAddr, outcome: Outcome, now: Instant) {
        let set = self.hosts();
        let Some(&i) = set.by_addr.get(&endpoint) else {
            return;
        };
        let stats = &set.hosts[i].stats;
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout => (true, true),
            Outcome::Overflow => return,
        };
        if is_5xx {
            inc(&stats.rq_error);
        }
        let Some(od) = self.config().outlier_detection else {
            return;
        };
        let (fire_5xx, fire_gateway) = {
            let mut o = stats.outlier();
            if !is_5xx {
                o.consecutive_5xx = 0;
                o.consecutive_gateway = 0;
                return;
            }
            o.consecutive_5xx += 1;
            if is_gateway {
                o.consecutive_gateway += 1;
            } else {
                o.consecutive_gateway = 0;
            }
            let f5 = od.consecutive_5xx > 0 && o.consecutive_5xx >= od.consecutive_5xx;
            let fg = od.consecutive_gateway_failure > 0 && o.consecutive_gateway >= od.consecutive_gateway_failure;
            if f5 {
                o.consecutive_5xx = 0;
            }
            if fg {
                o.consecutive_gateway = 0;
            }
            (f5, fg)
        };
        let enforce = |percent: u32| percent >= 100 || fastrand::u32(0..100) < percent;
        if fire_5xx {
            inc(&self.stats.detected_5xx);
            if enforce(od.enforcing_consecutive_5xx) {
                self.eject(&set, i, &od, now);
                return;
            }
        }
        if fire_gateway {
            inc(&self.stats.detected_gateway);
            if enforce(od.enforcing_consecutive_gateway_failure) {
                self.eject(&set, i, &od, now);
            }
        }
    }

    /// Ejects host `i` for `base × times ejected` (≤ max_ejection_time), unless that would take
    /// more than max_ejection_percent of the hosts out; as Envoy documents, one host may always
    /// be ejected whatever the percentage.
    fn eject(&self, set: &HostSet, i: usize, od: &OutlierDetection, now: Instant) {
        let _g = self.eject.lock().unwrap_or_else(|p| p.into_inner());
        let stats = &set.hosts[i].stats;
        if stats.ejected(now) {
            return;
        }
        let active = set
            .hosts
            .iter()
            .enumerate()
            .filter(|(j, h)| *j != i && h.stats.ejected(now))
            .count() as u64;
        let total = set.hosts.len() as u64;
        if active > 0 && (active + 1) * 100 > u64::from(od.max_ejection_percent) * total {
            inc(&self.stats.ejections_overflow);
            return;
        }
        let mut o = stats.outlier();
        // Envoy lowers the multiplier for every interval the host stayed in.
        if let Some(since) = o.unejected_at.take() {
            let healthy_intervals = now.saturating_duration_since(since).as_nanos() / od.interval.as_nanos().max(1);
            o.times_ejected = o
                .times_ejected
                .saturating_sub(u32::try_from(healthy_intervals).unwrap_or(u32::MAX));
        }
        o.times_ejected = o.times_ejected.saturating_add(1);
        let cap = od.max_ejection_time.max(od.base_ejection_time);
        let time = od.base_ejection_time.saturating_mul(o.times_ejected).min(cap);
        o.ejected_until = Some(now + time);
        o.consecutive_5xx = 0;
        o.consecutive_gateway = 0;
        inc(&self.stats.ejections_enforced);
        tracing::info!(cluster = %self.name, endpoint = %set.hosts[i].endpoint.address,
            ejection_ms = time.as_millis() as u64, "outlier ejected");
    }

    pub fn counters(&self) -> ClusterCounters {
        let s = &self.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let now = Instant::now();
        let (cx_active, pending_active) = self.pool.gauges();
        ClusterCounters {
            upstream_rq_total: l(&s.rq_total),
            upstream_rq_active: u64::from(self.active_requests.load(Ordering::Relaxed)),
            upstream_rq_pending_total: l(&s.rq_pending_total),
            upstream_rq_pending_active: u64::from(pending_active),
            upstream_rq_pending_overflow: l(&s.rq_pending_overflow),
            upstream_rq_retry: l(&s.rq_retry),
            upstream_rq_retry_overflow: l(&s.rq_retry_overflow),
            upstream_cx_total: l(&s.cx_total),
            upstream_cx_active: u64::from(cx_active),
            upstream_cx_connect_fail: l(&s.cx_connect_fail),
            upstream_cx_overflow: l(&s.cx_overflow),
            outlier_detection_ejections_enforced_total: l(&s.ejections_enforced),
            outlier_detection_ejections_active: self.hosts().hosts.iter().filter(|h| h.stats.ejected(now)).count()
                as u64,
            outlier_detection_ejections_overflow: l(&s.ejections_overflow),
            outlier_detection_ejections_detected_consecutive_5xx: l(&s.detected_5xx),
            outlier_detection_ejections_detected_consecutive_gateway_failure: l(&s.detected_gateway),
        }
    }

    fn status(&self) -> ClusterStatus {
        let now = Instant::now();
        let endpoints = self
            .hosts()
            .hosts
            .iter()
            .map(|h| {
                let ejected = h.stats.ejected(now);
                let o = h.stats.outlier();
                EndpointStatus {
                    address: h.endpoint.address,
                    weight: h.endpoint.weight,
                    priority: h.endpoint.priority,
                    health: h.endpoint.health,
                    active_requests: h.stats.active.load(Ordering::Relaxed),
                    rq_total: h.stats.rq_total.load(Ordering::Relaxed),
                    rq_error: h.stats.rq_error.load(Ordering::Relaxed),
                    ejected,
                    ejected_for_ms: o
                        .ejected_until
                        .filter(|_| ejected)
                        .map(|u| u.saturating_duration_since(now).as_millis() as u64),
                    times_ejected: o.times_ejected,
                }
            })
            .collect();
        ClusterStatus {
            name: self.name.clone(),
            counters: self.counters(),
            endpoints,
        }
    }

    /// The stats of `endpoint` if it is one of the cluster's (ORIGINAL_DST targets are not).
    fn host_stats(&self, endpoint: SocketAddr) -> Option<Arc<HostStats>> {
        let set = self.hosts();
        set.by_addr.get(&endpoint).map(|&i| set.hosts[i].stats.clone())
    }
}

/// Counts a request as active on its endpoint (LEAST_REQUEST's input) while alive.
pub(crate) struct ActiveGuard(Option<Arc<HostStats>>);

impl ActiveGuard {
    fn new(stats: Option<Arc<HostStats>>) -> Self {
        if let Some(s) = &stats {
            s.active.fetch_add(1, Ordering::Relaxed);
            inc(&s.rq_total);
        }
        ActiveGuard(stats)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How long an unused pooled connection is kept by default.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests;
