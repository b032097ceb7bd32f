//! The test bed: nodes and pods as network namespaces on this machine.
//!
//! A [`TestBed`] is one L2 segment (a bridge in its own "fabric" namespace); each [`Pod`] is a
//! network namespace with a veth onto that bridge and an address from 198.18.0.0/15 (never any
//! other range). A [`Node`] is one `nodeway run` process. Everything is removed on drop, also when
//! a test panics. Used by the end-to-end tests, `cargo xtask demo` and `cargo xtask bench`.
use std::{
    fs,
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub mod control_plane;
pub mod envoy;
pub mod grpc;
pub mod h2raw;
pub mod http;
pub mod istio_ca;
pub mod kube_api;
pub mod metrics;
pub mod xds;
pub use metrics::{metric_value, tcp_bytes};

/// `$NODEWAY_TOOLS_DIR`, default `$HOME/.local/nodeway-tools` (the same rule as `cargo xtask setup`).
pub fn tools_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("NODEWAY_TOOLS_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".local/nodeway-tools"))
}

/// Now, as RFC 3339 UTC (the API server's timestamps).
pub fn rfc3339_now() -> String {
    nodeway_proxy::connections::format_rfc3339(std::time::SystemTime::now())
}

static BEDS: AtomicU32 = AtomicU32::new(0);

/// True when the test may run. Without root: skips with a message, or fails under `CI=true`.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("end-to-end tests need root (network namespaces, eBPF) and CI=true: failing instead of skipping");
    }
    eprintln!("skipping: needs root (network namespaces and eBPF); run as root or via `cargo xtask test`");
    false
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// One L2 segment with pods on it.
pub struct TestBed {
    prefix: String,
    subnet: u8,
    fabric: String,
    pods: Vec<String>,
    next_host: u8,
    dir: PathBuf,
}

impl TestBed {
    pub fn new(name: &str) -> Result<Self> {
        let n = BEDS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() % 10_000;
        let prefix = format!("nwt{pid}-{n}");
        // 198.18.<subnet>.0/24; beds are separate L2 segments, so equal subnets would not clash.
        let subnet = (1 + (pid + n) % 250) as u8;
        let dir = std::env::temp_dir().join(format!("{prefix}-{name}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let fabric = format!("{prefix}-fab");
        let bed = TestBed {
            prefix,
            subnet,
            fabric: fabric.clone(),
            pods: Vec::new(),
            next_host: 2,
            dir,
        };
        sh(&["ip", "netns", "add", &fabric])?;
        sh(&["ip", "-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &fabric, "link", "set", "br0", "up"])?;
        Ok(bed)
    }

    /// Temporary directory of this bed (configs, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Joins the host (this process's network namespace, where the agent and a kubelet run) to
    /// the bed's segment as 198.18.<subnet>.254; the link goes with the bed.
    pub fn link_host(&self) -> Result<Ipv4Addr> {
        let ip = Ipv4Addr::new(198, 18, self.subnet, 254);
        let host_end = format!("{}-h", self.prefix);
        sh(&[
            "ip",
            "link",
            "add",
            &host_end,
            "type",
            "veth",
            "peer",
            "name",
            "host",
            "netns",
            &self.fabric,
        ])?;
        sh(&["ip", "-n", &self.fabric, "link", "set", "host", "master", "br0", "up"])?;
        sh(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &host_end])?;
        sh(&["ip", "link", "set", &host_end, "up"])?;
        Ok(ip)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A new pod (network namespace `<prefix>-<name>`) in Kubernetes namespace `namespace`.
    pub fn add_pod(&mut self, name: &str, namespace: &str) -> Result<Pod> {
        let netns = format!("{}-{name}", self.prefix);
        let ip = Ipv4Addr::new(198, 18, self.subnet, self.next_host);
        let port = format!("p{}", self.next_host);
        self.next_host += 1;
        sh(&["ip", "netns", "add", &netns])?;
        self.pods.push(netns.clone());
        sh(&[
            "ip",
            "-n",
            &self.fabric,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        sh(&["ip", "-n", &self.fabric, "link", "set", &port, "master", "br0", "up"])?;
        sh(&["ip", "-n", &netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
        Ok(Pod {
            name: name.into(),
            namespace: namespace.into(),
            netns,
            ip,
        })
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        for ns in self.pods.iter().chain(std::iter::once(&self.fabric)) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A pod: a network namespace with one address.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// Runs `f` on a thread inside the pod's network namespace; sockets it creates stay there.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
        let path = format!("/run/netns/{}", self.netns);
        let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        thread::spawn(move || -> Result<R> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in pod panicked"))?
    }

    /// A TCP echo server on 0.0.0.0:`port` in the pod, until dropped.
    pub fn echo_server(&self, port: u16) -> Result<EchoServer> {
        self.tcp_server(port, |mut c, _| {
            let mut buf = [0u8; 16384];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = c.shutdown(Shutdown::Write);
        })
    }

    /// A TCP server on 0.0.0.0:`port` in the pod that answers each connection with the address
    /// it comes from (`ip:port`, what the app sees) and closes it, until dropped.
    pub fn peer_server(&self, port: u16) -> Result<EchoServer> {
        self.tcp_server(port, |mut c, peer| {
            let _ = c.write_all(peer.to_string().as_bytes());
            let _ = c.shutdown(Shutdown::Write);
        })
    }

    fn tcp_server(&self, port: u16, handle: fn(TcpStream, SocketAddr)) -> Result<EchoServer> {
        let listener = self.run(move || TcpListener::bind(("0.0.0.0", port)))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, peer)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                            handle(c, peer);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(EchoServer {
            stop,
            accepted,
            handle: Some(handle),
        })
    }

    /// Connects from inside the pod (a socket of the pod's namespace, as the app's would be).
    pub fn connect(&self, to: SocketAddr) -> Result<io::Result<TcpStream>> {
        self.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(3)))
    }

    /// Connects, sends `payload`, half-closes, reads everything back. Bytes that come back equal
    /// what an echo server got.
    pub fn exchange(&self, to: SocketAddr, payload: &[u8]) -> Result<io::Result<Vec<u8>>> {
        let stream = match self.connect(to)? {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        Ok(exchange_on(stream, payload))
    }
}

/// Sends `payload`, half-closes, reads until EOF (bounded by a 5 s read timeout).
pub fn exchange_on(mut s: TcpStream, payload: &[u8]) -> io::Result<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(payload)?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

pub struct EchoServer {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Pod entry of a node's config file.
pub struct PodEntry<'a> {
    pub pod: &'a Pod,
    pub labels: &'a [(&'a str, &'a str)],
    pub exclude_outbound: &'a [u16],
    pub exclude_inbound: &'a [u16],
    /// The node the pod runs on; `None`: the config's own node.
    pub node: Option<&'a str>,
    pub service_account: Option<&'a str>,
    /// `STRICT` or `PERMISSIVE`.
    pub mtls: Option<&'a str>,
}

impl<'a> From<&'a Pod> for PodEntry<'a> {
    fn from(pod: &'a Pod) -> Self {
        PodEntry {
            pod,
            labels: &[],
            exclude_outbound: &[],
            exclude_inbound: &[],
            node: None,
            service_account: None,
            mtls: None,
        }
    }
}

/// The YAML of a node's config file (see the README): `captured` namespaces carry
/// `istio.io/dataplane-mode: ambient`.
pub fn config_yaml(node: &str, captured: &[&str], pods: &[PodEntry<'_>]) -> String {
    let mut y = format!("node: {node}\nnamespaces:\n");
    let mut names: Vec<&str> = pods.iter().map(|p| p.pod.namespace.as_str()).collect();
    names.extend(captured);
    names.sort();
    names.dedup();
    for ns in names {
        y += &format!("- name: {ns}\n");
        if captured.contains(&ns) {
            y += "  labels: {istio.io/dataplane-mode: ambient}\n";
        }
    }
    y += "pods:\n";
    for e in pods {
        let p = e.pod;
        y += &format!(
            "- name: {}\n  namespace: {}\n  ips: [{}]\n  netns: {}\n  labels: {{app: {}{}}}\n",
            p.name,
            p.namespace,
            p.ip,
            p.netns,
            p.name,
            e.labels.iter().map(|(k, v)| format!(", {k}: {v}")).collect::<String>()
        );
        if let Some(n) = e.node {
            y += &format!("  node: {n}\n");
        }
        if let Some(m) = e.mtls {
            y += &format!("  mtls: {m}\n");
        }
        if let Some(sa) = e.service_account {
            y += &format!("  serviceAccount: {sa}\n");
        }
        if !e.exclude_outbound.is_empty() {
            y += &format!("  excludeOutboundPorts: {:?}\n", e.exclude_outbound);
        }
        if !e.exclude_inbound.is_empty() {
            y += &format!("  excludeInboundPorts: {:?}\n", e.exclude_inbound);
        }
    }
    y
}

/// Where the `nodeway` binary should be, without checking (for cleanup in `Drop`, where a panic
/// while unwinding would abort and leave the test bed's namespaces behind).
fn nodeway_bin_path() -> PathBuf {
    match std::env::var_os("NODEWAY_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/nodeway"),
    }
}

/// Path of the `nodeway` binary: `$NODEWAY_BIN`, else the workspace's target/debug.
pub fn nodeway_bin() -> PathBuf {
    let p = nodeway_bin_path();
    assert!(
        p.exists(),
        "{} missing: build first: cargo build -p nodeway-agent",
        p.display()
    );
    p
}

static NODES: AtomicU32 = AtomicU32::new(0);

/// Where nodes of the harness listen before their first report: nothing answers there.
const UNREPORTED: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// What `nodeway run` writes to `addresses.json` in its `--run-dir` once its listeners are bound.
#[derive(serde::Deserialize)]
struct ReportedAddresses {
    pid: u32,
    admin: SocketAddr,
    stats: SocketAddr,
    readiness: SocketAddr,
}

/// One `nodeway run` process: a node.
pub struct Node {
    pub name: String,
    child: Option<Child>,
    args: Vec<String>,
    /// The admin, stats and readiness addresses. nodeway binds port 0 and reports the ports it
    /// got, so no other process can take them between choosing and binding; they change when the
    /// process is started again (`restart`, `relaunch`).
    pub admin: SocketAddr,
    pub stats: SocketAddr,
    pub readiness: SocketAddr,
    pub pin_dir: PathBuf,
    /// `--run-dir`, where nodeway reports its addresses.
    pub run_dir: PathBuf,
    log: PathBuf,
    starts: u32,
    env: Vec<(String, String)>,
}

impl Node {
    /// Starts `nodeway run --config <config>` with its own ports and pin directory, and waits
    /// until it is ready.
    pub fn start(bed: &TestBed, name: &str, config: &Path, extra: &[&str]) -> Result<Node> {
        let mut node = Node::spawn(bed, name, config, extra)?;
        node.wait_ready(Duration::from_secs(20))?;
        Ok(node)
    }

    /// Starts like [`Node::start`] with extra environment (the agent's test-only knobs).
    pub fn start_with_env(
        bed: &TestBed,
        name: &str,
        config: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Node> {
        let source = ["--config".to_string(), config.display().to_string()];
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut node = Node::spawn_with(bed, name, &source, extra, &env)?;
        node.wait_ready(Duration::from_secs(20))?;
        Ok(node)
    }

    /// Starts without waiting for readiness (for start-up failure tests).
    pub fn spawn(bed: &TestBed, name: &str, config: &Path, extra: &[&str]) -> Result<Node> {
        let source = ["--config".to_string(), config.display().to_string()];
        Node::spawn_with(bed, name, &source, extra, &[])
    }

    /// Starts `nodeway run --source kubernetes` as node `node_name` against the API server of
    /// `kubeconfig`, finding pods' processes under `proc_root`, and waits until it is ready.
    pub fn start_kubernetes(
        bed: &TestBed,
        name: &str,
        node_name: &str,
        kubeconfig: &Path,
        proc_root: &Path,
        extra: &[&str],
    ) -> Result<Node> {
        let source = [
            "--source".to_string(),
            "kubernetes".to_string(),
            "--proc-root".to_string(),
            proc_root.display().to_string(),
            "--debounce-ms".to_string(),
            "50".to_string(),
        ];
        let env = [
            ("KUBECONFIG".to_string(), kubeconfig.display().to_string()),
            ("NODE_NAME".to_string(), node_name.to_string()),
        ];
        let mut node = Node::spawn_with(bed, name, &source, extra, &env)?;
        node.wait_ready(Duration::from_secs(20))?;
        Ok(node)
    }

    /// Starts `nodeway run` with `source` arguments (`--config F`, or `--source kubernetes ...`)
    /// and extra environment, without waiting for readiness. Once it returns, the addresses are
    /// the process's own (unless it exited first: `wait_ready` then says why).
    pub fn spawn_with(
        bed: &TestBed,
        name: &str,
        source: &[String],
        extra: &[&str],
        env: &[(String, String)],
    ) -> Result<Node> {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}-{name}", bed.prefix));
        // Two nodes of one name (an old and a new agent) have a run directory each.
        let run_dir = bed
            .dir
            .join(format!("run-{name}-{}", NODES.fetch_add(1, Ordering::SeqCst)));
        let mut args: Vec<String> = vec!["run".into()];
        args.extend(source.iter().cloned());
        args.extend([
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--stats-addr".into(),
            "127.0.0.1:0".into(),
            "--readiness-addr".into(),
            "127.0.0.1:0".into(),
            "--run-dir".into(),
            run_dir.display().to_string(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
            // One CA per bed: nodes of a bed trust each other, nothing is left on the machine.
            "--ca-dir".into(),
            bed.dir.join("ca").display().to_string(),
        ]);
        if !extra.contains(&"--drain-timeout") {
            args.extend(["--drain-timeout".to_string(), "1".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = bed.dir.join(format!("{name}.log"));
        let mut node = Node {
            name: name.into(),
            child: None,
            args,
            admin: UNREPORTED,
            stats: UNREPORTED,
            readiness: UNREPORTED,
            pin_dir,
            run_dir,
            log,
            starts: 0,
            env: env.to_vec(),
        };
        node.launch()?;
        Ok(node)
    }

    fn launch(&mut self) -> Result<()> {
        self.starts += 1;
        // A killed process cannot remove its report.
        let _ = fs::remove_file(self.run_dir.join("addresses.json"));
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(nodeway_bin())
            .args(&self.args)
            .env("NODEWAY_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning nodeway")?;
        self.child = Some(child);
        self.await_addresses(Duration::from_secs(20))
    }

    /// Waits until the process reports its bound addresses and takes them, or until it exits
    /// (then the addresses stay as they were, and `wait_ready` shows the log).
    fn await_addresses(&mut self, limit: Duration) -> Result<()> {
        let file = self.run_dir.join("addresses.json");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let Some(child) = &mut self.child else {
                return Ok(());
            };
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            // Written atomically: a file that is there is complete. An earlier process's
            // (killed, so it could not remove it) carries another PID.
            let report = fs::read_to_string(&file)
                .ok()
                .and_then(|t| serde_json::from_str::<ReportedAddresses>(&t).ok());
            if let Some(r) = report.filter(|r| r.pid == child.id()) {
                (self.admin, self.stats, self.readiness) = (r.admin, r.stats, r.readiness);
                return Ok(());
            }
            thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "nodeway {} did not report its addresses in {} after {limit:?}:\n{}",
            self.name,
            file.display(),
            self.log_text()
        )
    }

    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "nodeway {} exited ({status}) before ready:\n{}",
                        self.name,
                        self.log_text()
                    );
                }
            }
            if matches!(http_get(self.readiness, "/healthz/ready"), Ok((200, _))) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("nodeway {} not ready after {limit:?}:\n{}", self.name, self.log_text())
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin API; panics with the node's log on failure.
    pub fn get(&self, path: &str) -> String {
        match http_get(self.admin, path) {
            Ok((200, body)) => body,
            Ok((code, body)) => panic!("GET {path}: {code} {body}\nlog:\n{}", self.log_text()),
            Err(e) => panic!("GET {path}: {e:#}\nlog:\n{}", self.log_text()),
        }
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        let body = self.get(path);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
    }

    /// The running agent's own layout directory under `pin_dir` (its `maps/` and `links/`).
    pub fn layout_dir(&self) -> PathBuf {
        let v = self.json("/captured");
        PathBuf::from(v["pinLayoutDir"].as_str().unwrap_or_default())
    }

    pub fn metrics(&self) -> String {
        match http_get(self.stats, "/stats/prometheus") {
            Ok((200, body)) => body,
            other => panic!("metrics: {other:?}"),
        }
    }

    /// `/connections` entries.
    pub fn connections(&self) -> Vec<serde_json::Value> {
        self.json("/connections")["connections"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The `/captured` entry of pod `name`.
    pub fn captured_pod(&self, name: &str) -> Option<serde_json::Value> {
        self.json("/captured")["pods"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
    }

    /// PID of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no cleanup, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded); returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()?.code()
    }

    /// Waits for the process to exit by itself (bounded); its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child {
                if let Ok(Some(s)) = c.try_wait() {
                    self.child = None;
                    return s.code();
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process and starts it again with the same arguments, without waiting.
    pub fn relaunch(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }

    /// Starts the process again with the same arguments and pin directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()?;
        self.wait_ready(Duration::from_secs(20))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        // Leave nothing in the kernel, whatever the test did.
        let _ = Command::new(nodeway_bin_path())
            .args(["cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if thread::panicking() {
            eprintln!("---- nodeway {} log ----\n{}", self.name, self.log_text());
        }
    }
}

/// Minimal HTTP/1.1 GET (Connection: close): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let code: u16 = head.split(' ').nth(1).context("no status")?.parse()?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A `/proc`-like directory for `--proc-root`: `<pid>/cgroup` names a pod UID the way the kubelet's
/// cgroups do, `<pid>/ns` links to the real process's namespaces. Removed on drop.
pub struct FakeProc {
    dir: PathBuf,
}

impl FakeProc {
    pub fn new(bed: &TestBed) -> Result<Self> {
        let dir = bed.dir().join("proc");
        fs::create_dir_all(dir.join("self"))?;
        Ok(FakeProc { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Makes process `pid` a container of the pod with `uid` (systemd cgroup driver layout).
    pub fn add(&self, pid: u32, uid: &str) -> Result<()> {
        let d = self.dir.join(pid.to_string());
        fs::create_dir_all(&d)?;
        fs::write(
            d.join("cgroup"),
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-0123.scope\n",
                uid.replace('-', "_")
            ),
        )?;
        let ns = d.join("ns");
        if fs::symlink_metadata(&ns).is_err() {
            std::os::unix::fs::symlink(format!("/proc/{pid}/ns"), &ns)?;
        }
        Ok(())
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A process running inside a pod's network namespace (a "container"); killed by PID on drop.
pub struct Container {
    child: Child,
}

impl Container {
    /// `ip netns exec <pod's netns> sleep 600`.
    pub fn start(pod: &Pod) -> Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", &pod.netns, "sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a container process")?;
        let c = Container { child };
        // `ip netns exec` enters the namespace, then execs sleep under the same PID.
        let own = fs::read_link("/proc/self/ns/net")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_link(format!("/proc/{}/ns/net", c.pid())).ok().as_ref() == Some(&own) {
            if Instant::now() > deadline {
                bail!("process {} never entered {}", c.pid(), pod.netns);
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(c)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns true (bounded).
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Resident set size of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time process `pid` has used (utime + stime), seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i)?.parse::<u64>().ok();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&h| h > 0)
        .unwrap_or(100);
    Some((ticks(11)? + ticks(12)?) as f64 / hz as f64)
}

/// Open file descriptors of process `pid` (entries of `/proc/PID/fd`).
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A node's config with `pods`, a Service `web` (`host`, VIP `vip`, port `port`) and a route
/// table on `port` sending every request to `backend` (EDS cluster `outbound|port|v1|host`).
pub fn routed_service_yaml(pods: &[PodEntry<'_>], backend: &Pod, host: &str, vip: &str, port: u16) -> String {
    let cluster = format!("outbound|{port}|v1|{host}");
    format!(
        "{}services:\n- {{name: web, namespace: demo, hostname: {host}, addresses: [{{address: {vip}}}], ports: [{{servicePort: {port}, targetPort: {port}}}]}}\n\
routes:\n- name: \"{port}\"\n  virtualHosts:\n  - name: \"{host}:{port}\"\n    domains: [\"{host}\", \"{vip}\"]\n    routes:\n    - match: {{prefix: \"/\"}}\n      route: {{cluster: \"{cluster}\"}}\n\
clusters:\n- name: \"{cluster}\"\n  type: EDS\n  edsClusterConfig: {{serviceName: \"{cluster}\"}}\n  connectTimeout: 1s\n\
endpoints:\n- clusterName: \"{cluster}\"\n  endpoints: [{{lbEndpoints: [{{endpoint: {{address: {{socketAddress: {{address: \"{}\", portValue: {port}}}}}}}}}]}}]\n",
        config_yaml("node-a", &["demo"], pods),
        backend.ip
    )
}
