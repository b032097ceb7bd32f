//! Per-pod budgets end to end: with `--max-connections-per-pod 1`, a pod's second connection is
//! refused in each direction (outbound: reset; inbound: refused), counted with reason
//! `connection_limit`, and passes again once the first one closes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    io::{Read, Write},
    time::Duration,
};

use nodeway_tests::{config_yaml, eventually, metric_value, require_root, Node, Pod, PodEntry, TestBed};

const PORT: u16 = 8080;

fn echoes(p: &Pod, to: std::net::SocketAddr) -> bool {
    p.exchange(to, b"hello").unwrap().ok().as_deref() == Some(&b"hello"[..])
}

#[test]
fn a_pods_connections_are_capped_in_each_direction() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("budgets").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let outsider = bed.add_pod("outsider", "plain").unwrap();
    let pods: [PodEntry<'_>; 3] = [(&server).into(), (&client).into(), (&outsider).into()];
    let cfg = bed.dir().join("n.yaml");
    std::fs::write(&cfg, config_yaml("node-a", &["demo"], &pods)).unwrap();
    let node = Node::start(&bed, "a", &cfg, &["--max-connections-per-pod", "1"]).unwrap();
    let _app = server.echo_server(PORT).unwrap();
    let to = server.addr(PORT);
    let count =
        |name: &str, pod: &str| metric_value(&node.metrics(), name, &[("pod", pod), ("reason", "connection_limit")]);

    // The client's one connection: its outbound slot and the server's inbound slot.
    let mut held = client.connect(to).unwrap().unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    held.write_all(b"a").unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"a");

    assert!(!echoes(&outsider, to), "the server's inbound slot is taken");
    assert_eq!(count("nodeway_inbound_refused_total", "demo/server"), 1.0);
    assert!(!echoes(&client, to), "the client's outbound slot is taken");
    assert_eq!(count("nodeway_outbound_failed_total", "demo/client"), 1.0);

    drop(held);
    assert!(
        eventually(Duration::from_secs(5), || echoes(&client, to)),
        "slots come back"
    );
    drop(bed);
}
