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
//! - **VirtualService change**: reviews v1 and v2 on node b (a Service, its EndpointSlice, a
//!   DestinationRule with subsets); a VirtualService flipped between all-to-v1 and all-to-v2;
//!   the time from the write returning until the client's first request the new subset answers
//!   (istiod's push over the client's sidecar class stream, nodeway's route swap). Over
//!   `--vs-changes` rounds.
//! - RSS of both agents at the end, with the mesh of that run.
//! - **streams and memory per class** (a fresh mesh per layout, one node): `--class-pods` pods
//!   in `--classes` label sets, against the same pods each with labels of its own (one stream
//!   per pod, what a sidecar each would cost): class streams, the sidecars istiod counts, the
//!   agent's (and istiod's) RSS once every class is synced.
//!
//! The baseline in the same run is the API server's own write latency (the status update that
//! starts each measurement, the VirtualService write), so the figures show what istiod and
//! nodeway add on top.

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

use super::istiod_l7::{self, ClassRun, VsFigures};
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
    /// VirtualService flips (all to subset v1 / all to v2) measured
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub vs_changes: u32,
    /// Captured pods on the one node of the class figures (and of their one-class-per-pod baseline)
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub class_pods: u32,
    /// Label sets (sidecar classes) those pods come in
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub classes: u32,
    /// Give up on one measurement after this many seconds
    #[arg(long, default_value_t = 60)]
    pub limit_seconds: u64,
    /// Give up waiting for every class of a layout to be synced after this many seconds
    #[arg(long, default_value_t = 300)]
    pub sync_limit_seconds: u64,
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
    #[serde(flatten)]
    vs: VsFigures,
    classes: Option<ClassFigures>,
}

/// The class layout and its same-run baseline: every pod a class of its own (what one stream
/// per pod, as a sidecar each, would cost).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClassFigures {
    per_class: ClassRun,
    per_pod: ClassRun,
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
    let mut figures = two_nodes(opts)?;
    let sync_limit = Duration::from_secs(opts.sync_limit_seconds);
    let accounts = opts.classes.min(opts.class_pods);
    println!(
        "bench istiod: {} pods in {} classes on one node (fresh mesh)",
        opts.class_pods, opts.classes
    );
    let per_class = istiod_l7::class_layout(opts.class_pods, opts.classes, accounts, sync_limit)?;
    println!(
        "bench istiod: baseline, {} pods in {} classes (one per pod, fresh mesh)",
        opts.class_pods, opts.class_pods
    );
    let per_pod = istiod_l7::class_layout(opts.class_pods, opts.class_pods, accounts, sync_limit)?;
    figures.classes = Some(ClassFigures { per_class, per_pod });
    write_report(&figures, out)
}

/// The figures on the two-node mesh: new pods, policy changes, VirtualService changes, RSS.
fn two_nodes(opts: &Options) -> Result<Figures> {
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
    let (ready, servers) = new_pods(&mut m, &b, &client, opts.pods, limit)?;
    println!("bench istiod: measuring {} policy changes", opts.policy_changes);
    let (deny, allow) = policy_changes(&m, &client, &servers[0].0, opts.policy_changes, limit)?;
    println!("bench istiod: measuring {} VirtualService changes", opts.vs_changes);
    let reviews = istiod_l7::reviews(&mut m)?;
    let vs = istiod_l7::vs_changes(&m, &client.pod, &reviews, opts.vs_changes, limit)?;
    Ok(Figures {
        pods: opts.pods,
        pod_ready_ms: ready.pod_ready,
        status_write_ms: ready.status_write,
        deny_effective_ms: deny,
        allow_effective_ms: allow,
        rss_kib: [rss_kib(&a), rss_kib(&b)],
        vs,
        classes: None,
    })
}

struct PodReady {
    pod_ready: Vec<f64>,
    status_write: Vec<f64>,
}

/// `count` new pods on node b, each timed from its status write to its first mutual-TLS
/// connection; the pods stay (with their echo servers) for the policy rounds.
fn new_pods(
    m: &mut Mesh,
    b: &Node,
    client: &KubePod,
    count: u32,
    limit: Duration,
) -> Result<(PodReady, Vec<(KubePod, EchoServer)>)> {
    let mut r = PodReady {
        pod_ready: Vec::new(),
        status_write: Vec::new(),
    };
    let mut servers = Vec::new();
    for i in 0..count {
        let (name, sa) = (format!("server-{i}"), format!("server-{i}"));
        m.service_account("bench", &sa)?;
        let p = m.prepare_pod("node-b", &name, "bench", &sa)?;
        let echo = p.pod.echo_server(APP_PORT)?;
        let start = Instant::now();
        m.set_running(&p)?;
        let wrote = start.elapsed().as_secs_f64() * 1000.0;
        let waited = time_until(limit, &format!("pod {name} reachable over mutual TLS"), || {
            passes(client, &p) && mtls_connections_to(b, &name) >= 1.0
        })?;
        r.pod_ready.push(wrote + waited);
        r.status_write.push(wrote);
        servers.push((p, echo));
    }
    Ok((r, servers))
}

/// `rounds` DENY policies for the client created (until refused) and deleted (until passing).
fn policy_changes(
    m: &Mesh,
    client: &KubePod,
    target: &KubePod,
    rounds: u32,
    limit: Duration,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut deny = Vec::new();
    let mut allow = Vec::new();
    let policy = json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": "bench"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/bench/sa/client"]}}]}]},
    });
    for _ in 0..rounds {
        let start = Instant::now();
        m.cp.kube().apply(policy.clone())?;
        time_until(limit, "DENY in effect", || !passes(client, target))?;
        deny.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        m.cp.kube().delete(&policy)?;
        time_until(limit, "DENY removed", || passes(client, target))?;
        allow.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((deny, allow))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn row(name: &str, v: &[f64]) -> String {
    let mut m = v.to_vec();
    format!(
        "| {name} | {} | {:.1} | {:.1} |\n",
        v.len(),
        median(&mut m),
        percentile(v, 0.99)
    )
}

/// The class table: each figure of the class layout next to its one-class-per-pod baseline.
fn class_table(c: &ClassFigures) -> String {
    let (k, p) = (&c.per_class, &c.per_pod);
    let mut md = format!(
        "\n## Sidecar class streams, {} captured pods on one node\n\n\
         | figure | {} classes | baseline: {} classes (one per pod) | ratio |\n|---|---:|---:|---:|\n",
        k.pods, k.label_sets, p.label_sets
    );
    let mut line = |name: &str, a: f64, b: f64, digits: usize| {
        md += &format!("| {name} | {a:.digits$} | {b:.digits$} | {:.2} |\n", ratio(a, b));
    };
    line(
        "class streams (`/config_dump` sidecarClasses)",
        k.class_streams as f64,
        p.class_streams as f64,
        0,
    );
    line(
        "of them connected",
        k.connected_streams as f64,
        p.connected_streams as f64,
        0,
    );
    line(
        "sidecars connected to istiod (`/debug/syncz`)",
        k.istiod_sidecars as f64,
        p.istiod_sidecars as f64,
        0,
    );
    line(
        "agent VmRSS, every class synced (KiB)",
        k.agent_rss_kib as f64,
        p.agent_rss_kib as f64,
        0,
    );
    if let (Some(a), Some(b)) = (k.istiod_rss_kib, p.istiod_rss_kib) {
        line("istiod VmRSS (KiB)", a as f64, b as f64, 0);
    }
    line("agent start -> every class synced (ms)", k.synced_ms, p.synced_ms, 0);
    md
}

fn write_report(f: &Figures, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let write_median = median(&mut f.status_write_ms.clone());
    let ready_median = median(&mut f.pod_ready_ms.clone());
    let vs_write = median(&mut f.vs.vs_write_ms.clone());
    let vs_routed = median(&mut f.vs.vs_routed_ms.clone());
    let mut md =
        String::from("# bench istiod\n\nTimes in milliseconds, from the API write to the effect on traffic.\n\n");
    md += "| figure | samples | median | p99 |\n|---|---:|---:|---:|\n";
    md += &row("pod Running -> first mutual-TLS connection to it", &f.pod_ready_ms);
    md += &row("baseline: the API server's status write itself", &f.status_write_ms);
    md += &row("AuthorizationPolicy DENY created -> refused", &f.deny_effective_ms);
    md += &row("AuthorizationPolicy deleted -> passes again", &f.allow_effective_ms);
    md += &row(
        "VirtualService v1<->v2 written -> first request the new subset answers",
        &f.vs.vs_routed_ms,
    );
    md += &row(
        "baseline: the API server's VirtualService write itself",
        &f.vs.vs_write_ms,
    );
    md += &format!(
        "\nRatio pod-ready / status-write (medians): {:.1}x\n\n\
         Ratio VirtualService routed / VirtualService write (medians): {:.1}x; p99: {:.1}x\n\n\
         RSS of the agents with {} pods in the mesh: node a {} KiB, node b {} KiB\n",
        ready_median / write_median,
        ratio(vs_routed, vs_write),
        ratio(
            percentile(&f.vs.vs_routed_ms, 0.99),
            percentile(&f.vs.vs_write_ms, 0.99)
        ),
        f.pods + 3,
        f.rss_kib[0],
        f.rss_kib[1]
    );
    if let Some(c) = &f.classes {
        md += &class_table(c);
    }
    let mut json = serde_json::to_value(f)?;
    json["ratios"] = json!({
        "podReadyOverStatusWrite": ratio(ready_median, write_median),
        "vsRoutedOverVsWriteMedian": ratio(vs_routed, vs_write),
        "vsRoutedOverVsWriteP99": ratio(percentile(&f.vs.vs_routed_ms, 0.99), percentile(&f.vs.vs_write_ms, 0.99)),
        "classStreams": f.classes.as_ref().map(|c| ratio(c.per_class.class_streams as f64, c.per_pod.class_streams as f64)),
        "istiodSidecars": f.classes.as_ref().map(|c| ratio(c.per_class.istiod_sidecars as f64, c.per_pod.istiod_sidecars as f64)),
        "agentRss": f.classes.as_ref().map(|c| ratio(c.per_class.agent_rss_kib as f64, c.per_pod.agent_rss_kib as f64)),
    });
    std::fs::write(out.join("istiod.md"), &md)?;
    std::fs::write(out.join("istiod.json"), serde_json::to_string_pretty(&json)?)?;
    print!("{md}");
    println!("written: {}", out.join("istiod.md").display());
    Ok(())
}
