//! `--source kubernetes`: the node's pods and the namespaces from the API server.
//!
//! kube-rs reflectors (Namespaces; Pods with the field selector `spec.nodeName=<node>`; with
//! `--cluster-pods`, a trimmed copy of every node's pods for the workload model) keep a local copy
//! of what matters. After any change (debounced) the copies are turned into the same
//! [`Config`] the local file gives ([`model::build`]) and published on a watch channel; `run`
//! applies it exactly like an edited file. Nothing is published before both lists have arrived, so
//! a (re)starting agent never releases pinned pods on a partial view. While the API server is
//! unreachable the watchers retry with backoff, the last published config (and so the capture)
//! stays, and the errors show on `/captured` and in `nodeway_kubernetes_api_errors_total`.
pub mod annotate;
pub mod model;
pub mod netns;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    runtime::{reflector, watcher, WatchStreamExt},
    Api, Client,
};
use nodeway_proxy::{connections::format_rfc3339, metrics::Metrics};
use serde::Serialize;
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use crate::config::Config;
use netns::NetnsResolver;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes API client (in-cluster service account, or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
}

/// What the controller needs to know.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's name (`NODE_NAME` from the downward API).
    pub node: String,
    pub trust_domain: String,
    /// Where the host's processes are (`/proc` with hostPID).
    pub proc_root: PathBuf,
    /// The CNI's named network namespaces, for the `nodeway.io/netns` fallback.
    pub netns_dir: PathBuf,
    /// Changes arriving within this window are applied together.
    pub debounce: Duration,
    /// How often pods whose network namespace was not found are looked up again.
    pub retry_unresolved: Duration,
    /// Also watch every other node's pods, so traffic to captured pods elsewhere is HBONE (mutual
    /// TLS to the pod's identity) rather than plain TCP.
    pub cluster_pods: bool,
}

/// The controller's health, shown as `source` on `/captured` and `/config_dump`.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    pub kind: &'static str,
    pub node: String,
    /// Both lists (namespaces, pods) have arrived at least once.
    pub synced: bool,
    /// The last watch event was a success.
    pub connected: bool,
    pub api_errors: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// When a changed config was last published.
    pub last_update: Option<String>,
    pub namespaces: usize,
    pub pods: usize,
}

/// A running controller: its configs and its status.
pub struct Source {
    pub updates: watch::Receiver<Option<Config>>,
    pub status: Arc<Mutex<SourceStatus>>,
    /// This node's pods as cached (for the redirection annotations).
    pub pods: reflector::Store<Pod>,
}

/// The API client from the in-cluster config, or `KUBECONFIG`; it connects lazily.
pub async fn client() -> Result<Client, KubeError> {
    Client::try_default().await.map_err(KubeError::Client)
}

/// Starts the watches on `client`.
pub fn start(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Source {
    let (tx, rx) = watch::channel(None);
    let status = Arc::new(Mutex::new(SourceStatus {
        kind: "kubernetes",
        node: settings.node.clone(),
        ..Default::default()
    }));
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let pods = pod_store.clone();
    tokio::spawn(control(
        client,
        settings,
        metrics,
        tx,
        status.clone(),
        (pod_store, pod_writer),
    ));
    Source {
        updates: rx,
        status,
        pods,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Namespaces,
    Pods,
    ClusterPods,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
            Kind::ClusterPods => "cluster pods",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a watch event means for the published config.
enum Change {
    /// The local copy changed.
    Changed,
    /// The first (or a fresh) complete list is in the local copy.
    Listed,
    /// Nothing visible yet (a relist in progress).
    None,
}

fn change<K>(ev: &watcher::Event<K>) -> Change {
    match ev {
        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Change::Changed,
        watcher::Event::InitDone => Change::Listed,
        watcher::Event::Init | watcher::Event::InitApply(_) => Change::None,
    }
}

type Events = stream::SelectAll<stream::BoxStream<'static, (Kind, Result<Change, watcher::Error>)>>;

async fn control(
    client: Client,
    s: Settings,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Option<Config>>,
    status: Arc<Mutex<SourceStatus>>,
    (pod_store, pod_writer): (reflector::Store<Pod>, reflector::store::Writer<Pod>),
) {
    let (mut events, ns_store, cluster_store) = watches(client, &s, pod_writer);
    info!(node = %s.node, cluster_pods = s.cluster_pods, "watching namespaces and this node's pods");
    let mut c = Controller {
        resolver: NetnsResolver::new(&s.proc_root, &s.netns_dir),
        listed: [false, false, !s.cluster_pods],
        build_at: None,
        retry_at: None,
        unresolved_before: BTreeSet::new(),
        stores: (ns_store, pod_store, cluster_store),
        s,
        metrics,
        tx,
        status,
    };
    loop {
        let wake = match (c.build_at, c.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            ev = events.next() => {
                let Some((kind, ev)) = ev else {
                    warn!("the Kubernetes watches ended");
                    return;
                };
                match ev {
                    Ok(change) => c.on_change(kind, change),
                    Err(e) => c.on_error(kind, &e),
                }
            }
            _ = sleep_until(wake), if wake.is_some() => c.rebuild(),
        }
    }
}

/// The reflectors: namespaces, this node's pods and, with `--cluster-pods`, every node's pods
/// (trimmed). Returns their merged events and the stores the events keep up to date.
fn watches(
    client: Client,
    s: &Settings,
    pod_writer: reflector::store::Writer<Pod>,
) -> (Events, reflector::Store<Namespace>, reflector::Store<Pod>) {
    let (ns_store, ns_writer) = reflector::store::<Namespace>();
    let ns_events = reflector(
        ns_writer,
        watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .map(|r| (Kind::Namespaces, r.map(|e| change(&e))))
    .boxed();
    let pod_events = reflector(
        pod_writer,
        watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", s.node)),
        ),
    )
    .default_backoff()
    .map(|r| (Kind::Pods, r.map(|e| change(&e))))
    .boxed();
    let (cluster_store, cluster_writer) = reflector::store::<Pod>();
    let mut streams = vec![ns_events, pod_events];
    if s.cluster_pods {
        let trimmed = watcher(Api::<Pod>::all(client), watcher::Config::default()).modify(trim_remote_pod);
        streams.push(
            reflector(cluster_writer, trimmed)
                .default_backoff()
                .map(|r| (Kind::ClusterPods, r.map(|e| change(&e))))
                .boxed(),
        );
    }
    (stream::select_all(streams), ns_store, cluster_store)
}

/// Only what the workload model needs is kept of other nodes' pods.
fn trim_remote_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    if let Some(spec) = &mut p.spec {
        spec.containers.clear();
        spec.init_containers = None;
        spec.volumes = None;
    }
    if let Some(status) = &mut p.status {
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.conditions = None;
    }
}

/// The controller's state between events.
struct Controller {
    s: Settings,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Option<Config>>,
    status: Arc<Mutex<SourceStatus>>,
    /// Namespaces, this node's pods, every node's pods.
    stores: (
        reflector::Store<Namespace>,
        reflector::Store<Pod>,
        reflector::Store<Pod>,
    ),
    resolver: NetnsResolver,
    /// Which lists have arrived (in the order of `stores`).
    listed: [bool; 3],
    /// When the debounced rebuild is due.
    build_at: Option<Instant>,
    /// When pods whose network namespace was not found are looked up again.
    retry_at: Option<Instant>,
    unresolved_before: BTreeSet<(String, String)>,
}

impl Controller {
    fn on_change(&mut self, kind: Kind, change: Change) {
        let newly = {
            let mut st = lock(&self.status);
            let was = st.connected;
            st.connected = true;
            !was && st.api_errors > 0
        };
        if newly {
            info!(watch = kind.as_str(), "Kubernetes API reachable again");
        }
        match change {
            Change::Listed => {
                self.listed[kind.index()] = true;
                self.build_at.get_or_insert(Instant::now() + self.s.debounce);
            }
            Change::Changed => {
                self.build_at.get_or_insert(Instant::now() + self.s.debounce);
            }
            Change::None => {}
        }
    }

    fn on_error(&self, kind: Kind, e: &watcher::Error) {
        self.metrics.kubernetes_api_errors.inc();
        let msg = format!("{} watch: {e}", kind.as_str());
        warn!(error = %msg, "Kubernetes API error; keeping the current capture, retrying with backoff");
        let mut st = lock(&self.status);
        st.connected = false;
        st.api_errors += 1;
        st.last_error = Some(msg);
        st.last_error_at = Some(format_rfc3339(SystemTime::now()));
    }

    /// Builds the config from the local copies, once every list has arrived, and publishes it
    /// if it changed.
    fn rebuild(&mut self) {
        self.build_at = None;
        self.retry_at = None;
        if !self.listed.iter().all(|l| *l) {
            return;
        }
        let namespaces = self.stores.0.state();
        let pods = self.stores.1.state();
        let others = self.stores.2.state();
        let (cfg, unresolved) = model::build(
            &self.s.node,
            &self.s.trust_domain,
            &namespaces,
            &pods,
            &others,
            &mut self.resolver,
        );
        self.note_unresolved(&unresolved);
        {
            let mut st = lock(&self.status);
            st.synced = true;
            st.namespaces = namespaces.len();
            st.pods = pods.len();
        }
        let changed = self.tx.send_if_modified(|cur| {
            if cur.as_ref() == Some(&cfg) {
                return false;
            }
            *cur = Some(cfg);
            true
        });
        if changed {
            lock(&self.status).last_update = Some(format_rfc3339(SystemTime::now()));
        }
    }

    /// Warns and counts each pod newly without a network namespace, and schedules a retry.
    fn note_unresolved(&mut self, unresolved: &[crate::config::Uncapturable]) {
        let now: BTreeSet<(String, String)> = unresolved
            .iter()
            .map(|u| (u.namespace.clone(), u.name.clone()))
            .collect();
        for u in unresolved {
            if !self.unresolved_before.contains(&(u.namespace.clone(), u.name.clone())) {
                warn!(pod = %format!("{}/{}", u.namespace, u.name), reason = %u.reason, "cannot capture pod: its network namespace was not found or was refused; retrying");
                self.metrics.netns_resolve_failures.inc();
            }
        }
        self.metrics.pods_unresolved.set(now.len() as i64);
        self.unresolved_before = now;
        if !unresolved.is_empty() {
            self.retry_at = Some(Instant::now() + self.s.retry_unresolved);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
