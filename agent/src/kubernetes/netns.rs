//! Finds a pod's network namespace from its container processes.
//!
//! The kubelet puts every container of a pod in a cgroup whose path carries the pod's UID
//! (`.../pod<uid>/<container>` with the cgroupfs driver, `...-pod<uid_with_underscores>.slice/...`
//! with the systemd driver). Any process whose `/proc/<pid>/cgroup` names the UID runs in the pod's
//! network namespace, reachable at `/proc/<pid>/ns/net` (the agent runs with hostPID). When no
//! such process is found (or the kernel refuses to open it), the path a CNI plugin handed over in
//! the pod annotation [`NETNS_ANNOTATION`] (a path or a name under the CNI netns directory) is used,
//! else the named namespace in the CNI netns directory (`/var/run/netns/cni-...`, as containerd
//! and CRI-O create them) that holds the pod's IP.
//!
//! The annotation is a tenant's input (anyone who can create a pod writes it), so whatever path is
//! found is vetted before it is used: the namespace must hold every IP the API server lists for the
//! pod, must not be the agent's own (the node's host network) and must be found for no other pod.
//! Otherwise the pod is not captured and `/captured` says why.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nodeway_proxy::netns::Netns;

/// Pod annotation with the pod's network namespace (path, or a name under `--netns-dir`).
pub const NETNS_ANNOTATION: &str = "nodeway.io/netns";

/// One pod to find: its UID and the annotation's value, if any.
#[derive(Clone, Debug)]
pub struct PodRef<'a> {
    /// `namespace/name`, for the reasons shown on `/captured`.
    pub name: &'a str,
    pub uid: &'a str,
    pub annotation: Option<&'a str>,
    /// The pod's IPs, to find its namespace among the CNI's named ones.
    pub ips: &'a [IpAddr],
}

/// A network namespace's identity: the nsfs device and inode (what `ip netns identify` compares).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

/// What a namespace is and which addresses it holds, learnt before it is trusted for a pod.
#[derive(Clone, Debug)]
pub struct NsFacts {
    pub id: NsId,
    pub ips: Vec<IpAddr>,
}

/// Opens a namespace to learn its facts; the kernel in production, a table in unit tests.
pub trait Inspect: Send {
    fn inspect(&self, path: &Path) -> Result<NsFacts, String>;
}

/// [`Inspect`] through the kernel: `stat` for the identity, the interfaces' addresses from inside.
pub struct Kernel;

impl Inspect for Kernel {
    fn inspect(&self, path: &Path) -> Result<NsFacts, String> {
        let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let id = NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        let ns = Netns::open(&path.display().to_string()).map_err(|e| format!("{}: {e}", path.display()))?;
        let ips = ns
            .run(interface_addresses)
            .map_err(|e| format!("{}: {e}", path.display()))??;
        Ok(NsFacts { id, ips })
    }
}

/// The non-loopback addresses of the calling thread's network namespace.
pub fn interface_addresses() -> Result<Vec<IpAddr>, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing its addresses: {e}"))?;
    Ok(addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .filter(|ip| !ip.is_loopback())
        .collect())
}

/// What one pass over `/proc` found: pod UID -> PID, and pod UID -> why its namespace could not
/// be opened.
type Scan = (BTreeMap<String, u32>, BTreeMap<String, String>);

/// Looks pods up under a `/proc`-style root; remembers which process it used for each pod so the
/// path stays the same while that process lives.
pub struct NetnsResolver {
    proc_root: PathBuf,
    netns_dir: PathBuf,
    inspect: Box<dyn Inspect>,
    /// The agent's own namespace (the node's host network when run as the DaemonSet); never a pod's.
    host: Option<NsId>,
    /// Pod UID -> PID whose namespace was used.
    cache: BTreeMap<String, u32>,
    /// Pod UID -> named namespace found by the pod's IP.
    by_ip: BTreeMap<String, PathBuf>,
}

impl NetnsResolver {
    pub fn new(proc_root: impl Into<PathBuf>, netns_dir: impl Into<PathBuf>) -> Self {
        let host = Kernel.inspect(Path::new("/proc/self/ns/net")).ok().map(|f| f.id);
        Self::with_inspector(proc_root, netns_dir, Box::new(Kernel), host)
    }

    pub fn with_inspector(
        proc_root: impl Into<PathBuf>,
        netns_dir: impl Into<PathBuf>,
        inspect: Box<dyn Inspect>,
        host: Option<NsId>,
    ) -> Self {
        NetnsResolver {
            proc_root: proc_root.into(),
            netns_dir: netns_dir.into(),
            inspect,
            host,
            cache: BTreeMap::new(),
            by_ip: BTreeMap::new(),
        }
    }

    /// The netns path of every pod in `pods`, or why none may be used ("not found: ..." or
    /// "refused: ..."). Scans `/proc` at most once.
    pub fn resolve(&mut self, pods: &[PodRef<'_>]) -> BTreeMap<String, Result<String, String>> {
        let found = self
            .find(pods)
            .into_iter()
            .map(|(uid, r)| (uid, r.map_err(|why| format!("not found: {why}"))))
            .collect();
        self.vet(pods, found)
    }

    /// Keeps a found path only if its namespace holds the pod's IPs, is not the host's and was
    /// found for no other pod (else a tenant's annotation could hand nodeway the node's network or
    /// a neighbour's pod to capture as its own).
    fn vet(
        &self,
        pods: &[PodRef<'_>],
        mut found: BTreeMap<String, Result<String, String>>,
    ) -> BTreeMap<String, Result<String, String>> {
        let mut owners: BTreeMap<NsId, Vec<&str>> = BTreeMap::new();
        let mut ids = BTreeMap::new();
        for p in pods {
            let Some(Ok(path)) = found.get(p.uid) else { continue };
            match self.admissible(p, Path::new(path)) {
                Ok(id) => {
                    owners.entry(id).or_default().push(p.name);
                    ids.insert(p.uid, id);
                }
                Err(why) => {
                    found.insert(p.uid.to_string(), Err(format!("refused: {why}")));
                }
            }
        }
        for p in pods {
            let Some(others) = ids.get(p.uid).and_then(|id| owners.get(id)) else {
                continue;
            };
            if others.len() > 1 {
                let path = found.get(p.uid).and_then(|r| r.clone().ok()).unwrap_or_default();
                let rest: Vec<&str> = others.iter().copied().filter(|n| *n != p.name).collect();
                let why = format!("refused: {path} was found for pods {} too", rest.join(", "));
                found.insert(p.uid.to_string(), Err(why));
            }
        }
        found
    }

    fn admissible(&self, pod: &PodRef<'_>, path: &Path) -> Result<NsId, String> {
        let facts = self.inspect.inspect(path)?;
        if Some(facts.id) == self.host {
            return Err(format!(
                "{} is the node's own network namespace (the agent's), never a pod's",
                path.display()
            ));
        }
        let missing: Vec<String> = pod
            .ips
            .iter()
            .filter(|ip| !facts.ips.contains(ip))
            .map(IpAddr::to_string)
            .collect();
        if pod.ips.is_empty() || !missing.is_empty() {
            return Err(format!(
                "{} does not hold the pod's address {}: it is not this pod's network namespace",
                path.display(),
                if missing.is_empty() {
                    "(none listed)".to_string()
                } else {
                    missing.join(", ")
                }
            ));
        }
        Ok(facts.id)
    }

    fn find(&mut self, pods: &[PodRef<'_>]) -> BTreeMap<String, Result<String, String>> {
        let wanted: BTreeSet<&str> = pods.iter().map(|p| p.uid).collect();
        self.cache.retain(|uid, _| wanted.contains(uid.as_str()));
        self.by_ip
            .retain(|uid, path| wanted.contains(uid.as_str()) && path.exists());
        // Keep a remembered process while it still belongs to the pod.
        let stale: Vec<String> = self
            .cache
            .iter()
            .filter(|(uid, pid)| !cgroup_names(&self.cgroup_of(**pid), uid))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in stale {
            self.cache.remove(&uid);
        }
        let missing: Vec<&str> = pods
            .iter()
            .map(|p| p.uid)
            .filter(|u| !self.cache.contains_key(*u))
            .collect();
        let mut scan_error = None;
        let mut problems = BTreeMap::new();
        if !missing.is_empty() {
            match self.scan(&missing) {
                Ok((found, p)) => {
                    self.cache.extend(found);
                    problems = p;
                }
                Err(e) => scan_error = Some(format!("cannot scan {}: {e}", self.proc_root.display())),
            }
        }
        let mut named: Option<Vec<(PathBuf, Vec<IpAddr>)>> = None;
        pods.iter()
            .map(|p| {
                let r = match self.cache.get(p.uid) {
                    Some(pid) => Ok(self.proc_root.join(pid.to_string()).join("ns/net")),
                    None => {
                        let problem = scan_error.as_deref().or(problems.get(p.uid).map(String::as_str));
                        self.fallback(p, problem).or_else(|why| {
                            if let Some(path) = self.by_ip.get(p.uid) {
                                return Ok(path.clone());
                            }
                            let named = named.get_or_insert_with(|| self.named_namespaces());
                            match named.iter().find(|(_, ips)| p.ips.iter().any(|ip| ips.contains(ip))) {
                                Some((path, _)) => {
                                    self.by_ip.insert(p.uid.to_string(), path.clone());
                                    Ok(path.clone())
                                }
                                None => Err(format!(
                                    "{why}; no namespace in {} holds {}",
                                    self.netns_dir.display(),
                                    p.ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
                                )),
                            }
                        })
                    }
                };
                (p.uid.to_string(), r.map(|path| path.display().to_string()))
            })
            .collect()
    }

    /// Every namespace in the CNI netns directory with the addresses on its interfaces.
    fn named_namespaces(&self) -> Vec<(PathBuf, Vec<IpAddr>)> {
        let Ok(entries) = fs::read_dir(&self.netns_dir) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        paths.sort();
        paths
            .into_iter()
            .filter_map(|path| {
                let facts = self.inspect.inspect(&path).ok()?;
                Some((path, facts.ips))
            })
            .collect()
    }

    fn fallback(&self, pod: &PodRef<'_>, problem: Option<&str>) -> Result<PathBuf, String> {
        let why = match problem {
            Some(e) => e.to_string(),
            None => format!(
                "no process under {} has pod UID {} in its cgroup (containers not started, or the agent does not see the host's processes: it needs hostPID)",
                self.proc_root.display(),
                pod.uid
            ),
        };
        let Some(spec) = pod.annotation.filter(|s| !s.is_empty()) else {
            return Err(format!("{why}; no {NETNS_ANNOTATION} annotation to fall back on"));
        };
        let path = if spec.contains('/') {
            PathBuf::from(spec)
        } else {
            self.netns_dir.join(spec)
        };
        match fs::metadata(&path) {
            Ok(_) => Ok(path),
            Err(e) => Err(format!(
                "{why}; the {NETNS_ANNOTATION} annotation's {}: {e}",
                path.display()
            )),
        }
    }

    /// Lowest PID per wanted UID (the sandbox's pause process when there is one), and for UIDs
    /// whose processes were found but their namespace could not be opened, why.
    fn scan(&self, uids: &[&str]) -> Result<Scan, String> {
        let entries = fs::read_dir(&self.proc_root).map_err(|e| e.to_string())?;
        let mut pids: Vec<u32> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        let mut found = BTreeMap::new();
        let mut problems = BTreeMap::new();
        for pid in pids {
            if found.len() == uids.len() {
                break;
            }
            let cgroup = self.cgroup_of(pid);
            if cgroup.is_empty() {
                continue;
            }
            for uid in uids {
                if found.contains_key(*uid) || !cgroup_names(&cgroup, uid) {
                    continue;
                }
                let ns = self.proc_root.join(pid.to_string()).join("ns/net");
                match fs::metadata(&ns) {
                    Ok(_) => {
                        found.insert(uid.to_string(), pid);
                        problems.remove(*uid);
                    }
                    Err(e) => {
                        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                            " (another user's process: opening it needs CAP_SYS_PTRACE)"
                        } else {
                            ""
                        };
                        problems
                            .entry(uid.to_string())
                            .or_insert_with(|| format!("process {pid} is in the pod but {}: {e}{hint}", ns.display()));
                    }
                }
            }
        }
        Ok((found, problems))
    }

    fn cgroup_of(&self, pid: u32) -> String {
        fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup")).unwrap_or_default()
    }
}

/// Whether a `/proc/<pid>/cgroup` text puts the process in the pod with `uid`, for both kubelet
/// cgroup drivers.
pub fn cgroup_names(cgroup: &str, uid: &str) -> bool {
    if uid.is_empty() {
        return false;
    }
    let underscored = uid.replace('-', "_");
    cgroup.lines().any(|line| {
        let path = line.splitn(3, ':').nth(2).unwrap_or(line);
        path.split('/').any(|seg| {
            seg.strip_suffix(".slice")
                .unwrap_or(seg)
                .rsplit_once("pod")
                .is_some_and(|(_, rest)| rest == uid || rest == underscored)
        })
    })
}

/// Namespaces faked as files: the identity is the file's, the addresses are its comma-separated
/// contents.
#[cfg(test)]
pub(crate) struct FakeFiles;

#[cfg(test)]
impl Inspect for FakeFiles {
    fn inspect(&self, path: &Path) -> Result<NsFacts, String> {
        let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
        let ips = text.split(',').filter_map(|ip| ip.trim().parse().ok()).collect();
        Ok(NsFacts {
            id: NsId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            ips,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const UID: &str = "6b9e2a1c-1f2d-4c1e-9a55-0c2d3e4f5a6b";

    #[test]
    fn both_cgroup_drivers() {
        let cgroupfs = format!("0::/kubepods/besteffort/pod{UID}/0123abcd\n");
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-ab.scope\n",
            UID.replace('-', "_")
        );
        let v1 = format!("12:memory:/kubepods/pod{UID}/x\n11:cpu:/kubepods/pod{UID}/x\n");
        for text in [&cgroupfs, &systemd, &v1] {
            assert!(cgroup_names(text, UID), "{text}");
        }
        assert!(!cgroup_names("0::/system.slice/containerd.service\n", UID));
        assert!(!cgroup_names(&format!("0::/kubepods/pod{UID}0/x"), UID));
        assert!(!cgroup_names("0::/kubepods/pod/x", ""));
    }

    /// A `/proc`-like tree: `<pid>/cgroup` and `<pid>/ns/net` (a [`FakeFiles`] namespace holding
    /// `ips`).
    fn fake_proc(dir: &Path, pid: u32, cgroup: &str, ips: &str) {
        let p = dir.join(pid.to_string());
        fs::create_dir_all(p.join("ns")).unwrap();
        fs::write(p.join("cgroup"), cgroup).unwrap();
        fs::write(p.join("ns/net"), ips).unwrap();
    }

    fn ips(s: &str) -> Vec<IpAddr> {
        s.split(',').map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn finds_the_lowest_pid_then_the_annotation_and_says_why_not() {
        let dir = std::env::temp_dir().join(format!("nodeway-netns-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let proc_root = dir.join("proc");
        let netns_dir = dir.join("netns");
        fs::create_dir_all(&netns_dir).unwrap();
        fs::write(netns_dir.join("cni-1234"), "198.18.0.2").unwrap();
        let web = "198.18.0.1";
        fake_proc(&proc_root, 40, &format!("0::/kubepods/pod{UID}/app\n"), web);
        fake_proc(&proc_root, 31, &format!("0::/kubepods/pod{UID}/pause\n"), web);
        fake_proc(&proc_root, 7, "0::/system.slice/sshd.service\n", "198.18.0.9");
        let mut r = NetnsResolver::with_inspector(&proc_root, &netns_dir, Box::new(FakeFiles), None);
        let (web_ips, other_ips, lost_ips) = (ips(web), ips("198.18.0.2"), ips("198.18.0.3"));
        let pods = [
            PodRef {
                name: "demo/web",
                uid: UID,
                annotation: None,
                ips: &web_ips,
            },
            PodRef {
                name: "demo/other",
                uid: "other",
                annotation: Some("cni-1234"),
                ips: &other_ips,
            },
            PodRef {
                name: "demo/lost",
                uid: "lost",
                annotation: None,
                ips: &lost_ips,
            },
        ];
        let got = r.resolve(&pods);
        let want_31 = proc_root.join("31/ns/net").display().to_string();
        assert_eq!(got[UID].as_deref(), Ok(want_31.as_str()));
        let cni = netns_dir.join("cni-1234").display().to_string();
        assert_eq!(got["other"].as_deref(), Ok(cni.as_str()));
        let why = got["lost"].as_ref().unwrap_err();
        assert!(why.contains("pod UID lost") && why.contains("hostPID"), "{why}");
        // The remembered process is kept while it lives, even when a lower PID appears.
        fake_proc(&proc_root, 5, &format!("0::/kubepods/pod{UID}/new\n"), web);
        assert_eq!(r.resolve(&pods)[UID].as_deref(), Ok(want_31.as_str()));
        // When it is gone, another process of the pod is used.
        fs::remove_dir_all(proc_root.join("31")).unwrap();
        let want_5 = proc_root.join("5/ns/net").display().to_string();
        assert_eq!(r.resolve(&pods)[UID].as_deref(), Ok(want_5.as_str()));
        let _ = fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod vetting {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Bed {
        dir: PathBuf,
        host: NsId,
    }

    impl Bed {
        fn new(name: &str) -> Bed {
            let dir = std::env::temp_dir().join(format!("nodeway-netns-vet-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("proc")).unwrap();
            fs::create_dir_all(dir.join("netns")).unwrap();
            fs::write(dir.join("host"), "192.168.7.1").unwrap();
            let host = FakeFiles.inspect(&dir.join("host")).unwrap().id;
            Bed { dir, host }
        }

        fn netns(&self, name: &str, ips: &str) -> String {
            let p = self.dir.join("netns").join(name);
            fs::write(&p, ips).unwrap();
            p.display().to_string()
        }

        fn resolver(&self) -> NetnsResolver {
            NetnsResolver::with_inspector(
                self.dir.join("proc"),
                self.dir.join("netns"),
                Box::new(FakeFiles),
                Some(self.host),
            )
        }
    }

    impl Drop for Bed {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn pod<'a>(name: &'a str, annotation: &'a str, ips: &'a [IpAddr]) -> PodRef<'a> {
        PodRef {
            name,
            uid: name,
            annotation: Some(annotation),
            ips,
        }
    }

    #[test]
    fn the_hosts_namespace_is_never_a_pods() {
        let bed = Bed::new("host");
        let host = bed.dir.join("host").display().to_string();
        let ip = ["192.168.7.1".parse().unwrap()];
        let got = bed.resolver().resolve(&[pod("demo/evil", &host, &ip)]);
        let why = got["demo/evil"].as_ref().unwrap_err();
        assert!(why.contains("node's own network namespace"), "{why}");
    }

    #[test]
    fn a_namespace_without_the_pods_address_is_refused() {
        let bed = Bed::new("neighbour");
        let victim = bed.netns("cni-victim", "198.18.0.20");
        let ip = ["198.18.0.21".parse().unwrap()];
        let got = bed.resolver().resolve(&[pod("demo/evil", &victim, &ip)]);
        let why = got["demo/evil"].as_ref().unwrap_err();
        assert!(why.contains("does not hold the pod's address 198.18.0.21"), "{why}");
    }

    #[test]
    fn every_listed_address_must_be_there_and_one_namespace_serves_one_pod() {
        let bed = Bed::new("shared");
        let both = bed.netns("cni-both", "198.18.0.30, 198.18.0.31, fd00::30");
        let (one, dual, two): (Vec<IpAddr>, Vec<IpAddr>, Vec<IpAddr>) = (
            vec!["198.18.0.30".parse().unwrap()],
            vec!["198.18.0.30".parse().unwrap(), "fd00::99".parse().unwrap()],
            vec!["198.18.0.31".parse().unwrap()],
        );
        let mut r = bed.resolver();
        let got = r.resolve(&[pod("demo/a", &both, &one)]);
        assert_eq!(
            got["demo/a"].as_deref(),
            Ok(both.as_str()),
            "one pod: its own namespace"
        );
        let got = r.resolve(&[pod("demo/dual", &both, &dual)]);
        let why = got["demo/dual"].as_ref().unwrap_err();
        assert!(why.contains("fd00::99"), "{why}");
        let got = r.resolve(&[pod("demo/a", &both, &one), pod("demo/b", &both, &two)]);
        for (name, other) in [("demo/a", "demo/b"), ("demo/b", "demo/a")] {
            let why = got[name].as_ref().unwrap_err();
            assert!(why.contains(&format!("found for pods {other} too")), "{name}: {why}");
        }
    }

    #[test]
    fn no_address_listed_means_no_namespace() {
        let bed = Bed::new("noip");
        let ns = bed.netns("cni-x", "198.18.0.40");
        let got = bed.resolver().resolve(&[pod("demo/x", &ns, &[])]);
        assert!(got["demo/x"].is_err());
    }
}
