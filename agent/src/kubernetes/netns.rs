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
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::IpAddr,
    path::PathBuf,
};

use nodeway_proxy::netns::Netns;

/// Pod annotation with the pod's network namespace (path, or a name under `--netns-dir`).
pub const NETNS_ANNOTATION: &str = "nodeway.io/netns";

/// One pod to find: its UID and the annotation's value, if any.
#[derive(Clone, Debug)]
pub struct PodRef<'a> {
    pub uid: &'a str,
    pub annotation: Option<&'a str>,
    /// The pod's IPs, to find its namespace among the CNI's named ones.
    pub ips: &'a [IpAddr],
}

/// What one pass over `/proc` found: pod UID -> PID, and pod UID -> why its namespace could not
/// be opened.
type Scan = (BTreeMap<String, u32>, BTreeMap<String, String>);

/// Looks pods up under a `/proc`-style root; remembers which process it used for each pod so the
/// path stays the same while that process lives.
#[derive(Debug)]
pub struct NetnsResolver {
    proc_root: PathBuf,
    netns_dir: PathBuf,
    /// Pod UID -> PID whose namespace was used.
    cache: BTreeMap<String, u32>,
    /// Pod UID -> named namespace found by the pod's IP.
    by_ip: BTreeMap<String, PathBuf>,
}

impl NetnsResolver {
    pub fn new(proc_root: impl Into<PathBuf>, netns_dir: impl Into<PathBuf>) -> Self {
        NetnsResolver {
            proc_root: proc_root.into(),
            netns_dir: netns_dir.into(),
            cache: BTreeMap::new(),
            by_ip: BTreeMap::new(),
        }
    }

    /// The netns path of every pod in `pods`, or why none was found. Scans `/proc` at most once.
    pub fn resolve(&mut self, pods: &[PodRef<'_>]) -> BTreeMap<String, Result<String, String>> {
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
                let ns = Netns::open(&path.display().to_string()).ok()?;
                let ips = ns
                    .run(|| -> Vec<IpAddr> {
                        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
                            return Vec::new();
                        };
                        addrs
                            .filter_map(|a| {
                                let a = a.address?;
                                if let Some(v4) = a.as_sockaddr_in() {
                                    return Some(IpAddr::V4(v4.ip()));
                                }
                                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                            })
                            .filter(|ip| !ip.is_loopback())
                            .collect()
                    })
                    .ok()?;
                Some((path, ips))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

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

    /// A `/proc`-like tree: `<pid>/cgroup` and `<pid>/ns/net`.
    fn fake_proc(dir: &Path, pid: u32, cgroup: &str) {
        let p = dir.join(pid.to_string());
        fs::create_dir_all(p.join("ns")).unwrap();
        fs::write(p.join("cgroup"), cgroup).unwrap();
        fs::write(p.join("ns/net"), "").unwrap();
    }

    #[test]
    fn finds_the_lowest_pid_then_the_annotation_and_says_why_not() {
        let dir = std::env::temp_dir().join(format!("nodeway-netns-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let proc_root = dir.join("proc");
        let netns_dir = dir.join("netns");
        fs::create_dir_all(&netns_dir).unwrap();
        fs::write(netns_dir.join("cni-1234"), "").unwrap();
        fake_proc(&proc_root, 40, &format!("0::/kubepods/pod{UID}/app\n"));
        fake_proc(&proc_root, 31, &format!("0::/kubepods/pod{UID}/pause\n"));
        fake_proc(&proc_root, 7, "0::/system.slice/sshd.service\n");
        let mut r = NetnsResolver::new(&proc_root, &netns_dir);
        let pods = [
            PodRef {
                uid: UID,
                annotation: None,
                ips: &[],
            },
            PodRef {
                uid: "other",
                annotation: Some("cni-1234"),
                ips: &[],
            },
            PodRef {
                uid: "lost",
                annotation: None,
                ips: &[],
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
        fake_proc(&proc_root, 5, &format!("0::/kubepods/pod{UID}/new\n"));
        assert_eq!(r.resolve(&pods)[UID].as_deref(), Ok(want_31.as_str()));
        // When it is gone, another process of the pod is used.
        fs::remove_dir_all(proc_root.join("31")).unwrap();
        let want_5 = proc_root.join("5/ns/net").display().to_string();
        assert_eq!(r.resolve(&pods)[UID].as_deref(), Ok(want_5.as_str()));
        let _ = fs::remove_dir_all(&dir);
    }
}
