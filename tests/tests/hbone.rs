//! End to end: mutual TLS (HBONE) between pods on two nodeway nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fs, time::Duration};

use nodeway_tests::{config_yaml, eventually, metric_value, require_root, tcp_bytes, Node, Pod, PodEntry, TestBed};

const PORT: u16 = 8080;

/// Node a runs `client`, node b runs `server` (service account `api`); both know both.
fn two_nodes(bed: &mut TestBed, server_sa_seen_by_a: &str) -> (Pod, Pod, Node, Node) {
    two_nodes_with(bed, server_sa_seen_by_a, &[])
}

fn two_nodes_with(bed: &mut TestBed, server_sa_seen_by_a: &str, a_args: &[&str]) -> (Pod, Pod, Node, Node) {
    two_nodes_args(bed, server_sa_seen_by_a, a_args, &[])
}

fn two_nodes_args(
    bed: &mut TestBed,
    server_sa_seen_by_a: &str,
    a_args: &[&str],
    b_args: &[&str],
) -> (Pod, Pod, Node, Node) {
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let (ca, cb) = (bed.dir().join("a.yaml"), bed.dir().join("b.yaml"));
    let entry = |p, node, sa| PodEntry {
        node,
        service_account: sa,
        ..PodEntry::from(p)
    };
    fs::write(
        &ca,
        config_yaml(
            "node-a",
            &["demo"],
            &[
                entry(&client, None, None),
                entry(&server, Some("node-b"), Some(server_sa_seen_by_a)),
            ],
        ),
    )
    .unwrap();
    fs::write(
        &cb,
        config_yaml(
            "node-b",
            &["demo"],
            &[entry(&client, Some("node-a"), None), entry(&server, None, Some("api"))],
        ),
    )
    .unwrap();
    let a = Node::start(bed, "a", &ca, a_args).unwrap();
    let b = Node::start(bed, "b", &cb, b_args).unwrap();
    // Ready means captured; each pod's certificate is issued right after (a busy machine makes
    // that visible: until then the server has no certificate and refuses the handshake).
    for n in [&a, &b] {
        let issued = || {
            n.json("/certs")["certificates"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
        };
        assert!(eventually(Duration::from_secs(10), issued), "{}", n.get("/certs"));
    }
    (client, server, a, b)
}

#[test]
fn pods_on_two_nodes_talk_mutual_tls_with_their_own_identities() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("hbone").unwrap();
    let (client, server, a, b) = two_nodes_with(&mut bed, "api", &["--hbone-idle-timeout", "1"]);
    let _s = server.echo_server(PORT).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    for _ in 0..3 {
        assert_eq!(client.exchange(server.addr(PORT), &data).unwrap().unwrap(), data);
    }
    let src_id = "spiffe://cluster.local/ns/demo/sa/default";
    let dst_id = "spiffe://cluster.local/ns/demo/sa/api";
    let labels = [
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("source_principal", src_id),
        ("destination_principal", dst_id),
        ("connection_security_policy", "mutual_tls"),
    ];
    let closed = |n: &Node, reporter| {
        let mut l = labels.to_vec();
        l.push(("reporter", reporter));
        metric_value(&n.metrics(), "istio_tcp_connections_closed_total", &l)
    };
    assert!(eventually(Duration::from_secs(5), || closed(&a, "source") == 3.0
        && closed(&b, "destination") == 3.0));
    let mb = b.metrics();
    let l = [("reporter", "destination"), ("source_principal", src_id)];
    let moved = 3.0 * data.len() as f64;
    assert_eq!(tcp_bytes(&mb, &l), (moved, moved), "{mb}");

    // One pooled HTTP/2 connection carried the three tunnels: node b saw one SYN on 15008.
    let hbone_syns = || b.json("/captured")["stats"]["inbound_redirected"].as_u64().unwrap();
    assert_eq!(hbone_syns(), 1);
    // Idle for longer than --hbone-idle-timeout: closed; the next tunnel dials anew.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(client.exchange(server.addr(PORT), b"again").unwrap().unwrap(), b"again");
    assert_eq!(hbone_syns(), 2);

    // Each node holds exactly the certificates of its own pods, fetched at capture.
    let certs = |n: &Node| -> Vec<String> {
        n.json("/certs")["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["identity"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(certs(&a), [src_id]);
    assert_eq!(certs(&b), [dst_id]);
    let table = b.get("/certs?format=table");
    assert!(
        table.starts_with("IDENTITY") && table.contains(dst_id) && table.contains("nodeway dev CA"),
        "{table}"
    );
}

/// What the server's app saw as the connection's source, as `ip`.
fn seen_from(client: &Pod, to: std::net::SocketAddr) -> String {
    let got = client.exchange(to, b"").unwrap().unwrap();
    let peer: std::net::SocketAddr = String::from_utf8(got).unwrap().parse().unwrap();
    peer.ip().to_string()
}

#[test]
fn the_app_sees_the_clients_address_not_its_own() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("hbonesrc").unwrap();
    let (client, server, _a, b) = two_nodes(&mut bed, "api");
    let _s = server.peer_server(PORT).unwrap();
    // The app's replies go back to the proxy by the pod's mark rule, not out of the pod.
    // Over HBONE from node a: the client pod's address, as with ztunnel and sidecars.
    assert_eq!(
        seen_from(&client, server.addr(PORT)),
        client.ip.to_string(),
        "{}",
        b.log_text()
    );
    // Plaintext from a pod outside the mesh (PERMISSIVE): that pod's address.
    let web = bed.add_pod("web", "other").unwrap();
    assert_eq!(
        seen_from(&web, server.addr(PORT)),
        web.ip.to_string(),
        "{}",
        b.log_text()
    );
    let l = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let closed = || metric_value(&b.metrics(), "istio_tcp_connections_closed_total", &l);
    assert!(
        eventually(Duration::from_secs(5), || closed() == 1.0),
        "{}",
        b.metrics()
    );
}

#[test]
fn wrong_server_identity_is_refused() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("idmismatch").unwrap();
    // Node a expects the server to be `payments`; node b serves it as `api`.
    let (client, server, a, _b) = two_nodes(&mut bed, "payments");
    let _s = server.echo_server(PORT).unwrap();
    let r = client.exchange(server.addr(PORT), b"secret").unwrap();
    assert!(
        r.map(|v| v.is_empty()).unwrap_or(true),
        "no bytes may reach a server with the wrong identity"
    );
    assert!(
        eventually(Duration::from_secs(3), || a.log_text().contains(
            "is not the destination's expected spiffe://cluster.local/ns/demo/sa/payments"
        )),
        "{}",
        a.log_text()
    );
    assert_eq!(
        metric_value(
            &a.metrics(),
            "istio_tcp_connections_opened_total",
            &[("reporter", "source")]
        ),
        0.0
    );
    let failed = [("pod", "demo/client"), ("reason", "hbone")];
    assert_eq!(
        metric_value(&a.metrics(), "nodeway_outbound_failed_total", &failed),
        1.0
    );
}

#[test]
fn plaintext_on_the_hbone_port_is_refused() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("garbage").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let outsider = bed.add_pod("outsider", "plain").unwrap();
    let cfg = bed.dir().join("n.yaml");
    fs::write(
        &cfg,
        config_yaml("node-a", &["demo"], &[(&server).into(), (&outsider).into()]),
    )
    .unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let app = server.echo_server(PORT).unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let r = outsider.exchange(server.addr(15008), request).unwrap();
    // At most a TLS alert comes back; nothing reaches the application.
    assert!(r.map(|v| v != request).unwrap_or(true));
    assert_eq!(app.accepted(), 0);
    assert!(
        eventually(Duration::from_secs(3), || node
            .log_text()
            .contains("HBONE TLS handshake refused")),
        "{}",
        node.log_text()
    );
    let log = node.log_text();
    assert!(log.contains(&outsider.ip.to_string()), "the log names the peer: {log}");
    // The node still serves.
    assert_eq!(outsider.exchange(server.addr(PORT), b"ok").unwrap().unwrap(), b"ok");
    assert_eq!(app.accepted(), 1);
}

#[test]
fn strict_mode_refuses_plaintext_and_permissive_labels_it() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("strict").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let strict = bed.add_pod("strict", "demo").unwrap();
    let permissive = bed.add_pod("permissive", "demo").unwrap();
    let outsider = bed.add_pod("outsider", "plain").unwrap();
    let cfg = bed.dir().join("n.yaml");
    let pods = [
        (&client).into(),
        PodEntry {
            mtls: Some("STRICT"),
            ..PodEntry::from(&strict)
        },
        (&permissive).into(),
        (&outsider).into(),
    ];
    fs::write(&cfg, config_yaml("node-a", &["demo"], &pods)).unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let strict_app = strict.echo_server(PORT).unwrap();
    let _p = permissive.echo_server(PORT).unwrap();

    let r = outsider.exchange(strict.addr(PORT), b"plain").unwrap();
    assert!(
        r.map(|v| v.is_empty()).unwrap_or(true),
        "plaintext must not reach a STRICT pod"
    );
    assert_eq!(strict_app.accepted(), 0);
    assert!(node.log_text().contains("mTLS mode STRICT"));
    // Over HBONE it is allowed.
    assert_eq!(client.exchange(strict.addr(PORT), b"mtls").unwrap().unwrap(), b"mtls");
    assert_eq!(strict_app.accepted(), 1);

    assert_eq!(
        outsider.exchange(permissive.addr(PORT), b"plain").unwrap().unwrap(),
        b"plain"
    );
    let labels = [
        ("reporter", "destination"),
        ("destination_workload", "permissive"),
        ("connection_security_policy", "none"),
    ];
    assert!(eventually(Duration::from_secs(5), || metric_value(
        &node.metrics(),
        "istio_tcp_connections_closed_total",
        &labels
    ) == 1.0));
}

/// The dev CA's root is renewed before it expires, by the nodes sharing its directory, and
/// HBONE between them works all along: every new connection (each makes its own handshake
/// here) succeeds before, during and after the rotation, and the old root ends up retired.
#[test]
fn hbone_keeps_working_across_a_root_rotation() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("rotate").unwrap();
    // A 60 s root and 10 s leaves: the next root is published at 40 s, signs from 50 s, and the
    // old one expires at 60 s.
    let args = [
        "--ca-root-lifetime",
        "60",
        "--cert-ttl",
        "10",
        "--hbone-idle-timeout",
        "1",
    ];
    let (client, server, a, _b) = two_nodes_args(&mut bed, "api", &args, &args);
    let _s = server.echo_server(PORT).unwrap();
    let root_file = bed.dir().join("ca").join("root-cert.pem");
    let first_root = fs::read_to_string(&root_file).unwrap();
    let start = std::time::Instant::now();
    let mut exchanges = 0;
    while start.elapsed() < Duration::from_secs(70) {
        let msg = format!("exchange {exchanges}");
        let got = client.exchange(server.addr(PORT), msg.as_bytes()).unwrap();
        assert_eq!(
            got.as_deref().ok(),
            Some(msg.as_bytes()),
            "{msg} after {:?}: {got:?}\n{}",
            start.elapsed(),
            a.get("/certs")
        );
        exchanges += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let root = fs::read_to_string(&root_file).unwrap();
    assert_ne!(root, first_root, "the root was renewed");
    let retired = fs::read_to_string(bed.dir().join("ca").join("retired-roots.pem")).unwrap_or_default();
    assert!(
        !retired.contains(first_root.trim()),
        "the old root is dropped once it has expired"
    );
    let m = a.metrics();
    let opened = metric_value(
        &m,
        "istio_tcp_connections_opened_total",
        &[("reporter", "source"), ("connection_security_policy", "mutual_tls")],
    );
    assert_eq!(opened, exchanges as f64, "{m}");
}
