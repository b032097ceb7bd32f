//! `cargo xtask bench redirect`: what capture costs a pod's TCP traffic.
//!
//! Topology (tests/ harness): one node, a client pod (namespace `bench`) and a server pod (an echo
//! server and `iperf3 -s`, namespace `bench-server`). Five modes, interleaved round by round:
//! (a) direct: no nodeway running, no capture;
//! (b) `nodeway run --capture ebpf`: cgroup connect4 + sk_lookup steer the client's traffic into nodeway;
//! (c) `nodeway run --capture iptables`: the same nodeway behind iptables REDIRECT rules that the
//!     agent installs in the client's namespace;
//! (d) same-node: both pods captured with workload certificates, the connection handed to the
//!     server's inbound side inside nodeway (`--same-node in-process`);
//! (e) hbone-local: as (d), but over HBONE through the node's own tunnel (`--same-node hbone`).
//! Per run: connection setup rate (connect, one small echo, close; sequential), round-trip
//! latency p50/p99 on one persistent connection at a fixed request rate, and iperf3 throughput
//! (one stream) with nodeway's CPU time. Medians over runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::echo::{self, EchoServer};
use super::hbone::{iperf_client, iperf_server, IPERF_PORT};
use super::report::{Mode, Report, Run};
use crate::bench::topology::{BenchBed, BenchNode};
use crate::{interrupt, netns};

#[derive(Args, Clone, Debug)]
pub struct Options {
    /// Runs per mode (the report shows medians)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: u32,
    /// Connection setups per run (at most)
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    pub connections: u64,
    /// Time limit of the connection-setup phase of one run, seconds
    #[arg(long, default_value_t = 5.0)]
    pub connect_seconds: f64,
    /// Round-trips per run on the persistent connection
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(10..=200_000))]
    pub requests: u64,
    /// Request rate on the persistent connection, per second
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=50_000))]
    pub rate: u64,
    /// Time limit of the latency phase of one run, seconds
    #[arg(long, default_value_t = 10.0)]
    pub request_seconds: f64,
    /// Length of the iperf3 throughput phase of one run, seconds
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=120))]
    pub throughput_seconds: u32,
    /// Request (and echo) size, bytes
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub size: u64,
    /// Only these modes (comma-separated: direct,ebpf,iptables,same-node,hbone-local)
    #[arg(long, value_delimiter = ',', default_values_t = Mode::ALL.iter().map(|m| m.name().to_owned()).collect::<Vec<_>>())]
    pub modes: Vec<String>,
    /// Benchmark a debug build of nodeway instead of a release build
    #[arg(long)]
    pub debug: bool,
    /// Where redirect.md and redirect.json go (default: target/bench)
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Skip `setup`
    #[arg(long)]
    pub no_setup: bool,
}

const SERVER_PORT: u16 = 8080;

impl Options {
    fn modes(&self) -> Result<Vec<Mode>> {
        super::report::select_modes(&self.modes, &Mode::ALL, Mode::name)
    }

    fn seconds(v: f64, what: &str) -> Result<Duration> {
        if !(v.is_finite() && v > 0.0 && v <= 600.0) {
            bail!("{what} must be between 0 and 600 seconds, got {v}");
        }
        Ok(Duration::from_secs_f64(v))
    }
}

pub fn run(nodeway_bin: &Path, opts: &Options, out_dir: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench redirect needs root (network namespaces, eBPF, iptables)");
    }
    let modes = opts.modes()?;
    let connect_time = Options::seconds(opts.connect_seconds, "--connect-seconds")?;
    let request_time = Options::seconds(opts.request_seconds, "--request-seconds")?;
    let size = usize::try_from(opts.size).context("--size")?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    println!(
        "bench redirect: {} run(s) x {:?}; per run up to {} connects ({:?}) and {} round-trips at {}/s ({:?}), {} B",
        opts.runs,
        modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
        opts.connections,
        connect_time,
        opts.requests,
        opts.rate,
        request_time,
        size
    );
    let mut bed = BenchBed::create(nodeway_bin)?;
    let client_ns = bed.client_netns();
    let server_ns = bed.server_netns();
    for ns in [&client_ns, &server_ns] {
        widen_ports(ns)?;
    }
    let server_addr = bed.server().addr(SERVER_PORT);
    let server = EchoServer::start(&server_ns, server_addr)?;
    let _iperf = iperf_server(bed.server())?;
    println!(
        "topology: client {} (namespace `bench`, captured) -> echo server {} and iperf3 :{IPERF_PORT} \
         (namespace `bench-server`, captured only in the same-node modes)",
        bed.client().ip,
        server.addr()
    );

    let load = Load {
        connect_time,
        request_time,
        size,
        out_dir,
    };
    let mut runs = Vec::new();
    for round in 1..=opts.runs {
        // Rotate the order each round so no mode always runs first (warm caches, thermal drift).
        let mut order = modes.clone();
        let len = order.len();
        order.rotate_left((round as usize - 1) % len);
        for mode in order {
            interrupt::check()?;
            let run = one_run(&mut bed, &server, mode, round, opts, &load)?;
            print_run(&run);
            runs.push(run);
        }
    }
    let bed_client = bed.client().ip;
    drop(server);
    drop(bed);

    let report = Report::new(
        kernel_release(),
        format!("nodeway {} build", if opts.debug { "debug" } else { "release" }),
        serde_json::json!({
            "runs": opts.runs,
            "connections": opts.connections,
            "connectSeconds": opts.connect_seconds,
            "requests": opts.requests,
            "rate": opts.rate,
            "requestSeconds": opts.request_seconds,
            "sizeBytes": opts.size,
            "throughputSeconds": opts.throughput_seconds,
            "client": bed_client.to_string(),
            "server": server_addr.to_string(),
        }),
        runs,
    );
    report.write(out_dir)?;
    println!("\n{}", report.markdown());
    println!(
        "wrote {} and {}",
        out_dir.join("redirect.md").display(),
        out_dir.join("redirect.json").display()
    );
    Ok(())
}

/// What one run does, the same for every mode.
struct Load<'a> {
    connect_time: Duration,
    request_time: Duration,
    size: usize,
    out_dir: &'a Path,
}

/// The counters that prove a run's traffic took the path its mode names.
struct Counts {
    opened: u64,
    /// Connections the server's side of nodeway accepted (same-node modes).
    accepted: u64,
    same_node: u64,
    redirected: u64,
}

impl Counts {
    fn of(node: &BenchNode) -> Result<Self> {
        Ok(Counts {
            opened: node.opened_connections()?,
            accepted: node.accepted_connections(),
            same_node: node.same_node_connections(),
            redirected: node.inbound_redirected(),
        })
    }
}

/// One mode, one round: connection setups, paced round-trips, then iperf3.
fn one_run(
    bed: &mut BenchBed,
    server: &EchoServer,
    mode: Mode,
    round: u32,
    opts: &Options,
    load: &Load,
) -> Result<Run> {
    let client_ns = bed.client_netns();
    let node = match mode {
        Mode::Direct => None,
        _ => Some(bed.start_node(mode)?),
    };
    let before = node.as_ref().map(Counts::of).transpose()?;
    // Warm-up: first connections pay for ARP/neighbour entries and the proxy's first accepts.
    echo::connect_rate(&client_ns, server.addr(), 20, Duration::from_secs(5), load.size)
        .with_context(|| format!("{} warm-up", mode.name()))?;
    let conns = echo::connect_rate(
        &client_ns,
        server.addr(),
        opts.connections,
        load.connect_time,
        load.size,
    )
    .with_context(|| format!("{} round {round}: connection setups", mode.name()))?;
    let lat = echo::latency(
        &client_ns,
        server.addr(),
        opts.requests,
        opts.rate,
        load.request_time,
        load.size,
    )
    .with_context(|| format!("{} round {round}: latency", mode.name()))?;
    if let (Some(n), Some(before)) = (&node, &before) {
        check_path(mode, before, &Counts::of(n)?, conns.completed)?;
    }
    let pid = node.as_ref().map(BenchNode::pid).transpose()?;
    let cpu_before = pid.map(super::hbone::cpu_seconds).transpose()?;
    let to = bed.server().addr(IPERF_PORT);
    let json = load.out_dir.join(format!("redirect-iperf-{}.json", mode.name()));
    let (bytes, secs) = iperf_client(bed.client(), to, opts.throughput_seconds, &json)
        .with_context(|| format!("{} round {round}: throughput", mode.name()))?;
    let cpu = match (pid, cpu_before) {
        (Some(p), Some(b)) => Some(super::hbone::cpu_seconds(p)? - b),
        _ => None,
    };
    drop(node);
    let us = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
    let gb = bytes as f64 / 1e9;
    Ok(Run {
        round,
        mode,
        connects: conns.completed,
        connects_per_sec: conns.per_second(),
        requests: lat.samples.len() as u64,
        late_sends: lat.late,
        p50_us: us(echo::percentile(&lat.samples, 50.0)),
        p99_us: us(echo::percentile(&lat.samples, 99.0)),
        gbit_per_sec: if secs > 0.0 { gb * 8.0 / secs } else { f64::NAN },
        proxy_cpu_seconds: cpu,
        gb_per_cpu_second: cpu.filter(|c| *c > 0.0).map(|c| gb / c),
    })
}

/// A run is only worth something if the traffic really took its mode's path.
fn check_path(mode: Mode, before: &Counts, after: &Counts, made: u64) -> Result<()> {
    let opened = after.opened.saturating_sub(before.opened);
    if opened < made {
        bail!(
            "{}: nodeway counted {opened} new connections for {made} made: traffic was not captured",
            mode.name()
        );
    }
    let accepted = after.accepted.saturating_sub(before.accepted);
    if mode.captures_server() && accepted < made {
        bail!(
            "{}: the server's side of nodeway accepted {accepted} connections for {made} made",
            mode.name()
        );
    }
    let handed = after.same_node.saturating_sub(before.same_node);
    // HBONE streams share pooled tunnel connections, so one steered SYN can carry them all.
    let tunnelled = after.redirected.saturating_sub(before.redirected);
    match mode {
        Mode::SameNode if handed < made => bail!(
            "same-node: {handed} of {made} connections were handed over in-process (nodeway_same_node_connections_total)"
        ),
        Mode::HboneLocal if handed > 0 || tunnelled == 0 => bail!(
            "hbone-local: {tunnelled} tunnel connections reached the HBONE socket, {handed} connections were handed over in-process"
        ),
        _ => Ok(()),
    }
}

fn print_run(run: &Run) {
    println!(
        "round {} {:<11} {:>6} connects {:>8.0}/s | {:>6} round-trips p50 {:>7.1} µs p99 {:>7.1} µs{} | {:>6.2} Gbit/s{}",
        run.round,
        run.mode.name(),
        run.connects,
        run.connects_per_sec,
        run.requests,
        run.p50_us,
        run.p99_us,
        echo::late_note(run.late_sends),
        run.gbit_per_sec,
        run.gb_per_cpu_second.map_or(String::new(), |g| format!(" {g:.3} GB/CPU-s")),
    );
}

/// Many short connections to one destination: give the pod (whose namespace this benchmark
/// created) a wide ephemeral port range and TIME_WAIT reuse so the runs do not run out of ports.
fn widen_ports(ns: &Path) -> Result<()> {
    let name = ns.display().to_string();
    netns::run_in(ns, move || {
        for (file, value) in [
            ("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000"),
            ("/proc/sys/net/ipv4/tcp_tw_reuse", "1"),
        ] {
            std::fs::write(file, value).with_context(|| format!("cannot set {file} in {name}"))?;
        }
        Ok(())
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}
