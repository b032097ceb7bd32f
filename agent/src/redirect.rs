//! The eBPF side of capture: loads nodeway's kernel programs, attaches them, pins them under
//! bpffs, and keeps their maps in step with the pods the agent captures.
//!
//! Layout under the pin directory (`--pin-dir`, default `/sys/fs/bpf/nodeway`): one directory
//! per map layout, `v<version>-<digest>/` ([`crate::pin_layout`]), holding `maps/<MAP>` (the
//! programs' maps, reused by a restarted agent of the same layout) and `links/<program>` /
//! `links/sk_lookup-<netns cookie>` (attachments that outlive the process). A restarted agent
//! attaches fresh programs next to the pinned ones and then drops the old links, so capture never
//! lapses; over another layout it migrates (see [`Redirector::start`]); `--cleanup` removes all
//! of it.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, MapInfo, PerCpuArray, SockMap},
    programs::{links::FdLink, links::PinnedLink, CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps},
    Ebpf, EbpfLoader,
};
use nodeway_ebpf_common::{
    stat, ConnKey, IpKey, OrigDst, PodEntry, PortKey, AF_INET, AF_INET6, DIRECTION_INBOUND, DIRECTION_OUTBOUND,
    HELD_CLOSED_SLOT, MAX_EXCLUDED_PORTS_PER_POD, MAX_HOST_ADDRS, MAX_IPS_PER_POD, OUTBOUND_PORT,
};

use crate::pin_layout::{self, Decision, Layout, MapSpec, OldLayout, Pinned, PIN_LAYOUT_VERSION};
use nodeway_proxy::OriginalDst;
use serde::Serialize;
use tokio::net::TcpStream;
use tracing::{info, warn};

/// The programs attached once, at the cgroup-v2 root.
const CGROUP_PROGRAMS: [&str; 5] = [
    "nodeway_connect4",
    "nodeway_connect6",
    "nodeway_getpeername4",
    "nodeway_getpeername6",
    "nodeway_sockops",
];
const SK_LOOKUP: &str = "nodeway_sk_lookup";

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub name: String,
    pub attached_to: String,
    pub link: String,
    /// The link was pinned by an earlier agent and replaced without a gap.
    pub took_over: bool,
}

pub struct Redirector {
    ebpf: Ebpf,
    /// `--pin-dir`.
    root: PathBuf,
    /// This layout's directory under it.
    pin_dir: PathBuf,
    /// Directories of other layouts being migrated from: their pod links are taken over as pods
    /// are registered again, the rest goes in [`Redirector::finish_migration`].
    retiring: Vec<PathBuf>,
    cgroup: PathBuf,
    attachments: Vec<Attachment>,
    pods_by_netns: BpfHashMap<MapData, u64, PodEntry>,
    pods_by_ip: BpfHashMap<MapData, IpKey, PodEntry>,
    excluded: BpfHashMap<MapData, PortKey, u8>,
    host_addrs: BpfHashMap<MapData, IpKey, u8>,
    sockets: SockMap<MapData>,
    orig_dst: Arc<Mutex<BpfHashMap<MapData, ConnKey, OrigDst>>>,
    stats: PerCpuArray<MapData, u64>,
}

/// What a pod's capture registers in the maps: its entry (slot, outbound port), addresses,
/// excluded ports and inbound proxy sockets (sockmap index, fd).
pub struct PodRegistration<'a> {
    pub entry: PodEntry,
    pub ips: &'a [IpAddr],
    pub exclude_outbound: &'a [u16],
    pub exclude_inbound: &'a [u16],
    pub sockets: &'a [(u32, RawFd)],
}

/// Refuses a pod over its share of the shared maps, before any entry is written.
fn within_budget(ips: &[IpAddr], exclude_outbound: &[u16], exclude_inbound: &[u16]) -> Result<()> {
    let ports: std::collections::BTreeSet<(u16, bool)> = exclude_outbound
        .iter()
        .map(|p| (*p, true))
        .chain(exclude_inbound.iter().map(|p| (*p, false)))
        .collect();
    if ports.len() > MAX_EXCLUDED_PORTS_PER_POD as usize {
        anyhow::bail!(
            "the pod excludes {} ports (outbound and inbound together); at most {MAX_EXCLUDED_PORTS_PER_POD} per pod",
            ports.len()
        );
    }
    if ips.len() > MAX_IPS_PER_POD as usize {
        anyhow::bail!("the pod has {} addresses; at most {MAX_IPS_PER_POD} per pod", ips.len());
    }
    Ok(())
}

/// What a pod's capture put into the kernel (shown on `/captured`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PodKernelState {
    pub attachments: Vec<String>,
    pub map_entries: Vec<String>,
}

impl Redirector {
    /// Loads and attaches, taking over what an earlier agent pinned under `root`. Over the same
    /// layout, its maps are reused. Over another layout, this layout gets a directory of its own:
    /// entries that mean the same are copied and every other pod of the old state is held
    /// closed in the new maps, before the new programs attach; then the old cgroup links go.
    /// The old pods' sk_lookup links keep steering their inbound SYNs (established connections
    /// are never looked up again) until each pod is registered again, and
    /// [`Redirector::finish_migration`] removes the rest. If the layout's directory is new and
    /// the start fails half-way, what was attached is removed again.
    pub fn start(root: &Path, cgroup: &Path, ebpf_log: bool) -> Result<Self> {
        ensure_bpffs(root)?;
        let test = TestOnlyLayout::from_env();
        let object = aya::include_bytes_aligned!(env!("NODEWAY_EBPF_OBJ"));
        let layout = Layout::of_object(object, test.version.unwrap_or(PIN_LAYOUT_VERSION), &test.max_entries())
            .map_err(|e| anyhow!(e))?;
        let name = layout.dir_name();
        let (ours, others) = survey(root, &name);
        let olds = match pin_layout::decide(&layout, ours.as_ref(), &others) {
            Decision::Refuse(why) => bail!(
                "pinned eBPF state cannot be reused ({why}); remove it with `nodeway cleanup --pin-dir {}` (its pods are released) or run the agent that pinned it",
                root.display()
            ),
            Decision::Fresh | Decision::Reuse => Vec::new(),
            Decision::Migrate(olds) => {
                let from: Vec<String> = olds.iter().map(|o| o.dir.display().to_string()).collect();
                info!(from = %from.join(", "), to = %name, "pinned eBPF state has another map layout: migrating");
                olds
            }
        };
        let dir = root.join(&name);
        let fresh = ours.is_none();
        let r = Self::start_inner(root, &dir, &olds, cgroup, ebpf_log, &test, object);
        if r.is_err() && fresh {
            let _ = remove_layout_dir(&dir);
            let _ = fs::remove_dir(root);
        }
        r
    }

    fn start_inner(
        root: &Path,
        pin_dir: &Path,
        olds: &[OldLayout],
        cgroup: &Path,
        ebpf_log: bool,
        test: &TestOnlyLayout,
        object: &[u8],
    ) -> Result<Self> {
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).with_context(|| format!("creating pin directory {}", d.display()))?;
        }
        let log_flag: u8 = u8::from(ebpf_log);
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&maps_dir)
            .override_global("LOG_ENABLED", &log_flag, true);
        for (map, n) in test.max_entries() {
            loader.map_max_entries(map, n);
        }
        let mut ebpf = loader
            .load(object)
            .with_context(|| format!("loading the eBPF programs (maps pinned in {})", maps_dir.display()))?;
        if ebpf_log {
            start_ebpf_logger(&mut ebpf);
        }
        for old in olds {
            seed_from(&mut ebpf, old)?;
        }
        let retiring: Vec<PathBuf> = olds.iter().map(|o| o.dir.clone()).collect();
        let attachments = attach_cgroup_programs(&mut ebpf, &links_dir, &retiring, cgroup)?;
        remove_stale_links(&links_dir)?;
        let p: &mut SkLookup = program(&mut ebpf, SK_LOOKUP)?;
        p.load().context("loading nodeway_sk_lookup")?;

        let pods_by_netns = BpfHashMap::try_from(take_map(&mut ebpf, "PODS_BY_NETNS")?)?;
        let pods_by_ip = BpfHashMap::try_from(take_map(&mut ebpf, "PODS_BY_IP")?)?;
        let excluded = BpfHashMap::try_from(take_map(&mut ebpf, "EXCLUDED_PORTS")?)?;
        let sockets = SockMap::try_from(take_map(&mut ebpf, "PROXY_SOCKETS")?)?;
        let host_addrs = BpfHashMap::try_from(take_map(&mut ebpf, "HOST_ADDRS")?)?;
        let orig_dst = Arc::new(Mutex::new(BpfHashMap::try_from(take_map(&mut ebpf, "ORIG_DST")?)?));
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, "STATS")?)?;
        info!(pin_dir = %pin_dir.display(), cgroup = %cgroup.display(), "eBPF capture programs attached");
        Ok(Redirector {
            ebpf,
            root: root.to_path_buf(),
            pin_dir: pin_dir.to_path_buf(),
            retiring,
            cgroup: cgroup.to_path_buf(),
            attachments,
            pods_by_netns,
            pods_by_ip,
            excluded,
            host_addrs,
            sockets,
            orig_dst,
            stats,
        })
    }

    /// Ends a migration once every pod has been registered again (or released): detaches what
    /// is left of the old layouts' links (pods no longer captured) and unpins their maps.
    pub fn finish_migration(&mut self) {
        for dir in std::mem::take(&mut self.retiring) {
            match remove_layout_dir(&dir) {
                Ok(()) => info!(dir = %dir.display(), "pinned state of the old map layout removed"),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %format!("{e:#}"), "removing the old map layout's pins failed")
                }
            }
        }
    }

    /// Makes `HOST_ADDRS` the node's addresses: SYNs from them (the kubelet's probes) reach
    /// captured pods' apps directly. Returns how many are in the map.
    pub fn set_host_addresses(&mut self, ips: &[IpAddr]) -> Result<usize> {
        let want: std::collections::HashSet<IpKey> =
            ips.iter().take(MAX_HOST_ADDRS as usize).map(|ip| ip_key(*ip)).collect();
        let stale: Vec<IpKey> = self
            .host_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains(k))
            .collect();
        for k in stale {
            let _ = self.host_addrs.remove(&k);
        }
        for k in &want {
            self.host_addrs.insert(*k, 1, 0).context("HOST_ADDRS")?;
        }
        Ok(want.len())
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// `--pin-dir`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This layout's directory under [`Redirector::root`].
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Pods a previous agent captured (netns cookie → entry), for reconciliation at start.
    pub fn pinned_pods(&self) -> Vec<(u64, PodEntry)> {
        self.pods_by_netns.iter().filter_map(|r| r.ok()).collect()
    }

    /// Per-pod sk_lookup links pinned by a previous agent (of this layout or one being migrated
    /// from), by netns cookie.
    pub fn pinned_pod_links(&self) -> Vec<u64> {
        let mut v: Vec<u64> = pod_links(&self.pin_dir);
        for d in &self.retiring {
            v.extend(pod_links(d));
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Registers a pod: its sockets, exclusions and addresses, then (last, so a half-registered
    /// pod never steers) its namespace and its sk_lookup link.
    pub fn capture(
        &mut self,
        netns: &nodeway_proxy::netns::Netns,
        pod: &PodRegistration<'_>,
    ) -> Result<PodKernelState> {
        let slot = pod.entry.slot;
        within_budget(pod.ips, pod.exclude_outbound, pod.exclude_inbound)?;
        // Replace whatever an earlier capture of this slot left.
        self.clear_slot_entries(slot)?;
        let r = self.register(netns, pod);
        if r.is_err() {
            // Half-registered entries must not outlive the failure: the slot goes to the next pod.
            let _ = self.clear_slot_entries(slot);
        }
        r
    }

    /// Holds a pod's traffic closed without serving it (after its capture failed): its
    /// namespace entry under [`HELD_CLOSED_SLOT`] (its connects go to a loopback port nobody
    /// serves) and its sk_lookup link (no address of it is listed, so inbound SYNs are dropped).
    pub fn hold_closed(&mut self, netns: &nodeway_proxy::netns::Netns) -> Result<PodKernelState> {
        let cookie = netns.cookie();
        let entry = PodEntry {
            slot: HELD_CLOSED_SLOT,
            outbound_port: OUTBOUND_PORT,
            _pad: 0,
        };
        self.pods_by_netns
            .insert(cookie, entry, 0)
            .with_context(|| format!("PODS_BY_NETNS[{cookie}]"))?;
        Ok(PodKernelState {
            attachments: vec![self.attach_lookup(netns)?],
            map_entries: vec![format!("PODS_BY_NETNS[{cookie}] (held closed)")],
        })
    }

    fn register(&mut self, netns: &nodeway_proxy::netns::Netns, pod: &PodRegistration<'_>) -> Result<PodKernelState> {
        let cookie = netns.cookie();
        let (entry, slot) = (pod.entry, pod.entry.slot);
        let mut st = PodKernelState::default();
        for (index, fd) in pod.sockets {
            self.sockets
                .set(*index, &Fd(*fd), 0)
                .with_context(|| format!("PROXY_SOCKETS[{index}]"))?;
            st.map_entries.push(format!("PROXY_SOCKETS[{index}]"));
        }
        for (ports, dir, name) in [
            (pod.exclude_outbound, DIRECTION_OUTBOUND, "outbound"),
            (pod.exclude_inbound, DIRECTION_INBOUND, "inbound"),
        ] {
            for port in ports {
                let key = PortKey {
                    slot,
                    port: *port,
                    direction: dir,
                    _pad: 0,
                };
                self.excluded
                    .insert(key, 1, 0)
                    .with_context(|| format!("EXCLUDED_PORTS[{slot},{port},{name}]"))?;
                st.map_entries
                    .push(format!("EXCLUDED_PORTS[slot {slot} {name} {port}]"));
            }
        }
        for ip in pod.ips {
            self.pods_by_ip
                .insert(ip_key(*ip), entry, 0)
                .with_context(|| format!("PODS_BY_IP[{ip}]"))?;
            st.map_entries.push(format!("PODS_BY_IP[{ip}]"));
        }
        self.pods_by_netns
            .insert(cookie, entry, 0)
            .with_context(|| format!("PODS_BY_NETNS[{cookie}]"))?;
        st.map_entries.push(format!("PODS_BY_NETNS[{cookie}]"));
        st.attachments.push(self.attach_lookup(netns)?);
        Ok(st)
    }

    /// Attaches (or takes over) the pod's pinned sk_lookup link.
    fn attach_lookup(&mut self, netns: &nodeway_proxy::netns::Netns) -> Result<String> {
        let cookie = netns.cookie();
        let pin = self.pin_dir.join("links").join(format!("sk_lookup-{cookie}"));
        let mut old = vec![take_over(&pin)?];
        for d in &self.retiring {
            old.push(take_over(&d.join("links").join(format!("sk_lookup-{cookie}")))?);
        }
        let p: &mut SkLookup = program(&mut self.ebpf, SK_LOOKUP)?;
        let id = p
            .attach(netns.as_fd())
            .with_context(|| format!("attaching sk_lookup to {}", netns.path().display()))?;
        let link: FdLink = p.take_link(id)?.into();
        link.pin(&pin)
            .map_err(|e| anyhow!("pinning sk_lookup at {}: {e}", pin.display()))?;
        drop(old);
        Ok(format!("sk_lookup on netns {} ({})", cookie, pin.display()))
    }

    /// Removes every trace of a pod: map entries by slot and netns cookie, and its sk_lookup link.
    pub fn release(&mut self, cookie: u64, slot: Option<u32>) -> Result<()> {
        let _ = self.pods_by_netns.remove(&cookie);
        for dir in std::iter::once(&self.pin_dir).chain(&self.retiring) {
            let pin = dir.join("links").join(format!("sk_lookup-{cookie}"));
            if pin.exists() {
                let link = PinnedLink::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
                link.unpin().with_context(|| format!("unpinning {}", pin.display()))?;
            }
        }
        if let Some(slot) = slot {
            self.clear_slot_entries(slot)?;
        }
        Ok(())
    }

    /// Forgets a slot's sockets, exclusions and addresses (a respec moved the pod elsewhere).
    pub fn clear_slot(&mut self, slot: u32) -> Result<()> {
        self.clear_slot_entries(slot)
    }

    fn clear_slot_entries(&mut self, slot: u32) -> Result<()> {
        let ips: Vec<IpKey> = self
            .pods_by_ip
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, e)| e.slot == slot)
            .map(|(k, _)| k)
            .collect();
        for k in ips {
            let _ = self.pods_by_ip.remove(&k);
        }
        let ports: Vec<PortKey> = self
            .excluded
            .keys()
            .filter_map(|r| r.ok())
            .filter(|k| k.slot == slot)
            .collect();
        for k in ports {
            let _ = self.excluded.remove(&k);
        }
        for i in 0..nodeway_ebpf_common::SOCKETS_PER_POD {
            let _ = self
                .sockets
                .clear_index(&(slot * nodeway_ebpf_common::SOCKETS_PER_POD + i));
        }
        Ok(())
    }

    /// Kernel-side counters summed over CPUs.
    pub fn stats(&self) -> BTreeMap<&'static str, u64> {
        stat::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let v = self
                    .stats
                    .get(&(i as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (*name, v)
            })
            .collect()
    }

    pub fn original_dst(&self) -> Arc<dyn OriginalDst> {
        Arc::new(EbpfOriginalDst {
            map: self.orig_dst.clone(),
        })
    }

    /// Detaches everything and removes the pins: nothing of nodeway stays in the kernel.
    pub fn cleanup(self) -> Result<()> {
        let dir = self.root.clone();
        drop(self);
        remove_pins(&dir)
    }
}

/// Removes everything nodeway pinned under a pin directory (every layout's links, detaching
/// them, and maps), then the directory.
pub fn remove_pins(root: &Path) -> Result<()> {
    if let Ok(rd) = fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_str().is_some_and(pin_layout::is_layout_dir_name) {
                remove_layout_dir(&e.path())?;
            }
        }
    }
    remove_layout_dir(root)
}

/// Removes one layout directory's links (detaching them) and maps, then the directory (when it
/// is empty: the unversioned layout's directory is the pin directory itself).
fn remove_layout_dir(dir: &Path) -> Result<()> {
    let links = dir.join("links");
    if let Ok(rd) = fs::read_dir(&links) {
        for e in rd.flatten() {
            let p = e.path();
            match PinnedLink::from_pin(&p) {
                Ok(l) => {
                    l.unpin().with_context(|| format!("unpinning {}", p.display()))?;
                }
                Err(_) => fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?,
            }
        }
    }
    for sub in ["maps", "links"] {
        let d = dir.join(sub);
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        if d.exists() {
            fs::remove_dir(&d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    let empty = fs::read_dir(dir).map(|mut rd| rd.next().is_none()).unwrap_or(false);
    if empty {
        fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// A borrowed raw fd, for aya's `SockMap::set`.
struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

struct EbpfOriginalDst {
    map: Arc<Mutex<BpfHashMap<MapData, ConnKey, OrigDst>>>,
}

impl OriginalDst for EbpfOriginalDst {
    fn original_dst(&self, netns_cookie: u64, peer: SocketAddr, _stream: &TcpStream) -> Option<SocketAddr> {
        // The IPv4 listener also serves v4-mapped clients; its peers are plain IPv4.
        let family = match peer.ip() {
            IpAddr::V4(_) => AF_INET,
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => AF_INET,
            IpAddr::V6(_) => AF_INET6,
        };
        let key = ConnKey {
            netns_cookie,
            port: peer.port(),
            family,
            _pad: 0,
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let dst = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(orig_to_socket_addr(&dst))
    }
}

pub fn orig_to_socket_addr(d: &OrigDst) -> SocketAddr {
    let ip = if d.family == AF_INET6 {
        let mut b = [0u8; 16];
        for (i, w) in d.addr.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(b)
    } else {
        IpAddr::from(d.addr[0].to_ne_bytes())
    };
    SocketAddr::new(ip, d.port)
}

pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey {
            family: AF_INET as u32,
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        },
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            IpKey {
                family: AF_INET6 as u32,
                addr: [w(0), w(4), w(8), w(12)],
            }
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    p.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Test-only: makes this agent pin the layout an agent of another build would (another layout
/// version, another `HOST_ADDRS` capacity), so the end-to-end tests can upgrade over a
/// different layout. Never set outside tests.
#[derive(Default)]
struct TestOnlyLayout {
    version: Option<u32>,
    host_addrs_max_entries: Option<u32>,
}

impl TestOnlyLayout {
    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
        let t = TestOnlyLayout {
            version: var("NODEWAY_TEST_ONLY_PIN_LAYOUT_VERSION"),
            host_addrs_max_entries: var("NODEWAY_TEST_ONLY_HOST_ADDRS_MAX_ENTRIES"),
        };
        if t.version.is_some() || t.host_addrs_max_entries.is_some() {
            warn!("NODEWAY_TEST_ONLY_* set: pinning a test layout (never do this outside tests)");
        }
        t
    }

    fn max_entries(&self) -> Vec<(&'static str, u32)> {
        self.host_addrs_max_entries
            .map(|n| ("HOST_ADDRS", n))
            .into_iter()
            .collect()
    }
}

/// What is pinned under `root`: this layout's directory (`name`) and every other layout's,
/// the unversioned one (`root/maps`, `root/links`) included.
fn survey(root: &Path, name: &str) -> (Option<Pinned>, Vec<Pinned>) {
    let (mut ours, mut others) = (None, Vec::new());
    if root.join("maps").exists() || root.join("links").exists() {
        others.push(pinned_at(root, pin_layout::version_of(None)));
    }
    let mut dirs: Vec<(String, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
        .filter(|(n, p)| pin_layout::is_layout_dir_name(n) && p.is_dir())
        .collect();
    dirs.sort();
    for (n, path) in dirs {
        let p = pinned_at(&path, pin_layout::version_of(Some(&n)));
        if n == name {
            ours = Some(p);
        } else {
            others.push(p);
        }
    }
    (ours, others)
}

fn pinned_at(dir: &Path, version: Option<u32>) -> Pinned {
    let maps = fs::read_dir(dir.join("maps"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let spec = MapInfo::from_pin(e.path())
                .map_err(|e| e.to_string())
                .and_then(|i| map_spec(&i));
            Some((name, spec))
        })
        .collect();
    Pinned {
        dir: dir.to_path_buf(),
        version: version.unwrap_or(0),
        maps,
    }
}

fn map_spec(i: &MapInfo) -> Result<MapSpec, String> {
    let map_type = i.map_type().map_err(|e| e.to_string())? as u32;
    Ok(MapSpec {
        map_type,
        key_size: i.key_size(),
        value_size: i.value_size(),
        max_entries: i.max_entries(),
    })
}

/// Netns cookies of the per-pod sk_lookup links pinned in a layout directory.
fn pod_links(dir: &Path) -> Vec<u64> {
    fs::read_dir(dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("sk_lookup-")?.parse().ok())
        .collect()
}

/// Carries an old layout's state into the new maps before the new programs attach: entries of
/// the maps that mean the same are copied; the pods of the old state whose entries cannot be
/// are held closed (until each is registered again), so nothing of theirs bypasses the proxy
/// in between.
fn seed_from(ebpf: &mut Ebpf, old: &OldLayout) -> Result<()> {
    let maps = old.dir.join("maps");
    let mut copied = 0;
    for name in &old.copy {
        let from = maps.join(name);
        copied += match name.as_str() {
            "PODS_BY_NETNS" => copy_entries::<u64, PodEntry>(ebpf, name, &from)?,
            "PODS_BY_IP" => copy_entries::<IpKey, PodEntry>(ebpf, name, &from)?,
            "EXCLUDED_PORTS" => copy_entries::<PortKey, u8>(ebpf, name, &from)?,
            "HOST_ADDRS" => copy_entries::<IpKey, u8>(ebpf, name, &from)?,
            "ORIG_DST_BY_COOKIE" => copy_entries::<u64, OrigDst>(ebpf, name, &from)?,
            "ORIG_DST" => copy_entries::<ConnKey, OrigDst>(ebpf, name, &from)?,
            // Sockets cannot be read back (pods are registered again with the new agent's
            // sockets); counters start again.
            _ => 0,
        };
    }
    let mut held = 0;
    if !old.copy.contains("PODS_BY_NETNS") {
        let mut pods: BpfHashMap<&mut MapData, u64, PodEntry> = BpfHashMap::try_from(
            ebpf.map_mut("PODS_BY_NETNS")
                .ok_or_else(|| anyhow!("map PODS_BY_NETNS missing"))?,
        )?;
        for cookie in pod_links(&old.dir) {
            let entry = PodEntry {
                slot: HELD_CLOSED_SLOT,
                outbound_port: OUTBOUND_PORT,
                _pad: 0,
            };
            pods.insert(cookie, entry, 0)
                .with_context(|| format!("holding pod {cookie} closed while migrating"))?;
            held += 1;
        }
    }
    info!(from = %old.dir.display(), copied, held_closed = held, "migrated pinned entries");
    Ok(())
}

/// Copies every entry of the pinned map at `from` into the loaded map `name`; entries over the
/// new capacity are reported, not fatal (the pods they belong to are registered again).
fn copy_entries<K: aya::Pod, V: aya::Pod>(ebpf: &mut Ebpf, name: &str, from: &Path) -> Result<usize> {
    let data = MapData::from_pin(from).with_context(|| format!("opening {}", from.display()))?;
    let old: BpfHashMap<MapData, K, V> = BpfHashMap::try_from(aya::maps::Map::from_map_data(data)?)?;
    let map = ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing"))?;
    let mut new: BpfHashMap<&mut MapData, K, V> = BpfHashMap::try_from(map)?;
    let mut n = 0;
    for (k, v) in old.iter().filter_map(Result::ok) {
        match new.insert(k, v, 0) {
            Ok(()) => n += 1,
            Err(e) => warn!(map = name, error = %e, "an entry of the old layout does not fit the new map"),
        }
    }
    Ok(n)
}

/// Attaches the cgroup programs, each next to the link an earlier agent pinned for it (in this
/// layout's directory or an old one), which goes once the new one runs.
fn attach_cgroup_programs(
    ebpf: &mut Ebpf,
    links_dir: &Path,
    retiring: &[PathBuf],
    cgroup: &Path,
) -> Result<Vec<Attachment>> {
    let cgroup_file = fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let mut attachments = Vec::new();
    // bpf_link attachments to a cgroup always stack with other programs; the kernel wants
    // flags 0 there, which is what `Single` passes.
    for name in CGROUP_PROGRAMS {
        let pin = links_dir.join(name);
        let mut old = vec![take_over(&pin)?];
        for d in retiring {
            old.push(take_over(&d.join("links").join(name))?);
        }
        let link: FdLink = if name == "nodeway_sockops" {
            let p: &mut SockOps = program(ebpf, name)?;
            p.load().with_context(|| format!("loading {name}"))?;
            let id = p
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            p.take_link(id)?.try_into()?
        } else {
            let p: &mut CgroupSockAddr = program(ebpf, name)?;
            p.load().with_context(|| format!("loading {name}"))?;
            let id = p
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            p.take_link(id)?.try_into()?
        };
        link.pin(&pin)
            .map_err(|e| anyhow!("pinning {name} at {}: {e}", pin.display()))?;
        let took_over = old.iter().any(Option::is_some);
        drop(old); // detaches the previous agent's links, now that ours runs
        attachments.push(Attachment {
            name: name.to_string(),
            attached_to: cgroup.display().to_string(),
            link: pin.display().to_string(),
            took_over,
        });
    }
    Ok(attachments)
}

/// Detaches and removes links pinned for programs this agent no longer has (renamed or
/// removed): nothing runs in the kernel that no agent knows about.
fn remove_stale_links(links_dir: &Path) -> Result<()> {
    for e in fs::read_dir(links_dir).into_iter().flatten().flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if CGROUP_PROGRAMS.contains(&name.as_str()) || name.starts_with("sk_lookup-") {
            continue;
        }
        warn!(link = %e.path().display(), "removing the pinned link of a program this agent does not have");
        if let Some(l) = take_over(&e.path())? {
            drop(l);
        }
    }
    Ok(())
}

/// Opens a link pinned by an earlier agent and removes its pin, keeping it attached until the
/// returned handle drops.
fn take_over(pin: &Path) -> Result<Option<FdLink>> {
    if !pin.exists() {
        return Ok(None);
    }
    match PinnedLink::from_pin(pin) {
        Ok(l) => Ok(Some(l.unpin().with_context(|| format!("unpinning {}", pin.display()))?)),
        Err(e) => {
            warn!(pin = %pin.display(), error = %e, "stale pin is not a link, removing it");
            fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
            Ok(None)
        }
    }
}

/// Makes sure the pin directory sits on a bpffs, mounting one at /sys/fs/bpf if none is there.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    let mounts = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let on_bpffs = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-");
        matches!(sep, Some(s) if f.get(s + 1) == Some(&"bpf") && parent.starts_with(f[4]))
    });
    if on_bpffs {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(default) {
        bail!(
            "pin directory {} is not on a bpffs (mount one: mount -t bpf bpf DIR)",
            pin_dir.display()
        );
    }
    fs::create_dir_all(default).ok();
    nix::mount::mount(
        Some("bpf"),
        default,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| "mounting bpffs at /sys/fs/bpf")?;
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

fn start_ebpf_logger(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => {
            tokio::spawn(async move {
                // SAFETY: the logger owns its ring buffer's fd: it stays open, and is what `as_raw_fd`
                // returns, for as long as the AsyncFd owns the logger.
                let registered =
                    unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
                let Ok(mut fd) = registered else { return };
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else { return };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => warn!(error = %e, "eBPF logging requested but unavailable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_conversions_round_trip() {
        for s in ["198.18.1.2:80", "[2001:db8::1]:443"] {
            let a: SocketAddr = s.parse().unwrap();
            let k = ip_key(a.ip());
            let d = OrigDst {
                family: k.family as u16,
                port: a.port(),
                addr: k.addr,
            };
            assert_eq!(orig_to_socket_addr(&d), a);
        }
    }
}
