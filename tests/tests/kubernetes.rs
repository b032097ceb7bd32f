//! End to end with `--source kubernetes`: the agent's kube-rs controller against an in-test API
//! server (real list and watch streams over HTTP), pods as network namespaces whose "containers"
//! are processes running in them, found through a `/proc`-style root.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use nodeway_tests::{
    eventually, exchange_on,
    kube_api::{self, FakeApiServer},
    metric_value, require_root, Container, FakeProc, Node, Pod, TestBed,
};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(10);
const NODE: &str = "node-a";

/// A pod known to the API server, with a container process in its network namespace.
struct KubePod {
    pod: Pod,
    _container: Container,
}

/// The bed, its fake API server and `/proc`, and pods in namespace `demo`.
struct Cluster {
    api: FakeApiServer,
    proc_root: FakeProc,
    // Dropped last: the namespaces go after the processes in them.
    bed: TestBed,
}

impl Cluster {
    fn new(name: &str) -> Self {
        let bed = TestBed::new(name).unwrap();
        let api = FakeApiServer::start(bed.dir()).unwrap();
        let proc_root = FakeProc::new(&bed).unwrap();
        Cluster { api, proc_root, bed }
    }

    fn namespace(&self, name: &str, ambient: bool) {
        self.api.apply("namespaces", kube_api::namespace(name, ambient));
    }

    /// A Running pod on this node with a process in its network namespace.
    fn pod(&mut self, name: &str, namespace: &str, labels: &[(&str, &str)]) -> KubePod {
        self.pod_on(NODE, name, namespace, labels)
    }

    /// A Running pod on `node` with a process in its network namespace.
    fn pod_on(&mut self, node: &str, name: &str, namespace: &str, labels: &[(&str, &str)]) -> KubePod {
        let pod = self.bed.add_pod(name, namespace).unwrap();
        let container = Container::start(&pod).unwrap();
        let uid = format!(
            "{}-{name}-0000-4000-8000-000000000000",
            &self.bed.prefix().replace('-', "")
        );
        self.proc_root.add(container.pid(), &uid).unwrap();
        let mut obj = kube_api::pod(name, namespace, &uid, node, &pod.ip.to_string());
        for (k, v) in labels {
            obj["metadata"]["labels"][*k] = (*v).into();
        }
        self.api.apply("pods", obj);
        KubePod {
            pod,
            _container: container,
        }
    }

    fn set_pod_label(&self, namespace: &str, name: &str, key: &str, value: &str) {
        let mut obj = self.api.get("pods", namespace, name).unwrap();
        obj["metadata"]["labels"][key] = value.into();
        self.api.apply("pods", obj);
    }

    fn start_node(&self, name: &str) -> Node {
        self.start_node_as(name, NODE, &[])
    }

    fn start_node_as(&self, name: &str, node: &str, extra: &[&str]) -> Node {
        Node::start_kubernetes(
            &self.bed,
            name,
            node,
            self.api.kubeconfig(),
            self.proc_root.path(),
            extra,
        )
        .unwrap()
    }
}

/// Whether a connection from `from` to `to` goes through the node proxy (its outbound connect is
/// rewritten to the in-pod listener on loopback) rather than straight to the peer.
fn through_proxy(from: &Pod, to: &Pod) -> bool {
    let s = from.connect(to.addr(PORT)).unwrap().unwrap();
    let proxied = s.local_addr().unwrap().ip().is_loopback();
    assert_eq!(exchange_on(s, b"ping").unwrap(), b"ping");
    proxied
}

fn captured(node: &Node, name: &str) -> bool {
    node.captured_pod(name).is_some_and(|p| p["captured"] == true)
}

#[test]
fn namespace_label_captures_its_pods_and_unlabel_releases() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("k8s-label");
    c.namespace("demo", false);
    let client = c.pod("client", "demo", &[]);
    let server = c.pod("server", "demo", &[]);
    let _echo = server.pod.echo_server(PORT).unwrap();
    let node = c.start_node("a");

    // Unlabelled: known, not captured, and /captured says why.
    let p = node.captured_pod("client").expect("the pod is listed");
    assert_eq!(p["captured"], false);
    assert!(p["reason"].as_str().unwrap().contains("not labelled"), "{p}");
    assert!(!through_proxy(&client.pod, &server.pod));
    let source = &node.json("/captured")["source"];
    assert_eq!(source["kind"], "kubernetes");
    assert_eq!(source["synced"], true);

    // Label the namespace: both pods captured live, from their container processes' netns.
    c.namespace("demo", true);
    assert!(eventually(WAIT, || captured(&node, "client") && captured(&node, "server")));
    let p = node.captured_pod("client").unwrap();
    assert!(
        p["reason"]
            .as_str()
            .unwrap()
            .contains("istio.io/dataplane-mode=ambient"),
        "{p}"
    );
    assert!(p["since"].as_str().unwrap().ends_with('Z'), "{p}");
    assert!(p["netns"].as_str().unwrap().ends_with("/ns/net"), "{p}");
    assert!(through_proxy(&client.pod, &server.pod));
    assert_eq!(metric_value(&node.metrics(), "nodeway_captured_pods", &[]), 2.0);
    assert!(node.log_text().contains("pod captured"));
    // What the README tells users to run (through kubectl exec).
    let out = std::process::Command::new(nodeway_tests::nodeway_bin())
        .args(["inspect", "captured", "--admin", &node.admin.to_string()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("Source:  kubernetes: synced, connected, 0 API errors"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("demo ")
            && l.contains(" client ")
            && l.contains(" true ")
            && l.contains("namespace demo has istio.io/dataplane-mode=ambient")),
        "{table}"
    );

    // Unlabel: released, traffic direct again.
    c.namespace("demo", false);
    assert!(eventually(WAIT, || !captured(&node, "client") && !captured(&node, "server")));
    assert!(!through_proxy(&client.pod, &server.pod));
    assert_eq!(metric_value(&node.metrics(), "nodeway_captured_pods", &[]), 0.0);
}

#[test]
fn opt_out_host_network_unresolved_and_deleted_pods() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("k8s-pods");
    c.namespace("demo", true);
    let client = c.pod("client", "demo", &[]);
    let server = c.pod("server", "demo", &[]);
    let optout = c.pod("optout", "demo", &[("istio.io/dataplane-mode", "none")]);
    // A host-network pod and a pod whose processes cannot be found.
    let mut host = kube_api::pod("host", "demo", "uid-host", NODE, "198.19.255.1");
    host["spec"]["hostNetwork"] = true.into();
    c.api.apply("pods", host);
    c.api.apply(
        "pods",
        kube_api::pod("ghost", "demo", "uid-ghost", NODE, "198.19.255.2"),
    );
    // Another node's pod is not this agent's business.
    c.api.apply(
        "pods",
        kube_api::pod("remote", "demo", "uid-remote", "node-b", "198.19.255.3"),
    );
    // A pod whose processes are not visible: found in the CNI netns directory by its IP.
    let cni_only = c.bed.add_pod("cnionly", "demo").unwrap();
    c.api.apply(
        "pods",
        kube_api::pod("cnionly", "demo", "uid-cnionly", NODE, &cni_only.ip.to_string()),
    );
    let _echo = server.pod.echo_server(PORT).unwrap();
    let _echo2 = optout.pod.echo_server(PORT).unwrap();
    let node = c.start_node("a");

    assert!(eventually(WAIT, || captured(&node, "client") && captured(&node, "server")));
    let reason = |n: &str| node.captured_pod(n).unwrap()["reason"].as_str().unwrap().to_string();
    assert!(!captured(&node, "optout"));
    assert!(reason("optout").contains("istio.io/dataplane-mode=none"));
    assert!(!captured(&node, "host"));
    assert!(reason("host").contains("host-network"));
    assert!(!captured(&node, "ghost"));
    let why = reason("ghost");
    assert!(
        why.contains("network namespace not found") && why.contains("uid-ghost"),
        "{why}"
    );
    assert!(
        node.captured_pod("remote").is_none(),
        "other nodes' pods are not watched"
    );
    assert!(
        why.contains("no namespace in /var/run/netns holds 198.19.255.2"),
        "{why}"
    );
    assert!(eventually(WAIT, || captured(&node, "cnionly")));
    let p = node.captured_pod("cnionly").unwrap();
    assert_eq!(p["netns"], format!("/var/run/netns/{}", cni_only.netns), "{p}");
    assert!(through_proxy(&cni_only, &server.pod));
    assert!(node.log_text().contains("demo/ghost"));
    let m = node.metrics();
    assert_eq!(
        metric_value(&m, "nodeway_netns_resolve_failures_total", &[]),
        1.0,
        "{m}"
    );
    assert_eq!(metric_value(&m, "nodeway_pods_unresolved", &[]), 1.0, "{m}");
    assert!(
        !through_proxy(&optout.pod, &server.pod),
        "an opted-out pod's outbound is direct"
    );
    assert!(through_proxy(&client.pod, &optout.pod));

    // Opt a captured pod out live.
    c.set_pod_label("demo", "client", "istio.io/dataplane-mode", "none");
    assert!(eventually(WAIT, || !captured(&node, "client")));
    assert!(!through_proxy(&client.pod, &server.pod));

    // Delete a captured pod: released and gone from /captured; its kernel state is gone too
    // (its namespace's connects are no longer steered to the proxy).
    c.api.delete("pods", "demo", "server");
    assert!(eventually(WAIT, || node.captured_pod("server").is_none()));
    assert!(!through_proxy(&server.pod, &optout.pod));
    assert_eq!(
        metric_value(&node.metrics(), "nodeway_captured_pods", &[]),
        1.0,
        "only cnionly is left"
    );
}

#[test]
fn restart_reconciles_against_pinned_state() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("k8s-restart");
    c.namespace("demo", true);
    let client = c.pod("client", "demo", &[]);
    let server = c.pod("server", "demo", &[]);
    let gone = c.pod("gone", "demo", &[]);
    let leaver = c.pod("leaver", "demo", &[]);
    let _echo = server.pod.echo_server(PORT).unwrap();
    let mut node = c.start_node("a");
    let all = ["client", "server", "gone", "leaver"];
    assert!(eventually(WAIT, || all.iter().all(|p| captured(&node, p))));
    assert!(through_proxy(&gone.pod, &server.pod));

    // The agent dies; meanwhile one pod is deleted and another opted out.
    node.kill();
    c.api.delete("pods", "demo", "gone");
    c.set_pod_label("demo", "leaver", "istio.io/dataplane-mode", "none");
    node.restart().unwrap();

    // Reconciled: the remaining pods proxied again, the others released (not failing closed).
    assert!(eventually(WAIT, || captured(&node, "server") && captured(&node, "client")));
    assert!(node.captured_pod("gone").is_none());
    assert!(!captured(&node, "leaver"));
    assert!(through_proxy(&client.pod, &server.pod), "a kept pod is proxied again");
    assert!(
        !through_proxy(&gone.pod, &server.pod),
        "a deleted pod is not left captured"
    );
    assert!(!through_proxy(&leaver.pod, &server.pod), "an opted-out pod is released");
    assert!(node.log_text().contains("releasing a pod a previous agent captured"));
}

#[test]
fn api_server_unreachable_keeps_capture_and_retries() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("k8s-outage");
    c.namespace("demo", true);
    let client = c.pod("client", "demo", &[]);
    let server = c.pod("server", "demo", &[]);
    let _echo = server.pod.echo_server(PORT).unwrap();
    let node = c.start_node("a");
    assert!(eventually(WAIT, || captured(&node, "client") && captured(&node, "server")));

    c.api.stop();
    // Errors are reported and the watches keep retrying (one failure each, then more); the
    // capture stays.
    assert!(
        eventually(Duration::from_secs(30), || node.json("/captured")["source"]
            ["apiErrors"]
            .as_u64()
            .unwrap_or(0)
            >= 4),
        "{}",
        node.json("/captured")["source"]
    );
    let source = node.json("/captured")["source"].clone();
    assert_eq!(source["connected"], false, "{source}");
    assert!(source["lastError"].is_string(), "{source}");
    assert!(metric_value(&node.metrics(), "nodeway_kubernetes_api_errors_total", &[]) >= 4.0);
    assert!(captured(&node, "client") && captured(&node, "server"));
    assert!(through_proxy(&client.pod, &server.pod));
    // A change made while the agent cannot see it...
    c.set_pod_label("demo", "client", "istio.io/dataplane-mode", "none");
    std::thread::sleep(Duration::from_millis(500));
    assert!(captured(&node, "client"));

    // ...arrives once the API server is back (the watch resumes, with backoff).
    c.api.resume().unwrap();
    assert!(
        eventually(Duration::from_secs(40), || !captured(&node, "client")),
        "{}",
        node.json("/captured")
    );
    assert!(captured(&node, "server"));
    assert!(!through_proxy(&client.pod, &server.pod));
    assert!(eventually(WAIT, || node.json("/captured")["source"]["connected"] == true));
}

#[test]
fn restart_without_the_api_server_keeps_pods_fail_closed_until_the_lists_arrive() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("k8s-coldstart");
    c.namespace("demo", true);
    let client = c.pod("client", "demo", &[]);
    let server = c.pod("server", "demo", &[]);
    let _echo = server.pod.echo_server(PORT).unwrap();
    let mut node = c.start_node("a");
    assert!(eventually(WAIT, || captured(&node, "client") && captured(&node, "server")));

    // The agent restarts while the API server is down: it knows nothing, so it releases nothing
    // (captured pods fail closed rather than bypass the mesh) and is not ready.
    c.api.stop();
    node.relaunch().unwrap();
    let api_errors = || {
        nodeway_tests::http_get(node.admin, "/captured")
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|v| v["source"]["apiErrors"].as_u64())
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(20), || api_errors() >= 1),
        "{}",
        node.log_text()
    );
    let source = node.json("/captured")["source"].clone();
    assert_eq!(source["synced"], false, "{source}");
    assert!(node.json("/captured")["pods"].as_array().unwrap().is_empty());
    assert!(!matches!(
        nodeway_tests::http_get(node.readiness, "/healthz/ready"),
        Ok((200, _))
    ));
    let e = client
        .pod
        .connect(server.pod.addr(PORT))
        .unwrap()
        .expect_err("fails closed");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // The API server is back: lists arrive, the pods are taken over and proxied again.
    c.api.resume().unwrap();
    node.wait_ready(Duration::from_secs(40)).unwrap();
    assert!(captured(&node, "client") && captured(&node, "server"));
    assert!(through_proxy(&client.pod, &server.pod));
}

#[test]
fn start_up_errors_name_what_is_missing() {
    if !require_root() {
        return;
    }
    let bed = TestBed::new("k8s-errors").unwrap();
    let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/{}-errors", bed.prefix()));
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = std::process::Command::new(nodeway_tests::nodeway_bin())
            .arg("run")
            .args(args)
            .args(["--ca", "none"])
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--stats-addr",
                "127.0.0.1:0",
                "--readiness-addr",
                "127.0.0.1:0",
                "--pin-dir",
            ])
            .arg(&pin_dir)
            .env_remove("NODE_NAME")
            .env_remove("NODEWAY_CONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(
            !pin_dir.exists(),
            "nothing pinned before the start-up checks pass: {err}"
        );
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    };
    let err = run(&[], &[]);
    assert!(err.contains("--source file needs --config"), "{err}");
    let err = run(&["--source", "kubernetes"], &[]);
    assert!(err.contains("NODE_NAME"), "{err}");
    let missing = bed.dir().join("no-kubeconfig.yaml");
    let err = run(
        &["--source", "kubernetes", "--node-name", "node-a"],
        &[("KUBECONFIG", missing.to_str().unwrap())],
    );
    assert!(err.contains("Kubernetes API client"), "{err}");
    let not_proc = bed.dir().to_str().unwrap().to_string();
    let err = run(
        &[
            "--source",
            "kubernetes",
            "--node-name",
            "node-a",
            "--proc-root",
            &not_proc,
        ],
        &[],
    );
    assert!(
        err.contains("--proc-root") && err.contains("not a proc filesystem"),
        "{err}"
    );
}

#[test]
fn pods_on_two_nodes_talk_mutual_tls_from_the_cluster_view() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("k8s-two-nodes");
    c.namespace("demo", true);
    let client = c.pod_on("node-a", "client", "demo", &[]);
    let server = c.pod_on("node-b", "server", "demo", &[]);
    let _echo = server.pod.echo_server(PORT).unwrap();
    let a = c.start_node_as("a", "node-a", &[]);
    let b = c.start_node_as("b", "node-b", &[]);
    // Each agent captures only its own node's pod.
    assert!(captured(&a, "client") && a.captured_pod("server").is_none());
    assert!(captured(&b, "server") && b.captured_pod("client").is_none());

    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        client.pod.exchange(server.pod.addr(PORT), &data).unwrap().unwrap(),
        data
    );
    let id = "spiffe://cluster.local/ns/demo/sa/default";
    let labels = |reporter| {
        [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("destination_workload", "server"),
            ("source_principal", id),
            ("destination_principal", id),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    let closed =
        |n: &Node, reporter| metric_value(&n.metrics(), "istio_tcp_connections_closed_total", &labels(reporter));
    assert!(
        eventually(WAIT, || closed(&a, "source") == 1.0 && closed(&b, "destination") == 1.0),
        "{}",
        a.metrics()
    );

    // Without the cluster view node a does not know the server: plain TCP, accepted by node b.
    drop(a);
    let a = c.start_node_as("a2", "node-a", &["--cluster-pods", "false"]);
    assert_eq!(
        client.pod.exchange(server.pod.addr(PORT), b"tcp").unwrap().unwrap(),
        b"tcp"
    );
    let plain = [
        ("reporter", "source"),
        ("destination_workload", "unknown"),
        ("connection_security_policy", "none"),
    ];
    assert!(
        eventually(WAIT, || metric_value(
            &a.metrics(),
            "istio_tcp_connections_closed_total",
            &plain
        ) == 1.0),
        "{}",
        a.metrics()
    );
}
