//! Port 0 for the admin, stats and readiness listeners: nodeway reports what it bound (a line on
//! stdout, `addresses.json` in `--run-dir`), so agents side by side never race for ports.
use std::{collections::HashSet, fs, net::SocketAddr};

use nodeway_tests::{config_yaml, http_get, require_root, Node, TestBed};

fn report(node: &Node) -> serde_json::Value {
    let text = fs::read_to_string(node.run_dir.join("addresses.json")).expect("addresses.json");
    serde_json::from_str(&text).expect("JSON")
}

fn addr(v: &serde_json::Value) -> SocketAddr {
    v.as_str().and_then(|s| s.parse().ok()).expect("an address")
}

/// The report matches the process, the stdout line and what answers on those addresses.
fn check_reported(node: &Node) {
    let r = report(node);
    assert_eq!(r["pid"].as_u64(), node.pid().map(u64::from), "{r}");
    assert_eq!(
        (addr(&r["admin"]), addr(&r["stats"]), addr(&r["readiness"])),
        (node.admin, node.stats, node.readiness)
    );
    let line = format!(
        "nodeway: listening admin={} stats={} readiness={}",
        node.admin, node.stats, node.readiness
    );
    assert!(
        node.log_text().lines().any(|l| l == line),
        "no `{line}` in:\n{}",
        node.log_text()
    );
    assert_eq!(
        http_get(node.readiness, "/healthz/ready").expect("readiness answers").0,
        200
    );
    assert!(node.json("/captured")["pods"].is_array());
    assert!(
        node.metrics().contains("nodeway_"),
        "metrics on the reported stats address"
    );
}

#[test]
fn two_agents_on_port_zero_come_up_on_distinct_reported_addresses() {
    if !require_root() {
        return;
    }
    let bed = TestBed::new("port0").unwrap();
    let cfg = bed.dir().join("node.yaml");
    fs::write(&cfg, config_yaml("node-a", &[], &[])).unwrap();
    let mut a = Node::start(&bed, "a", &cfg, &["--ca", "none"]).unwrap();
    let b = Node::start(&bed, "b", &cfg, &["--ca", "none"]).unwrap();
    check_reported(&a);
    check_reported(&b);
    let all: HashSet<SocketAddr> = [a.admin, a.stats, a.readiness, b.admin, b.stats, b.readiness].into();
    assert_eq!(all.len(), 6, "{all:?}");
    assert!(all.iter().all(|s| s.port() != 0), "{all:?}");

    // A restarted agent reports again (its new ports, its new PID).
    let old_pid = a.pid();
    a.restart().unwrap();
    assert_ne!(a.pid(), old_pid);
    check_reported(&a);

    // A clean exit takes the report away; the other agent's stays.
    assert_eq!(a.stop(), Some(0));
    assert!(!a.run_dir.join("addresses.json").exists());
    check_reported(&b);
}
