//! ztunnel (Istio's node proxy) as a benchmark peer, from a binary the user built from ztunnel's
//! public source (`--ztunnel BIN`, with its `testing` feature for `FAKE_CA`). Nothing of ztunnel is
//! part of this repository: no code, no binary, no build steps.
//!
//! Each pod gets its own ztunnel in the pod's network namespace in ztunnel's dedicated
//! (single-tenant) mode, which needs neither istiod nor the CNI agent: `FAKE_CA=true` issues the
//! pod's SPIFFE certificate from ztunnel's built-in test root (both ends share it), `XDS_ADDRESS=""`
//! with `LOCAL_XDS_PATH` gives it the two workloads as `protocol: HBONE`, and an iptables
//! `REDIRECT` in the client pod sends the benchmark's ports to ztunnel's outbound listener
//! (15001). The server's ztunnel takes HBONE on 15008 and dials the server on its own address
//! (`ENABLE_ORIG_SRC=false`: the pod's own ztunnel has no transparent-source route back).
//!
//! `bench memory` runs node a's ztunnel in its shared (node) mode instead
//! ([`Ztunnel::start_shared`]): one ztunnel for all of the node's pods, which it takes over
//! Istio's CNI-agent protocol from `super::zds`.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodeway_tests::{http_get, Pod};

use super::hbone::ChildGuard;
use super::zds::{NodeAgent, Session};

/// ztunnel's outbound (capture) listener in dedicated mode.
const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's Prometheus endpoint and readiness probe.
const METRICS_PORT: u16 = 15020;
const READY_PORT: u16 = 15021;
/// The mark ztunnel sets on its own sockets (as its tests use), so the redirect skips them: its
/// passthrough connections go to the same address and port as the app's.
const PACKET_MARK: u32 = 1337;

/// A pod ztunnel serves, and the node name it is published on.
pub struct Workload<'a> {
    pub pod: &'a Pod,
    pub node: &'a str,
}

/// ztunnel's local xDS file (the format of ztunnel's `examples/localhost.yaml`): each pod as an
/// HBONE workload with the service account `default`, as the nodes' dev CA issues it.
pub fn local_xds_yaml(workloads: &[Workload<'_>]) -> String {
    let mut y = String::from("workloads:\n");
    for w in workloads {
        let p = w.pod;
        let _ = write!(
            y,
            "- uid: {uid}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: default\n  \
             trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  \
             network: \"\"\n  services: {{}}\n",
            uid = super::zds::uid(p),
            ns = p.namespace,
            name = p.name,
            ip = p.ip,
            node = w.node,
        );
    }
    y
}

/// One ztunnel in a pod's network namespace; stopped by its PID when dropped (before its node
/// agent connection, which is declared after the child).
pub struct Ztunnel {
    pod: Pod,
    child: ChildGuard,
    log: PathBuf,
    /// Shared mode: the node agent's socket and connection, held while ztunnel runs.
    agent: Option<(NodeAgent, Session)>,
}

impl Ztunnel {
    /// Starts ztunnel for `w` with `workers` worker threads and waits until it reports ready.
    pub fn start(bin: &Path, dir: &Path, xds: &Path, w: &Workload<'_>, workers: usize) -> Result<Self> {
        let p = w.pod;
        let info = format!("{}/{}/default", p.namespace, p.name);
        let env = [("PROXY_MODE", "dedicated"), ("PROXY_WORKLOAD_INFO", info.as_str())];
        let mut z = Ztunnel::spawn(bin, dir, xds, p, w.node, workers, &env)?;
        z.wait_ready(Duration::from_secs(10))?;
        Ok(z)
    }

    /// Starts ztunnel in its shared (node) mode in `home`'s network namespace, serving `pods`
    /// (published on `node`) as Istio's CNI agent would hand them over (see `super::zds`), and
    /// waits until it has taken them and reports ready.
    pub fn start_shared(
        bin: &Path,
        dir: &Path,
        xds: &Path,
        (home, node): (&Pod, &str),
        pods: &[&Pod],
        workers: usize,
    ) -> Result<Self> {
        let agent = NodeAgent::listen(&dir.join(format!("ztunnel-{node}.sock")))?;
        let uds = agent.path().display().to_string();
        let env = [("PROXY_MODE", "shared"), ("INPOD_UDS", uds.as_str())];
        let mut z = Ztunnel::spawn(bin, dir, xds, home, node, workers, &env)?;
        let session = agent
            .snapshot(pods, Duration::from_secs(10))
            .with_context(|| format!("handing node {node}'s pods to ztunnel: {}", z.log_tail()))?;
        z.agent = Some((agent, session));
        z.wait_ready(Duration::from_secs(10))?;
        Ok(z)
    }

    /// ztunnel in `p`'s network namespace with the settings both modes share and `mode`'s.
    fn spawn(
        bin: &Path,
        dir: &Path,
        xds: &Path,
        p: &Pod,
        node: &str,
        workers: usize,
        mode: &[(&str, &str)],
    ) -> Result<Self> {
        let log = dir.join(format!("ztunnel-{}.log", p.name));
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file")?;
        // A clean environment: ztunnel reads much of its config from it (KUBERNETES_SERVICE_HOST,
        // CA_ADDRESS, ...), and the caller's must not leak in.
        let child = Command::new("ip")
            .args(["netns", "exec", &p.netns])
            .arg(bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", xds)
            .envs(mode.iter().copied())
            .env("NODE_NAME", node)
            .env("ENABLE_ORIG_SRC", "false")
            .env("PACKET_MARK", PACKET_MARK.to_string())
            .env("ZTUNNEL_WORKER_THREADS", workers.to_string())
            // Warnings only, as the nodeway nodes run: no per-connection access log.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting ztunnel {} in {}", bin.display(), p.netns))?;
        Ok(Ztunnel {
            pod: p.clone(),
            child: ChildGuard(Some(child)),
            log,
            agent: None,
        })
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let c = self.child.0.as_mut().context("ztunnel child")?;
            if let Some(status) = c.try_wait()? {
                self.child.0 = None;
                bail!("ztunnel for {} exited ({status}): {}", self.pod.name, self.log_tail());
            }
            if matches!(self.get(READY_PORT, "/healthz/ready"), Ok((200, _))) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "ztunnel for {} not ready within {limit:?}: {}",
            self.pod.name,
            self.log_tail()
        )
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(10).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn get(&self, port: u16, path: &'static str) -> Result<(u16, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.pod.run(move || http_get(addr, path))?
    }

    /// Its Prometheus text (Istio's standard metrics).
    pub fn metrics(&self) -> Result<String> {
        match self.get(METRICS_PORT, "/metrics")? {
            (200, body) => Ok(body),
            (code, _) => bail!("ztunnel for {}: /metrics answered {code}", self.pod.name),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.0.as_ref().map(std::process::Child::id)
    }
}

/// `--ztunnel BIN` names a file: said before any namespace or process is set up.
pub fn check_bin(bin: &Path) -> Result<()> {
    if !bin.is_file() {
        bail!("--ztunnel {}: no such file", bin.display());
    }
    Ok(())
}

/// A ztunnel for the client pod (published on node-a) and one for the server pod (node-b),
/// with a local xDS file naming both; one worker thread per core, as nodeway runs. The client's
/// ztunnel is first.
pub fn start_pair(bin: &Path, dir: &Path, client: &Pod, server: &Pod) -> Result<[Ztunnel; 2]> {
    let xds = dir.join("ztunnel-xds.yaml");
    let workloads = [
        Workload {
            pod: client,
            node: "node-a",
        },
        Workload {
            pod: server,
            node: "node-b",
        },
    ];
    fs::write(&xds, local_xds_yaml(&workloads)).with_context(|| format!("writing {}", xds.display()))?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let server = Ztunnel::start(bin, dir, &xds, &workloads[1], workers)?;
    let client = Ztunnel::start(bin, dir, &xds, &workloads[0], workers)?;
    Ok([client, server])
}

/// Node a as ztunnel serves it in a mesh: one ztunnel in its shared mode in `home`'s network
/// namespace for `pods` (the client first), and a dedicated ztunnel for the server pod on
/// node b; the local xDS file names them all. The client's node ztunnel is first.
pub fn start_node_pair(bin: &Path, dir: &Path, home: &Pod, pods: &[&Pod], server: &Pod) -> Result<[Ztunnel; 2]> {
    let xds = dir.join("ztunnel-xds.yaml");
    let mut workloads: Vec<Workload<'_>> = pods.iter().map(|&pod| Workload { pod, node: "node-a" }).collect();
    workloads.push(Workload {
        pod: server,
        node: "node-b",
    });
    fs::write(&xds, local_xds_yaml(&workloads)).with_context(|| format!("writing {}", xds.display()))?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let server = Ztunnel::start(bin, dir, &xds, &workloads[pods.len()], workers)?;
    let node = Ztunnel::start_shared(bin, dir, &xds, (home, "node-a"), pods, workers)?;
    Ok([node, server])
}

/// An iptables `REDIRECT` of the client pod's connections to `to` on `ports` into ztunnel's
/// outbound listener, the way a sidecar's capture works (ztunnel's own, marked, sockets
/// excepted); deleted when dropped.
pub struct Redirect {
    netns: String,
    rule: Vec<String>,
}

impl Redirect {
    pub fn add(client: &Pod, to: &Pod, ports: &[u16]) -> Result<Self> {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let rule = [
            "OUTPUT",
            "-m",
            "mark",
            "!",
            "--mark",
            &PACKET_MARK.to_string(),
            "-p",
            "tcp",
            "-d",
            &to.ip.to_string(),
            "-m",
            "multiport",
            "--dports",
            &ports.join(","),
            "-j",
            "REDIRECT",
            "--to-ports",
            &OUTBOUND_PORT.to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        let r = Redirect {
            netns: client.netns.clone(),
            rule,
        };
        r.iptables("-A")?;
        Ok(r)
    }

    fn iptables(&self, op: &str) -> Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, "iptables", "-w", "-t", "nat", op])
            .args(&self.rule)
            .output()
            .context("running iptables (Debian package iptables)")?;
        if !out.status.success() {
            bail!(
                "iptables -t nat {op} {} in {}: {}",
                self.rule.join(" "),
                self.netns,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        if let Err(e) = self.iptables("-D") {
            eprintln!("warning: {e:#}");
        }
    }
}

/// "ztunnel (tls-aws-lc, rustc 1.95.0, dedicated mode)" from `ztunnel version`, or the binary's
/// path.
pub fn describe(bin: &Path, mode: &str) -> String {
    let out = Command::new(bin).arg("version").output().ok();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let field = |key: &str| {
        let start = text.find(&format!("{key}:\""))? + key.len() + 2;
        text[start..].split('"').next().map(str::to_owned)
    };
    match (field("CryptoProvider"), field("RustVersion")) {
        (Some(c), Some(r)) => format!("ztunnel ({c}, rustc {r}, {mode})"),
        _ => format!("ztunnel {}", bin.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: [u8; 4]) -> Pod {
        Pod {
            name: name.into(),
            namespace: "bench".into(),
            netns: format!("x-{name}"),
            ip: ip.into(),
        }
    }

    #[test]
    fn local_xds_names_each_pod_as_an_hbone_workload() {
        let (c, s) = (pod("client", [198, 18, 0, 2]), pod("server", [198, 18, 0, 3]));
        let y = local_xds_yaml(&[
            Workload {
                pod: &c,
                node: "node-a",
            },
            Workload {
                pod: &s,
                node: "node-b",
            },
        ]);
        let v: serde_yaml::Value = serde_yaml::from_str(&y).expect("YAML");
        let w = v["workloads"].as_sequence().expect("workloads");
        assert_eq!(w.len(), 2);
        assert_eq!(w[1]["workloadIps"][0].as_str(), Some("198.18.0.3"));
        assert_eq!(w[1]["protocol"].as_str(), Some("HBONE"));
        assert_eq!(w[1]["node"].as_str(), Some("node-b"));
        assert_eq!(w[0]["trustDomain"].as_str(), Some("cluster.local"));
    }
}
