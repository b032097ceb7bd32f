//! `cargo xtask demo`: nodeway capturing pods on this machine, shown step by step and checked.
//!
//! Pods are network namespaces (the tests/ harness). Namespace `demo` (labelled
//! `istio.io/dataplane-mode: ambient`, so captured) holds `client`, `server-v1` and `server-v2`;
//! namespace `outside` (no label) holds `web`. One nodeway node. The demo shows, and checks:
//! (a) client -> server-v1 on TCP port 9000 (no route table: L4), both captured on this one node,
//! so handed over inside nodeway (the same-node path: no TLS, the identities and policy of mutual
//! TLS), on `/connections` and in `istio_tcp_*` with both principals while it is open, and in
//! `nodeway_same_node_connections_total`; (b) HTTP to the
//! service on port 8080, routed by the example's route table (`x-version: v2` to v2, the rest to
//! v1), counted in `istio_requests_total` and written to the access log; (c) `web` untouched: no
//! proxy on its side, its app sees the client's own address and bytes, its own connections are
//! proxied by no source proxy. A check that fails prints `FAILED: ...`; the demo then lists the
//! failures and exits non-zero.
//!
//! Its config file is the repository's example, `agent/examples/nodeway.yaml`, with the pods'
//! netns names and IPs replaced by the ones the demo made. Every namespace, process and kernel
//! object is removed at the end, also on failure or Ctrl-C.
mod checks;

use std::{
    fs,
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nodeway_tests::{
    eventually, exchange_on,
    http::{HttpBackend, HttpRequest},
    metric_value, Node, Pod, TestBed,
};
use serde_json::Value;

use crate::interrupt;
use checks::{Answer, Checks, HOST};

/// The port with the example's route table ("8080"): HTTP, routed.
const HTTP_PORT: u16 = 8080;
/// A port without a route table: L4.
const TCP_PORT: u16 = 9000;
/// The service address of `server.demo.svc.cluster.local` in the example.
const VIP: &str = "198.19.100.1";
/// Bound of waiting for something to show on the admin API or in the metrics.
const WAIT: Duration = Duration::from_secs(5);

/// The example config file, which the demo runs with.
const EXAMPLE: &str = include_str!("../../agent/examples/nodeway.yaml");

/// The demo's pods.
struct Pods {
    client: Pod,
    v1: Pod,
    v2: Pod,
    web: Pod,
}

/// The example with each pod's placeholder netns name and IP (`nwdemo-<pod>`, the `ips:` of the
/// example) replaced by the real ones.
fn example_config(example: &str, pods: &[(&Pod, &str)]) -> Result<String> {
    let mut yaml = example.to_string();
    for (pod, placeholder_ip) in pods {
        let netns = format!("netns: nwdemo-{}\n", pod.name);
        if !yaml.contains(&netns) || !yaml.contains(placeholder_ip) || !yaml.contains(VIP) {
            bail!(
                "agent/examples/nodeway.yaml no longer has pod {} at {netns} / {placeholder_ip}, or service {VIP}",
                pod.name
            );
        }
        yaml = yaml
            .replace(&netns, &format!("netns: {}\n", pod.netns))
            .replace(placeholder_ip, &pod.ip.to_string());
    }
    Ok(yaml)
}

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

pub fn run(nodeway: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo needs root: it makes network namespaces and loads eBPF programs (try `sudo -E cargo xtask demo`)"
        );
    }
    std::env::set_var("NODEWAY_BIN", nodeway);
    let mut checks = Checks::default();
    show(&mut checks, EXAMPLE)?;
    checks.verdict()
}

/// Everything the demo shows, run with config file `example`; `Err` only when it cannot go on
/// (setting up, Ctrl-C).
fn show(c: &mut Checks, example: &str) -> Result<()> {
    step("pods: `client`, `server-v1`, `server-v2` in namespace `demo` (istio.io/dataplane-mode: ambient); `web` in `outside` (not captured)");
    let mut bed = TestBed::new("demo")?;
    let p = Pods {
        client: bed.add_pod("client", "demo")?,
        v1: bed.add_pod("server-v1", "demo")?,
        v2: bed.add_pod("server-v2", "demo")?,
        web: bed.add_pod("web", "outside")?,
    };
    for pod in [&p.client, &p.v1, &p.v2, &p.web] {
        println!(
            "  {:<9} {:<8} {:<15} netns {}",
            pod.name, pod.namespace, pod.ip, pod.netns
        );
    }
    let config = bed.dir().join("node.yaml");
    let yaml = example_config(
        example,
        &[
            (&p.client, "198.18.100.11"),
            (&p.v1, "198.18.100.12"),
            (&p.v2, "198.18.100.13"),
            (&p.web, "198.18.100.14"),
        ],
    )?;
    fs::write(&config, &yaml).with_context(|| format!("writing {}", config.display()))?;
    step(&format!(
        "nodeway run --config {} --access-log true (agent/examples/nodeway.yaml with this run's netns names and IPs):",
        config.display()
    ));
    print!("{yaml}");
    let node = Node::start(&bed, "node", &config, &["--access-log", "true"])?;
    interrupt::check()?;

    step("GET /captured?format=table  (what `nodeway inspect captured` prints)");
    println!("{}", node.get("/captured?format=table"));
    step("the L7 config from the file: `nodeway inspect routes`, `clusters`, `endpoints`");
    for what in ["/routes", "/clusters", "/endpoints"] {
        println!("{}", node.get(&format!("{what}?format=table")));
    }

    let _tcp_apps = [p.v1.echo_server(TCP_PORT)?, p.v2.echo_server(TCP_PORT)?];
    let _http_apps = [
        HttpBackend::start(&p.v1, HTTP_PORT, "server-v1")?,
        HttpBackend::start(&p.v2, HTTP_PORT, "server-v2")?,
    ];
    l4_mtls(c, &node, &p)?;
    interrupt::check()?;
    http_routing(c, &node, &p)?;
    interrupt::check()?;
    uncaptured(c, &node, &p)?;

    step("GET /certs?format=table  (one certificate per workload identity on this node)");
    println!("{}", node.get("/certs?format=table"));
    step(&format!(
        "istio_tcp_* and istio_requests_total on {}/stats/prometheus",
        node.stats
    ));
    print_metrics(&node.metrics(), &["istio_tcp_", "istio_requests_total"], &[]);

    step("stopping nodeway and removing the pods (nothing stays in the kernel)");
    drop(node);
    drop(bed);
    Ok(())
}

/// (a) client -> server-v1 on a TCP port: the same-node hand-over with mutual-TLS identities,
/// seen while open and after.
fn l4_mtls(c: &mut Checks, node: &Node, p: &Pods) -> Result<()> {
    let server = p.v1.addr(TCP_PORT);
    step(&format!(
        "(a) client -> server-v1 {server} (port {TCP_PORT}: no route table, so L4; captured on both ends on this node: handed over inside nodeway, mutual-TLS identities, no TLS needed); the connection stays open"
    ));
    let Some(open) = connected(c, "client connects to server-v1", p.client.connect(server)?) else {
        return Ok(());
    };
    let conns = settle(node, |cs| {
        checks::half(cs, "outbound", server).is_some() && checks::half(cs, "inbound", server).is_some()
    });
    step("GET /connections?format=table  (while it is open)");
    println!("{}", node.get("/connections?format=table"));
    let metrics = node.metrics();
    println!("  istio_tcp_connections_opened_total (mutual_tls), while it is open:");
    print_metrics(
        &metrics,
        &["istio_tcp_connections_opened_total"],
        &[("connection_security_policy", "mutual_tls")],
    );
    checks::l4_open(c, &conns, &metrics, p.client.ip.into(), server);

    let sent = b"hello from the client";
    let back = exchange_on(open, sent).unwrap_or_else(|e| format!("(failed: {e})").into_bytes());
    println!("  echo came back: {:?}", String::from_utf8_lossy(&back));
    let closed = checks::mtls_labels("source");
    eventually(WAIT, || {
        metric_value(&node.metrics(), "istio_tcp_connections_closed_total", &closed) >= 1.0
    });
    checks::l4_closed(c, sent, &back, &node.metrics());
    Ok(())
}

/// (b) HTTP to the service, routed by the route table "8080" by header to v2, else to v1.
fn http_routing(c: &mut Checks, node: &Node, p: &Pods) -> Result<()> {
    step(&format!(
        "(b) client -> http://{HOST}:{HTTP_PORT} (service address {VIP}): routed by the route table \"{HTTP_PORT}\""
    ));
    let vip = SocketAddr::new(VIP.parse()?, HTTP_PORT);
    let sends: [(Option<&str>, &'static str); 3] = [
        (Some("v2"), "server-v2"),
        (None, "server-v1"),
        (Some("v3"), "server-v1"),
    ];
    let mut answers = Vec::new();
    for (version, expected) in sends {
        let mut req = HttpRequest::get("/hello").authority(format!("{HOST}:{HTTP_PORT}"));
        let mut request = "GET /hello".to_string();
        if let Some(v) = version {
            req = req.header("x-version", v);
            request += &format!("  x-version: {v}");
        }
        let answer = match p.client.http_request(vip, req) {
            Ok(r) => Answer {
                status: Some(r.status),
                backend: r.backend().map(str::to_string),
                request,
                expected,
            },
            Err(e) => {
                println!("  {request}: {e:#}");
                Answer {
                    status: None,
                    backend: None,
                    request,
                    expected,
                }
            }
        };
        println!(
            "  {:<28} -> {} from {}",
            answer.request,
            answer.status.map_or("no answer".to_string(), |s| s.to_string()),
            answer.backend.as_deref().unwrap_or("-")
        );
        answers.push(answer);
    }
    checks::http_answers(c, &answers);
    http_observed(c, node)
}

/// (b) What nodeway reported about the routed requests: metrics and access log.
fn http_observed(c: &mut Checks, node: &Node) -> Result<()> {
    let (v1, v2) = (2, 1);
    eventually(WAIT, || {
        let m = node.metrics();
        let count = |w| metric_value(&m, "istio_requests_total", &checks::request_labels(w));
        count("server-v1") >= v1 as f64 && count("server-v2") >= v2 as f64
    });
    step(&format!("istio_requests_total on {}/stats/prometheus", node.stats));
    let metrics = node.metrics();
    print_metrics(&metrics, &["istio_requests_total"], &[("response_code", "200")]);
    checks::http_metrics(c, &metrics, v1, v2);

    step("the access log: nodeway's stdout (--access-log true), one JSON line per request");
    eventually(WAIT, || {
        checks::access_log_lines(&node.log_text(), "v2-by-header").len() >= v2
            && checks::access_log_lines(&node.log_text(), "default").len() >= v1
    });
    let log = node.log_text();
    for line in checks::access_log_lines(&log, "v2-by-header") {
        println!("  {line}");
    }
    checks::http_access_log(c, &log, v1, v2);
    Ok(())
}

/// (c) `web` is not captured: nothing proxies its side of a connection.
fn uncaptured(c: &mut Checks, node: &Node, p: &Pods) -> Result<()> {
    step("(c) web (namespace `outside`, not labelled) is not captured");
    checks::captured(c, &node.json("/captured"));
    let _witness = Witness::start(&p.web, TCP_PORT)?;
    let web = p.web.addr(TCP_PORT);
    step(&format!(
        "client -> web {web}: the client's proxy sends plain TCP (web has no proxy); web's app answers with what it saw"
    ));
    if let Some(open) = connected(c, "client connects to web", p.client.connect(web)?) {
        let conns = settle(node, |cs| checks::half(cs, "outbound", web).is_some());
        println!("{}", node.get("/connections?format=table"));
        checks::to_uncaptured_open(c, &conns, web);
        let sent = b"hello web";
        let back = exchange_on(open, sent).unwrap_or_default();
        let seen = witnessed(&back);
        match &seen {
            Some((peer, bytes)) => println!(
                "  web's app saw a connection from {peer} carrying {:?}",
                String::from_utf8_lossy(bytes)
            ),
            None => println!("  web's app answered {:?}", String::from_utf8_lossy(&back)),
        }
        checks::uncaptured_saw(c, seen, p.client.ip.into(), sent);
    }

    let server = p.v1.addr(TCP_PORT);
    step(&format!(
        "web -> server-v1 {server}: web's traffic leaves unproxied; server-v1's proxy accepts it (PERMISSIVE, labelled `none`)"
    ));
    let web_ip: IpAddr = p.web.ip.into();
    let Some(open) = connected(c, "web connects to server-v1", p.web.connect(server)?) else {
        return Ok(());
    };
    let conns = settle(node, |cs| {
        cs.iter().any(|x| {
            x["direction"] == "inbound"
                && x["source"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{web_ip}:")))
        })
    });
    println!("{}", node.get("/connections?format=table"));
    checks::from_uncaptured_open(c, &conns, &node.metrics(), web_ip, server);
    let sent = b"hello server";
    let back = exchange_on(open, sent).unwrap_or_default();
    println!("  echo came back: {:?}", String::from_utf8_lossy(&back));
    c.expect(back == sent, "web's echo came back from server-v1", || {
        format!("{:?}", String::from_utf8_lossy(&back))
    });
    Ok(())
}

/// The stream, or a failed check naming what could not connect.
fn connected(c: &mut Checks, what: &str, result: io::Result<TcpStream>) -> Option<TcpStream> {
    match result {
        Ok(s) => Some(s),
        Err(e) => {
            c.expect(false, what, || e.to_string());
            None
        }
    }
}

/// `/connections` once `done` holds for it, or as it is after [`WAIT`].
fn settle(node: &Node, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    eventually(WAIT, || done(&node.connections()));
    node.connections()
}

/// A TCP server in a pod that answers each connection with the address it came from, a newline
/// and the bytes it got: what an app with no proxy in front of it sees. Stops when dropped.
struct Witness {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Witness {
    fn start(pod: &Pod, port: u16) -> Result<Self> {
        let listener = pod.run(move || TcpListener::bind(("0.0.0.0", port)))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let _ = answer_witnessed(conn, peer);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Witness {
            stop,
            handle: Some(handle),
        })
    }
}

fn answer_witnessed(mut conn: TcpStream, peer: SocketAddr) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(WAIT))?;
    let mut got = Vec::new();
    conn.read_to_end(&mut got)?;
    conn.write_all(format!("{}\n", peer.ip()).as_bytes())?;
    conn.write_all(&got)?;
    conn.shutdown(Shutdown::Write)
}

/// The peer address and bytes a [`Witness`] reported.
fn witnessed(answer: &[u8]) -> Option<(IpAddr, Vec<u8>)> {
    let nl = answer.iter().position(|b| *b == b'\n')?;
    let peer = std::str::from_utf8(&answer[..nl]).ok()?.parse().ok()?;
    Some((peer, answer[nl + 1..].to_vec()))
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Prints the samples whose name starts with one of `prefixes` and that carry every label of
/// `with`, shortened to the labels a reader looks at first.
fn print_metrics(metrics: &str, prefixes: &[&str], with: &[(&str, &str)]) {
    let mut out = io::stdout().lock();
    for line in metrics.lines().filter(|l| {
        prefixes.iter().any(|p| l.starts_with(p)) && with.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
    }) {
        let _ = writeln!(out, "  {}", shorten(line));
    }
}

/// Keeps the labels a reader looks at first.
fn shorten(line: &str) -> String {
    let Some((series, value)) = line.rsplit_once(' ') else {
        return line.to_string();
    };
    let Some((name, labels)) = series.split_once('{') else {
        return line.to_string();
    };
    let keep = [
        "reporter",
        "source_workload",
        "destination_workload",
        "destination_service",
        "source_principal",
        "destination_principal",
        "connection_security_policy",
        "response_code",
    ];
    let kept: Vec<&str> = labels
        .trim_end_matches('}')
        .split("\",")
        .filter(|kv| keep.iter().any(|k| kv.starts_with(&format!("{k}="))))
        .collect();
    let mut s = kept.join("\",");
    if !s.ends_with('"') {
        s.push('"');
    }
    format!("{name}{{{s}}} {value}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo for real: pods, a nodeway node, traffic, every check. Needs root (skips without,
    /// fails under CI=true), like the other end-to-end tests.
    #[test]
    fn the_demo_runs_and_every_check_passes() {
        if !nodeway_tests::require_root() {
            return;
        }
        run(&nodeway_tests::nodeway_bin()).expect("every demo check passes");
    }

    /// With the header route of the example broken (it matches `x-version: v9`), the demo's
    /// routing checks fail, each by name, and only they.
    #[test]
    fn a_broken_route_table_fails_the_routing_checks() {
        if !nodeway_tests::require_root() {
            return;
        }
        let broken = EXAMPLE.replace("stringMatch: {exact: v2}", "stringMatch: {exact: v9}");
        assert_ne!(broken, EXAMPLE);
        let mut c = Checks::default();
        show(&mut c, &broken).expect("the demo runs to the end");
        let failed = c.failed();
        assert_eq!(
            failed[0],
            "GET /hello  x-version: v2 -> 200 from server-v2 (got Some(200) from Some(\"server-v1\"))"
        );
        assert_eq!(failed.len(), 5, "{failed:#?}");
        assert!(failed[1].starts_with("istio_requests_total") && failed[1].ends_with("server-v1\"} 2 (got 3)"));
        assert!(failed[2].starts_with("istio_requests_total") && failed[2].ends_with("server-v2\"} 1 (got 0)"));
        assert!(failed[3].starts_with("access log") && failed[3].contains("\"default\""));
        assert!(failed[4].starts_with("access log") && failed[4].contains("\"v2-by-header\""));
        assert!(c.verdict().is_err());
    }

    #[test]
    fn a_witness_answer_parses() {
        assert_eq!(
            witnessed(b"198.18.3.2\nhello web"),
            Some(("198.18.3.2".parse().expect("ip"), b"hello web".to_vec()))
        );
        assert_eq!(witnessed(b"\x16\x03\x01 TLS"), None);
    }

    #[test]
    fn the_example_has_every_pod_of_the_demo() {
        let pod = |name: &str, ip: &str| Pod {
            name: name.into(),
            namespace: "demo".into(),
            netns: format!("nwt1-0-{name}"),
            ip: ip.parse().expect("ip"),
        };
        let (client, v1, v2, web) = (
            pod("client", "198.18.100.2"),
            pod("server-v1", "198.18.100.3"),
            pod("server-v2", "198.18.100.4"),
            pod("web", "198.18.100.5"),
        );
        let yaml = example_config(
            EXAMPLE,
            &[
                (&client, "198.18.100.11"),
                (&v1, "198.18.100.12"),
                (&v2, "198.18.100.13"),
                (&web, "198.18.100.14"),
            ],
        )
        .expect("placeholders present");
        for placeholder in [
            "netns: nwdemo-",
            "198.18.100.11",
            "198.18.100.12",
            "198.18.100.13",
            "198.18.100.14",
        ] {
            assert!(!yaml.contains(placeholder), "{placeholder} left in:\n{yaml}");
        }
        assert!(yaml.contains("netns: nwt1-0-server-v2\n") && yaml.contains("address: 198.18.100.4,"));
    }
}
