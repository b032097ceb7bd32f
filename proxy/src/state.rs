//! The node's config model as the data path reads it: workloads, services, authorization
//! policies and the L7 model, each an immutable snapshot swapped whole by a config source (xDS
//! or the local file). Readers take an `Arc` and keep a consistent view for as long as they hold
//! it; nothing here does I/O or knows about pods' sockets.
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, RwLock},
};

use crate::{authz::PolicyStore, l7::L7Config, service::ServiceIndex, workload::WorkloadIndex};

/// Called with a new L7 model before readers can see it, so that runtime state derived from it
/// (the upstream clusters) is in place for the first request that uses it.
pub type L7Hook = Box<dyn Fn(&L7Config) + Send + Sync>;

/// Config snapshots every pod's listeners share.
#[derive(Default)]
pub struct ProxyState {
    workloads: RwLock<Arc<WorkloadIndex>>,
    policies: RwLock<Arc<PolicyStore>>,
    services: RwLock<Arc<ServiceIndex>>,
    /// The node's own L7 model (the local file, or the node stream): what pods without a class
    /// of their own ([`L7State`] per sidecar class) route by.
    l7: Arc<L7State>,
    sync: SyncGate,
    /// Bumped whenever what authorization reads (policies, workloads) is swapped: open
    /// connections authorized under the old view are checked again.
    authz_epoch: tokio::sync::watch::Sender<u64>,
}

/// One L7 model and who follows it: the node's, or one sidecar class's (the config istiod
/// generates for a class of pods alike, `xds::classes`). Each has its own runtime
/// state (upstream clusters, DNS answers) kept in step by its hooks.
pub struct L7State {
    l7: RwLock<Arc<L7Config>>,
    hooks: RwLock<Vec<L7Hook>>,
    /// Serializes writers (a config source and the DNS resolver), so that neither replaces the
    /// other's newer model with an older one.
    write: Mutex<()>,
    /// Whether a first whole model has arrived (the node's: from the start; a class's: once
    /// its stream delivered one). Until then the pods that route by it fail closed.
    synced: tokio::sync::watch::Sender<bool>,
}

impl Default for L7State {
    fn default() -> Self {
        L7State::new(true)
    }
}

impl L7State {
    pub fn new(synced: bool) -> Self {
        L7State {
            l7: RwLock::default(),
            hooks: RwLock::default(),
            write: Mutex::new(()),
            synced: tokio::sync::watch::Sender::new(synced),
        }
    }

    /// The current routes, clusters and endpoints; a change swaps them whole.
    pub fn l7(&self) -> Arc<L7Config> {
        read(&self.l7)
    }

    /// Runs the hooks with `config`, then makes it the current model. Resolved DNS endpoints
    /// of clusters that did not change carry over ([`L7Config::keep_resolved`]).
    pub fn set_l7(&self, mut config: L7Config) {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        config.keep_resolved(&self.l7());
        self.install(config);
    }

    /// Replaces the model by `f(current)` unless it returns `None`, with no other writer in
    /// between (read-modify-write, for the DNS resolver's answers).
    pub fn update_l7(&self, f: impl FnOnce(&L7Config) -> Option<L7Config>) {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(next) = f(&self.l7()) {
            self.install(next);
        }
    }

    fn install(&self, config: L7Config) {
        for hook in self.hooks.read().unwrap_or_else(|p| p.into_inner()).iter() {
            hook(&config);
        }
        swap(&self.l7, config);
    }

    /// Registers `hook` for every later change, and runs it once with the current model.
    pub fn on_l7_change(&self, hook: L7Hook) {
        hook(&self.l7());
        self.hooks.write().unwrap_or_else(|p| p.into_inner()).push(hook);
    }

    pub fn synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// A first whole model is in place (once is enough: an outage keeps the last one).
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }
}

/// The config types still awaited before the data path may serve captured pods. Nothing awaited
/// (the local file, loaded before anything is served): synced from the start.
struct SyncGate {
    pending: Mutex<BTreeSet<String>>,
    synced: tokio::sync::watch::Sender<bool>,
}

impl Default for SyncGate {
    fn default() -> Self {
        SyncGate {
            pending: Mutex::new(BTreeSet::new()),
            synced: tokio::sync::watch::Sender::new(true),
        }
    }
}

impl ProxyState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current workload view; a config change swaps it whole.
    pub fn workloads(&self) -> Arc<WorkloadIndex> {
        read(&self.workloads)
    }

    pub fn set_workloads(&self, index: WorkloadIndex) {
        swap(&self.workloads, index);
        self.authz_epoch.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// The current authorization policies; a change swaps them whole.
    pub fn policies(&self) -> Arc<PolicyStore> {
        read(&self.policies)
    }

    pub fn set_policies(&self, store: PolicyStore) {
        swap(&self.policies, store);
        self.authz_epoch.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// Changes each time policies or workloads are swapped (see the inbound pipeline's
    /// re-check of open connections).
    pub fn authz_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.authz_epoch.subscribe()
    }

    /// The current services; a change swaps them whole.
    pub fn services(&self) -> Arc<ServiceIndex> {
        read(&self.services)
    }

    pub fn set_services(&self, index: ServiceIndex) {
        swap(&self.services, index);
    }

    /// The node's routes, clusters and endpoints; a change swaps them whole.
    pub fn l7(&self) -> Arc<L7Config> {
        self.l7.l7()
    }

    /// The node's L7 model and its followers.
    pub fn l7_state(&self) -> &Arc<L7State> {
        &self.l7
    }

    /// [`L7State::set_l7`] on the node's model.
    pub fn set_l7(&self, config: L7Config) {
        self.l7.set_l7(config);
    }

    /// [`L7State::update_l7`] on the node's model.
    pub fn update_l7(&self, f: impl FnOnce(&L7Config) -> Option<L7Config>) {
        self.l7.update_l7(f);
    }

    /// Waits for `types` to be marked synced ([`ProxyState::mark_synced`]) before
    /// [`ProxyState::synced`] holds: a config source that starts empty calls this first.
    pub fn require_sync(&self, types: &[&str]) {
        let mut pending = self.sync.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.extend(types.iter().map(|t| t.to_string()));
        self.sync.synced.send_replace(pending.is_empty());
    }

    /// `type_url` has been received (once is enough: a later outage keeps the last config).
    pub fn mark_synced(&self, type_url: &str) {
        let mut pending = self.sync.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.remove(type_url) && pending.is_empty() {
            self.sync.synced.send_replace(true);
        }
    }

    /// Whether every required config type has been received once. Until then captured pods'
    /// connections are refused (an empty policy set would allow everything).
    pub fn synced(&self) -> bool {
        *self.sync.synced.borrow()
    }

    /// The types still awaited, for logs and the admin API.
    pub fn awaiting(&self) -> Vec<String> {
        let pending = self.sync.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.iter().cloned().collect()
    }

    /// Resolves once [`ProxyState::synced`] holds.
    pub async fn wait_synced(&self) {
        let mut rx = self.sync.synced.subscribe();
        // An error: the sender (self) is gone, nothing left to wait for.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// [`L7State::on_l7_change`] on the node's model.
    pub fn on_l7_change(&self, hook: L7Hook) {
        self.l7.on_l7_change(hook);
    }
}

fn read<T>(slot: &RwLock<Arc<T>>) -> Arc<T> {
    match slot.read() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn swap<T>(slot: &RwLock<Arc<T>>, value: T) {
    let value = Arc::new(value);
    match slot.write() {
        Ok(mut g) => *g = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn synced_once_every_required_type_arrived_and_for_good() {
        let state = ProxyState::new();
        assert!(state.synced(), "nothing required (the local file): synced");
        state.require_sync(&["a", "b"]);
        assert!(!state.synced());
        state.mark_synced("a");
        state.mark_synced("c");
        assert!(!state.synced());
        assert_eq!(state.awaiting(), ["b"]);
        state.mark_synced("b");
        assert!(state.synced());
        state.mark_synced("a");
        assert!(state.synced());
    }

    #[test]
    fn l7_hooks_see_each_model_before_readers_do() {
        let state = Arc::new(ProxyState::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let (c, s) = (calls.clone(), Arc::downgrade(&state));
        state.on_l7_change(Box::new(move |next| {
            c.fetch_add(1, Ordering::SeqCst);
            // The hook runs before the swap: readers still see the previous model.
            if let Some(s) = s.upgrade() {
                assert!(s.l7().clusters.len() <= next.clusters.len());
            }
        }));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "run once at registration");
        state.set_l7(L7Config::default());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
