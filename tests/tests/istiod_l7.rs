//! The book's traffic management through the real istiod: VirtualServices and DestinationRules
//! applied as Istio YAML to the test API server reach nodeway over its per-class sidecar streams
//! (istiod generates L7 config only for sidecars), and the client pods' HTTP is routed by them on
//! the node: header match to a subset, source-label match (each pod's class has its own config),
//! weighted shifts, fault abort and delay gated by a header, a 0.5 s timeout against a 2 s
//! upstream, retries on 5xx, no route, circuit breaking, outlier ejection and return, mirroring
//! (as istiod configures it: without the `-shadow` host suffix),
//! TCP traffic shifting and a ServiceEntry to a host outside the mesh. Checked by status codes,
//! which backend answered, counts, response flags and `istio_requests_total`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{net::SocketAddr, time::Duration};

use nodeway_tests::{
    control_plane::{require_control_plane, KubePod, Mesh},
    eventually,
    http::{concurrent, HttpBackend, HttpRequest, HttpResponse},
    metric_value, require_root, EchoServer, Node, Pod,
};
use serde_json::{json, Value};

const NS: &str = "demo";
const PORT: u16 = 9080;
const HOST: &str = "reviews.demo.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(45);

fn istio(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

/// The Service `name` (a VIP on `port`, named `port_name`: `http` makes istiod build an HTTP
/// listener, `tcp` a TCP one) and its EndpointSlice (the test bed runs no controller manager:
/// written as the endpoint-slice controller would).
fn service(m: &Mesh, name: &str, (port_name, port): (&str, u16), pods: &[(&str, &Pod)]) -> std::net::Ipv4Addr {
    let kube = m.cp.kube();
    let svc = kube
        .apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": name}, "ports": [{"name": port_name, "port": port, "targetPort": port}]}
        }))
        .unwrap();
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(pod, p)| {
            json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "node-b", "targetRef": {"kind": "Pod", "name": pod, "namespace": NS}})
        })
        .collect();
    kube.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": NS,
                     "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "nodeway-tests"}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap();
    svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap()
}

/// `v1` and `v2` of `app` on node b (service account `app`), subsets of one DestinationRule.
fn subset_pods(m: &mut Mesh, app: &str) -> (KubePod, KubePod) {
    let v1 = m.pod("node-b", &format!("{app}-v1"), NS, app).unwrap();
    let v2 = m.pod("node-b", &format!("{app}-v2"), NS, app).unwrap();
    label(m, &format!("{app}-v1"), json!({"app": app, "version": "v1"}));
    label(m, &format!("{app}-v2"), json!({"app": app, "version": "v2"}));
    (v1, v2)
}

/// A DestinationRule's spec: `traffic_policy` (none when empty: the API server refuses `{}`
/// there) and the subsets by `version`.
fn subsets(host: &str, traffic_policy: Value) -> Value {
    let mut spec = json!({"host": host, "subsets": [
        {"name": "v1", "labels": {"version": "v1"}},
        {"name": "v2", "labels": {"version": "v2"}}]});
    if traffic_policy.as_object().is_some_and(|o| !o.is_empty()) {
        spec["trafficPolicy"] = traffic_policy;
    }
    spec
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
    _client: KubePod,
    _tester: KubePod,
    v1: (KubePod, HttpBackend),
    v2: (KubePod, HttpBackend),
    _b: Node,
}

impl Bed {
    /// Two client pods on node a (two classes: `app: client` and `app: tester`), reviews v1 and
    /// v2 on node b, the DestinationRule's subsets by `version`.
    fn new(name: &str) -> Bed {
        let mut m = Mesh::new(name).unwrap();
        m.namespace(NS, true).unwrap();
        for sa in ["client", "reviews", "tcp-echo"] {
            m.service_account(NS, sa).unwrap();
        }
        let client = m.pod("node-a", "client", NS, "client").unwrap();
        let tester = m.pod("node-a", "tester", NS, "client").unwrap();
        let (v1, v2) = subset_pods(&mut m, "reviews");
        let b1 = v1.pod.http_backend(PORT, "v1").unwrap();
        let b2 = v2.pod.http_backend(PORT, "v2").unwrap();
        let vip = service(
            &m,
            "reviews",
            ("http", PORT),
            &[("reviews-v1", &v1.pod), ("reviews-v2", &v2.pod)],
        );
        m.cp.kube()
            .apply(istio("DestinationRule", "reviews", subsets(HOST, json!({}))))
            .unwrap();
        let a = m.node("a", "node-a").unwrap();
        let b = m.node("b", "node-b").unwrap();
        Bed {
            client: client.pod.clone(),
            tester: tester.pod.clone(),
            vip: SocketAddr::from((vip, PORT)),
            _client: client,
            _tester: tester,
            v1: (v1, b1),
            v2: (v2, b2),
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

    fn destination_rule(&self, traffic_policy: Value) {
        let dr = istio("DestinationRule", "reviews", subsets(HOST, traffic_policy));
        self.m.cp.kube().apply(dr).unwrap();
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

    /// Whether the client's class has an outlier detector on the service's default cluster.
    fn outlier_detection_in_force(&self) -> bool {
        let classes = self.a.json("/config_dump")["sidecarClasses"].clone();
        let Some(class) = classes
            .as_array()
            .and_then(|c| c.iter().find(|c| c["labels"]["app"] == "client"))
        else {
            return false;
        };
        let name = format!("outbound|{PORT}||{HOST}");
        let clusters = class["l7"]["clusters"].as_array().cloned().unwrap_or_default();
        clusters
            .iter()
            .any(|c| c["name"] == name && !c["outlierDetection"].is_null())
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
    // In force when both hold (the default route spreads over both, so either alone can be luck).
    let header_routed = || {
        bed.backends(client, 5, &[("end-user", "jason")]) == vec!["v2"; 5]
            && bed.backends(client, 5, &[]) == vec!["v1"; 5]
    };
    assert!(eventually(WAIT, header_routed), "{}", bed.explain());
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

    // 20/80: v2 within ±5σ of 160 (σ ≈ 5.7).
    bed.virtual_service(json!([{"route": [
        {"destination": {"host": HOST, "subset": "v1"}, "weight": 20},
        {"destination": {"host": HOST, "subset": "v2"}, "weight": 80}]}]));
    let shifted = |got: &[String]| got.iter().filter(|b| *b == "v2").count() > 130;
    assert!(
        eventually(WAIT, || shifted(&bed.backends(client, 200, &[]))),
        "{}",
        bed.explain()
    );
    let v2 = bed.backends(client, 200, &[]).iter().filter(|b| *b == "v2").count();
    assert!((132..=188).contains(&v2), "20/80: {v2} of 200 to v2");
}

#[test]
fn circuit_breaking_outlier_ejection_mirroring_and_delay_from_istiod() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let bed = Bed::new("istiod-l7-resilience");
    let client = &bed.client;
    let to_v1 = json!([{"route": [{"destination": {"host": HOST, "subset": "v1"}}]}]);

    // The book's circuit breaker: 1 connection, 1 pending request, 1 request per connection.
    // Of 8 concurrent slow requests some overflow at once: 503 UO, `x-envoy-overloaded`.
    bed.destination_rule(json!({"connectionPool": {
        "tcp": {"maxConnections": 1},
        "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}}}));
    bed.virtual_service(to_v1.clone());
    let burst = || {
        concurrent(client, bed.vip, 8, 8, |_| {
            HttpRequest::get("/?delay_ms=300").authority(HOST)
        })
        .unwrap()
    };
    let overflowed = |results: &[anyhow::Result<HttpResponse>]| {
        results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter(|r| r.status == 503 && r.header("x-envoy-overloaded") == Some("true"))
            .count()
    };
    assert!(eventually(WAIT, || overflowed(&burst()) > 0), "{}", bed.explain());
    let results = burst();
    let served = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    assert!(overflowed(&results) > 0 && served >= 2, "{results:?}");
    assert!(bed.requests(&[("response_code", "503"), ("response_flags", "UO")]) >= 1.0);

    // Outlier detection: v1 answers 500; after 3 in a row it is ejected and v2 takes
    // everything; after its ejection time it is back.
    bed.destination_rule(json!({"outlierDetection": {
        "consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "3s", "maxEjectionPercent": 100}}));
    bed.virtual_service(json!([{"route": [{"destination": {"host": HOST}}]}]));
    // In force once both subsets answer (the previous route had v1 only) and the client's
    // class has the detector on the service's cluster.
    let in_force = || {
        let got = bed.backends(client, 10, &[]);
        got.iter().any(|b| b == "v1") && got.iter().any(|b| b == "v2") && bed.outlier_detection_in_force()
    };
    assert!(eventually(WAIT, in_force), "{}", bed.explain());
    bed.v1.1.set_status(Some(500));
    let seen: Vec<String> = (0..20)
        .map(|_| {
            let r = bed.get(client, "/", &[]);
            format!("{}:{}", r.status, r.backend().unwrap_or("-"))
        })
        .collect();
    let fails = seen.iter().filter(|s| s.starts_with("500")).count();
    assert_eq!(fails, 3, "exactly the 3 consecutive failures before ejection: {seen:?}");
    assert_eq!(bed.backends(client, 10, &[]), vec!["v2"; 10]);
    bed.v1.1.set_status(None);
    assert!(
        eventually(Duration::from_secs(10), || bed
            .backends(client, 10, &[])
            .iter()
            .any(|b| b == "v1")),
        "v1 is back after its ejection time"
    );

    // Mirroring: v2 sees a copy of each request to v1; the client gets v1's answer.
    bed.destination_rule(json!({}));
    bed.virtual_service(json!([{"route": [{"destination": {"host": HOST, "subset": "v1"}}],
        "mirror": {"host": HOST, "subset": "v2"}, "mirrorPercentage": {"value": 100.0}}]));
    let mirrored = || {
        bed.v2.1.clear();
        bed.get(client, "/mirrored", &[]).backend() == Some("v1")
            && eventually(Duration::from_secs(2), || bed.v2.1.requests() == 1)
    };
    assert!(eventually(WAIT, mirrored), "{}", bed.explain());
    let shadow = bed.v2.1.received();
    // istiod sets `disableShadowHostSuffixAppend` (its DISABLE_SHADOW_HOST_SUFFIX, on by
    // default): the mirror sees the authority as sent, without Envoy's `-shadow`.
    assert_eq!(shadow[0].authority, HOST);
    assert_eq!(shadow[0].path, "/mirrored");

    // Delay gated by a header: 0.5 s added, then served; other requests are not delayed.
    bed.virtual_service(json!([
        {"match": [{"headers": {"x-fault": {"exact": "delay"}}}],
         "fault": {"delay": {"fixedDelay": "0.5s", "percentage": {"value": 100}}},
         "route": [{"destination": {"host": HOST, "subset": "v1"}}]},
        {"route": [{"destination": {"host": HOST, "subset": "v1"}}]}
    ]));
    let delayed = || bed.get(client, "/", &[("x-fault", "delay")]);
    assert!(
        eventually(WAIT, || delayed().elapsed >= Duration::from_millis(500)),
        "{}",
        bed.explain()
    );
    let r = delayed();
    assert_eq!((r.status, r.backend()), (200, Some("v1")));
    assert!(r.elapsed >= Duration::from_millis(500), "{:?}", r.elapsed);
    assert!(bed.get(client, "/", &[]).elapsed < Duration::from_millis(400));
    assert!(bed.requests(&[("response_code", "200"), ("response_flags", "DI")]) >= 2.0);
}

/// How many of `n` connections to `to` each echo server took, and how many failed (refused
/// while a route names a subset the config does not have yet, as Envoy refuses them).
fn tcp_split(from: &Pod, to: SocketAddr, v1: &EchoServer, v2: &EchoServer, n: usize) -> (u64, u64, usize) {
    let (a, b) = (v1.accepted(), v2.accepted());
    let failed = (0..n)
        .filter(|_| from.exchange(to, b"ping").unwrap().ok().as_deref() != Some(&b"ping"[..]))
        .count();
    (v1.accepted() - a, v2.accepted() - b, failed)
}

#[test]
fn tcp_traffic_shifting_and_a_service_entry_from_istiod() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let mut bed = Bed::new("istiod-l7-tcp");
    const TCP_PORT: u16 = 9000;
    let tcp_host = "tcp-echo.demo.svc.cluster.local";
    let (e1, e2) = subset_pods(&mut bed.m, "tcp-echo");
    let (s1, s2) = (
        e1.pod.echo_server(TCP_PORT).unwrap(),
        e2.pod.echo_server(TCP_PORT).unwrap(),
    );
    let vip = service(
        &bed.m,
        "tcp-echo",
        ("tcp", TCP_PORT),
        &[("tcp-echo-v1", &e1.pod), ("tcp-echo-v2", &e2.pod)],
    );
    let to = SocketAddr::from((vip, TCP_PORT));
    // The host outside the mesh for the ServiceEntry below: a pod in a namespace not captured.
    bed.m.namespace("outside", false).unwrap();
    bed.m.service_account("outside", "default").unwrap();
    let external = bed.m.pod("node-b", "external", "outside", "default").unwrap();
    let _web = external.pod.http_backend(8080, "external").unwrap();
    let apply = |obj: Value| bed.m.cp.kube().apply(obj).unwrap();
    apply(istio("DestinationRule", "tcp-echo", subsets(tcp_host, json!({}))));
    let tcp_vs = |w1: u32, w2: u32| {
        let route = |subset: &str, weight: u32| json!({"destination": {"host": tcp_host, "subset": subset, "port": {"number": TCP_PORT}}, "weight": weight});
        let spec = json!({"hosts": [tcp_host], "tcp": [{"match": [{"port": TCP_PORT}], "route": [route("v1", w1), route("v2", w2)]}]});
        apply(istio("VirtualService", "tcp-echo", spec));
    };
    // All to v1 first, so that the shift below is the VirtualService's and not the default's.
    tcp_vs(100, 0);
    assert!(
        eventually(WAIT, || tcp_split(&bed.client, to, &s1, &s2, 20) == (20, 0, 0)),
        "{}",
        bed.explain()
    );
    tcp_vs(80, 20);
    assert!(
        eventually(WAIT, || tcp_split(&bed.client, to, &s1, &s2, 20).1 > 0),
        "{}",
        bed.explain()
    );
    let (v1, v2, failed) = tcp_split(&bed.client, to, &s1, &s2, 200);
    assert_eq!(failed, 0, "{}", bed.explain());
    assert!((132..=188).contains(&v1), "80/20: v1 {v1}, v2 {v2}");
    let opened = metric_value(
        &bed.a.metrics(),
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("destination_service", tcp_host),
            ("destination_version", "v2"),
        ],
    );
    assert!(opened >= v2 as f64, "{opened} < {v2}");

    let se = json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "api-external", "namespace": NS},
        "spec": {"hosts": ["api.external.test"], "addresses": ["198.18.250.10"], "location": "MESH_EXTERNAL",
                 "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
                 "resolution": "STATIC", "endpoints": [{"address": external.pod.ip.to_string()}]}});
    // A ServiceEntry for that host at an address of its own, HTTP on port 80 to its 8080.
    apply(se);
    let to = SocketAddr::from(([198, 18, 250, 10], 80));
    let get = || {
        let req = HttpRequest::get("/")
            .authority("api.external.test")
            .timeout(Duration::from_secs(5));
        bed.client.http_request(to, req).ok()
    };
    assert!(
        eventually(WAIT, || get().is_some_and(|r| r.backend() == Some("external"))),
        "{}",
        bed.explain()
    );
    let labels = [
        ("reporter", "source"),
        ("destination_service", "api.external.test"),
        ("response_code", "200"),
    ];
    assert!(
        metric_value(&bed.a.metrics(), "istio_requests_total", &labels) >= 1.0,
        "{}",
        bed.a.metrics()
    );
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
    let backend = &bed.v1.1;
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
