//! End to end: two captured pods of one node. Their connection is handed over inside nodeway
//! (`--same-node in-process`, the default): no TLS, no trip to the HBONE socket, but the same
//! identities, policy decision and metrics as HBONE. `--same-node hbone` keeps the tunnel.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use nodeway_tests::{
    config_yaml, eventually, exchange_on, http::HttpRequest, metric_value, require_root, tcp_bytes, Node, Pod,
    PodEntry, TestBed,
};

const PORT: u16 = 8080;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/api";

/// `client` (service account `client`) and `server` (`api`) captured on one node.
fn one_node(bed: &mut TestBed) -> (Pod, Pod, PathBuf, String) {
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let sa = |p, sa| PodEntry {
        service_account: Some(sa),
        ..PodEntry::from(p)
    };
    let base = config_yaml("node-a", &["demo"], &[sa(&client, "client"), sa(&server, "api")]);
    let cfg = bed.dir().join("n.yaml");
    fs::write(&cfg, &base).unwrap();
    (client, server, cfg, base)
}

fn start(bed: &TestBed, cfg: &Path, args: &[&str]) -> Node {
    let node = Node::start(bed, "a", cfg, args).unwrap();
    let issued = || {
        node.json("/certs")["certificates"]
            .as_array()
            .is_some_and(|c| c.len() == 2)
    };
    assert!(eventually(Duration::from_secs(10), issued), "{}", node.get("/certs"));
    node
}

/// `istio_tcp_connections_closed_total` with both principals and mutual TLS, as `reporter`.
fn closed_mtls(node: &Node, reporter: &str) -> f64 {
    let labels = [
        ("reporter", reporter),
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("source_principal", CLIENT_ID),
        ("destination_principal", SERVER_ID),
        ("connection_security_policy", "mutual_tls"),
    ];
    metric_value(&node.metrics(), "istio_tcp_connections_closed_total", &labels)
}

fn same_node_count(node: &Node) -> f64 {
    metric_value(&node.metrics(), "nodeway_same_node_connections_total", &[])
}

/// The server's namespace refuses the client's principal.
const DENY_CLIENT: &str = "policies:
- name: deny-client
  namespace: demo
  scope: NAMESPACE
  action: DENY
  rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/demo/sa/client}]}]}]}]
";

/// Connections `demo/server` refused by policy.
fn refused_by_policy(node: &Node) -> f64 {
    metric_value(
        &node.metrics(),
        "nodeway_inbound_refused_total",
        &[("pod", "demo/server"), ("reason", "authorization")],
    )
}

/// SYNs the capture steered to the pods' inbound and HBONE sockets.
fn steered(node: &Node) -> u64 {
    node.json("/captured")["stats"]["inbound_redirected"].as_u64().unwrap()
}

#[test]
fn same_node_pods_skip_tls_but_keep_identities_policy_and_metrics() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("samenode").unwrap();
    let (client, server, cfg, base) = one_node(&mut bed);
    let node = start(&bed, &cfg, &[]);
    let app = server.echo_server(PORT).unwrap();
    let to = server.addr(PORT);

    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 256) as u8).collect();
    for _ in 0..2 {
        assert_eq!(client.exchange(to, &data).unwrap().unwrap(), data);
    }
    assert_eq!(same_node_count(&node), 2.0, "{}", node.metrics());
    assert_eq!(
        steered(&node),
        0,
        "nothing went through the HBONE socket: {}",
        node.get("/captured")
    );
    assert!(
        eventually(Duration::from_secs(5), || closed_mtls(&node, "source") == 2.0
            && closed_mtls(&node, "destination") == 2.0),
        "{}",
        node.metrics()
    );
    let m = node.metrics();
    for reporter in ["source", "destination"] {
        let l = [("reporter", reporter), ("source_principal", CLIENT_ID)];
        let moved = 2.0 * data.len() as f64;
        assert_eq!(tcp_bytes(&m, &l), (moved, moved), "{reporter}: {m}");
    }

    // While open, the connection is in the table from both sides.
    let mut held = client.connect(to).unwrap().unwrap();
    held.write_all(b"ping").unwrap();
    let both = || {
        let dirs: Vec<String> = node
            .connections()
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["direction"].as_str().unwrap_or(""),
                    c["pod"].as_str().unwrap_or("")
                )
            })
            .collect();
        dirs.contains(&"outbound demo/client".to_string()) && dirs.contains(&"inbound demo/server".to_string())
    };
    assert!(eventually(Duration::from_secs(5), both), "{:?}", node.connections());
    assert_eq!(exchange_on(held, b"").unwrap(), b"ping");

    // The destination's policy still decides, by the client's identity: DENY it, live. A
    // connection opened before the DENY is closed by it, too.
    let mut before_deny = client.connect(to).unwrap().unwrap();
    before_deny.write_all(b"early").unwrap();
    let mut echoed = [0u8; 5];
    before_deny.read_exact(&mut echoed).unwrap();
    fs::write(&cfg, format!("{base}{DENY_CLIENT}")).unwrap();
    let refused = || refused_by_policy(&node);
    let passes = || client.exchange(to, b"hello").unwrap().ok().as_deref() == Some(&b"hello"[..]);
    assert!(
        eventually(Duration::from_secs(10), || !passes()),
        "the DENY policy never applied"
    );
    let (accepted, handed) = (app.accepted(), same_node_count(&node));
    let denied = refused();
    assert!(!passes());
    assert_eq!(refused(), denied + 1.0, "{}", node.metrics());
    before_deny.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let end = before_deny.read_to_end(&mut rest);
    let closed = match &end {
        Ok(n) => *n == 0 || rest.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "the connection opened before the DENY is still open: {end:?}");
    assert_eq!(app.accepted(), accepted, "a denied connection never reaches the app");
    assert_eq!(
        same_node_count(&node),
        handed,
        "only admitted connections are handed over"
    );
}

#[test]
fn the_app_sees_the_client_pods_address() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("samesrc").unwrap();
    let (client, server, cfg, _) = one_node(&mut bed);
    let node = start(&bed, &cfg, &[]);
    let _app = server.peer_server(PORT).unwrap();
    let got = client.exchange(server.addr(PORT), b"").unwrap().unwrap();
    let peer: std::net::SocketAddr = String::from_utf8(got).unwrap().parse().unwrap();
    assert_eq!(peer.ip(), client.ip, "{}", node.log_text());
    assert_eq!(same_node_count(&node), 1.0);
}

#[test]
fn with_same_node_hbone_the_tunnel_goes_through_the_hbone_socket() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("samehbone").unwrap();
    let (client, server, cfg, _) = one_node(&mut bed);
    let node = start(&bed, &cfg, &["--same-node", "hbone"]);
    let _app = server.echo_server(PORT).unwrap();
    assert_eq!(client.exchange(server.addr(PORT), b"hello").unwrap().unwrap(), b"hello");
    assert_eq!(
        steered(&node),
        1,
        "one SYN to the server's HBONE socket: {}",
        node.get("/captured")
    );
    assert_eq!(same_node_count(&node), 0.0);
    // The same identities and labels as the in-process path.
    assert!(
        eventually(Duration::from_secs(5), || closed_mtls(&node, "source") == 1.0
            && closed_mtls(&node, "destination") == 1.0),
        "{}",
        node.metrics()
    );
}

/// The route table's L7 config on top of [`one_node`]: the service `api` at a VIP, port
/// [`PORT`] routed by prefix to the server pod's cluster.
fn with_route(base: &str, server: &Pod) -> String {
    let cluster = format!("outbound|{PORT}||{HOST}");
    format!(
        "{base}services:
- {{name: api, namespace: demo, hostname: {HOST}, addresses: [{{address: {VIP}}}], ports: [{{servicePort: {PORT}, targetPort: {PORT}}}]}}
routes:
- name: \"{PORT}\"
  virtualHosts:
  - name: api
    domains: [\"{HOST}\", \"{VIP}\"]
    routes: [{{match: {{prefix: /}}, route: {{cluster: \"{cluster}\"}}}}]
clusters:
- {{name: \"{cluster}\", type: EDS, edsClusterConfig: {{serviceName: \"{cluster}\"}}, connectTimeout: 1s}}
endpoints:
- clusterName: \"{cluster}\"
  endpoints: [{{lbEndpoints: [{{endpoint: {{address: {{socketAddress: {{address: \"{}\", portValue: {PORT}}}}}}}}}]}}]
",
        server.ip
    )
}

const HOST: &str = "api.demo.svc.cluster.local";
const VIP: &str = "198.19.0.20";

/// HTTP routed by the client pod's route table to a pod of the same node: the router's upstream
/// connection is handed over in-process, and the destination still authorizes and reports it
/// with both principals.
#[test]
fn routed_http_to_a_same_node_pod_is_handed_over_with_both_identities() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("samel7").unwrap();
    let (client, server, cfg, base) = one_node(&mut bed);
    fs::write(&cfg, with_route(&base, &server)).unwrap();
    let node = start(&bed, &cfg, &[]);
    let _app = server.http_backend(PORT, "api").unwrap();
    let vip: std::net::SocketAddr = format!("{VIP}:{PORT}").parse().unwrap();
    let get = || client.http_request(vip, HttpRequest::get("/hello").authority(format!("{HOST}:{PORT}")));
    for _ in 0..3 {
        let r = get().unwrap();
        assert_eq!((r.status, r.backend()), (200, Some("api")), "{}", node.log_text());
    }
    assert!(same_node_count(&node) >= 1.0, "{}", node.metrics());
    assert_eq!(
        steered(&node),
        0,
        "no tunnel to the HBONE socket: {}",
        node.get("/captured")
    );
    let by = |reporter| {
        let labels = [
            ("reporter", reporter),
            ("response_code", "200"),
            ("source_principal", CLIENT_ID),
            ("destination_principal", SERVER_ID),
            ("connection_security_policy", "mutual_tls"),
        ];
        metric_value(&node.metrics(), "istio_requests_total", &labels)
    };
    assert!(
        eventually(Duration::from_secs(5), || by("source") == 3.0
            && by("destination") == 3.0),
        "{}",
        node.metrics()
    );

    // The destination's per-connection policy refuses the client, live: the router's pooled
    // upstream connection, admitted before it, is closed, and the next connect is refused.
    let handed = same_node_count(&node);
    fs::write(&cfg, format!("{}{DENY_CLIENT}", with_route(&base, &server))).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || get().is_ok_and(|r| r.status == 503)),
        "the DENY never refused the routed request: {}",
        node.log_text()
    );
    let r = get().unwrap();
    assert_eq!(r.status, 503, "{}", node.log_text());
    assert!(refused_by_policy(&node) >= 1.0, "{}", node.metrics());
    assert_eq!(
        same_node_count(&node),
        handed,
        "only admitted connections are handed over"
    );
}
