//! Prometheus metrics with Istio's names and labels, so existing Istio/Kiali/Grafana dashboards
//! work unchanged against nodeway, plus nodeway's own capture and eBPF metrics.
//!
//! prometheus-client appends `_total` to counter names itself, so counters are registered without
//! the suffix ("istio_tcp_connections_opened") and exposed as Istio spells them
//! ("istio_tcp_connections_opened_total").

use std::{
    collections::{HashMap, HashSet},
    sync::{atomic::Ordering, Arc, Mutex, RwLock},
};

use crate::{identity::Identity, workload::Workload};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Content type of [`Metrics::encode`]'s output; Prometheus negotiates and parses it natively.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Istio's value for a label nodeway cannot determine.
pub const UNKNOWN: &str = "unknown";

/// The label set of Istio's TCP metrics, field for field.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// "source" on the outbound side, "destination" on the inbound side.
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// Always "tcp" for L4 metrics.
    pub request_protocol: String,
    /// Envoy response flags; "-" when none.
    pub response_flags: String,
    /// "none" for plaintext, "mutual_tls" for mTLS.
    pub connection_security_policy: String,
}

impl TcpLabels {
    /// Labels for `reporter` ("source" or "destination") with every other value unknown.
    pub fn new(reporter: impl Into<String>) -> Self {
        Self {
            reporter: reporter.into(),
            ..Self::default()
        }
    }

    /// Istio's TCP labels for a connection between two (possibly unknown) workloads.
    pub fn between(reporter: &str, src: Option<&Workload>, dst: Option<&Workload>) -> Self {
        let s = |v: Option<&str>| v.map_or_else(|| UNKNOWN.to_string(), str::to_string);
        TcpLabels {
            reporter: reporter.to_string(),
            source_workload: s(src.map(|w| w.workload_name.as_str())),
            source_workload_namespace: s(src.map(|w| w.namespace.as_str())),
            source_app: s(src.and_then(Workload::app)),
            source_version: s(src.and_then(Workload::version)),
            destination_workload: s(dst.map(|w| w.workload_name.as_str())),
            destination_workload_namespace: s(dst.map(|w| w.namespace.as_str())),
            destination_app: s(dst.and_then(Workload::app)),
            destination_version: s(dst.and_then(Workload::version)),
            connection_security_policy: "none".to_string(),
            ..TcpLabels::default()
        }
    }

    /// The connection is mutual TLS between these two identities.
    pub fn set_mutual_tls(&mut self, source: &Identity, destination: &Identity) {
        self.source_principal = source.to_string();
        self.destination_principal = destination.to_string();
        self.connection_security_policy = "mutual_tls".to_string();
    }

    /// Istio's `destination_service*` labels for a connection to (or through) `s`.
    pub fn set_destination_service(&mut self, s: &crate::service::Service) {
        self.destination_service = s.hostname.clone();
        self.destination_service_name = s.name.clone();
        self.destination_service_namespace = s.namespace.clone();
    }

    /// The `destination_service*` labels Istio's cluster name gives
    /// (`outbound|9080|v1|reviews.default.svc.cluster.local`: `reviews`, `default`), when it
    /// is one.
    pub fn set_destination_cluster(&mut self, cluster: &str) {
        let Some(fqdn) = crate::cluster::istio_service_host(cluster) else {
            return;
        };
        self.destination_service = fqdn.to_string();
        let mut labels_of = fqdn.split('.');
        self.destination_service_name = labels_of.next().unwrap_or(UNKNOWN).to_string();
        self.destination_service_namespace = labels_of.next().unwrap_or(UNKNOWN).to_string();
    }

    /// The destination labels become those of `dst` (the endpoint a request went to).
    pub fn set_destination_workload(&mut self, dst: &Workload) {
        let d = TcpLabels::between(&self.reporter, None, Some(dst));
        self.destination_workload = d.destination_workload;
        self.destination_workload_namespace = d.destination_workload_namespace;
        self.destination_app = d.destination_app;
        self.destination_version = d.destination_version;
    }
}

impl Default for TcpLabels {
    /// Everything "unknown", as Istio reports it, except the fields with a fixed L4 value.
    fn default() -> Self {
        let u = || UNKNOWN.to_string();
        Self {
            reporter: u(),
            source_workload: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            destination_workload: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_service: u(),
            destination_service_name: u(),
            destination_service_namespace: u(),
            request_protocol: "tcp".to_string(),
            response_flags: "-".to_string(),
            connection_security_policy: u(),
        }
    }
}

/// The label set of Istio's HTTP/gRPC request metrics: the TCP labels with the request's
/// protocol ("http", "grpc"), plus `response_code` and `grpc_response_status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: String,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

impl RequestLabels {
    /// The request labels of a connection's TCP labels.
    pub fn from_tcp(
        t: &TcpLabels,
        request_protocol: &str,
        response_code: u16,
        grpc_status: Option<&str>,
        flags: &str,
    ) -> Self {
        RequestLabels {
            reporter: t.reporter.clone(),
            source_workload: t.source_workload.clone(),
            source_workload_namespace: t.source_workload_namespace.clone(),
            source_principal: t.source_principal.clone(),
            source_app: t.source_app.clone(),
            source_version: t.source_version.clone(),
            destination_workload: t.destination_workload.clone(),
            destination_workload_namespace: t.destination_workload_namespace.clone(),
            destination_principal: t.destination_principal.clone(),
            destination_app: t.destination_app.clone(),
            destination_version: t.destination_version.clone(),
            destination_service: t.destination_service.clone(),
            destination_service_name: t.destination_service_name.clone(),
            destination_service_namespace: t.destination_service_namespace.clone(),
            request_protocol: request_protocol.to_string(),
            response_code: response_code.to_string(),
            grpc_response_status: grpc_status_label(grpc_status),
            response_flags: flags.to_string(),
            connection_security_policy: t.connection_security_policy.clone(),
        }
    }
}

/// `grpc_response_status` as Envoy reads `grpc-status` (`Grpc::Common::getGrpcStatus`): the
/// code when it is one of gRPC's 0..=16, else [`INVALID_GRPC_STATUS`] (what a peer sends never
/// becomes a label value of its own); empty when there is none.
pub fn grpc_status_label(grpc_status: Option<&str>) -> String {
    match grpc_status.map(str::parse::<u8>) {
        None => String::new(),
        Some(Ok(code)) if code <= 16 => code.to_string(),
        Some(_) => INVALID_GRPC_STATUS.to_string(),
    }
}

/// Envoy's `InvalidCode`: a `grpc-status` that is not a known gRPC code.
pub const INVALID_GRPC_STATUS: &str = "-1";

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for `istio_request_bytes` / `istio_response_bytes` (powers of ten).
const BYTES_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1e6, 1e7, 1e8];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn bytes_histogram() -> Histogram {
    Histogram::new(BYTES_BUCKETS)
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// Label of `nodeway_inbound_refused_total`: why an inbound connection was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub pod: String,
    pub reason: String,
}

/// Labels of `nodeway_xds_responses_total`: the resource type and `ack` or `nack`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsLabels {
    pub type_url: String,
    pub result: String,
}

/// Label of `nodeway_ebpf_redirects_total`: which kernel event (e.g. "outbound_redirected").
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// The counter handles of one TCP label set, cloned out of the families once so the hot path
/// (per read) is a single atomic add with no map lookup or allocation.
#[derive(Clone, Debug)]
pub struct TcpCounters {
    pub opened: Counter,
    pub closed: Counter,
    /// destination -> source bytes (istio_tcp_sent_bytes_total).
    pub sent_bytes: Counter,
    /// source -> destination bytes (istio_tcp_received_bytes_total).
    pub received_bytes: Counter,
}

/// One TCP label set with its counters, shared by every open connection that has it: a
/// connection holds one `Arc` instead of its own copy of Istio's 17 labels (17 strings, about
/// 1 KB a connection; `bench memory`).
#[derive(Debug)]
pub struct TcpSeries {
    pub labels: TcpLabels,
    pub counters: TcpCounters,
}

/// The live [`TcpSeries`], by label set. Entries of closed connections' series are dropped when
/// the map has doubled since the last sweep, so it holds at most about twice the label sets in
/// use.
#[derive(Debug, Default)]
struct TcpSeriesCache {
    map: HashMap<TcpLabels, std::sync::Weak<TcpSeries>, foldhash::fast::RandomState>,
    sweep_at: usize,
}

impl TcpSeriesCache {
    fn get(&self, labels: &TcpLabels) -> Option<Arc<TcpSeries>> {
        self.map.get(labels).and_then(std::sync::Weak::upgrade)
    }

    fn insert(&mut self, series: &Arc<TcpSeries>) {
        if self.map.len() >= self.sweep_at {
            self.map.retain(|_, s| s.strong_count() > 0);
            self.sweep_at = (self.map.len() * 2).max(64);
        }
        self.map.insert(series.labels.clone(), Arc::downgrade(series));
    }
}

/// All of nodeway's metrics and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub tcp_connections_opened: Family<TcpLabels, Counter>,
    pub tcp_connections_closed: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    pub captured_pods: Gauge,
    pub capture_failures: Counter,
    /// Config file edits (or xDS pushes) rejected; the running config stayed.
    pub config_errors: Counter,
    /// xDS responses by type and ACK/NACK.
    pub xds_responses: Family<XdsLabels, Counter>,
    /// xDS streams opened (a rising count means reconnects).
    pub xds_streams: Counter,
    /// Inbound connections or HBONE streams refused, by pod and reason.
    pub inbound_refused: Family<RefusedLabels, Counter>,
    /// Outbound connections that could not reach their destination, by pod and reason.
    pub outbound_failed: Family<RefusedLabels, Counter>,
    /// Connections between two captured pods of this node handed over in-process instead of
    /// HBONE through the TCP stack (`--same-node in-process`).
    pub same_node_connections: Counter,
    /// Mirrors the kernel's monotonic statistics; set through [`Metrics::set_ebpf_redirects`].
    pub ebpf_redirects: Family<KindLabel, Counter>,
    /// Failed list/watch calls to the Kubernetes API (each is retried with backoff).
    pub kubernetes_api_errors: Counter,
    /// Times a pod to capture had no findable network namespace (counted once per episode).
    pub netns_resolve_failures: Counter,
    /// Pods to capture whose network namespace is not found right now.
    pub pods_unresolved: Gauge,
    /// Request-body bytes buffered (for retries and mirrors) on the node now, of the budget.
    pub buffer_budget_reserved_bytes: Gauge,
    /// Request bodies sent without retries or mirrors because the buffer budget was spent.
    pub buffer_budget_exhausted: Counter,
    /// Access log lines dropped because the writer thread's queue was full.
    pub access_log_dropped: Counter,
    /// Tasks alive on the runtime that scrapes the metrics (tokio's `num_alive_tasks`), set at
    /// each scrape: a figure that only grows is a task leak.
    pub runtime_alive_tasks: Gauge,
    /// The Istio series created, by workload (`namespace/name`, source or destination), so a
    /// removed pod's series can be dropped.
    series: Mutex<Series>,
    /// The four request metrics of each request label set, looked up with one fast hash per
    /// request instead of one SipHash per family (the families stay the exposition's source).
    request_handles: RwLock<HashMap<RequestLabels, RequestHandles, foldhash::fast::RandomState>>,
    /// The TCP series open connections share.
    tcp_series: RwLock<TcpSeriesCache>,
}

/// The metrics one finished request updates, cloned out of their families once per label set.
#[derive(Clone, Debug)]
struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// Label sets of the Istio families, by the workloads they name.
#[derive(Debug, Default)]
struct Series {
    tcp: HashMap<String, HashSet<TcpLabels>>,
    requests: HashMap<String, HashSet<RequestLabels>>,
}

/// The workloads a series names (`namespace/name`), unknown ones left out.
fn workloads_of(src: (&str, &str), dst: (&str, &str)) -> Vec<String> {
    [src, dst]
        .into_iter()
        .filter(|(ns, name)| *name != UNKNOWN && *ns != UNKNOWN)
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            series: Mutex::new(Series::default()),
            request_handles: RwLock::default(),
            tcp_series: RwLock::default(),
            tcp_connections_opened: Family::<TcpLabels, Counter>::default(),
            tcp_connections_closed: Family::<TcpLabels, Counter>::default(),
            tcp_sent_bytes: Family::<TcpLabels, Counter>::default(),
            tcp_received_bytes: Family::<TcpLabels, Counter>::default(),
            requests: Family::<RequestLabels, Counter>::default(),
            request_duration: HistogramFamily::new_with_constructor(duration_histogram),
            request_bytes: HistogramFamily::new_with_constructor(bytes_histogram),
            response_bytes: HistogramFamily::new_with_constructor(bytes_histogram),
            captured_pods: Gauge::default(),
            capture_failures: Counter::default(),
            config_errors: Counter::default(),
            xds_responses: Family::<XdsLabels, Counter>::default(),
            xds_streams: Counter::default(),
            inbound_refused: Family::<RefusedLabels, Counter>::default(),
            outbound_failed: Family::<RefusedLabels, Counter>::default(),
            same_node_connections: Counter::default(),
            ebpf_redirects: Family::<KindLabel, Counter>::default(),
            kubernetes_api_errors: Counter::default(),
            netns_resolve_failures: Counter::default(),
            pods_unresolved: Gauge::default(),
            buffer_budget_reserved_bytes: Gauge::default(),
            buffer_budget_exhausted: Counter::default(),
            access_log_dropped: Counter::default(),
            runtime_alive_tasks: Gauge::default(),
        };
        m.register_istio();
        m.register_capture();
        m.register_node();
        m
    }

    /// Istio's standard metrics, under Istio's names (what Kiali and the dashboards read).
    fn register_istio(&mut self) {
        let r = &mut self.registry;
        r.register(
            "istio_tcp_connections_opened",
            "Total TCP connections opened",
            self.tcp_connections_opened.clone(),
        );
        r.register(
            "istio_tcp_connections_closed",
            "Total TCP connections closed",
            self.tcp_connections_closed.clone(),
        );
        r.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during the response of a TCP connection (destination to source)",
            self.tcp_sent_bytes.clone(),
        );
        r.register(
            "istio_tcp_received_bytes",
            "Bytes received during the request of a TCP connection (source to destination)",
            self.tcp_received_bytes.clone(),
        );
        r.register("istio_requests", "Total requests", self.requests.clone());
        r.register(
            "istio_request_duration_milliseconds",
            "Request duration, first byte of the request to last byte of the response",
            self.request_duration.clone(),
        );
        r.register(
            "istio_request_bytes",
            "Request sizes (headers and body)",
            self.request_bytes.clone(),
        );
        r.register(
            "istio_response_bytes",
            "Response sizes (headers and body)",
            self.response_bytes.clone(),
        );
    }

    /// nodeway's capture: pods, kernel events, the Kubernetes API, network namespaces.
    fn register_capture(&mut self) {
        let r = &mut self.registry;
        r.register(
            "nodeway_captured_pods",
            "Pods whose traffic is currently captured on this node",
            self.captured_pods.clone(),
        );
        r.register(
            "nodeway_capture_failures",
            "Attempts to capture a pod that failed",
            self.capture_failures.clone(),
        );
        r.register(
            "nodeway_ebpf_redirects",
            "Kernel-side capture events by kind, mirrored from the eBPF statistics map",
            self.ebpf_redirects.clone(),
        );
        r.register(
            "nodeway_kubernetes_api_errors",
            "Failed list/watch calls to the Kubernetes API (retried with backoff; the capture stays)",
            self.kubernetes_api_errors.clone(),
        );
        r.register(
            "nodeway_netns_resolve_failures",
            "Times a pod to capture had no findable network namespace",
            self.netns_resolve_failures.clone(),
        );
        r.register(
            "nodeway_pods_unresolved",
            "Pods to capture whose network namespace is not found right now",
            self.pods_unresolved.clone(),
        );
    }

    /// nodeway's config, refusals, budgets and runtime.
    fn register_node(&mut self) {
        let r = &mut self.registry;
        r.register(
            "nodeway_config_errors",
            "Config updates rejected (the running config was kept)",
            self.config_errors.clone(),
        );
        r.register(
            "nodeway_xds_responses",
            "xDS responses by resource type and result (ack: applied, nack: rejected, last good config kept)",
            self.xds_responses.clone(),
        );
        r.register(
            "nodeway_xds_streams",
            "xDS streams opened to the control plane",
            self.xds_streams.clone(),
        );
        r.register(
            "nodeway_inbound_refused",
            "Inbound connections refused (bad TLS, wrong identity or trust domain, plaintext to STRICT, bad CONNECT)",
            self.inbound_refused.clone(),
        );
        r.register(
            "nodeway_outbound_failed",
            "Outbound connections that failed (HBONE: TLS, identity, CONNECT refused; plain TCP: connect)",
            self.outbound_failed.clone(),
        );
        r.register(
            "nodeway_same_node_connections",
            "Connections between captured pods of this node handed over inside nodeway (no TLS, no second TCP trip), policy checked",
            self.same_node_connections.clone(),
        );
        r.register(
            "nodeway_buffer_budget_reserved_bytes",
            "Request-body bytes buffered for retries and mirrors on this node now (at most the budget)",
            self.buffer_budget_reserved_bytes.clone(),
        );
        r.register(
            "nodeway_buffer_budget_exhausted",
            "Request bodies sent without retries or mirrors because the node's buffer budget was spent",
            self.buffer_budget_exhausted.clone(),
        );
        r.register(
            "nodeway_access_log_dropped",
            "Access log lines dropped because the writer could not keep up (stdout blocked)",
            self.access_log_dropped.clone(),
        );
        r.register(
            "nodeway_runtime_alive_tasks",
            "Tasks alive on the agent's tokio runtime now (connections, streams, timers, reapers)",
            self.runtime_alive_tasks.clone(),
        );
    }

    /// Clones the four TCP counters of `labels` (creating them at zero if new).
    pub fn tcp_counters(&self, labels: &TcpLabels) -> TcpCounters {
        self.tcp_series(labels.clone()).counters.clone()
    }

    /// The shared series of `labels`: the one open connections with these labels already hold,
    /// else a new one.
    pub fn tcp_series(&self, labels: TcpLabels) -> Arc<TcpSeries> {
        let cache = self.tcp_series.read().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache.get(&labels) {
            return s;
        }
        drop(cache);
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        for w in workloads_of(
            (&labels.source_workload_namespace, &labels.source_workload),
            (&labels.destination_workload_namespace, &labels.destination_workload),
        ) {
            series.tcp.entry(w).or_default().insert(labels.clone());
        }
        // Under the series lock, so a concurrent forget_workload cannot leave a stale entry.
        let mut cache = self.tcp_series.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache.get(&labels) {
            return s;
        }
        let counters = TcpCounters {
            opened: self.tcp_connections_opened.get_or_create(&labels).clone(),
            closed: self.tcp_connections_closed.get_or_create(&labels).clone(),
            sent_bytes: self.tcp_sent_bytes.get_or_create(&labels).clone(),
            received_bytes: self.tcp_received_bytes.get_or_create(&labels).clone(),
        };
        let s = Arc::new(TcpSeries { labels, counters });
        cache.insert(&s);
        s
    }

    /// Records one finished request.
    pub fn record_request(&self, labels: &RequestLabels, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        let record = |h: &RequestHandles| {
            h.requests.inc();
            h.duration.observe(duration_ms);
            h.request_bytes.observe(request_bytes as f64);
            h.response_bytes.observe(response_bytes as f64);
        };
        let handles = self.request_handles.read().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = handles.get(labels) {
            return record(h);
        }
        drop(handles);
        let h = self.create_request_series(labels);
        record(&h);
    }

    /// The families' series of a new request label set, noted by workload for
    /// [`Metrics::forget_workload`].
    fn create_request_series(&self, labels: &RequestLabels) -> RequestHandles {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        for w in workloads_of(
            (&labels.source_workload_namespace, &labels.source_workload),
            (&labels.destination_workload_namespace, &labels.destination_workload),
        ) {
            series.requests.entry(w).or_default().insert(labels.clone());
        }
        let h = RequestHandles {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.request_duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        };
        // Under the series lock, so a concurrent forget_workload cannot leave a stale handle.
        let mut handles = self.request_handles.write().unwrap_or_else(|p| p.into_inner());
        handles.insert(labels.clone(), h.clone());
        h
    }

    /// Drops every Istio series that names the workload `namespace/name` (a released pod), as
    /// a sidecar's series go with its pod.
    pub fn forget_workload(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut cache = self.tcp_series.write().unwrap_or_else(|p| p.into_inner());
        for l in series.tcp.remove(&key).unwrap_or_default() {
            // Connections still open count on into their (now unexposed) counters; the next
            // connection with these labels starts the series afresh.
            cache.map.remove(&l);
            self.tcp_connections_opened.remove(&l);
            self.tcp_connections_closed.remove(&l);
            self.tcp_sent_bytes.remove(&l);
            self.tcp_received_bytes.remove(&l);
        }
        drop(cache);
        let mut handles = self.request_handles.write().unwrap_or_else(|p| p.into_inner());
        for l in series.requests.remove(&key).unwrap_or_default() {
            handles.remove(&l);
            self.requests.remove(&l);
            self.request_duration.remove(&l);
            self.request_bytes.remove(&l);
            self.response_bytes.remove(&l);
        }
    }

    pub fn set_captured_pods(&self, n: i64) {
        self.captured_pods.set(n);
    }

    pub fn inc_inbound_refused(&self, pod: &str, reason: &str) {
        self.inbound_refused
            .get_or_create(&RefusedLabels {
                pod: pod.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn inc_outbound_failed(&self, pod: &str, reason: &str) {
        self.outbound_failed
            .get_or_create(&RefusedLabels {
                pod: pod.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn inc_config_errors(&self) {
        self.config_errors.inc();
    }

    pub fn inc_capture_failures(&self) {
        self.capture_failures.inc();
    }

    /// Publishes the kernel's running `total` for `kind`. The kernel keeps absolute counts, so
    /// the counter is raised to `total` (never lowered: a recreated map restarting from zero
    /// leaves the counter where it was until the kernel count passes it, keeping it monotonic).
    pub fn set_ebpf_redirects(&self, kind: &str, total: u64) {
        let label = KindLabel { kind: kind.to_string() };
        self.ebpf_redirects
            .get_or_create(&label)
            .inner()
            .fetch_max(total, Ordering::Relaxed);
    }

    /// The OpenMetrics text exposition (ends with `# EOF`); serve with [`OPENMETRICS_CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let alive = i64::try_from(rt.metrics().num_alive_tasks()).unwrap_or(i64::MAX);
            self.runtime_alive_tasks.set(alive);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String cannot fail; a label encoder could, so say so rather than panic.
            tracing::warn!(error = %e, "encoding metrics failed; exposition is partial");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_labels_follow_istio() {
        let l = TcpLabels::new("source");
        assert_eq!(l.reporter, "source");
        assert_eq!(l.source_workload, "unknown");
        assert_eq!(l.request_protocol, "tcp");
        assert_eq!(l.response_flags, "-");
        assert_eq!(l.connection_security_policy, "unknown");
    }

    #[test]
    fn exposes_istio_names_and_labels() {
        let m = Metrics::new();
        let mut labels = TcpLabels::new("source");
        labels.source_workload = "client".into();
        labels.destination_workload = "server".into();
        labels.connection_security_policy = "none".into();
        let c = m.tcp_counters(&labels);
        c.opened.inc();
        c.received_bytes.inc_by(10);
        c.sent_bytes.inc_by(20);
        c.closed.inc();
        m.set_captured_pods(3);
        m.inc_capture_failures();
        let text = m.encode();
        for name in [
            "istio_tcp_connections_opened_total{",
            "istio_tcp_connections_closed_total{",
            "istio_tcp_sent_bytes_total{",
            "istio_tcp_received_bytes_total{",
            "nodeway_captured_pods 3",
            "nodeway_capture_failures_total 1",
            "# TYPE istio_tcp_connections_opened counter",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
        assert!(!text.contains("_total_total"), "{text}");
        assert!(text.contains("reporter=\"source\""), "{text}");
        assert!(text.contains("source_workload=\"client\""), "{text}");
        assert!(text.contains("request_protocol=\"tcp\""), "{text}");
        assert!(text.contains("response_flags=\"-\""), "{text}");
        assert!(text.contains("connection_security_policy=\"none\""), "{text}");
        let received = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
            .unwrap_or_default();
        assert!(received.ends_with(" 10"), "{received}");
        assert!(text.trim_end().ends_with("# EOF"));
    }

    fn request_labels(src: &str, dst: &str, grpc: Option<&str>) -> RequestLabels {
        let mut t = TcpLabels::new("source");
        (t.source_workload, t.source_workload_namespace) = (src.into(), "demo".into());
        (t.destination_workload, t.destination_workload_namespace) = (dst.into(), "demo".into());
        RequestLabels::from_tcp(&t, "grpc", 200, grpc, "-")
    }

    #[test]
    fn grpc_status_labels_are_the_known_codes_or_invalid() {
        let m = Metrics::new();
        for s in ["0", "16", "17", "999999", "x", "-3", " 2", "ok"] {
            m.record_request(&request_labels("client", "server", Some(s)), 1.0, 0, 0);
        }
        m.record_request(&request_labels("client", "server", None), 1.0, 0, 0);
        let text = m.encode();
        let values: HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter_map(|l| l.split("grpc_response_status=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(values, HashSet::from(["0", "16", "-1", ""]), "{text}");
        let invalid = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains("grpc_response_status=\"-1\""))
            .unwrap_or_default();
        assert!(invalid.ends_with(" 6"), "six invalid codes share one series: {invalid}");
    }

    #[test]
    fn a_forgotten_workload_takes_its_series_along() {
        let m = Metrics::new();
        m.record_request(&request_labels("client", "server", None), 1.0, 0, 0);
        m.record_request(&request_labels("other", "server2", None), 1.0, 0, 0);
        let mut t = TcpLabels::new("destination");
        (t.destination_workload, t.destination_workload_namespace) = ("server".into(), "demo".into());
        m.tcp_counters(&t).opened.inc();
        m.forget_workload("demo", "server");
        let text = m.encode();
        assert!(!text.contains("destination_workload=\"server\""), "{text}");
        assert!(text.contains("destination_workload=\"server2\""), "{text}");
        assert!(text.contains("source_workload=\"other\""), "{text}");
    }

    #[test]
    fn connections_share_their_label_set_series_until_its_workload_is_forgotten() {
        let m = Metrics::new();
        let mut t = TcpLabels::new("source");
        (t.destination_workload, t.destination_workload_namespace) = ("server".into(), "demo".into());
        let (a, b) = (m.tcp_series(t.clone()), m.tcp_series(t.clone()));
        assert!(Arc::ptr_eq(&a, &b), "one series for one label set");
        a.counters.opened.inc();
        b.counters.opened.inc();
        m.forget_workload("demo", "server");
        let c = m.tcp_series(t.clone());
        assert!(!Arc::ptr_eq(&a, &c), "a forgotten series is not handed out again");
        c.counters.opened.inc();
        let text = m.encode();
        let opened = text
            .lines()
            .find(|l| {
                l.starts_with("istio_tcp_connections_opened_total{") && l.contains("destination_workload=\"server\"")
            })
            .unwrap_or_default();
        assert!(opened.ends_with(" 1"), "counted from zero again: {text}");
    }

    #[test]
    fn series_of_closed_connections_leave_the_cache() {
        let m = Metrics::new();
        for i in 0..1000 {
            let mut t = TcpLabels::new("source");
            t.destination_workload = format!("server{i}");
            drop(m.tcp_series(t));
        }
        let held = m.tcp_series.read().map_or(usize::MAX, |c| c.map.len());
        assert!(held <= 128, "{held} label sets cached, none in use");
    }

    #[test]
    fn a_series_recorded_again_after_its_workload_was_forgotten_is_exposed_afresh() {
        let m = Metrics::new();
        let labels = request_labels("client", "server", None);
        m.record_request(&labels, 1.0, 0, 0);
        m.record_request(&labels, 1.0, 0, 0);
        m.forget_workload("demo", "server");
        // A cached handle of the forgotten series would count into nothing exposed.
        m.record_request(&labels, 1.0, 0, 0);
        let text = m.encode();
        let total = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains("destination_workload=\"server\""))
            .unwrap_or_default();
        assert!(total.ends_with(" 1"), "counted from zero again: {text}");
    }

    #[test]
    fn ebpf_redirects_mirror_kernel_totals_monotonically() {
        let m = Metrics::new();
        m.set_ebpf_redirects("outbound_redirected", 5);
        m.set_ebpf_redirects("outbound_redirected", 7);
        m.set_ebpf_redirects("outbound_redirected", 2); // map recreated: never goes down
        m.set_ebpf_redirects("inbound_redirected", 1);
        let text = m.encode();
        assert!(
            text.contains("nodeway_ebpf_redirects_total{kind=\"outbound_redirected\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("nodeway_ebpf_redirects_total{kind=\"inbound_redirected\"} 1"),
            "{text}"
        );
    }
}
