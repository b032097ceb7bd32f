//! Which pods are captured, and the work of capturing and releasing them: the proxy's in-pod
//! listeners, the kernel state ([`Redirector`] or iptables rules), and the proxy tasks.
//!
//! `apply` reconciles towards a config; it is idempotent, so the same call serves start-up
//! (including takeover of what a previous agent pinned), live edits and shutdown.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::SystemTime,
};

use anyhow::{Context, Result};
use nodeway_ebpf_common::{socket_index, PodEntry, HBONE_PORT, INBOUND_PORT, MAX_PODS, OUTBOUND_PORT};
use nodeway_proxy::{
    authz::PolicyStore, connections::format_rfc3339, identity::Identity, metrics::Metrics, netns::Netns,
    workload::WorkloadIndex, xds::classes::CapturedPod, L7Runtime, PodHandle, PodListeners, PodSpec, Proxy,
};
use serde_json::{json, Value};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::{
    classes::SidecarClasses,
    config::{Config, Pod},
    iptables,
    redirect::{PodKernelState, PodRegistration, Redirector},
};

pub enum Backend {
    Ebpf(Box<Redirector>),
    /// The sidecar/ztunnel way, kept as the benchmark baseline: iptables REDIRECT of outbound TCP.
    Iptables,
    /// After `--cleanup`.
    Stopped,
}

struct Captured {
    netns: Arc<Netns>,
    slot: u32,
    /// Stops the pod's listeners when taken or dropped.
    handle: Option<PodHandle>,
    listeners: Vec<String>,
    kernel: PodKernelState,
    spec: Pod,
}

/// A pod whose capture failed, held closed in the kernel ([`Redirector::hold_closed`]) until a
/// capture succeeds or the pod is released.
struct Held {
    cookie: u64,
    kernel: PodKernelState,
}

struct PodStatus {
    spec: Pod,
    captured: Option<Captured>,
    held: Option<Held>,
    wanted: bool,
    reason: String,
    error: Option<String>,
    since: SystemTime,
}

pub struct Capture {
    node: String,
    backend: Backend,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    pods: BTreeMap<(String, String), PodStatus>,
    /// Slots handed over by a previous agent, by netns cookie.
    inherited: BTreeMap<u64, u32>,
    /// Pods the source knows but cannot capture: (reason, since).
    uncapturable: BTreeMap<(String, String), (String, SystemTime)>,
    /// A config has been applied (until then nothing is known, so the agent is not ready).
    applied: bool,
    /// With `--xds-address`, workloads, services, policies and the L7 config (routes, clusters,
    /// endpoints) come from the control plane: `apply` then leaves them alone and only decides
    /// which local pods are captured.
    pub mesh_from_xds: bool,
    /// With per-class sidecar streams, the L7 model each pod routes by is its class's.
    pub classes: Option<SidecarClasses>,
}

impl Capture {
    pub fn new(backend: Backend, proxy: Arc<Proxy>, metrics: Arc<Metrics>) -> Self {
        let inherited = match &backend {
            // A pod held closed has no slot to inherit.
            Backend::Ebpf(r) => r
                .pinned_pods()
                .into_iter()
                .filter(|(_, e)| e.slot < MAX_PODS)
                .map(|(c, e)| (c, e.slot))
                .collect(),
            _ => BTreeMap::new(),
        };
        Capture {
            node: String::new(),
            backend,
            proxy,
            metrics,
            pods: BTreeMap::new(),
            inherited,
            uncapturable: BTreeMap::new(),
            applied: false,
            mesh_from_xds: false,
            classes: None,
        }
    }

    /// Brings capture in line with `cfg`. Errors of single pods are recorded on the pod (and
    /// counted), never abort the others.
    pub fn apply(&mut self, cfg: &Config) {
        self.node = cfg.node.clone();
        self.applied = true;
        if !self.mesh_from_xds {
            self.apply_mesh(cfg);
        }
        self.update_classes(cfg);
        let mut seen = BTreeSet::new();
        for pod in cfg.pods.iter().filter(|p| cfg.is_local(p)) {
            seen.insert((pod.namespace.clone(), pod.name.clone()));
            self.reconcile_pod(cfg, pod);
        }
        let reasons: BTreeMap<(String, String), &str> = cfg
            .uncapturable
            .iter()
            .map(|u| ((u.namespace.clone(), u.name.clone()), u.reason.as_str()))
            .collect();
        self.release_gone(&seen, &reasons);
        self.note_uncapturable(reasons);
        self.release_orphans();
        if let Backend::Ebpf(r) = &mut self.backend {
            // Every pod is registered again (or released): an old layout's pins can go.
            r.finish_migration();
        }
        self.forget_certificates(cfg);
        let n = self.pods.values().filter(|p| p.captured.is_some()).count();
        self.metrics.captured_pods.set(n as i64);
    }

    /// Workloads, services, policies and L7 from the local file (not from the control plane).
    fn apply_mesh(&self, cfg: &Config) {
        let state = self.proxy.state();
        state.set_workloads(WorkloadIndex::new(cfg.workloads()));
        state.set_services(nodeway_proxy::service::ServiceIndex::new(cfg.services()));
        state.set_policies(PolicyStore::new(cfg.policies.iter().cloned()));
        match cfg.l7() {
            Ok(l7) => state.set_l7(l7),
            // Checked when the file was parsed: not expected.
            Err(e) => tracing::error!(error = %e, "L7 config, keeping the running one"),
        }
    }

    /// One local pod: captured, released or captured again as its decision and spec say.
    fn reconcile_pod(&mut self, cfg: &Config, pod: &Pod) {
        let key = (pod.namespace.clone(), pod.name.clone());
        let decision = cfg.decide(pod);
        let st = self.pods.entry(key).or_insert_with(|| PodStatus {
            spec: pod.clone(),
            captured: None,
            held: None,
            wanted: false,
            reason: String::new(),
            error: None,
            since: SystemTime::now(),
        });
        let changed = st.wanted != decision.captured || st.spec != *pod;
        st.reason = decision.reason.clone();
        if !changed && (st.captured.is_some() == decision.captured) {
            return;
        }
        let same_netns = st.spec.netns == pod.netns;
        st.wanted = decision.captured;
        st.spec = pod.clone();
        st.since = SystemTime::now();
        // A pod that stays captured in the same namespace (new labels, IPs, exclusions) is
        // captured again over its old state, which goes only afterwards: no moment without
        // capture. Otherwise the old state goes first.
        let in_place = decision.captured && same_netns && matches!(self.backend, Backend::Ebpf(_));
        let mut replaced = None;
        if let Some(c) = st.captured.take() {
            if in_place {
                replaced = Some(c);
            } else {
                release(&mut self.backend, c);
            }
        }
        if !decision.captured || !same_netns {
            if let Some(h) = st.held.take() {
                release_held(&mut self.backend, h);
            }
        }
        st.error = None;
        if decision.captured {
            self.capture_wanted(cfg, pod, replaced, &decision.reason);
        } else {
            info!(pod = %format!("{}/{}", pod.namespace, pod.name), reason = %decision.reason, "pod not captured");
        }
    }

    /// Captures `pod` (over `replaced`, its old state in the same namespace, if any); on failure
    /// its traffic is held closed.
    fn capture_wanted(&mut self, cfg: &Config, pod: &Pod, mut replaced: Option<Captured>, reason: &str) {
        let workload = Arc::new(cfg.workload(pod));
        let identity = workload.identity(&cfg.trust_domain);
        let used = self.pods_slots_except(&pod.namespace, &pod.name);
        let slots = Slots {
            inherited: &self.inherited,
            used: &used,
            prefer: replaced.as_ref().map(|c| c.slot),
        };
        let l7 = self.l7_of(pod);
        let result = l7.and_then(|l7| {
            let serve = Serve { workload, identity, l7 };
            capture(&mut self.backend, &self.proxy, slots, pod, serve)
        });
        if let Some(old) = replaced.take() {
            retire(&mut self.backend, old, result.as_ref().ok().map(|c| c.slot));
        }
        match result {
            Ok(c) => {
                info!(pod = %format!("{}/{}", pod.namespace, pod.name), netns = %c.netns.path().display(), cookie = c.netns.cookie(), reason = %reason, "pod captured");
                // Re-borrow: pods_slots_except borrowed self immutably above.
                if let Some(st) = self.pods.get_mut(&(pod.namespace.clone(), pod.name.clone())) {
                    st.captured = Some(c);
                    // The capture replaced the held state's entries and took its link over.
                    st.held = None;
                }
            }
            Err(e) => self.hold_failed(pod, e),
        }
    }

    /// A capture failed: recorded on the pod, counted, and its traffic held closed.
    fn hold_failed(&mut self, pod: &Pod, e: anyhow::Error) {
        let msg = format!("{e:#}");
        warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %msg, "capturing pod failed");
        self.metrics.capture_failures.inc();
        let held = match self.pods.get_mut(&(pod.namespace.clone(), pod.name.clone())) {
            Some(st) if st.held.is_some() => st.held.take().map(Ok),
            _ => None,
        }
        .unwrap_or_else(|| hold(&mut self.backend, pod));
        if let Err(e) = &held {
            warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %format!("{e:#}"), "holding the pod's traffic closed failed too");
        }
        if let Some(st) = self.pods.get_mut(&(pod.namespace.clone(), pod.name.clone())) {
            st.error = Some(msg);
            st.held = held.ok();
        }
    }

    /// Pods no longer in the config: released, with the source's reason where it gave one.
    fn release_gone(&mut self, seen: &BTreeSet<(String, String)>, reasons: &BTreeMap<(String, String), &str>) {
        let gone: Vec<_> = self.pods.keys().filter(|k| !seen.contains(*k)).cloned().collect();
        for key in gone {
            if let Some(mut st) = self.pods.remove(&key) {
                if let Some(h) = st.held.take() {
                    release_held(&mut self.backend, h);
                }
                if let Some(c) = st.captured {
                    let why = reasons.get(&key).copied().unwrap_or("pod removed");
                    info!(pod = %format!("{}/{}", key.0, key.1), reason = %why, "pod released");
                    release(&mut self.backend, c);
                }
            }
        }
    }

    /// Pods the source cannot capture, each with the time its reason was first seen.
    fn note_uncapturable(&mut self, reasons: BTreeMap<(String, String), &str>) {
        let mut uncapturable = BTreeMap::new();
        for (key, reason) in reasons {
            let since = match self.uncapturable.remove(&key) {
                Some((old, since)) if old == reason => since,
                _ => {
                    info!(pod = %format!("{}/{}", key.0, key.1), %reason, "pod not captured");
                    SystemTime::now()
                }
            };
            uncapturable.insert(key, (reason.to_string(), since));
        }
        self.uncapturable = uncapturable;
    }

    /// The sidecar classes become those of the pods to capture now.
    fn update_classes(&mut self, cfg: &Config) {
        let Some(classes) = &mut self.classes else { return };
        let pods: Vec<CapturedPod> = cfg
            .pods
            .iter()
            .filter(|p| cfg.is_local(p) && cfg.decide(p).captured)
            .map(class_member)
            .collect();
        classes.update(&pods);
    }

    /// Whether every sidecar class has its config (true without classes).
    pub fn classes_synced(&self) -> bool {
        self.classes.as_ref().is_none_or(SidecarClasses::all_synced)
    }

    /// The L7 model `pod` routes by: its class's with per-class streams, else the node's.
    fn l7_of(&self, pod: &Pod) -> Result<Option<Arc<L7Runtime>>> {
        let Some(classes) = &self.classes else { return Ok(None) };
        classes
            .runtime_of(&uid(pod))
            .map(Some)
            .with_context(|| format!("no sidecar class for {}/{}", pod.namespace, pod.name))
    }

    /// Certificates are held for the identities of captured pods only.
    fn forget_certificates(&self, cfg: &Config) {
        let Some(h) = self.proxy.hbone() else { return };
        let live: BTreeSet<Identity> = self
            .pods
            .values()
            .filter(|p| p.captured.is_some())
            .map(|p| cfg.workload(&p.spec).identity(&cfg.trust_domain))
            .collect();
        h.certs.retain(|id| live.contains(id));
    }

    fn pods_slots_except(&self, ns: &str, name: &str) -> BTreeSet<u32> {
        self.pods
            .iter()
            .filter(|((n, p), _)| !(n == ns && p == name))
            .filter_map(|(_, s)| s.captured.as_ref().map(|c| c.slot))
            .collect()
    }

    /// Kernel state a previous agent left for pods that are not captured now.
    fn release_orphans(&mut self) {
        let Backend::Ebpf(r) = &mut self.backend else { return };
        // Pods held closed are live too: their state is what keeps them from a bypass.
        let live: BTreeSet<u64> = self
            .pods
            .values()
            .filter_map(|p| p.captured.as_ref().map(|c| c.netns.cookie()))
            .chain(self.pods.values().filter_map(|p| p.held.as_ref().map(|h| h.cookie)))
            .collect();
        let mut orphans: BTreeMap<u64, Option<u32>> = r.pinned_pod_links().into_iter().map(|c| (c, None)).collect();
        for (cookie, e) in r.pinned_pods() {
            orphans.insert(cookie, Some(e.slot));
        }
        let live_slots: BTreeSet<u32> = self
            .pods
            .values()
            .filter_map(|p| p.captured.as_ref().map(|c| c.slot))
            .collect();
        for (cookie, slot) in orphans {
            if live.contains(&cookie) {
                continue;
            }
            // Never clear a slot that a live pod now uses.
            let slot = slot.filter(|s| !live_slots.contains(s));
            info!(cookie, "releasing a pod a previous agent captured");
            if let Err(e) = r.release(cookie, slot) {
                warn!(cookie, error = %format!("{e:#}"), "releasing orphaned pod state failed");
            }
            self.inherited.remove(&cookie);
        }
    }

    /// Releases every pod (shutdown with --cleanup, or before the backend goes).
    pub fn release_all(&mut self) {
        for st in self.pods.values_mut() {
            if let Some(c) = st.captured.take() {
                release(&mut self.backend, c);
            }
            if let Some(h) = st.held.take() {
                release_held(&mut self.backend, h);
            }
        }
    }

    /// Stops accepting on every pod's listeners (shutdown); live connections carry on.
    pub fn stop_accepting(&mut self) {
        for st in self.pods.values_mut() {
            if let Some(c) = &mut st.captured {
                if let Some(h) = c.handle.take() {
                    h.stop();
                }
            }
        }
    }

    /// `--cleanup`: releases every pod, then detaches and unpins everything of the backend.
    pub fn cleanup(&mut self) -> Result<()> {
        self.release_all();
        match std::mem::replace(&mut self.backend, Backend::Stopped) {
            Backend::Ebpf(r) => r.cleanup(),
            _ => Ok(()),
        }
    }

    /// All pods this agent has been told about, captured in `pods` with what was done for them.
    pub fn status_json(&self) -> Value {
        let pods: Vec<Value> = self
            .pods
            .iter()
            .map(|((ns, name), st)| {
                let (captured, reason) = match (&st.captured, &st.error) {
                    (Some(_), _) => (true, st.reason.clone()),
                    (None, Some(e)) if st.held.is_some() => {
                        (false, format!("capture failed, traffic fails closed: {e}"))
                    }
                    (None, Some(e)) => (
                        false,
                        format!("capture failed and its traffic could not be held closed: {e}"),
                    ),
                    (None, None) => (false, st.reason.clone()),
                };
                let mut v = json!({
                    "name": name, "namespace": ns, "captured": captured, "reason": reason,
                    "since": format_rfc3339(st.since),
                    "netns": st.spec.netns, "ips": st.spec.ips,
                    "excludeOutboundPorts": st.spec.exclude_outbound_ports,
                    "excludeInboundPorts": st.spec.exclude_inbound_ports,
                });
                if let Some(h) = &st.held {
                    v["heldClosed"] = json!(true);
                    v["netnsCookie"] = json!(h.cookie);
                    v["attachments"] = json!(h.kernel.attachments);
                    v["mapEntries"] = json!(h.kernel.map_entries);
                }
                if let Some(synced) = self.classes.as_ref().and_then(|c| c.synced(&format!("{ns}/{name}"))) {
                    v["l7Synced"] = json!(synced);
                    if !synced && st.captured.is_some() {
                        v["reason"] = json!(format!("{reason}; outbound fails closed until its sidecar class's config arrives from istiod"));
                    }
                }
                if let Some(c) = &st.captured {
                    v["netnsCookie"] = json!(c.netns.cookie());
                    v["slot"] = json!(c.slot);
                    v["listeners"] = json!(c.listeners);
                    v["attachments"] = json!(c.kernel.attachments);
                    v["mapEntries"] = json!(c.kernel.map_entries);
                }
                v
            })
            .chain(self.uncapturable.iter().map(|((ns, name), (reason, since))| {
                json!({"name": name, "namespace": ns, "captured": false, "reason": reason, "since": format_rfc3339(*since)})
            }))
            .collect();
        let (mode, programs, stats, pin_dir, cgroup) = match &self.backend {
            Backend::Ebpf(r) => (
                "ebpf",
                json!(r.attachments()),
                json!(r.stats()),
                json!(r.root().display().to_string()),
                json!(r.cgroup().display().to_string()),
            ),
            Backend::Iptables => ("iptables", json!([]), json!({}), Value::Null, Value::Null),
            Backend::Stopped => ("stopped", json!([]), json!({}), Value::Null, Value::Null),
        };
        let layout_dir = match &self.backend {
            Backend::Ebpf(r) => json!(r.pin_dir().display().to_string()),
            _ => Value::Null,
        };
        json!({"node": self.node, "mode": mode, "pinDir": pin_dir, "pinLayoutDir": layout_dir, "cgroup": cgroup, "programs": programs, "pods": pods, "stats": stats})
    }

    /// The node's own addresses, whose SYNs (the kubelet's probes) skip the proxy.
    pub fn set_host_addresses(&mut self, ips: &[IpAddr]) {
        if let Backend::Ebpf(r) = &mut self.backend {
            if let Err(e) = r.set_host_addresses(ips) {
                warn!(error = %format!("{e:#}"), "updating the node's addresses for probe exemption failed");
            }
        }
    }

    /// Kernel counters, for the metrics.
    pub fn kernel_stats(&self) -> BTreeMap<&'static str, u64> {
        match &self.backend {
            Backend::Ebpf(r) => r.stats(),
            _ => BTreeMap::new(),
        }
    }

    /// The pods whose traffic goes through the proxy right now.
    pub fn captured_pods(&self) -> BTreeSet<(String, String)> {
        self.pods
            .iter()
            .filter(|(_, p)| p.captured.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// True once a config is applied and every pod that should be captured is.
    pub fn all_captured(&self) -> bool {
        self.applied && self.pods.values().all(|p| !p.wanted || p.captured.is_some())
    }
}

/// Which slot a capture may take: not one in `used`; the pod's own previous one (`prefer`, a
/// respec) or the one a previous agent gave its namespace first.
struct Slots<'a> {
    inherited: &'a BTreeMap<u64, u32>,
    used: &'a BTreeSet<u32>,
    prefer: Option<u32>,
}

impl Slots<'_> {
    fn pick(&self, cookie: u64) -> Result<u32> {
        let free = |s: &u32| !self.used.contains(s);
        if let Some(s) = self.prefer.filter(free) {
            return Ok(s);
        }
        match self.inherited.get(&cookie) {
            Some(s) if free(s) => Ok(*s),
            _ => (0..MAX_PODS)
                .find(|s| free(s) && !self.inherited.values().any(|i| i == s))
                .context("no free pod slot"),
        }
    }
}

/// The state a respec replaced: its listeners stop; its kernel entries were overwritten by the
/// new capture, or (if that failed, or took another slot) its slot's entries are cleared.
fn retire(backend: &mut Backend, old: Captured, new_slot: Option<u32>) {
    if new_slot != Some(old.slot) {
        if let Backend::Ebpf(r) = backend {
            if let Err(e) = r.clear_slot(old.slot) {
                warn!(slot = old.slot, error = %format!("{e:#}"), "clearing a replaced pod slot failed");
            }
        }
    }
    drop(old.handle);
}

/// What the proxy serves a captured pod as.
struct Serve {
    workload: Arc<nodeway_proxy::workload::Workload>,
    identity: Identity,
    /// `None`: the node's L7 model.
    l7: Option<Arc<L7Runtime>>,
}

/// A pod's key in its sidecar class.
fn uid(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

fn class_member(pod: &Pod) -> CapturedPod {
    let ip = ipv4s(pod).next().map(|ip| ip.to_string());
    CapturedPod {
        uid: uid(pod),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone().unwrap_or_else(|| "default".into()),
        ip: ip
            .or_else(|| pod.ips.first().map(ToString::to_string))
            .unwrap_or_default(),
        labels: pod.labels.clone(),
    }
}

fn capture(backend: &mut Backend, proxy: &Arc<Proxy>, slots: Slots<'_>, pod: &Pod, serve: Serve) -> Result<Captured> {
    let Serve { workload, identity, l7 } = serve;
    let spec = pod.netns.as_deref().unwrap_or_default();
    let netns = Arc::new(Netns::open(spec)?);
    let slot = slots.pick(netns.cookie())?;
    let ebpf = matches!(backend, Backend::Ebpf(_));
    // Loopback listeners: reachable only through the capture, never from the network.
    let mut outbound = vec![listen(&netns, SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)))?];
    let mut inbound = Vec::new();
    let mut hbone_sockets = Vec::new();
    if ebpf {
        inbound.push((
            socket_index(slot, false, false),
            listen(&netns, SocketAddr::from((Ipv4Addr::LOCALHOST, INBOUND_PORT)))?,
        ));
        if let Some(h) = proxy.hbone() {
            // Fetch the pod's certificate now, not on its first connection.
            h.certs.track(identity.clone());
            hbone_sockets.push((
                socket_index(slot, true, false),
                listen(&netns, SocketAddr::from((Ipv4Addr::LOCALHOST, HBONE_PORT)))?,
            ));
            if let Ok(l) = listen(&netns, SocketAddr::from((Ipv6Addr::LOCALHOST, HBONE_PORT))) {
                hbone_sockets.push((socket_index(slot, true, true), l));
            }
        }
        // IPv6 may be disabled in a pod; then its IPv6 traffic has no listener and fails closed.
        match listen(&netns, SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT))) {
            Ok(l) => outbound.push(l),
            Err(e) => warn!(pod = %workload.key(), error = %format!("{e:#}"), "no IPv6 outbound listener"),
        }
        if let Ok(l) = listen(&netns, SocketAddr::from((Ipv6Addr::LOCALHOST, INBOUND_PORT))) {
            inbound.push((socket_index(slot, false, true), l));
        }
    }
    let mut listeners: Vec<String> = outbound
        .iter()
        .chain(inbound.iter().chain(&hbone_sockets).map(|(_, l)| l))
        .filter_map(|l| l.local_addr().ok()?.as_socket())
        .map(|a| a.to_string())
        .collect();
    listeners.sort();
    // The app sees the client's address when the pod's delivery routing is in place; without
    // it (an old kernel, no CAP_NET_ADMIN in the pod's namespace) the pod's own, and the
    // capture goes on.
    let transparent_delivery = ebpf
        && crate::delivery::install(&netns)
            .map_err(
                |e| warn!(pod = %workload.key(), error = %format!("{e:#}"), "no delivery from the client's address"),
            )
            .is_ok();
    let kernel = match backend {
        Backend::Ebpf(r) => {
            let entry = PodEntry {
                slot,
                outbound_port: OUTBOUND_PORT,
                _pad: 0,
            };
            let fds: Vec<(u32, RawFd)> = inbound
                .iter()
                .chain(&hbone_sockets)
                .map(|(i, l)| (*i, l.as_raw_fd()))
                .collect();
            r.capture(
                &netns,
                &PodRegistration {
                    entry,
                    ips: &pod.ips,
                    exclude_outbound: &pod.exclude_outbound_ports,
                    exclude_inbound: &pod.exclude_inbound_ports,
                    sockets: &fds,
                },
            )?
        }
        Backend::Iptables => iptables::capture(&netns, pod)?,
        Backend::Stopped => anyhow::bail!("the agent is shutting down"),
    };
    let spec = PodSpec {
        workload,
        identity,
        netns: netns.clone(),
        l7,
        transparent_delivery,
    };
    let sockets = PodListeners {
        outbound: outbound.into_iter().map(Into::into).collect(),
        inbound: inbound.into_iter().map(|(_, l)| l.into()).collect(),
        hbone: hbone_sockets.into_iter().map(|(_, l)| l.into()).collect(),
    };
    let handle = proxy.start_pod(spec, sockets).context("serving the pod's listeners")?;
    Ok(Captured {
        netns,
        slot,
        handle: Some(handle),
        listeners,
        kernel,
        spec: pod.clone(),
    })
}

/// After a failed capture: the pod's namespace entry and lookup link without any proxy socket.
fn hold(backend: &mut Backend, pod: &Pod) -> Result<Held> {
    let Backend::Ebpf(r) = backend else {
        anyhow::bail!("only the eBPF capture can hold a pod closed");
    };
    let netns = Netns::open(pod.netns.as_deref().unwrap_or_default())?;
    let kernel = r.hold_closed(&netns)?;
    Ok(Held {
        cookie: netns.cookie(),
        kernel,
    })
}

fn release_held(backend: &mut Backend, h: Held) {
    if let Backend::Ebpf(r) = backend {
        if let Err(e) = r.release(h.cookie, None) {
            warn!(cookie = h.cookie, error = %format!("{e:#}"), "releasing a held pod failed");
        }
    }
}

fn release(backend: &mut Backend, c: Captured) {
    drop(c.handle);
    let res = match backend {
        Backend::Ebpf(r) => {
            if let Err(e) = crate::delivery::remove(&c.netns) {
                warn!(netns = %c.netns.path().display(), error = %format!("{e:#}"), "removing the delivery routing failed");
            }
            r.release(c.netns.cookie(), Some(c.slot))
        }
        Backend::Iptables => iptables::release(&c.netns, &c.spec),
        Backend::Stopped => Ok(()),
    };
    if let Err(e) = res {
        warn!(netns = %c.netns.path().display(), error = %format!("{e:#}"), "releasing pod state failed");
    }
}

/// A listening socket created inside the pod's namespace.
fn listen(netns: &Netns, addr: SocketAddr) -> Result<Socket> {
    netns
        .run(|| -> std::io::Result<Socket> {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.set_reuse_address(true)?;
            // A restarted agent binds next to one that is still draining its connections.
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            s.listen(4096)?;
            Ok(s)
        })?
        .with_context(|| format!("listening on {addr} in {}", netns.path().display()))
}

/// Own IPs of a pod as the iptables rules need them.
pub fn ipv4s(pod: &Pod) -> impl Iterator<Item = Ipv4Addr> + '_ {
    pod.ips.iter().filter_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}
