//! `cargo xtask bench redirect`: what capture costs a pod's TCP traffic.
//!
//! Topology (tests/ harness): one node, a client pod and a server pod (an echo server) in the
//! namespace `bench`. Three modes, interleaved round by round:
//! (a) direct: no nodeway running, no capture;
//! (b) `nodeway run --capture ebpf`: cgroup connect4 + sk_lookup steer both pods' traffic into nodeway;
//! (c) `nodeway run --capture iptables`: the same nodeway behind iptables REDIRECT rules that the
//!     agent installs in the pods' namespaces.
//! Per run: connection setup rate (connect, one small echo, close; sequential) and round-trip
//! latency p50/p99 on one persistent connection at a fixed request rate. Medians over runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::echo::{self, EchoServer};
use super::report::{Mode, Report, Run};
use crate::bench::topology::BenchBed;
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
    /// Request (and echo) size, bytes
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub size: u64,
    /// Only these modes (comma-separated: direct,ebpf,iptables)
    #[arg(long, value_delimiter = ',', default_values_t = vec!["direct".to_owned(), "ebpf".to_owned(), "iptables".to_owned()])]
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
    println!(
        "topology: client {} (namespace `bench`, captured) -> echo server {} (namespace `bench-server`, not captured)",
        bed.client().ip,
        server.addr()
    );

    let mut runs = Vec::new();
    for round in 1..=opts.runs {
        // Rotate the order each round so no mode always runs first (warm caches, thermal drift).
        let mut order = modes.clone();
        let len = order.len();
        order.rotate_left((round as usize - 1) % len);
        for mode in order {
            interrupt::check()?;
            let node = match mode {
                Mode::Direct => None,
                Mode::Ebpf | Mode::Iptables => Some(bed.start_node(mode)?),
            };
            let before = match &node {
                Some(n) => Some(n.opened_connections()?),
                None => None,
            };
            // Warm-up: first connections pay for ARP/neighbour entries and the proxy's first accepts.
            echo::connect_rate(&client_ns, server.addr(), 20, Duration::from_secs(5), size)
                .with_context(|| format!("{} warm-up", mode.name()))?;
            let conns = echo::connect_rate(&client_ns, server.addr(), opts.connections, connect_time, size)
                .with_context(|| format!("{} round {round}: connection setups", mode.name()))?;
            let lat = echo::latency(&client_ns, server.addr(), opts.requests, opts.rate, request_time, size)
                .with_context(|| format!("{} round {round}: latency", mode.name()))?;
            if let (Some(n), Some(before)) = (&node, before) {
                // The run is only worth something if the traffic really went through nodeway.
                let after = n.opened_connections()?;
                if after < before + conns.completed {
                    bail!(
                        "{}: nodeway counted {} new connections for {} made: traffic was not captured",
                        mode.name(),
                        after.saturating_sub(before),
                        conns.completed
                    );
                }
            }
            drop(node);
            let us = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
            let run = Run {
                round,
                mode,
                connects: conns.completed,
                connects_per_sec: conns.per_second(),
                requests: lat.samples.len() as u64,
                late_sends: lat.late,
                p50_us: us(echo::percentile(&lat.samples, 50.0)),
                p99_us: us(echo::percentile(&lat.samples, 99.0)),
            };
            println!(
                "round {round} {:<9} {:>6} connects {:>8.0}/s | {:>6} round-trips p50 {:>7.1} µs p99 {:>7.1} µs{}",
                mode.name(),
                run.connects,
                run.connects_per_sec,
                run.requests,
                run.p50_us,
                run.p99_us,
                if run.late_sends > 0 {
                    format!(" ({} late sends)", run.late_sends)
                } else {
                    String::new()
                }
            );
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
