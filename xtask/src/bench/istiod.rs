//! `cargo xtask bench istiod`: how fast the real control plane's changes reach traffic.
//!
//! Topology: the istiod test bed (`nodeway_tests::control_plane::Mesh`: etcd, kube-apiserver and
//! istiod from their Go modules), two nodes (`nodeway run` release builds as node proxies), a
//! client pod on node a. Figures:
//! - **pod ready to serve**: a new pod on node b (its own service account, so a new certificate
//!   too) is set Running in the API server; the time until the client's first connection to it
//!   succeeds over HBONE with mutual TLS (node b counts it as `mutual_tls` to that workload).
//!   That is istiod's push of the workload (with the redirection annotation nodeway wrote), node
//!   b's capture and certificate, node a's new workload entry. Median and p99 over `--pods`.
//! - **policy change**: a DENY AuthorizationPolicy for the client's service account is created,
//!   then deleted; the time until connections are refused, resp. pass again. Over
//!   `--policy-changes` rounds.
//! - RSS of both agents at the end, with the mesh of that run.
//!
//! The baseline in the same run is the API server's own write latency (the status update that
//! starts each measurement), so the figures show what istiod and nodeway add on top.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use nodeway_tests::{
    control_plane::{require_control_plane, KubePod, Mesh, APP_PORT},
    metric_value, EchoServer, Node,
};
use serde::Serialize;
use serde_json::json;

use super::report::median;
use crate::interrupt;

#[derive(Args, Clone, Debug)]
pub struct Options {
    /// New pods measured (each one connection target)
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub pods: u32,
    /// AuthorizationPolicy create/delete rounds measured
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub policy_changes: u32,
    /// Give up on one measurement after this many seconds
    #[arg(long, default_value_t = 60)]
    pub limit_seconds: u64,
    /// Benchmark a debug build of nodeway instead of a release build
    #[arg(long)]
    pub debug: bool,
    /// Where istiod.md and istiod.json go (default: target/bench)
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Skip `setup`
    #[arg(long)]
    pub no_setup: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Figures {
    pods: u32,
    pod_ready_ms: Vec<f64>,
    status_write_ms: Vec<f64>,
    deny_effective_ms: Vec<f64>,
    allow_effective_ms: Vec<f64>,
    rss_kib: [u64; 2],
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn rss_kib(node: &Node) -> u64 {
    let Some(pid) = node.pid() else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Whether `client` gets its bytes echoed by `to` now.
fn passes(client: &KubePod, to: &KubePod) -> bool {
    client
        .pod
        .exchange(to.pod.addr(APP_PORT), b"ping")
        .ok()
        .and_then(|r| r.ok())
        .as_deref()
        == Some(&b"ping"[..])
}

/// Polls until `f` holds (every 10 ms); the time it took, or an error after `limit`.
fn time_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<f64> {
    let start = Instant::now();
    while start.elapsed() < limit {
        interrupt::check()?;
        if f() {
            return Ok(start.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("{what}: not within {limit:?}")
}

fn mtls_connections_to(node: &Node, workload: &str) -> f64 {
    metric_value(
        &node.metrics(),
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("destination_workload", workload),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
}

pub fn run(nodeway: &Path, opts: &Options, out: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench istiod needs root (network namespaces, eBPF)");
    }
    if !require_control_plane() {
        bail!("the control plane is not built: run `cargo xtask setup`");
    }
    // The harness starts the binary named by NODEWAY_BIN.
    std::env::set_var("NODEWAY_BIN", nodeway);
    let limit = Duration::from_secs(opts.limit_seconds);
    let mut m = Mesh::new("bench-istiod").context("starting the control plane")?;
    m.namespace("bench", true)?;
    m.service_account("bench", "client")?;
    let client = m.pod("node-a", "client", "bench", "client")?;
    let a = m.node("a", "node-a")?;
    let b = m.node("b", "node-b")?;
    println!(
        "bench istiod: control plane and two nodes up; measuring {} new pods",
        opts.pods
    );

    let mut pod_ready = Vec::new();
    let mut status_write = Vec::new();
    let mut servers: Vec<(KubePod, EchoServer)> = Vec::new();
    for i in 0..opts.pods {
        let (name, sa) = (format!("server-{i}"), format!("server-{i}"));
        m.service_account("bench", &sa)?;
        let p = m.prepare_pod("node-b", &name, "bench", &sa)?;
        let echo = p.pod.echo_server(APP_PORT)?;
        let start = Instant::now();
        m.set_running(&p)?;
        let wrote = start.elapsed().as_secs_f64() * 1000.0;
        let waited = time_until(limit, &format!("pod {name} reachable over mutual TLS"), || {
            passes(&client, &p) && mtls_connections_to(&b, &name) >= 1.0
        })?;
        pod_ready.push(wrote + waited);
        status_write.push(wrote);
        servers.push((p, echo));
    }
    let target = &servers[0].0;
    println!("bench istiod: measuring {} policy changes", opts.policy_changes);
    let mut deny = Vec::new();
    let mut allow = Vec::new();
    let policy = json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": "bench"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/bench/sa/client"]}}]}]},
    });
    for _ in 0..opts.policy_changes {
        let start = Instant::now();
        m.cp.kube().apply(policy.clone())?;
        time_until(limit, "DENY in effect", || !passes(&client, target))?;
        deny.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        m.cp.kube().delete(&policy)?;
        time_until(limit, "DENY removed", || passes(&client, target))?;
        allow.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let figures = Figures {
        pods: opts.pods,
        pod_ready_ms: pod_ready,
        status_write_ms: status_write,
        deny_effective_ms: deny,
        allow_effective_ms: allow,
        rss_kib: [rss_kib(&a), rss_kib(&b)],
    };
    write_report(&figures, out)
}

fn write_report(f: &Figures, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let row = |name: &str, v: &[f64]| {
        let mut m = v.to_vec();
        format!(
            "| {name} | {} | {:.1} | {:.1} |\n",
            v.len(),
            median(&mut m),
            percentile(v, 0.99)
        )
    };
    let write_median = median(&mut f.status_write_ms.clone());
    let ready_median = median(&mut f.pod_ready_ms.clone());
    let mut md =
        String::from("# bench istiod\n\nTimes in milliseconds, from the API write to the effect on traffic.\n\n");
    md += "| figure | samples | median | p99 |\n|---|---:|---:|---:|\n";
    md += &row("pod Running -> first mutual-TLS connection to it", &f.pod_ready_ms);
    md += &row("baseline: the API server's status write itself", &f.status_write_ms);
    md += &row("AuthorizationPolicy DENY created -> refused", &f.deny_effective_ms);
    md += &row("AuthorizationPolicy deleted -> passes again", &f.allow_effective_ms);
    md += &format!(
        "\nRatio pod-ready / status-write (medians): {:.1}x\n\nRSS of the agents with {} pods in the mesh: node a {} KiB, node b {} KiB\n",
        ready_median / write_median,
        f.pods + 1,
        f.rss_kib[0],
        f.rss_kib[1]
    );
    std::fs::write(out.join("istiod.md"), &md)?;
    std::fs::write(out.join("istiod.json"), serde_json::to_string_pretty(f)?)?;
    print!("{md}");
    println!("written: {}", out.join("istiod.md").display());
    Ok(())
}
