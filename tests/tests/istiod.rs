//! End to end against the real control plane: etcd, kube-apiserver and istiod built from their
//! own Go modules (`cargo xtask setup`), started per test (`nodeway_tests::control_plane`).
//! nodeway runs as ztunnel does beside istiod: `--source kubernetes` against the API server,
//! certificates from istiod's CA as a trusted node proxy (pod-bound `istio-ca` token), workloads
//! and policies over xDS on :15012. Everything istiod sends here, its own code generated.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use nodeway_tests::{
    control_plane::{require_control_plane, Mesh},
    eventually, exchange_on, metric_value, require_root, Node, Pod,
};
use serde_json::{json, Value};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(30);

fn captured(node: &Node, name: &str) -> bool {
    node.captured_pod(name).is_some_and(|p| p["captured"] == true)
}

/// Captured and its sidecar class's L7 config in force (`l7Synced`), so its outbound is served:
/// until then it fails closed with `config_not_synced`, which a connection right after the
/// capture would race.
fn serving(node: &Node, name: &str) -> bool {
    node.captured_pod(name)
        .is_some_and(|p| p["captured"] == true && p["l7Synced"] != false)
}

/// The workload istiod sent node `n` for `namespace/name`, from `/workloads`.
fn workload(n: &Node, namespace: &str, name: &str) -> Option<Value> {
    let all = n.json("/workloads");
    let list = all
        .as_array()
        .cloned()
        .or_else(|| all["workloads"].as_array().cloned())?;
    list.into_iter()
        .find(|w| w["name"] == name && w["namespace"] == namespace)
}

#[test]
fn pods_on_two_nodes_talk_mutual_tls_with_istiod_certificates() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let mut m = Mesh::new("istiod-mtls").unwrap();
    m.namespace("demo", true).unwrap();
    m.service_account("demo", "client").unwrap();
    m.service_account("demo", "server").unwrap();
    let client = m.pod("node-a", "client", "demo", "client").unwrap();
    let server = m.pod("node-b", "server", "demo", "server").unwrap();
    let _echo = server.pod.echo_server(PORT).unwrap();
    let a = m.node("a", "node-a").unwrap();
    let b = m.node("b", "node-b").unwrap();
    assert!(eventually(WAIT, || serving(&a, "client") && captured(&b, "server")));

    // Each agent tells the API server, as istio-cni does; istiod then publishes the pods as HBONE.
    assert!(eventually(WAIT, || m.annotation("demo", "client").unwrap().as_deref()
        == Some("enabled")
        && m.annotation("demo", "server").unwrap().as_deref() == Some("enabled")));
    assert!(
        eventually(WAIT, || workload(&a, "demo", "server")
            .is_some_and(|w| w.to_string().to_ascii_lowercase().contains("hbone"))),
        "istiod's workload for the server, as node a has it: {:?}\n{}",
        workload(&a, "demo", "server"),
        a.get("/config_dump")
    );

    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let s = client.pod.connect(server.pod.addr(PORT)).unwrap().unwrap();
    assert!(
        s.local_addr().unwrap().ip().is_loopback(),
        "the client's connect went through the proxy"
    );
    assert_eq!(exchange_on(s, &data).unwrap(), data);

    // Certificates istiod's CA signed for each pod's own service account, through nodeway's
    // trusted node account; both ends name them.
    let labels = |reporter| {
        [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("destination_workload", "server"),
            ("source_principal", "spiffe://cluster.local/ns/demo/sa/client"),
            ("destination_principal", "spiffe://cluster.local/ns/demo/sa/server"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    let closed =
        |n: &Node, reporter| metric_value(&n.metrics(), "istio_tcp_connections_closed_total", &labels(reporter));
    assert!(
        eventually(WAIT, || closed(&a, "source") == 1.0 && closed(&b, "destination") == 1.0),
        "{}\n{}",
        a.metrics(),
        b.metrics()
    );
    let certs = a.json("/certs").to_string();
    assert!(certs.contains("spiffe://cluster.local/ns/demo/sa/client"), "{certs}");
    assert!(
        certs.contains("nodeway test-bed"),
        "issued under the test root: {certs}"
    );
}

#[test]
fn labelling_the_namespace_captures_live_and_unlabelling_releases() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let mut m = Mesh::new("istiod-label").unwrap();
    m.namespace("demo", false).unwrap();
    m.service_account("demo", "default").unwrap();
    let client = m.pod("node-a", "client", "demo", "default").unwrap();
    let server = m.pod("node-a", "server", "demo", "default").unwrap();
    let _echo = server.pod.echo_server(PORT).unwrap();
    let a = m.node("a", "node-a").unwrap();
    let through_proxy = || {
        let s = client.pod.connect(server.pod.addr(PORT)).unwrap().unwrap();
        let proxied = s.local_addr().unwrap().ip().is_loopback();
        assert_eq!(exchange_on(s, b"ping").unwrap(), b"ping");
        proxied
    };
    assert!(!captured(&a, "client"));
    assert!(!through_proxy());
    assert_eq!(m.annotation("demo", "client").unwrap(), None);

    m.namespace("demo", true).unwrap();
    assert!(
        eventually(WAIT, || serving(&a, "client") && serving(&a, "server")),
        "{}",
        a.json("/captured")
    );
    assert!(eventually(WAIT, || m.annotation("demo", "server").unwrap().as_deref()
        == Some("enabled")));
    assert!(through_proxy());

    m.namespace("demo", false).unwrap();
    assert!(eventually(WAIT, || !captured(&a, "client") && !captured(&a, "server")));
    assert!(eventually(WAIT, || m.annotation("demo", "server").unwrap().is_none()));
    assert!(!through_proxy());
}

/// Whether `from` gets `hello` echoed by the server on `to` (an authorization refusal resets).
fn passes(from: &Pod, to: &Pod) -> bool {
    from.exchange(to.addr(PORT), b"hello").unwrap().ok().as_deref() == Some(&b"hello"[..])
}

fn refused(n: &Node, pod: &str, reason: &str) -> f64 {
    metric_value(
        &n.metrics(),
        "nodeway_inbound_refused_total",
        &[("pod", pod), ("reason", reason)],
    )
}

#[test]
fn authorization_policies_by_service_account_and_principal() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let mut m = Mesh::new("istiod-authz").unwrap();
    m.namespace("demo", true).unwrap();
    for sa in ["client", "robot", "server"] {
        m.service_account("demo", sa).unwrap();
    }
    let client = m.pod("node-a", "client", "demo", "client").unwrap();
    let robot = m.pod("node-a", "robot", "demo", "robot").unwrap();
    let server = m.pod("node-b", "server", "demo", "server").unwrap();
    let _echo = server.pod.echo_server(PORT).unwrap();
    let a = m.node("a", "node-a").unwrap();
    let b = m.node("b", "node-b").unwrap();
    assert!(eventually(WAIT, || workload(&a, "demo", "server")
        .is_some_and(|w| w["protocol"] == "HBONE")));
    assert!(passes(&client.pod, &server.pod), "{}", b.log_text());
    assert!(passes(&robot.pod, &server.pod));

    // DENY by service account (`from.source.serviceAccounts`): the client is refused, the robot
    // still passes.
    let policy = |spec: Value| {
        json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "server-policy", "namespace": "demo"},
            "spec": spec,
        })
    };
    m.cp.kube()
        .apply(policy(json!({
            "selector": {"matchLabels": {"app": "server"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"serviceAccounts": ["demo/client"]}}]}],
        })))
        .unwrap();
    assert!(
        eventually(WAIT, || !passes(&client.pod, &server.pod)),
        "DENY by service account\n{}\n{}",
        b.json("/policies"),
        b.log_text()
    );
    assert!(passes(&robot.pod, &server.pod), "{}", b.json("/policies"));
    assert!(refused(&b, "demo/server", "authorization") >= 1.0, "{}", b.metrics());

    // ALLOW by principal: only the client passes now.
    m.cp.kube()
        .apply(policy(json!({
            "selector": {"matchLabels": {"app": "server"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}],
        })))
        .unwrap();
    assert!(
        eventually(WAIT, || passes(&client.pod, &server.pod)
            && !passes(&robot.pod, &server.pod)),
        "ALLOW by principal\n{}",
        b.json("/policies")
    );
}

#[test]
fn strict_peer_authentication_refuses_plaintext_from_an_uncaptured_pod() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let mut m = Mesh::new("istiod-strict").unwrap();
    m.namespace("demo", true).unwrap();
    m.namespace("outside", false).unwrap();
    m.service_account("demo", "default").unwrap();
    m.service_account("outside", "default").unwrap();
    let client = m.pod("node-a", "client", "demo", "default").unwrap();
    let server = m.pod("node-a", "server", "demo", "default").unwrap();
    let web = m.pod("node-a", "web", "outside", "default").unwrap();
    let _echo = server.pod.echo_server(PORT).unwrap();
    let a = m.node("a", "node-a").unwrap();
    assert!(eventually(WAIT, || captured(&a, "server") && !captured(&a, "web")));
    assert!(eventually(WAIT, || workload(&a, "demo", "server")
        .is_some_and(|w| w["protocol"] == "HBONE")));
    // PERMISSIVE (no PeerAuthentication): plaintext from outside the mesh is accepted.
    assert!(passes(&web.pod, &server.pod), "{}", a.log_text());

    m.cp.kube()
        .apply(json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "strict", "namespace": "demo"},
            "spec": {"mtls": {"mode": "STRICT"}},
        }))
        .unwrap();
    assert!(
        eventually(WAIT, || !passes(&web.pod, &server.pod)),
        "STRICT refuses plaintext\n{}\n{}",
        a.json("/policies"),
        a.log_text()
    );
    assert!(
        passes(&client.pod, &server.pod),
        "mutual TLS from the mesh still passes"
    );
}

#[test]
fn with_istiod_down_known_pods_keep_working_and_new_or_restarted_ones_fail_closed() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let mut m = Mesh::new("istiod-down").unwrap();
    m.namespace("demo", true).unwrap();
    for sa in ["client", "server", "late"] {
        m.service_account("demo", sa).unwrap();
    }
    let client = m.pod("node-a", "client", "demo", "client").unwrap();
    let server = m.pod("node-a", "server", "demo", "server").unwrap();
    let echo = server.pod.echo_server(PORT).unwrap();
    let mut a = m.node("a", "node-a").unwrap();
    assert!(eventually(WAIT, || workload(&a, "demo", "server")
        .is_some_and(|w| w["protocol"] == "HBONE")));
    assert!(passes(&client.pod, &server.pod), "{}", a.log_text());

    // istiod goes away: the running agent keeps its last config and certificates.
    m.cp.stop_istiod();
    assert!(passes(&client.pod, &server.pod), "last config kept\n{}", a.log_text());

    // A pod that arrives meanwhile is captured, but nothing can vouch for it (no certificate,
    // no workload from istiod): its connections are refused, never sent around the proxy.
    let late = m.pod("node-a", "late", "demo", "late").unwrap();
    assert!(eventually(WAIT, || captured(&a, "late")), "{}", a.json("/captured"));
    let before = echo.accepted();
    assert!(!passes(&late.pod, &server.pod), "a pod istiod never saw is refused");

    // A restarted agent with istiod down is not ready, and captured pods fail closed.
    a.relaunch().unwrap();
    assert!(
        a.wait_ready(Duration::from_secs(5)).is_err(),
        "not ready before the first xDS sync"
    );
    // Its proxy sockets are back (the pinned state kept the pod failing closed until then), so
    // the refusal below is the proxy's own decision, counted and explained.
    assert!(eventually(WAIT, || captured(&a, "client")), "{}", a.json("/captured"));
    assert!(
        !passes(&client.pod, &server.pod),
        "refused before the first sync\n{}",
        a.log_text()
    );
    assert_eq!(
        echo.accepted(),
        before,
        "no connection reached the app around the proxy"
    );
    let not_synced = metric_value(
        &a.metrics(),
        "nodeway_outbound_failed_total",
        &[("pod", "demo/client"), ("reason", "config_not_synced")],
    );
    assert_eq!(not_synced, 1.0, "refused, and says why\n{}", a.metrics());
    let mesh = &a.json("/captured")["meshConfig"];
    assert_eq!(mesh["synced"], false, "{mesh}");
    assert!(
        mesh["awaiting"].to_string().contains("istio.workload.Address"),
        "{mesh}"
    );

    // istiod returns: ready, and both pods pass with mutual TLS.
    m.cp.start_istiod_again().unwrap();
    a.wait_ready(Duration::from_secs(60)).unwrap();
    assert_eq!(a.json("/captured")["meshConfig"]["synced"], true);
    assert!(
        eventually(WAIT, || passes(&client.pod, &server.pod)),
        "{}",
        a.log_text()
    );
    assert!(eventually(WAIT, || passes(&late.pod, &server.pod)), "{}", a.log_text());
}

#[test]
fn a_service_vip_reaches_an_endpoint_over_hbone() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let mut m = Mesh::new("istiod-vip").unwrap();
    m.namespace("demo", true).unwrap();
    m.service_account("demo", "client").unwrap();
    m.service_account("demo", "server").unwrap();
    let client = m.pod("node-a", "client", "demo", "client").unwrap();
    let server = m.pod("node-b", "server", "demo", "server").unwrap();
    let _echo = server.pod.echo_server(PORT).unwrap();
    // A ClusterIP Service: port 80 to the pods' named port `http` (8080), as a Deployment's
    // Service usually is; the API server allocates the VIP.
    let svc =
        m.cp.kube()
            .apply(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "api", "namespace": "demo"},
                "spec": {"selector": {"app": "server"}, "ports": [{"name": "tcp", "port": 80, "targetPort": "http"}]},
            }))
            .unwrap();
    let vip: std::net::Ipv4Addr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let a = m.node("a", "node-a").unwrap();
    let b = m.node("b", "node-b").unwrap();
    assert!(
        eventually(WAIT, || a.get("/services").contains(&vip.to_string())
            && workload(&a, "demo", "server").is_some_and(|w| w["protocol"] == "HBONE")),
        "{}",
        a.get("/services")
    );

    let to = std::net::SocketAddr::from((vip, 80));
    let got = client.pod.exchange(to, b"through the VIP").unwrap();
    assert_eq!(
        got.unwrap_or_else(|e| panic!("{e}\n{}\n{}", a.log_text(), a.json("/config_dump")["sidecarClasses"])),
        b"through the VIP"
    );
    let labels = |reporter| {
        [
            ("reporter", reporter),
            ("destination_service", "api.demo.svc.cluster.local"),
            ("destination_workload", "server"),
            // istiod's canonical revision (no version label: `latest`), on both sides alike.
            ("source_version", "latest"),
            ("destination_version", "latest"),
            ("destination_principal", "spiffe://cluster.local/ns/demo/sa/server"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    assert!(
        eventually(WAIT, || metric_value(
            &a.metrics(),
            "istio_tcp_connections_closed_total",
            &labels("source")
        ) == 1.0
            && metric_value(
                &b.metrics(),
                "istio_tcp_connections_closed_total",
                &labels("destination")
            ) == 1.0),
        "{}\n{}",
        a.metrics(),
        b.metrics()
    );
}
