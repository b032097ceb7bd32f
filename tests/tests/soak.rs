//! A soak through one node: `NODEWAY_SOAK_CONNECTIONS` client connections (default 1000, CI
//! size) carrying `NODEWAY_SOAK_REQUESTS` requests in all (default 20 000), half HTTP/1.1
//! keep-alive and half h2c, from a captured client to a service port with a route table
//! (outbound L7 listener → HBONE → the backend pod's inbound HTTP), 32 connections at a time,
//! while a pod is added to and removed from the node's config over and over (pod churn).
//! `cargo xtask soak --connections 10000 --requests 1000000` is the full size.
//!
//! What it asserts, on the agent process: after the run and the same settling as before it, its
//! RSS is within 10% of the start, its open fds (`/proc/PID/fd`) at most [`FD_SLACK`] above the
//! start and `nodeway_runtime_alive_tasks` at most [`TASK_SLACK`] above it; every request got
//! its 200.
//!
//! The start figures are taken after a warm-up round (the same traffic, a tenth of it) and a
//! settling: pooled upstream connections are closed after 1 s unused
//! (`--upstream-idle-timeout 1`, `--hbone-idle-timeout 1`; the defaults keep them 60 s, and a
//! baseline taken with the warm-up's pooled connections still open measures the pool, not a
//! leak), and the fd and task counts must be steady for 2 s. The end figures are taken after
//! the same settling. The circuit breaker's default 1024 connections is never reached (32 at a
//! time), so this measures memory, not overflow.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    fs,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use hyper::Version;
use nodeway_tests::{
    fd_count,
    http::{HttpBackend, HttpConnection, HttpRequest},
    metric_value, require_root, rss_kib, Node, Pod, PodEntry, TestBed,
};

const PORT: u16 = 8080;
const VIP: &str = "198.19.0.10";
const HOST: &str = "web.demo.svc.cluster.local";
/// Client connections open at once.
const WORKERS: usize = 32;
/// Open fds the agent may have above its start (listeners of a pod being re-captured, the
/// stats scrape's own socket).
const FD_SLACK: usize = 8;
/// Alive tasks the agent may have above its start (the scrape itself, per-pod timers).
const TASK_SLACK: i64 = 16;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn write_config(path: &std::path::Path, pods: &[PodEntry<'_>], api: &Pod) {
    let text = nodeway_tests::routed_service_yaml(pods, api, HOST, VIP, PORT);
    // Atomically: the watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// `connections` connections, `requests` requests in all, [`WORKERS`] at a time; the count of
/// 200s. Stops at `deadline` whatever is left.
fn traffic(client: &Pod, connections: usize, requests: usize, deadline: Instant) -> usize {
    let per_conn = requests.div_ceil(connections).max(1);
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let vip = SocketAddr::new(VIP.parse().unwrap(), PORT);
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (next, ok, client) = (next.clone(), ok.clone(), client.clone());
            thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= connections || Instant::now() >= deadline {
                    return;
                }
                let version = if i % 2 == 0 { Version::HTTP_11 } else { Version::HTTP_2 };
                let Ok(mut conn) = HttpConnection::open(&client, vip, version) else {
                    continue;
                };
                let n = per_conn.min(requests.saturating_sub(i * per_conn));
                for _ in 0..n {
                    let req = HttpRequest::get("/soak")
                        .authority(format!("{HOST}:{PORT}"))
                        .timeout(Duration::from_secs(10));
                    match conn.send(req) {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => break,
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    ok.load(Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    rss_kib: u64,
    fds: usize,
    tasks: i64,
}

/// Waits until the agent's fds and tasks are the same for 2 s (at least 3 s, at most 60 s:
/// pooled connections closed after their 1 s idle timeout), then takes the figures.
fn settled(node: &Node) -> Figures {
    let pid = node.pid().unwrap();
    let sample = || {
        let tasks = metric_value(&node.metrics(), "nodeway_runtime_alive_tasks", &[]) as i64;
        (fd_count(pid).unwrap(), tasks)
    };
    let start = Instant::now();
    thread::sleep(Duration::from_secs(3));
    let mut last = sample();
    let mut steady_since = Instant::now();
    while start.elapsed() < Duration::from_secs(60) && steady_since.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(500));
        let now = sample();
        if now != last {
            last = now;
            steady_since = Instant::now();
        }
    }
    let (fds, tasks) = sample();
    Figures {
        rss_kib: rss_kib(pid).unwrap(),
        fds,
        tasks,
    }
}

#[test]
fn a_soak_with_pod_churn_returns_to_its_start_figures() {
    if !require_root() {
        return;
    }
    let connections = env_or("NODEWAY_SOAK_CONNECTIONS", 1000).max(1);
    let requests = env_or("NODEWAY_SOAK_REQUESTS", 20_000).max(connections);
    let mut bed = TestBed::new("soak").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let api = bed.add_pod("api", "demo").unwrap();
    let churn = bed.add_pod("churn", "demo").unwrap();
    let cfg = bed.dir().join("node.yaml");
    write_config(&cfg, &[(&client).into(), (&api).into()], &api);
    let node = Node::start(
        &bed,
        "a",
        &cfg,
        &[
            "--upstream-idle-timeout",
            "1",
            "--hbone-idle-timeout",
            "1",
            "--access-log",
            "false",
        ],
    )
    .unwrap();
    let backend = HttpBackend::start(&api, PORT, "api").unwrap();

    // Warm-up: a tenth of the traffic, then settle.
    let warm = traffic(
        &client,
        (connections / 10).max(1),
        (requests / 10).max(1),
        Instant::now() + Duration::from_secs(120),
    );
    assert!(warm > 0, "warm-up got no 200");
    let start = settled(&node);
    eprintln!("soak start: {start:?}");
    assert!(start.tasks > 0, "nodeway_runtime_alive_tasks is exported");

    // The soak, with a pod added and removed every second meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let churner = {
        let (stop, cfg) = (stop.clone(), cfg.clone());
        let (client, api, churn) = (client.clone(), api.clone(), churn.clone());
        thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) && rounds < 200 {
                let with = rounds % 2 == 0;
                let pods: Vec<PodEntry<'_>> = if with {
                    vec![(&client).into(), (&api).into(), (&churn).into()]
                } else {
                    vec![(&client).into(), (&api).into()]
                };
                write_config(&cfg, &pods, &api);
                rounds += 1;
                thread::sleep(Duration::from_secs(1));
            }
            // End without the churn pod, as at the start.
            write_config(&cfg, &[(&client).into(), (&api).into()], &api);
            rounds
        })
    };
    let began = Instant::now();
    // Bounded in time too: 600 s, or 10 ms a request for the full size.
    let limit = Duration::from_secs(600.max(requests as u64 / 100));
    let served = traffic(&client, connections, requests, began + limit);
    let took = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    let churned = churner.join().unwrap();
    let end = settled(&node);
    eprintln!(
        "soak: {connections} connections, {served}/{requests} requests in {took:?}, {churned} config changes; end: {end:?}; backend saw {} requests",
        backend.requests()
    );
    if std::env::var_os("NODEWAY_SOAK_DEBUG").is_some() {
        for p in [&client, &api] {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &p.netns, "ss", "-tanp"])
                .output()
                .unwrap();
            eprintln!("--- {} ---\n{}", p.name, String::from_utf8_lossy(&out.stdout));
        }
    }
    assert!(churned >= 2, "the churn pod was added and removed at least once");
    assert_eq!(served, requests, "every request got its 200");
    assert!(
        end.rss_kib * 10 <= start.rss_kib * 11,
        "RSS {} KiB at the end, {} KiB at the start (more than 10% above)",
        end.rss_kib,
        start.rss_kib
    );
    assert!(
        end.fds <= start.fds + FD_SLACK,
        "fds {} at the end, {} at the start",
        end.fds,
        start.fds
    );
    assert!(
        end.tasks <= start.tasks + TASK_SLACK,
        "alive tasks {} at the end, {} at the start",
        end.tasks,
        start.tasks
    );
}
