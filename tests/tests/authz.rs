//! Authorization on inbound, end to end: policies from the local file decide which pods reach a
//! server, over HBONE (by identity) and plaintext (by address); edits apply live.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fs, time::Duration};

use nodeway_tests::{config_yaml, eventually, metric_value, require_root, Node, PodEntry, TestBed};

const PORT: u16 = 8080;

#[test]
fn policies_deny_and_allow_connections_and_apply_live() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("authz").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let robot = bed.add_pod("robot", "other").unwrap();
    let outsider = bed.add_pod("outsider", "plain").unwrap();
    let sa = |p, sa| PodEntry {
        service_account: Some(sa),
        ..PodEntry::from(p)
    };
    let pods = [
        sa(&server, "api"),
        sa(&client, "client"),
        sa(&robot, "robot"),
        (&outsider).into(),
    ];
    let base = config_yaml("node-a", &["demo", "other"], &pods);
    let cfg = bed.dir().join("n.yaml");
    let deny_robots = "policies:
- name: deny-other
  namespace: demo
  scope: NAMESPACE
  action: DENY
  rules: [{clauses: [{matches: [{namespaces: [{exact: other}]}]}]}]
";
    fs::write(&cfg, format!("{base}{deny_robots}")).unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let app = server.echo_server(PORT).unwrap();
    let to = server.addr(PORT);
    let passes = |p: &nodeway_tests::Pod| p.exchange(to, b"hello").unwrap().ok().as_deref() == Some(&b"hello"[..]);
    let refused = |reason: &str| {
        metric_value(
            &node.metrics(),
            "nodeway_inbound_refused_total",
            &[("pod", "demo/server"), ("reason", reason)],
        )
    };

    // DENY by the peer's namespace (its mTLS identity): the robot is refused, the client passes,
    // and plaintext from outside the mesh (no identity, no namespace) is not matched by it.
    assert!(passes(&client));
    assert!(!passes(&robot), "a DENY policy matched the robot");
    assert!(passes(&outsider));
    assert_eq!(refused("authorization"), 1.0, "{}", node.metrics());
    let log = node.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("inbound connection refused") && l.contains("authorization"))
        .expect("a log line for the denial");
    assert!(line.contains("demo/deny-other"), "names the policy: {line}");
    assert!(
        line.contains("spiffe://cluster.local/ns/other/sa/robot"),
        "names the peer: {line}"
    );
    let policies = node.json("/policies");
    assert_eq!(policies["policies"][0]["name"], "deny-other", "{policies}");

    // Live edit: ALLOW only the client's identity on PORT. Everyone else now matches no ALLOW.
    let allow_client = format!(
        "policies:
- name: only-client
  namespace: demo
  scope: NAMESPACE
  rules:
  - clauses:
    - matches: [{{principals: [{{exact: cluster.local/ns/demo/sa/client}}]}}]
    - matches: [{{destinationPorts: [{PORT}]}}]
"
    );
    fs::write(&cfg, format!("{base}{allow_client}")).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || node.json("/policies")["policies"][0]["name"]
            == "only-client"),
        "{}",
        node.log_text()
    );
    assert!(passes(&client));
    assert!(!passes(&outsider), "plaintext has no principal: no ALLOW matches");
    assert!(!passes(&robot));
    assert_eq!(refused("authorization"), 3.0);
    assert!(node.log_text().contains("no ALLOW policy matched"));
    // Only allowed connections reached the application.
    assert_eq!(app.accepted(), 3);

    // A bad policy is refused with its place named; the last good policies stay.
    fs::write(
        &cfg,
        format!("{base}policies:\n- name: x\n  namespace: demo\n  action: MAYBE\n"),
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(5), || node
        .json("/config_dump")
        .to_string()
        .contains("MAYBE")));
    assert_eq!(node.json("/policies")["policies"][0]["name"], "only-client");
    assert!(passes(&client));
    assert!(!passes(&robot));
}
