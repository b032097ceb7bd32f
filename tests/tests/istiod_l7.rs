//! The book's traffic management through the real istiod: VirtualServices and DestinationRules
//! applied as Istio YAML to the test API server reach nodeway over its per-class sidecar streams
//! (istiod generates L7 config only for sidecars), and the client pods' HTTP is routed by them on
//! the node: header match to a subset, source-label match (each pod's class has its own config),
//! weighted shifts, fault abort gated by a header, a 0.5 s timeout against a 2 s upstream, retries
//! on 5xx, and no route. Checked by status codes, which backend answered, counts, response flags
//! and `istio_requests_total`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{net::SocketAddr, time::Duration};

use nodeway_tests::{
    control_plane::{require_control_plane, Mesh},
    eventually,
    http::{HttpRequest, HttpResponse},
    metric_value, require_root, Node, Pod,
};
use serde_json::{json, Value};

const NS: &str = "demo";
const PORT: u16 = 9080;
const HOST: &str = "reviews.demo.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(45);

fn istio(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

/// The `reviews` Service (a VIP on port 9080, named `http`: istiod makes it an HTTP listener)
/// and its EndpointSlice (the test bed runs no controller manager: written as the
/// endpoint-slice controller would).
fn reviews_service(m: &Mesh, pods: &[(&str, &Pod)]) -> std::net::Ipv4Addr {
    let kube = m.cp.kube();
    let svc = kube
        .apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "reviews", "namespace": NS},
            "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]}
        }))
        .unwrap();
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(name, p)| {
            json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "node-b", "targetRef": {"kind": "Pod", "name": name, "namespace": NS}})
        })
        .collect();
    kube.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "reviews-1", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": "reviews", "endpointslice.kubernetes.io/managed-by": "nodeway-tests"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap();
    svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap()
}

fn label(m: &Mesh, name: &str, labels: Value) {
    m.cp.kube()
        .merge(
            &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS}}),
            json!({"metadata": {"labels": labels}}),
        )
        .unwrap();
}

struct Bed {
    m: Mesh,
    a: Node,
    client: Pod,
    tester: Pod,
    vip: SocketAddr,
    _client: nodeway_tests::control_plane::KubePod,
    _tester: nodeway_tests::control_plane::KubePod,
    _v1: (nodeway_tests::control_plane::KubePod, nodeway_tests::http::HttpBackend),
    _v2: (nodeway_tests::control_plane::KubePod, nodeway_tests::http::HttpBackend),
    _b: Node,
}

impl Bed {
    /// Two client pods on node a (two classes: `app: client` and `app: tester`), reviews v1 and
    /// v2 on node b, the DestinationRule's subsets by `version`.
    fn new(name: &str) -> Bed {
        let mut m = Mesh::new(name).unwrap();
        m.namespace(NS, true).unwrap();
        for sa in ["client", "reviews"] {
            m.service_account(NS, sa).unwrap();
        }
        let client = m.pod("node-a", "client", NS, "client").unwrap();
        let tester = m.pod("node-a", "tester", NS, "client").unwrap();
        let v1 = m.pod("node-b", "reviews-v1", NS, "reviews").unwrap();
        let v2 = m.pod("node-b", "reviews-v2", NS, "reviews").unwrap();
        label(&m, "reviews-v1", json!({"app": "reviews", "version": "v1"}));
        label(&m, "reviews-v2", json!({"app": "reviews", "version": "v2"}));
        let b1 = v1.pod.http_backend(PORT, "v1").unwrap();
        let b2 = v2.pod.http_backend(PORT, "v2").unwrap();
        let vip = reviews_service(&m, &[("reviews-v1", &v1.pod), ("reviews-v2", &v2.pod)]);
        m.cp.kube()
            .apply(istio(
                "DestinationRule",
                "reviews",
                json!({"host": HOST, "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}}]}),
            ))
            .unwrap();
        let a = m.node("a", "node-a").unwrap();
        let b = m.node("b", "node-b").unwrap();
        Bed {
            client: client.pod.clone(),
            tester: tester.pod.clone(),
            vip: SocketAddr::from((vip, PORT)),
            _client: client,
            _tester: tester,
            _v1: (v1, b1),
            _v2: (v2, b2),
            m,
            a,
            _b: b,
        }
    }

    fn virtual_service(&self, http: Value) {
        let spec = json!({"hosts": [HOST], "http": http});
        self.m
            .cp
            .kube()
            .apply(istio("VirtualService", "reviews", spec))
            .unwrap();
    }

    fn send(&self, from: &Pod, req: HttpRequest) -> HttpResponse {
        let req = req.authority(HOST).timeout(Duration::from_secs(10));
        from.http_request(self.vip, req).unwrap()
    }

    fn get(&self, from: &Pod, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        let mut req = HttpRequest::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(from, req)
    }

    /// Which backend answered `n` requests (`-` for a local reply), in order.
    fn backends(&self, from: &Pod, n: usize, headers: &[(&str, &str)]) -> Vec<String> {
        (0..n)
            .map(|_| {
                let r = self.get(from, "/", headers);
                r.backend().map_or_else(|| format!("-{}", r.status), str::to_string)
            })
            .collect()
    }

    /// Until every one of 5 requests is answered by `backend`, or the wait ends.
    fn routed_to(&self, from: &Pod, headers: &[(&str, &str)], backend: &str) -> bool {
        eventually(WAIT, || self.backends(from, 5, headers).iter().all(|b| b == backend))
    }

    fn requests(&self, labels: &[(&str, &str)]) -> f64 {
        let mut all = vec![("reporter", "source"), ("destination_service", HOST)];
        all.extend_from_slice(labels);
        metric_value(&self.a.metrics(), "istio_requests_total", &all)
    }

    fn explain(&self) -> String {
        let dump = self.a.json("/config_dump");
        format!(
            "sidecar classes: {}\n---- node a log ----\n{}",
            serde_json::to_string_pretty(&dump["sidecarClasses"]).unwrap_or_default(),
            self.a.log_text()
        )
    }
}

#[test]
fn virtual_services_from_istiod_route_each_pod_by_its_class() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let bed = Bed::new("istiod-l7");
    let (client, tester) = (&bed.client, &bed.tester);

    // No VirtualService: istiod's default route to the service, over both endpoints.
    assert!(
        eventually(WAIT, || bed.get(client, "/", &[]).status == 200),
        "{}",
        bed.explain()
    );
    let classes = bed.a.json("/config_dump")["sidecarClasses"].clone();
    assert_eq!(
        classes.as_array().map(Vec::len),
        Some(2),
        "client and tester differ in labels: two classes\n{classes:#}"
    );
    assert!(classes.to_string().contains("sidecar~"), "{classes}");

    // Header match to a subset: `end-user: jason` to v2, everyone else to v1.
    bed.virtual_service(json!([
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": HOST, "subset": "v2"}}]},
        {"route": [{"destination": {"host": HOST, "subset": "v1"}}]}
    ]));
    assert!(
        bed.routed_to(client, &[("end-user", "jason")], "v2"),
        "{}",
        bed.explain()
    );
    assert_eq!(bed.backends(client, 10, &[]), vec!["v1"; 10]);
    assert_eq!(bed.backends(client, 10, &[("end-user", "jason")]), vec!["v2"; 10]);
    assert!(bed.requests(&[("destination_version", "v2"), ("response_code", "200")]) >= 10.0);

    // Source labels: only pods labelled `app: tester` go to v2; each pod's class has its own
    // config, so the client (another class) still goes to v1.
    bed.virtual_service(json!([
        {"match": [{"sourceLabels": {"app": "tester"}}], "route": [{"destination": {"host": HOST, "subset": "v2"}}]},
        {"route": [{"destination": {"host": HOST, "subset": "v1"}}]}
    ]));
    assert!(bed.routed_to(tester, &[], "v2"), "{}", bed.explain());
    assert_eq!(bed.backends(client, 10, &[]), vec!["v1"; 10], "{}", bed.explain());

    // Fault abort gated by a header.
    bed.virtual_service(json!([
        {"match": [{"headers": {"x-fault": {"exact": "abort"}}}],
         "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
         "route": [{"destination": {"host": HOST, "subset": "v1"}}]},
        {"route": [{"destination": {"host": HOST, "subset": "v1"}}]}
    ]));
    assert!(
        eventually(WAIT, || bed.get(client, "/", &[("x-fault", "abort")]).status == 418),
        "{}",
        bed.explain()
    );
    let aborted = bed.get(client, "/", &[("x-fault", "abort")]);
    assert_eq!(aborted.text(), "fault filter abort");
    assert_eq!(bed.get(client, "/", &[]).backend(), Some("v1"));
    assert!(
        bed.requests(&[("response_code", "418"), ("response_flags", "FI")]) >= 2.0,
        "{}",
        bed.a.metrics()
    );

    // Weighted 50/50 over 200 requests: each subset within ±5σ of 100 (σ ≈ 7.1).
    bed.virtual_service(json!([{"route": [
        {"destination": {"host": HOST, "subset": "v1"}, "weight": 50},
        {"destination": {"host": HOST, "subset": "v2"}, "weight": 50}]}]));
    assert!(
        eventually(WAIT, || bed.backends(client, 20, &[]).iter().any(|b| b == "v2")),
        "{}",
        bed.explain()
    );
    let got = bed.backends(client, 200, &[]);
    let v2 = got.iter().filter(|b| *b == "v2").count();
    assert_eq!(got.iter().filter(|b| *b == "v1").count() + v2, 200, "{got:?}");
    assert!((65..=135).contains(&v2), "50/50: {v2} of 200 to v2");
}

#[test]
fn timeouts_retries_and_no_route_from_istiod() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let bed = Bed::new("istiod-l7-timeouts");
    let client = &bed.client;

    // A 0.5 s route timeout against a 2 s upstream: 504 UT after about 0.5 s.
    bed.virtual_service(json!([
        {"route": [{"destination": {"host": HOST, "subset": "v1"}}], "timeout": "0.5s"}
    ]));
    let slow = || bed.get(client, "/?delay_ms=2000", &[]);
    assert!(eventually(WAIT, || slow().status == 504), "{}", bed.explain());
    let r = slow();
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert!(r.elapsed < Duration::from_millis(1500), "{:?}", r.elapsed);
    assert!(bed.requests(&[("response_code", "504"), ("response_flags", "UT")]) >= 2.0);

    // Retries on 5xx: 1 + 3 attempts reach v1, the client gets its last answer, flag URX.
    bed.virtual_service(json!([
        {"route": [{"destination": {"host": HOST, "subset": "v1"}}],
         "retries": {"attempts": 3, "retryOn": "5xx", "perTryTimeout": "1s"}}
    ]));
    let failing = || bed.get(client, "/?status=503", &[]);
    let backend = &bed._v1.1;
    assert!(
        eventually(WAIT, || {
            backend.clear();
            failing().status == 503 && backend.requests() == 4
        }),
        "{}",
        bed.explain()
    );
    assert!(bed.requests(&[("response_code", "503"), ("response_flags", "URX")]) >= 1.0);

    // No route: a VirtualService that matches `/api` only; other paths are 404 NR.
    bed.virtual_service(json!([
        {"match": [{"uri": {"prefix": "/api"}}], "route": [{"destination": {"host": HOST, "subset": "v1"}}]}
    ]));
    assert!(
        eventually(WAIT, || bed.get(client, "/other", &[]).status == 404),
        "{}",
        bed.explain()
    );
    assert_eq!(bed.get(client, "/api/x", &[]).backend(), Some("v1"));
    // No route, no cluster: no destination service either (Envoy's stats have none to read).
    let no_route = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("response_code", "404"),
        ("response_flags", "NR"),
    ];
    assert!(
        metric_value(&bed.a.metrics(), "istio_requests_total", &no_route) >= 1.0,
        "{}",
        bed.a.metrics()
    );
}
