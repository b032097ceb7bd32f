//! `cargo xtask bench memory`: what nodeway keeps in memory. Idle RSS of a node with `--pods`
//! captured pods, and the RSS each idle connection adds (median over `--runs`):
//! - an HBONE stream: a captured client pod on node a to a captured server pod on node b, so
//!   node a holds the app's socket and the tunnel's client end, node b the tunnel's server end
//!   and the socket to the app;
//! - an L4 connection: the client pod to an uncaptured pod (passthrough, plaintext), which only
//!   node a holds.
//!
//! Each phase starts fresh nodes (release builds), warms them with one connection each way,
//! lets them settle, reads VmRSS, opens `--connections` connections (one echoed byte each, so
//! every one is established end to end), checks that node a carries them, settles again and
//! reads VmRSS again: the difference over the count is bytes per connection, allocator
//! retention included (what a node pays).
//!
//! With `--ztunnel BIN` each round also measures ztunnel the same way, as it runs in a mesh:
//! node a's ztunnel in its shared (node) mode serving the same `--pods` captured pods, handed
//! over as Istio's CNI agent does (`super::zds`), and a dedicated ztunnel for the server pod (see
//! `super::ztunnel`); the client's connections are redirected into its outbound listener in the
//! client pod, and the same idle connections are opened (HBONE to the server pod, passthrough to
//! the uncaptured one).

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use nodeway_tests::{config_yaml, rss_kib, EchoServer, Node, Pod, PodEntry, TestBed};
use serde::Serialize;

use super::report::{median, ratio};
use super::ztunnel::{start_node_pair, Redirect, Ztunnel};
use crate::interrupt;

const PORT: u16 = 8080;
/// After a phase's connections are up, before RSS is read: the runtime's buffers and the
/// allocator settle.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Args, Clone, Debug)]
pub struct Options {
    /// Runs (the report shows medians)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// Captured pods on node a (the client among them)
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub pods: u32,
    /// Idle connections per phase
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(10..=5000))]
    pub connections: u32,
    /// Benchmark a debug build of nodeway instead of a release build
    #[arg(long)]
    pub debug: bool,
    /// A ztunnel binary built from ztunnel's public source with its `testing` feature: each
    /// round also measures ztunnel's bytes per idle connection
    #[arg(long, env = "ZTUNNEL")]
    pub ztunnel: Option<PathBuf>,
    /// Where memory.md and memory.json go (default: target/bench)
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Skip `setup`
    #[arg(long)]
    pub no_setup: bool,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub round: u32,
    /// Node a, warmed, with its pods captured and no connection open.
    pub idle_rss_kib: u64,
    pub hbone_client_bytes_per_stream: f64,
    pub hbone_server_bytes_per_stream: f64,
    pub l4_bytes_per_connection: f64,
    /// The same figures of ztunnel (idle: the client pod's ztunnel), with `--ztunnel`.
    pub ztunnel: Option<ZtunnelRun>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZtunnelRun {
    pub idle_rss_kib: u64,
    pub hbone_client_bytes_per_stream: f64,
    pub hbone_server_bytes_per_stream: f64,
    pub l4_bytes_per_connection: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub runs: usize,
    pub idle_rss_kib: f64,
    pub hbone_client_bytes_per_stream: f64,
    pub hbone_server_bytes_per_stream: f64,
    pub l4_bytes_per_connection: f64,
    /// ztunnel's medians, when every run measured it.
    pub ztunnel: Option<[f64; 4]>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub kernel: String,
    pub nodeway: String,
    pub parameters: serde_json::Value,
    pub runs: Vec<Run>,
    pub summary: Summary,
}

impl Report {
    fn new(nodeway: String, parameters: serde_json::Value, runs: Vec<Run>) -> Self {
        let med = |f: fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let summary = Summary {
            runs: runs.len(),
            idle_rss_kib: med(|r| r.idle_rss_kib as f64),
            hbone_client_bytes_per_stream: med(|r| r.hbone_client_bytes_per_stream),
            hbone_server_bytes_per_stream: med(|r| r.hbone_server_bytes_per_stream),
            l4_bytes_per_connection: med(|r| r.l4_bytes_per_connection),
            ztunnel: ztunnel_medians(&runs),
        };
        Report {
            kernel: super::hbone::kernel_release(),
            nodeway,
            parameters,
            runs,
            summary,
        }
    }

    fn markdown(&self) -> String {
        let s = &self.summary;
        let mut md = String::from("# bench memory\n\n");
        let _ = writeln!(
            md,
            "VmRSS of nodeway nodes ({}, kernel {}), medians of {} runs; parameters: {}.\n",
            self.nodeway, self.kernel, s.runs, self.parameters
        );
        let rows = [
            ("idle RSS, node a with its pods captured", s.idle_rss_kib, "KiB"),
            (
                "per idle HBONE stream, client node (app socket + tunnel end)",
                s.hbone_client_bytes_per_stream,
                "B",
            ),
            (
                "per idle HBONE stream, server node (tunnel end + app socket)",
                s.hbone_server_bytes_per_stream,
                "B",
            ),
            ("per idle L4 connection (passthrough)", s.l4_bytes_per_connection, "B"),
        ];
        md.push_str("| figure | nodeway | ztunnel | nodeway / ztunnel |\n|---|---:|---:|---:|\n");
        for (i, (name, value, unit)) in rows.into_iter().enumerate() {
            let z = s.ztunnel.map(|z| z[i]);
            let _ = writeln!(
                md,
                "| {name} | {value:.0} {unit} | {} | {} |",
                z.map_or("–".to_owned(), |z| format!("{z:.0} {unit}")),
                z.and_then(|z| ratio(value, z))
                    .map_or("–".to_owned(), |r| format!("{r:.2}")),
            );
        }
        md
    }
}

struct Bed {
    bed: TestBed,
    client: Pod,
    server: Pod,
    outside: Pod,
    /// Node a's other captured pods.
    fillers: Vec<Pod>,
    configs: [PathBuf; 2],
    starts: u32,
}

impl Bed {
    fn create(pods: u32) -> Result<Self> {
        let mut bed = TestBed::new("bench-memory")?;
        let client = bed.add_pod("client", "bench")?;
        let server = bed.add_pod("server", "bench")?;
        let outside = bed.add_pod("outside", "plain")?;
        let mut fillers = Vec::new();
        for i in 1..pods {
            fillers.push(bed.add_pod(&format!("pod{i}"), "bench")?);
        }
        let (a, b) = (bed.dir().join("a.yaml"), bed.dir().join("b.yaml"));
        let on = |p, node| PodEntry {
            node,
            ..PodEntry::from(p)
        };
        let mut on_a: Vec<PodEntry<'_>> = vec![on(&client, None), on(&server, Some("node-b")), on(&outside, None)];
        on_a.extend(fillers.iter().map(|p| on(p, None)));
        let write = |path: &Path, node: &str, pods: &[PodEntry<'_>]| {
            fs::write(path, config_yaml(node, &["bench"], pods)).with_context(|| format!("writing {}", path.display()))
        };
        write(&a, "node-a", &on_a)?;
        write(&b, "node-b", &[on(&client, Some("node-a")), on(&server, None)])?;
        Ok(Bed {
            bed,
            client,
            server,
            outside,
            fillers,
            configs: [a, b],
            starts: 0,
        })
    }

    fn start_nodes(&mut self) -> Result<[Node; 2]> {
        self.starts += 1;
        let args = ["--log-level", "warn", "--access-log", "false"];
        let a = Node::start(&self.bed, &format!("a{}", self.starts), &self.configs[0], &args)?;
        let b = Node::start(&self.bed, &format!("b{}", self.starts), &self.configs[1], &args)?;
        Ok([a, b])
    }
}

/// ztunnel's medians (idle RSS, HBONE client and server, L4), if every run has them.
fn ztunnel_medians(runs: &[Run]) -> Option<[f64; 4]> {
    let z: Vec<&ZtunnelRun> = runs.iter().map(|r| r.ztunnel.as_ref()).collect::<Option<_>>()?;
    if z.is_empty() {
        return None;
    }
    let med = |f: fn(&ZtunnelRun) -> f64| median(&mut z.iter().map(|r| f(r)).collect::<Vec<_>>());
    Some([
        med(|r| r.idle_rss_kib as f64),
        med(|r| r.hbone_client_bytes_per_stream),
        med(|r| r.hbone_server_bytes_per_stream),
        med(|r| r.l4_bytes_per_connection),
    ])
}

/// One echoed byte on a new connection from `from` to `to`: established end to end.
fn open_idle(from: &Pod, to: SocketAddr) -> Result<TcpStream> {
    let mut c = from
        .connect(to)?
        .with_context(|| format!("connecting {} -> {to}", from.ip))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"x")?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b).with_context(|| format!("echo from {to}"))?;
    Ok(c)
}

fn rss(node: &Node) -> Result<u64> {
    let pid = node.pid().context("node pid")?;
    rss_kib(pid).with_context(|| format!("VmRSS of {pid}"))
}

/// Waits until `node` lists at least `n` connections (they are proxied, not passed around it).
fn carried(node: &Node, n: usize) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let have = node.connections().len();
        if have >= n {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("node carries {have} connections, expected at least {n}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// RSS of both nodes before and after `n` idle connections from the client to `to`: the
/// warm idle RSS of node a and each node's bytes per connection.
fn phase(bed: &mut Bed, to: SocketAddr, n: u32) -> Result<(u64, f64, f64)> {
    let [a, b] = bed.start_nodes()?;
    idle_growth(&bed.client, to, n, || Ok([rss(&a)?, rss(&b)?]), |n| carried(&a, n))
}

/// Warms the path with one connection (closed again), then reads `rss` of both proxies before
/// and after `n` idle connections from `from` to `to`, once `carried` confirms the client's
/// proxy holds them: the first proxy's warm idle RSS and each one's bytes per connection.
fn idle_growth(
    from: &Pod,
    to: SocketAddr,
    n: u32,
    rss: impl Fn() -> Result<[u64; 2]>,
    carried: impl Fn(usize) -> Result<()>,
) -> Result<(u64, f64, f64)> {
    open_idle(from, to)?;
    std::thread::sleep(SETTLE);
    let [a0, b0] = rss()?;
    let mut held = Vec::with_capacity(n as usize);
    for _ in 0..n {
        interrupt::check()?;
        held.push(open_idle(from, to)?);
    }
    carried(n as usize)?;
    std::thread::sleep(SETTLE);
    let [a1, b1] = rss()?;
    let per = |before: u64, after: u64| (after.saturating_sub(before) * 1024) as f64 / f64::from(n);
    drop(held);
    Ok((a0, per(a0, a1), per(b0, b1)))
}

/// Waits until the client pod's ztunnel accepted at least `n` connections that are still
/// open (they went through it, not around it).
fn ztunnel_carried(client: &Pod, n: usize) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &client.netns,
                "ss",
                "-Htn",
                "state",
                "established",
                "sport",
                "=",
                ":15001",
            ])
            .output()
            .context("ss")?;
        let have = String::from_utf8_lossy(&out.stdout).lines().count();
        if have >= n {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("the client's ztunnel holds {have} connections, expected at least {n}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`phase`] for ztunnel: node a's ztunnel (shared mode, serving the client and node a's other
/// captured pods, in `home`'s network namespace) and the server pod's: node a's warm idle RSS
/// and each ztunnel's bytes per connection to `to` (the server pod over HBONE, or the uncaptured
/// pod).
fn ztunnel_phase(bed: &Bed, bin: &Path, home: &Pod, to: &Pod, n: u32) -> Result<(u64, f64, f64)> {
    let mut pods = vec![&bed.client];
    pods.extend(bed.fillers.iter());
    let [client, server] = start_node_pair(bin, bed.bed.dir(), home, &pods, &bed.server)?;
    let _redirect = Redirect::add(&bed.client, to, &[PORT])?;
    let rss_of = |z: &Ztunnel| {
        let pid = z.pid().context("ztunnel pid")?;
        rss_kib(pid).with_context(|| format!("VmRSS of {pid}"))
    };
    idle_growth(
        &bed.client,
        to.addr(PORT),
        n,
        || Ok([rss_of(&client)?, rss_of(&server)?]),
        |n| ztunnel_carried(&bed.client, n),
    )
}

pub fn run(nodeway_bin: &Path, opts: &Options, out_dir: &Path) -> Result<()> {
    if let Some(bin) = &opts.ztunnel {
        super::ztunnel::check_bin(bin)?;
    }
    // The harness starts the binary named by NODEWAY_BIN.
    std::env::set_var("NODEWAY_BIN", nodeway_bin);
    let mut bed = Bed::create(opts.pods)?;
    // Where node a's shared ztunnel runs (its own admin ports, apart from the machine's).
    let ztunnel_home = match opts.ztunnel {
        Some(_) => Some(bed.bed.add_pod("ztunnel", "istio-system")?),
        None => None,
    };
    // Every connection is held open on both ends in this process, and echoed by a thread.
    let _servers: [EchoServer; 2] = [bed.server.echo_server(PORT)?, bed.outside.echo_server(PORT)?];
    let (to_server, to_outside) = (bed.server.addr(PORT), bed.outside.addr(PORT));
    println!(
        "bench memory: {} run(s); {} captured pods on node a; {} idle connections per phase",
        opts.runs, opts.pods, opts.connections
    );
    let mut runs = Vec::new();
    for round in 1..=opts.runs {
        let (idle, client, server) = phase(&mut bed, to_server, opts.connections).context("HBONE phase")?;
        let (_, l4, _) = phase(&mut bed, to_outside, opts.connections).context("L4 phase")?;
        println!(
            "round {round}: idle {idle} KiB | HBONE stream {client:.0} B client node, {server:.0} B server node | L4 {l4:.0} B"
        );
        let ztunnel = match (&opts.ztunnel, &ztunnel_home) {
            (Some(bin), Some(home)) => {
                let (idle, client, server) =
                    ztunnel_phase(&bed, bin, home, &bed.server, opts.connections).context("ztunnel HBONE phase")?;
                let (_, l4, _) =
                    ztunnel_phase(&bed, bin, home, &bed.outside, opts.connections).context("ztunnel L4 phase")?;
                println!(
                    "round {round} ztunnel: idle {idle} KiB | HBONE stream {client:.0} B client node, \
                     {server:.0} B server | L4 {l4:.0} B"
                );
                Some(ZtunnelRun {
                    idle_rss_kib: idle,
                    hbone_client_bytes_per_stream: client,
                    hbone_server_bytes_per_stream: server,
                    l4_bytes_per_connection: l4,
                })
            }
            _ => None,
        };
        runs.push(Run {
            round,
            idle_rss_kib: idle,
            hbone_client_bytes_per_stream: client,
            hbone_server_bytes_per_stream: server,
            l4_bytes_per_connection: l4,
            ztunnel,
        });
    }
    let mut build = (if opts.debug { "debug build" } else { "release build" }).to_owned();
    if let Some(bin) = &opts.ztunnel {
        build = format!("{build}; {}", super::ztunnel::describe(bin, "shared mode on node a"));
    }
    let params = serde_json::json!({"pods": opts.pods, "connections": opts.connections, "runs": opts.runs});
    let report = Report::new(build, params, runs);
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let md = report.markdown();
    fs::write(out_dir.join("memory.md"), &md)?;
    fs::write(out_dir.join("memory.json"), serde_json::to_string_pretty(&report)?)?;
    println!("{md}");
    println!("wrote {}", out_dir.join("memory.md").display());
    Ok(())
}
