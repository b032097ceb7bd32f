//! `cargo xtask demo`: nodeway capturing pods on this machine, shown step by step.
//!
//! Pods are network namespaces (the tests/ harness). Namespace `demo` (labelled
//! `istio.io/dataplane-mode: ambient`, so captured) holds `client` and `server`; namespace
//! `outside` (no label) holds `web`. One nodeway node. The client talks to the server (captured
//! on both ends, so mutual TLS over HBONE) and to `web` (captured on the client's end only); the
//! demo prints what `/captured`, `/connections`, `/certs` and the `istio_tcp_*` metrics show.
//!
//! Its config file is the repository's example, `agent/examples/nodeway.yaml` (pods, a service,
//! a route table with two routes, subset clusters and their endpoints), with the pods' netns names
//! and IPs replaced by the ones the demo made; the demo shows the L7 config nodeway loaded from it.
//! Every namespace, process and kernel object is removed at the end, also on failure or Ctrl-C.
use std::{fs, io::Write, path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use nodeway_tests::{exchange_on, Node, Pod, TestBed};

use crate::interrupt;

const PORT: u16 = 8080;

/// The example config file, which the demo runs with.
const EXAMPLE: &str = include_str!("../../agent/examples/nodeway.yaml");

/// The example with each pod's placeholder netns name and IP (`nwdemo-<pod>`, the `ips:` of the
/// example) replaced by the real ones.
fn example_config(pods: &[(&Pod, &str)]) -> Result<String> {
    let mut yaml = EXAMPLE.to_string();
    for (pod, placeholder_ip) in pods {
        let netns = format!("nwdemo-{}", pod.name);
        if !yaml.contains(&netns) || !yaml.contains(placeholder_ip) {
            bail!(
                "agent/examples/nodeway.yaml no longer has pod {} at {netns} / {placeholder_ip}",
                pod.name
            );
        }
        yaml = yaml
            .replace(&netns, &pod.netns)
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
    step("pods: `client` and `server` in namespace `demo` (istio.io/dataplane-mode: ambient); `web` in `outside` (not captured)");
    let mut bed = TestBed::new("demo")?;
    let client = bed.add_pod("client", "demo")?;
    let server = bed.add_pod("server", "demo")?;
    let web = bed.add_pod("web", "outside")?;
    for p in [&client, &server, &web] {
        println!("  {:<7} {:<8} {:<15} netns {}", p.name, p.namespace, p.ip, p.netns);
    }
    let config = bed.dir().join("node.yaml");
    let yaml = example_config(&[
        (&client, "198.18.100.11"),
        (&server, "198.18.100.12"),
        (&web, "198.18.100.13"),
    ])?;
    fs::write(&config, &yaml).with_context(|| format!("writing {}", config.display()))?;
    step(&format!(
        "nodeway run --config {} (agent/examples/nodeway.yaml with this run's netns names and IPs):",
        config.display()
    ));
    print!("{yaml}");
    let node = Node::start(&bed, "node", &config, &[])?;
    interrupt::check()?;

    step("GET /captured?format=table  (what `nodeway inspect captured` prints)");
    println!("{}", node.get("/captured?format=table"));

    step("the L7 config from the file: `nodeway inspect routes`, `clusters`, `endpoints`");
    for what in ["/routes", "/clusters", "/endpoints"] {
        println!("{}", node.get(&format!("{what}?format=table")));
    }

    let _server_app = server.echo_server(PORT)?;
    let _web_app = web.echo_server(PORT)?;
    step(&format!(
        "client -> server {}:{PORT} (captured on both ends: HBONE, mutual TLS); the connection stays open",
        server.ip
    ));
    let open = client.connect(server.addr(PORT))?.context("client -> server")?;
    std::thread::sleep(Duration::from_millis(200));
    step("GET /connections?format=table  (while it is open)");
    println!("{}", node.get("/connections?format=table"));
    let back = exchange_on(open, b"hello from the client")?;
    println!("  echo came back: {:?}", String::from_utf8_lossy(&back));

    step(&format!(
        "client -> web {}:{PORT} (web is not captured: plain TCP from the client's proxy)",
        web.ip
    ));
    let back = client
        .exchange(web.addr(PORT), b"hello web")?
        .context("client -> web")?;
    println!("  echo came back: {:?}", String::from_utf8_lossy(&back));

    step("web -> server: inbound to a captured pod from outside the mesh (PERMISSIVE: accepted, labelled `none`)");
    let back = web
        .exchange(server.addr(PORT), b"hello server")?
        .context("web -> server")?;
    println!("  echo came back: {:?}", String::from_utf8_lossy(&back));
    std::thread::sleep(Duration::from_millis(300));

    step("GET /certs?format=table  (one certificate per workload identity on this node)");
    println!("{}", node.get("/certs?format=table"));

    step("istio_tcp_* on :15020/stats/prometheus");
    let metrics = node.metrics();
    let mut out = std::io::stdout().lock();
    for line in metrics.lines().filter(|l| l.starts_with("istio_tcp_")) {
        writeln!(out, "  {}", shorten(line))?;
    }
    drop(out);

    step("stopping nodeway and removing the pods (nothing stays in the kernel)");
    drop(node);
    drop(bed);
    println!("done");
    Ok(())
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
        "source_principal",
        "destination_principal",
        "connection_security_policy",
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
