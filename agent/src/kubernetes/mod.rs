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

async fn control(
    client: Client,
    s: Settings,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Option<Config>>,
    status: Arc<Mutex<SourceStatus>>,
    (pod_store, pod_writer): (reflector::Store<Pod>, reflector::store::Writer<Pod>),
) {
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
        // Only what the workload model needs is kept of other nodes' pods.
        let trimmed = watcher(Api::<Pod>::all(client), watcher::Config::default()).modify(|p: &mut Pod| {
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
        });
        streams.push(
            reflector(cluster_writer, trimmed)
                .default_backoff()
                .map(|r| (Kind::ClusterPods, r.map(|e| change(&e))))
                .boxed(),
        );
    }
    let mut events = stream::select_all(streams);

    let mut resolver = NetnsResolver::new(&s.proc_root, &s.netns_dir);
    // Which lists have arrived (namespaces, this node's pods, every node's pods).
    let mut listed = [false, false, !s.cluster_pods];
    let mut build_at: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    let mut unresolved_before = BTreeSet::new();
    info!(node = %s.node, cluster_pods = s.cluster_pods, "watching namespaces and this node's pods");
    loop {
        let wake = match (build_at, retry_at) {
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
                    Ok(c) => {
                        let newly = {
                            let mut st = lock(&status);
                            let was = st.connected;
                            st.connected = true;
                            !was && st.api_errors > 0
                        };
                        if newly {
                            info!(watch = kind.as_str(), "Kubernetes API reachable again");
                        }
                        match c {
                            Change::Listed => {
                                listed[kind.index()] = true;
                                build_at.get_or_insert(Instant::now() + s.debounce);
                            }
                            Change::Changed => {
                                build_at.get_or_insert(Instant::now() + s.debounce);
                            }
                            Change::None => {}
                        }
                    }
                    Err(e) => {
                        metrics.kubernetes_api_errors.inc();
                        let msg = format!("{} watch: {e}", kind.as_str());
                        warn!(error = %msg, "Kubernetes API error; keeping the current capture, retrying with backoff");
                        let mut st = lock(&status);
                        st.connected = false;
                        st.api_errors += 1;
                        st.last_error = Some(msg);
                        st.last_error_at = Some(format_rfc3339(SystemTime::now()));
                    }
                }
            }
            _ = sleep_until(wake), if wake.is_some() => {
                build_at = None;
                retry_at = None;
                if !listed.iter().all(|l| *l) {
                    continue;
                }
                let namespaces = ns_store.state();
                let pods = pod_store.state();
                let others = cluster_store.state();
                let (cfg, unresolved) =
                    model::build(&s.node, &s.trust_domain, &namespaces, &pods, &others, &mut resolver);
                let now: BTreeSet<(String, String)> =
                    unresolved.iter().map(|u| (u.namespace.clone(), u.name.clone())).collect();
                for u in &unresolved {
                    if !unresolved_before.contains(&(u.namespace.clone(), u.name.clone())) {
                        warn!(pod = %format!("{}/{}", u.namespace, u.name), reason = %u.reason, "cannot capture pod: its network namespace was not found or was refused; retrying");
                        metrics.netns_resolve_failures.inc();
                    }
                }
                metrics.pods_unresolved.set(now.len() as i64);
                unresolved_before = now;
                if !unresolved.is_empty() {
                    retry_at = Some(Instant::now() + s.retry_unresolved);
                }
                {
                    let mut st = lock(&status);
                    st.synced = true;
                    st.namespaces = namespaces.len();
                    st.pods = pods.len();
                }
                let changed = tx.send_if_modified(|cur| {
                    if cur.as_ref() == Some(&cfg) {
                        return false;
                    }
                    *cur = Some(cfg);
                    true
                });
                if changed {
                    lock(&status).last_update = Some(format_rfc3339(SystemTime::now()));
                }
            }
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
