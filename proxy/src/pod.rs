//! Composition: the node's data plane ([`Proxy`]) and the captured pods it serves. Starting a pod
//! wires its listeners to its inbound and outbound sides and returns a [`PodHandle`] that stops
//! them.
use std::{
    collections::HashMap,
    net::TcpListener as StdListener,
    sync::{Arc, Mutex},
};

use rustls::pki_types::CertificateDer;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tracing::warn;

use crate::{
    config::{Config, SameNodePath},
    connections::Connections,
    hbone::{server::ServerSettings, tls, HboneClient},
    http::{
        access_log::AccessLogSink,
        body::{BufferBudget, BufferLimits},
        server::ServerLimits,
    },
    identity::{manager::CertManager, Identity},
    inbound::Inbound,
    metrics::Metrics,
    netns::Netns,
    outbound::{OriginalDst, Outbound},
    state::{L7State, ProxyState},
    transport::{
        local::{LocalPeer, LocalPeers, Registration},
        PodDialer,
    },
    upstream::Upstreams,
    workload::Workload,
};

/// Where certificates come from and what they chain to; without it the node is plaintext only.
pub struct Mtls {
    pub certs: Arc<CertManager>,
    pub roots: Vec<CertificateDer<'static>>,
    pub trust_domain: String,
}

/// The node's data plane: config snapshots, the HBONE client, the upstream clusters and the
/// connection table, shared by every captured pod.
pub struct Proxy {
    config: Config,
    state: Arc<ProxyState>,
    hbone: Option<Arc<HboneClient>>,
    /// Captured pods that take same-node handoffs (with mTLS and [`SameNodePath::InProcess`]).
    local: Option<Arc<LocalPeers>>,
    /// The node's L7 model and its upstream clusters.
    l7: Arc<L7Runtime>,
    connections: Arc<Connections>,
    original_dst: Arc<dyn OriginalDst>,
    /// Request bodies buffered by every pod's router, together.
    buffer_budget: Arc<BufferBudget>,
    live: LiveCounts,
    /// The access log's queue to its writer thread, when the log is on.
    access_log: Option<AccessLogSink>,
}

/// A captured pod as the agent hands it over.
pub struct PodSpec {
    pub workload: Arc<Workload>,
    /// The pod's SPIFFE identity: its certificate is used on its connections.
    pub identity: Identity,
    pub netns: Arc<Netns>,
    /// The L7 model its traffic routes by: its sidecar class's, or (`None`) the node's.
    pub l7: Option<Arc<L7Runtime>>,
    /// The pod's namespace has the policy routing for delivery from the client's address
    /// (`transport::PodDialer::connect_from`): its app sees the client, not itself.
    pub transparent_delivery: bool,
}

/// An L7 model and the runtime state that follows it (upstream clusters, DNS answers): the
/// node's, or one sidecar class's. Dropping the last handle stops its resolver.
pub struct L7Runtime {
    pub state: Arc<L7State>,
    pub upstreams: Arc<Upstreams>,
    resolver: JoinHandle<()>,
}

impl L7Runtime {
    /// Must run inside a tokio runtime (the DNS resolver is spawned).
    fn new(state: Arc<L7State>, idle_timeout: std::time::Duration) -> Arc<Self> {
        let upstreams = Arc::new(Upstreams::with_idle_timeout(idle_timeout));
        // Clusters follow the config when it changes, never per request.
        let u = upstreams.clone();
        state.on_l7_change(Box::new(move |l7| u.sync(l7)));
        let resolver = tokio::spawn(crate::resolver::run(state.clone()));
        Arc::new(L7Runtime {
            state,
            upstreams,
            resolver,
        })
    }
}

impl Drop for L7Runtime {
    fn drop(&mut self) {
        self.resolver.abort();
    }
}

/// The pod's listening sockets, opened inside its namespace by the agent.
#[derive(Default)]
pub struct PodListeners {
    pub outbound: Vec<StdListener>,
    pub inbound: Vec<StdListener>,
    pub hbone: Vec<StdListener>,
}

/// Serving one pod; dropping or stopping it stops its listeners (open connections finish).
pub struct PodHandle {
    tasks: Vec<JoinHandle<()>>,
    _live: LiveWorkload,
    /// Its class's model stays while the pod is served.
    _l7: Arc<L7Runtime>,
    /// Its place among the node's same-node peers.
    _local: Option<Registration>,
}

/// Captured pods per workload (`namespace`, workload name): Istio's series are per workload.
type LiveCounts = Arc<Mutex<HashMap<(String, String), usize>>>;

/// One captured pod of a workload; when the workload's last pod on the node goes, its metric
/// series go too (a sidecar's series end with its pod).
struct LiveWorkload {
    counts: LiveCounts,
    key: (String, String),
    metrics: Arc<Metrics>,
}

impl LiveWorkload {
    fn new(counts: &LiveCounts, w: &Workload, metrics: Arc<Metrics>) -> Self {
        let key = (w.namespace.clone(), w.workload_name.clone());
        *counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        LiveWorkload {
            counts: counts.clone(),
            key,
            metrics,
        }
    }
}

impl Drop for LiveWorkload {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = counts.get_mut(&self.key) else { return };
        *n -= 1;
        if *n == 0 {
            counts.remove(&self.key);
            self.metrics.forget_workload(&self.key.0, &self.key.1);
        }
    }
}

impl PodHandle {
    pub fn stop(self) {}
}

impl Drop for PodHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Proxy {
    /// Must run inside a tokio runtime (the HBONE pool reaper is spawned).
    pub fn new(
        config: Config,
        connections: Arc<Connections>,
        original_dst: Arc<dyn OriginalDst>,
        mtls: Option<Mtls>,
    ) -> Arc<Self> {
        let state = Arc::new(ProxyState::new());
        let l7 = L7Runtime::new(state.l7_state().clone(), config.upstream_idle_timeout);
        let hbone = mtls.map(|m| {
            let client = Arc::new(HboneClient::new(m.certs, m.roots, m.trust_domain, config.hbone.clone()));
            client.start_reaper();
            client
        });
        let m = connections.metrics();
        let buffer_budget = BufferBudget::new(
            config.buffer_budget,
            m.buffer_budget_reserved_bytes.clone(),
            m.buffer_budget_exhausted.clone(),
        );
        let access_log = config.access_log.then(|| access_log(&config, m)).flatten();
        let local = (hbone.is_some() && config.same_node == SameNodePath::InProcess).then(LocalPeers::new);
        Arc::new(Proxy {
            local,
            access_log,
            buffer_budget,
            live: LiveCounts::default(),
            config,
            state,
            hbone,
            l7,
            connections,
            original_dst,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn state(&self) -> &Arc<ProxyState> {
        &self.state
    }

    pub fn hbone(&self) -> Option<&Arc<HboneClient>> {
        self.hbone.as_ref()
    }

    /// The node's upstream clusters (those of its own L7 model).
    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.l7.upstreams
    }

    /// A new L7 model for a sidecar class, with its own clusters; not synced until a first
    /// model is set and [`L7State::mark_synced`].
    pub fn new_l7_runtime(&self) -> Arc<L7Runtime> {
        L7Runtime::new(Arc::new(L7State::new(false)), self.config.upstream_idle_timeout)
    }

    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    /// Serves `pod` on `listeners` (must run inside a tokio runtime).
    pub fn start_pod(&self, pod: PodSpec, listeners: PodListeners) -> std::io::Result<PodHandle> {
        let dialer = PodDialer::new(pod.netns.clone(), self.config.connect_timeout);
        let l7 = pod.l7.clone().unwrap_or_else(|| self.l7.clone());
        let outbound = Arc::new(Outbound {
            name: pod.workload.key(),
            workload: pod.workload.clone(),
            identity: pod.identity.clone(),
            dialer: dialer.clone(),
            state: self.state.clone(),
            hbone: self.hbone.clone(),
            local: self.local.clone(),
            l7: l7.state.clone(),
            upstreams: l7.upstreams.clone(),
            connections: self.connections.clone(),
            original_dst: self.original_dst.clone(),
            access_log: self.access_log.clone(),
            buffer: BufferLimits {
                max: self.config.retry_buffer_limit,
                wait: self.config.retry_buffer_wait,
                budget: self.buffer_budget.clone(),
            },
            http_server: self.server_limits(),
            connection_slots: self.connection_slots(),
        });
        let inbound = Arc::new(Inbound {
            workload: pod.workload.clone(),
            identity: pod.identity.clone(),
            dialer,
            state: self.state.clone(),
            l7: l7.state.clone(),
            connections: self.connections.clone(),
            access_log: self.access_log.clone(),
            http_server: self.server_limits(),
            connection_slots: self.connection_slots(),
            upstream_idle_timeout: self.config.upstream_idle_timeout,
            transparent_delivery: pod.transparent_delivery,
        });
        let mut tasks = Vec::new();
        for l in listeners.outbound {
            tasks.push(tokio::spawn(crate::outbound::serve(
                tokio_listener(l)?,
                outbound.clone(),
            )));
        }
        for l in listeners.inbound {
            tasks.push(tokio::spawn(crate::inbound::serve(tokio_listener(l)?, inbound.clone())));
        }
        let hbone_server = self.hbone_server(&pod);
        // Only a pod that serves HBONE takes what would have been HBONE.
        let local = match (&self.local, &hbone_server) {
            (Some(peers), Some(_)) => Some(peers.register(&pod.workload.ips, &(inbound.clone() as Arc<dyn LocalPeer>))),
            _ => None,
        };
        if let Some(settings) = hbone_server {
            for l in listeners.hbone {
                let l = tokio_listener(l)?;
                tasks.push(tokio::spawn(crate::inbound::serve_hbone(
                    l,
                    settings.clone(),
                    inbound.clone(),
                )));
            }
        }
        let live = LiveWorkload::new(&self.live, &pod.workload, self.connections.metrics().clone());
        Ok(PodHandle {
            tasks,
            _live: live,
            _l7: l7,
            _local: local,
        })
    }

    /// One pod's connection cap, for one direction.
    fn connection_slots(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(
            self.config.max_connections_per_pod.min(Semaphore::MAX_PERMITS),
        ))
    }

    fn server_limits(&self) -> ServerLimits {
        let c = &self.config;
        ServerLimits {
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.http_idle_timeout,
            max_concurrent_streams: c.http_max_concurrent_streams,
            keepalive_interval: c.hbone.keepalive_interval,
            keepalive_timeout: c.hbone.keepalive_timeout,
            http2_guards: c.http2_guards,
        }
    }

    fn hbone_server(&self, pod: &PodSpec) -> Option<Arc<ServerSettings>> {
        let h = self.hbone.as_ref()?;
        match tls::PodAcceptor::new(h.certs.clone(), pod.identity.clone(), &h.roots) {
            Ok(tls) => Some(Arc::new(ServerSettings {
                tls,
                trust_domain: h.trust_domain.clone(),
                config: self.config.hbone.clone(),
                first_connect_timeout: self.config.header_read_timeout,
                http2_guards: self.config.http2_guards,
            })),
            Err(e) => {
                warn!(pod = %pod.workload.key(), error = %e, "no HBONE server for this pod");
                None
            }
        }
    }
}

/// The access log's writer thread; without one (the thread could not start) the log is off.
fn access_log(config: &Config, m: &Metrics) -> Option<AccessLogSink> {
    AccessLogSink::stdout(config.access_log_queue, m.access_log_dropped.clone())
        .map_err(|e| warn!(error = %e, "no access log: its writer thread did not start"))
        .ok()
}

fn tokio_listener(l: StdListener) -> std::io::Result<TcpListener> {
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{RequestLabels, TcpLabels};

    fn pod(name: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "demo".into(),
            workload_name: "api".into(),
            ..Workload::default()
        }
    }

    fn series(m: &Metrics) -> usize {
        m.encode()
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .count()
    }

    #[test]
    fn a_workloads_series_go_with_its_last_pod() {
        let m = Arc::new(Metrics::new());
        let mut t = TcpLabels::new("destination");
        (t.destination_workload, t.destination_workload_namespace) = ("api".into(), "demo".into());
        m.record_request(&RequestLabels::from_tcp(&t, "http", 200, None, "-"), 1.0, 0, 0);
        let counts = LiveCounts::default();
        let (a, b) = (
            LiveWorkload::new(&counts, &pod("api-1"), m.clone()),
            LiveWorkload::new(&counts, &pod("api-2"), m.clone()),
        );
        drop(a);
        assert_eq!(series(&m), 1, "another pod of the workload is still here");
        drop(b);
        assert_eq!(series(&m), 0, "{}", m.encode());
    }
}
