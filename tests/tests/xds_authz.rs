//! End to end with a control plane: a node started with `--xds-address` takes workloads and an
//! authorization policy from the in-test delta ADS server; a DENY for a source namespace refuses
//! that pod's connections while others pass, and removing it over xDS lets the pod through.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fs, time::Duration};

use nodeway_tests::{
    config_yaml, eventually, metric_value, require_root,
    xds::{
        deny_from_namespace, in_service, service, workload, FakeXds, ADDRESS_TYPE, AUTHORIZATION_TYPE, XDS_SERVER_NAME,
    },
    Node, Pod, TestBed,
};

const PORT: u16 = 8080;

#[test]
fn policies_pushed_over_xds_deny_and_removal_allows() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("xdsauthz").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let robot = bed.add_pod("robot", "other").unwrap();
    // The file says which local pods are captured; the mesh view (workloads, policies) is xDS's.
    // A policy in the file is ignored when xDS is on.
    let base = config_yaml(
        "node-a",
        &["demo", "other"],
        &[(&server).into(), (&client).into(), (&robot).into()],
    );
    let cfg = bed.dir().join("n.yaml");
    fs::write(
        &cfg,
        format!("{base}policies:\n- {{name: file-deny-all, namespace: demo, scope: NAMESPACE, action: DENY, rules: [{{clauses: []}}]}}\n"),
    )
    .unwrap();

    let xds = FakeXds::start(bed.dir()).unwrap();
    let w = |p: &Pod| workload(&p.namespace, &p.name, &p.ip.octets(), "node-a");
    let api = service("demo", "api", [198, 19, 0, 10], PORT as u32);
    let server_w = in_service(w(&server), &api.0, PORT as u32);
    xds.set(ADDRESS_TYPE, &[server_w, w(&client), w(&robot), api], &[]);
    let deny = deny_from_namespace("demo", "deny-other", "other", None);
    xds.set(AUTHORIZATION_TYPE, std::slice::from_ref(&deny), &[]);

    let url = xds.url();
    let root = xds.root_cert.display().to_string();
    let node = Node::start(
        &bed,
        "a",
        &cfg,
        &[
            "--xds-address",
            &url,
            "--xds-root-cert",
            &root,
            "--xds-tls-server-name",
            XDS_SERVER_NAME,
            "--xds-backoff-ms",
            "100",
        ],
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || node.json("/policies")["policies"][0]
            ["name"]
            == "deny-other"),
        "policy from xDS: {}\n{}",
        node.json("/config_dump")["xds"],
        node.log_text()
    );
    let _app = server.echo_server(PORT).unwrap();
    let to = server.addr(PORT);
    let passes = |p: &Pod| p.exchange(to, b"hello").unwrap().ok().as_deref() == Some(&b"hello"[..]);
    let refused = || {
        metric_value(
            &node.metrics(),
            "nodeway_inbound_refused_total",
            &[("pod", "demo/server"), ("reason", "authorization")],
        )
    };

    assert!(passes(&client), "same namespace passes\n{}", node.log_text());
    assert!(!passes(&robot), "DENY from namespace other");
    assert_eq!(refused(), 1.0, "{}", node.metrics());
    let line = node
        .log_text()
        .lines()
        .find(|l| l.contains("inbound connection refused") && l.contains("authorization"))
        .map(str::to_owned)
        .expect("a log line for the denial");
    assert!(line.contains("demo/deny-other"), "names the policy: {line}");

    // config_dump shows the xDS resources, their versions and the ACKs.
    let dump = node.json("/config_dump");
    let x = &dump["xds"];
    assert_eq!(x["connected"], true, "{x}");
    assert!(x["types"][AUTHORIZATION_TYPE]["lastAck"]["nonce"].is_string(), "{x}");
    assert_eq!(x["resources"][AUTHORIZATION_TYPE][0]["name"], deny.0.as_str(), "{x}");

    let acks = metric_value(
        &node.metrics(),
        "nodeway_xds_responses_total",
        &[("type_url", AUTHORIZATION_TYPE), ("result", "ack")],
    );
    assert_eq!(acks, 1.0, "{}", node.metrics());

    // Workloads and services of the mesh, as JSON and as tables; `nodeway inspect`.
    let workloads = node.json("/workloads");
    let names: Vec<_> = workloads["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].clone())
        .collect();
    assert_eq!(names, ["client", "server", "robot"], "{workloads}");
    assert_eq!(workloads["workloads"][2]["protocol"], "HBONE");
    let table = node.get("/workloads?format=table");
    assert!(
        table.contains("robot") && table.contains(&robot.ip.to_string()),
        "{table}"
    );
    assert_eq!(
        node.json("/services")["services"][0]["hostname"],
        "api.demo.svc.cluster.local"
    );
    assert!(node.get("/services?format=table").contains("198.19.0.10"));
    let inspect = |what: &str| {
        let out = std::process::Command::new(nodeway_tests::nodeway_bin())
            .args(["inspect", what, "--admin", &node.admin.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "inspect {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let x = inspect("xds");
    assert!(
        x.contains("istio.security.Authorization") && x.contains("connected: true"),
        "{x}"
    );
    assert!(inspect("services").contains("api.demo.svc.cluster.local"));
    assert!(inspect("workloads").contains("server"));

    // The control plane removes the policy: the robot gets through.
    xds.push(AUTHORIZATION_TYPE, &[], &[deny.0.as_str()]);
    assert!(
        eventually(Duration::from_secs(10), || node.json("/policies")["policies"]
            .as_array()
            .is_some_and(|a| a.is_empty())),
        "{}",
        node.json("/policies")
    );
    assert!(passes(&robot), "allowed once the DENY is removed\n{}", node.log_text());
    assert!(passes(&client));
    assert_eq!(refused(), 1.0);
}
