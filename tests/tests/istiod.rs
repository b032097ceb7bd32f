//! End to end against the real control plane: etcd, kube-apiserver and istiod built from their
//! own Go modules (`cargo xtask setup`), started per test (`nodeway_tests::control_plane`).
//! nodeway runs as ztunnel does beside istiod: `--source kubernetes` against the API server,
//! certificates from istiod's CA as a trusted node proxy (pod-bound `istio-ca` token), workloads
//! and policies over xDS on :15012. Everything istiod sends here, its own code generated.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{net::Ipv4Addr, time::Duration};

use nodeway_tests::{
    control_plane::{require_control_plane, ControlPlane},
    eventually, exchange_on, metric_value, require_root, Container, FakeProc, Node, Pod, TestBed,
};
use serde_json::{json, Value};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(30);
const REDIRECTION: &str = "ambient.istio.io/redirection";

/// A pod in the API server with a "container" process in its network namespace.
struct KubePod {
    pod: Pod,
    _container: Container,
}

/// The control plane, the bed's pods as Kubernetes pods, and nodeway agents.
struct Mesh {
    cp: ControlPlane,
    proc_root: FakeProc,
    // Dropped last: the namespaces go after the processes in them.
    bed: TestBed,
}

fn pod_like(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace}})
}

impl Mesh {
    fn new(name: &str) -> Mesh {
        let bed = TestBed::new(name).unwrap();
        let cp = ControlPlane::start(bed.dir()).unwrap();
        let proc_root = FakeProc::new(&bed).unwrap();
        Mesh { cp, proc_root, bed }
    }

    fn host_ip(&self) -> Ipv4Addr {
        let o = self.cp.ip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], o[3] + 1)
    }

    /// A namespace, in the ambient mesh or not, with service account `sa` in it.
    fn namespace(&self, name: &str, ambient: bool) {
        let labels = if ambient {
            json!({"istio.io/dataplane-mode": "ambient"})
        } else {
            json!({})
        };
        self.cp
            .kube()
            .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}))
            .unwrap();
    }

    fn service_account(&self, namespace: &str, name: &str) {
        self.cp
            .kube()
            .apply(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}))
            .unwrap();
    }

    /// A Running pod on `node` with service account `sa`, its IP from the bed.
    fn pod(&mut self, node: &str, name: &str, namespace: &str, sa: &str) -> KubePod {
        let pod = self.bed.add_pod(name, namespace).unwrap();
        let container = Container::start(&pod).unwrap();
        let stored = self
            .cp
            .kube()
            .apply(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
                "spec": {
                    "nodeName": node,
                    "serviceAccountName": sa,
                    "containers": [{"name": "app", "image": "app:test", "ports": [{"containerPort": PORT}]}]
                }
            }))
            .unwrap();
        let uid = stored["metadata"]["uid"].as_str().unwrap();
        self.proc_root.add(container.pid(), uid).unwrap();
        self.cp
            .kube()
            .set_pod_running(namespace, name, &[pod.ip], self.host_ip())
            .unwrap();
        KubePod {
            pod,
            _container: container,
        }
    }

    /// `nodeway run` as node `node`'s agent: its Pod object and token, then ready.
    fn node(&self, name: &str, node: &str) -> Node {
        let (pod_name, token) = self.cp.node_proxy(node, self.host_ip()).unwrap();
        let mut source: Vec<String> = ["--source", "kubernetes", "--proc-root"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        source.push(self.proc_root.path().display().to_string());
        source.extend(["--debounce-ms".into(), "50".into()]);
        source.extend(self.cp.agent_args(&token));
        let env = self.cp.agent_env(node, &pod_name, self.host_ip());
        let mut n = Node::spawn_with(&self.bed, name, &source, &[], &env).unwrap();
        n.wait_ready(Duration::from_secs(60)).unwrap();
        n
    }

    fn annotation(&self, namespace: &str, name: &str) -> Option<String> {
        let p = self.cp.kube().get(&pod_like(namespace, name)).unwrap()?;
        p["metadata"]["annotations"][REDIRECTION].as_str().map(str::to_owned)
    }
}

fn captured(node: &Node, name: &str) -> bool {
    node.captured_pod(name).is_some_and(|p| p["captured"] == true)
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
    let mut m = Mesh::new("istiod-mtls");
    m.namespace("demo", true);
    m.service_account("demo", "client");
    m.service_account("demo", "server");
    let client = m.pod("node-a", "client", "demo", "client");
    let server = m.pod("node-b", "server", "demo", "server");
    let _echo = server.pod.echo_server(PORT).unwrap();
    let a = m.node("a", "node-a");
    let b = m.node("b", "node-b");
    assert!(eventually(WAIT, || captured(&a, "client") && captured(&b, "server")));

    // Each agent tells the API server, as istio-cni does; istiod then publishes the pods as HBONE.
    assert!(eventually(WAIT, || m.annotation("demo", "client").as_deref()
        == Some("enabled")
        && m.annotation("demo", "server").as_deref() == Some("enabled")));
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
    let mut m = Mesh::new("istiod-label");
    m.namespace("demo", false);
    m.service_account("demo", "default");
    let client = m.pod("node-a", "client", "demo", "default");
    let server = m.pod("node-a", "server", "demo", "default");
    let _echo = server.pod.echo_server(PORT).unwrap();
    let a = m.node("a", "node-a");
    let through_proxy = || {
        let s = client.pod.connect(server.pod.addr(PORT)).unwrap().unwrap();
        let proxied = s.local_addr().unwrap().ip().is_loopback();
        assert_eq!(exchange_on(s, b"ping").unwrap(), b"ping");
        proxied
    };
    assert!(!captured(&a, "client"));
    assert!(!through_proxy());
    assert_eq!(m.annotation("demo", "client"), None);

    m.namespace("demo", true);
    assert!(eventually(WAIT, || captured(&a, "client") && captured(&a, "server")));
    assert!(eventually(WAIT, || m.annotation("demo", "server").as_deref() == Some("enabled")));
    assert!(through_proxy());

    m.namespace("demo", false);
    assert!(eventually(WAIT, || !captured(&a, "client") && !captured(&a, "server")));
    assert!(eventually(WAIT, || m.annotation("demo", "server").is_none()));
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
    let mut m = Mesh::new("istiod-authz");
    m.namespace("demo", true);
    for sa in ["client", "robot", "server"] {
        m.service_account("demo", sa);
    }
    let client = m.pod("node-a", "client", "demo", "client");
    let robot = m.pod("node-a", "robot", "demo", "robot");
    let server = m.pod("node-b", "server", "demo", "server");
    let _echo = server.pod.echo_server(PORT).unwrap();
    let a = m.node("a", "node-a");
    let b = m.node("b", "node-b");
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
    let mut m = Mesh::new("istiod-strict");
    m.namespace("demo", true);
    m.namespace("outside", false);
    m.service_account("demo", "default");
    m.service_account("outside", "default");
    let client = m.pod("node-a", "client", "demo", "default");
    let server = m.pod("node-a", "server", "demo", "default");
    let web = m.pod("node-a", "web", "outside", "default");
    let _echo = server.pod.echo_server(PORT).unwrap();
    let a = m.node("a", "node-a");
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
