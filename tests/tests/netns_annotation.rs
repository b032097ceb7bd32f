//! The `nodeway.io/netns` annotation is a tenant's input: whoever may create a pod writes it.
//! Against the real API server (and istiod, which the agent needs to be ready), pods whose
//! process nodeway cannot find point it at the node's own network namespace or at a neighbour's;
//! neither is captured, `/captured` says why, and the neighbour keeps its capture and identity.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use nodeway_tests::{
    control_plane::{require_control_plane, Mesh},
    eventually, exchange_on, metric_value, require_root, Node,
};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(30);

fn reason(node: &Node, name: &str) -> Option<(bool, String)> {
    let p = node.captured_pod(name)?;
    Some((
        p["captured"] == true,
        p["reason"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[test]
fn a_tenants_netns_annotation_cannot_capture_the_host_or_a_neighbour() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let mut m = Mesh::new("netns-annotation").unwrap();
    m.namespace("demo", true).unwrap();
    m.service_account("demo", "default").unwrap();
    let victim = m.pod("node-a", "victim", "demo", "default").unwrap();
    let server = m.pod("node-a", "server", "demo", "default").unwrap();
    let _echo = server.pod.echo_server(PORT).unwrap();
    let victim_ns = format!("/var/run/netns/{}", victim.pod.netns);
    let _host = m
        .pod_with_netns_annotation("node-a", "to-host", "demo", "default", Some("/proc/self/ns/net"))
        .unwrap();
    let _thief = m
        .pod_with_netns_annotation("node-a", "thief", "demo", "default", Some(&victim_ns))
        .unwrap();
    // A CNI's annotation naming the pod's own namespace still works.
    let honest = m
        .pod_with_netns_annotation("node-a", "honest", "demo", "default", None)
        .unwrap();
    let a = m.node("a", "node-a").unwrap();

    // The victim's outbound is served once its sidecar class's config is in force (`l7Synced`).
    let settled = || {
        reason(&a, "victim").is_some_and(|(c, _)| c)
            && a.captured_pod("victim").is_some_and(|p| p["l7Synced"] != false)
            && reason(&a, "server").is_some_and(|(c, _)| c)
            && reason(&a, "honest").is_some_and(|(c, _)| c)
            && reason(&a, "to-host").is_some()
            && reason(&a, "thief").is_some()
    };
    assert!(eventually(WAIT, settled), "{}", a.get("/captured"));
    let (captured, why) = reason(&a, "to-host").unwrap();
    assert!(
        !captured,
        "the host's namespace was captured as a pod: {}",
        a.get("/captured")
    );
    assert!(why.contains("node's own network namespace"), "{why}");
    let (captured, why) = reason(&a, "thief").unwrap();
    assert!(
        !captured,
        "a neighbour's namespace was captured: {}",
        a.get("/captured")
    );
    assert!(why.contains("does not hold the pod's address"), "{why}");
    let shown = a.captured_pod("honest").unwrap();
    assert!(
        shown["netns"].as_str().unwrap_or_default().ends_with(&honest.pod.netns),
        "{shown}"
    );

    // The neighbour's traffic still goes through the proxy, as itself.
    let s = victim.pod.connect(server.pod.addr(PORT)).unwrap().unwrap();
    assert!(
        s.local_addr().unwrap().ip().is_loopback(),
        "the victim's connect was proxied"
    );
    assert_eq!(exchange_on(s, b"ping").unwrap(), b"ping");
    let opened = || {
        metric_value(
            &a.metrics(),
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("source_workload", "victim"),
                ("destination_workload", "server"),
            ],
        )
    };
    assert!(eventually(WAIT, || opened() == 1.0), "{}", a.metrics());
}
