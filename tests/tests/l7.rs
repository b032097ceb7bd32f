//! L7 end to end: a captured client pod sends HTTP to a service address; nodeway routes each
//! request with Envoy's semantics (the local file's RouteConfiguration "8080", clusters and
//! endpoints, in the protobuf-JSON form `istioctl proxy-config ... -o json` prints) to backend
//! pods over HBONE. Every test asserts what a user would check: status codes, which backend
//! answered, headers the backend saw, response flags in the metrics and the access log.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    fs,
    net::SocketAddr,
    time::{Duration, Instant},
};

use nodeway_tests::{
    config_yaml,
    http::{concurrent, grpc_health_check, HttpBackend, HttpRequest, HttpResponse},
    metric_value, require_root, Node, Pod, PodEntry, TestBed,
};

const PORT: u16 = 8080;
/// The service address the client dials (never routed anywhere: the capture takes it first).
const VIP: &str = "198.19.0.10";
const HOST: &str = "web.demo.svc.cluster.local";

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), PORT)
}

fn cluster_name(subset: &str) -> String {
    format!("outbound|{PORT}|{subset}|{HOST}")
}

/// A STATIC-endpoints-by-EDS cluster (type EDS, endpoints from `endpoints:`), with extra JSON.
fn cluster(subset: &str, extra: &str) -> String {
    format!(
        "- name: \"{}\"\n  type: EDS\n  edsClusterConfig: {{serviceName: \"{}\"}}\n  connectTimeout: 1s\n{extra}",
        cluster_name(subset),
        cluster_name(subset)
    )
}

fn endpoints(subset: &str, pods: &[&Pod]) -> String {
    let eps: Vec<String> = pods
        .iter()
        .map(|p| {
            format!(
                "{{endpoint: {{address: {{socketAddress: {{address: \"{}\", portValue: {PORT}}}}}}}}}",
                p.ip
            )
        })
        .collect();
    format!(
        "- clusterName: \"{}\"\n  endpoints: [{{lbEndpoints: [{}]}}]\n",
        cluster_name(subset),
        eps.join(", ")
    )
}

struct Mesh {
    bed: TestBed,
    node: Node,
    client: Pod,
    backends: Vec<HttpBackend>,
}

/// One node; `client` and backend pods in the captured namespace `demo`; `routes` is the YAML
/// list of virtual hosts' routes for RouteConfiguration "8080", `clusters` / `eps` the rest.
fn mesh(name: &str, backend_names: &[&str], l7: impl Fn(&[Pod]) -> String) -> Mesh {
    mesh_with(name, backend_names, &[], l7)
}

/// [`mesh`] with extra `nodeway run` flags.
fn mesh_with(name: &str, backend_names: &[&str], args: &[&str], l7: impl Fn(&[Pod]) -> String) -> Mesh {
    let mut bed = TestBed::new(name).unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let pods: Vec<Pod> = backend_names.iter().map(|n| bed.add_pod(n, "demo").unwrap()).collect();
    let mut entries: Vec<PodEntry<'_>> = vec![(&client).into()];
    entries.extend(pods.iter().map(PodEntry::from));
    let cfg = bed.dir().join("node.yaml");
    // The service the routes stand for; the destination side names it in its metrics.
    let service = format!(
        "services:\n- {{name: web, namespace: demo, hostname: {HOST}, addresses: [{{address: {VIP}}}], ports: [{{servicePort: {PORT}, targetPort: {PORT}}}]}}\n"
    );
    fs::write(
        &cfg,
        format!("{}{service}{}", config_yaml("node-a", &["demo"], &entries), l7(&pods)),
    )
    .unwrap();
    let node = Node::start(&bed, "a", &cfg, args).unwrap();
    let backends = pods
        .iter()
        .zip(backend_names)
        .map(|(p, n)| HttpBackend::start(p, PORT, n).unwrap())
        .collect();
    Mesh {
        bed,
        node,
        client,
        backends,
    }
}

impl Mesh {
    fn get(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        let mut req = HttpRequest::get(path).authority(format!("{HOST}:{PORT}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.client.http_request(vip(), req).unwrap()
    }

    fn requests(&self, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.node.metrics(), "istio_requests_total", labels)
    }

    fn backend(&self, name: &str) -> &HttpBackend {
        self.backends.iter().find(|b| b.name == name).unwrap()
    }
}

/// How many requests got a 200, from `backend` (or from any backend with `None`).
fn answered_by<E>(results: &[Result<HttpResponse, E>], backend: Option<&str>) -> usize {
    results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_ok_and(|r| r.status == 200 && (backend.is_none() || r.backend() == backend))
        })
        .count()
}

fn route_config(routes: &str) -> String {
    format!(
        "routes:\n- name: \"{PORT}\"\n  virtualHosts:\n  - name: \"{HOST}:{PORT}\"\n    domains: [\"{HOST}\", \"web\", \"web.demo\", \"{VIP}\"]\n    includeRequestAttemptCount: true\n    routes:\n{routes}"
    )
}

#[test]
fn header_weighted_prefix_routing_redirect_direct_and_no_route() {
    if !require_root() {
        return;
    }
    let m = mesh("l7route", &["v1", "v2", "ratings"], |pods| {
        let routes = r#"    - name: jason
      match: {prefix: "/", headers: [{name: end-user, stringMatch: {exact: jason}}]}
      route: {cluster: "outbound|8080|v2|web.demo.svc.cluster.local", timeout: 0s}
    - name: ratings
      match: {prefix: "/ratings/"}
      route: {cluster: "outbound|8080|ratings|web.demo.svc.cluster.local", prefixRewrite: "/api/"}
      requestHeadersToAdd: [{header: {key: x-routed-by, value: nodeway}}]
      responseHeadersToAdd: [{header: {key: x-route, value: ratings}}]
    - name: old
      match: {path: "/old"}
      redirect: {pathRedirect: "/new", responseCode: MOVED_PERMANENTLY}
    - name: health
      match: {path: "/static-health"}
      directResponse: {status: 200, body: {inlineString: "ok from nodeway"}}
    - name: split
      match: {prefix: "/split"}
      route:
        weightedClusters:
          clusters:
          - {name: "outbound|8080|v1|web.demo.svc.cluster.local", weight: 20}
          - {name: "outbound|8080|v2|web.demo.svc.cluster.local", weight: 80}
    - name: half
      match: {prefix: "/half"}
      route:
        weightedClusters:
          clusters:
          - {name: "outbound|8080|v1|web.demo.svc.cluster.local", weight: 50}
          - {name: "outbound|8080|v2|web.demo.svc.cluster.local", weight: 50}
    - name: default
      match: {prefix: "/"}
      route: {cluster: "outbound|8080|v1|web.demo.svc.cluster.local"}
"#;
        format!(
            "{}clusters:\n{}{}{}endpoints:\n{}{}{}",
            route_config(routes),
            cluster("v1", ""),
            cluster("v2", ""),
            cluster("ratings", ""),
            endpoints("v1", &[&pods[0]]),
            endpoints("v2", &[&pods[1]]),
            endpoints("ratings", &[&pods[2]]),
        )
    });

    // Header-based routing to one subset versus the other.
    let r = m.get("/reviews", &[("end-user", "jason")]);
    assert_eq!((r.status, r.backend()), (200, Some("v2")), "{}", r.text());
    let r = m.get("/reviews", &[]);
    assert_eq!((r.status, r.backend()), (200, Some("v1")), "{}", r.text());
    let seen = r.json();
    assert!(
        seen["headers"]["x-request-id"].as_str().is_some_and(|s| s.len() >= 32),
        "{seen}"
    );
    assert_eq!(seen["headers"]["x-envoy-attempt-count"], "1");

    // Prefix routing to another service, with prefix rewrite and header changes both ways.
    let r = m.get("/ratings/7?x=1", &[]);
    assert_eq!((r.status, r.backend()), (200, Some("ratings")), "{}", r.text());
    assert_eq!(r.json()["path"], "/api/7?x=1");
    assert_eq!(r.json()["headers"]["x-routed-by"], "nodeway");
    assert_eq!(r.header("x-route"), Some("ratings"));

    // Redirect and direct response are answered by nodeway itself.
    let r = m.get("/old?q=2", &[]);
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some(&*format!("http://{HOST}:{PORT}/new?q=2")));
    let r = m.get("/static-health", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "ok from nodeway"));

    // A 50/50 split over 200 requests: each side 100 ± 25 (binomial sd 7.1, 3.5 sd).
    let results = concurrent(&m.client, vip(), 8, 200, |i| {
        HttpRequest::get(&format!("/half/{i}")).authority(format!("{HOST}:{PORT}"))
    })
    .unwrap();
    let (v1, v2) = (answered_by(&results, Some("v1")), answered_by(&results, Some("v2")));
    assert_eq!(v1 + v2, 200, "every split request answered by v1 or v2");
    assert!((75..=125).contains(&v1), "v1 got {v1} of 200, expected about 100");

    // A 20/80 split over 300 requests: v1 gets about 60 (binomial sd 6.9; ± 25 is 3.6 sd).
    let results = concurrent(&m.client, vip(), 8, 300, |i| {
        HttpRequest::get(&format!("/split/{i}")).authority(format!("{HOST}:{PORT}"))
    })
    .unwrap();
    let (v1, ok) = (answered_by(&results, Some("v1")), answered_by(&results, None));
    assert_eq!(ok, 300, "every split request answered");
    assert!((35..=85).contains(&v1), "v1 got {v1} of 300, expected about 60");

    // No virtual host for the authority: 404 with flag NR, counted as Istio does.
    let r = m
        .client
        .http_request(vip(), HttpRequest::get("/").authority("unknown.example"))
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(
        m.requests(&[
            ("response_code", "404"),
            ("response_flags", "NR"),
            ("reporter", "source")
        ]),
        1.0,
        "{}",
        m.node.metrics()
    );
    assert!(
        m.requests(&[
            ("response_code", "200"),
            ("destination_service", HOST),
            ("destination_workload", "v2"),
            ("source_workload", "client"),
            ("request_protocol", "http"),
            ("connection_security_policy", "mutual_tls"),
        ]) >= 200.0,
        "{}",
        m.node.metrics()
    );
    // The destination's side reports the same requests (reporter="destination"), naming the
    // service from the authority and the peer by its mTLS identity, as an Istio sidecar's
    // inbound does; a request no destination saw (404 NR) is reported by the source only.
    let reported = |reporter| {
        m.requests(&[
            ("reporter", reporter),
            ("response_code", "200"),
            ("destination_service", HOST),
            ("destination_workload", "v2"),
            ("source_workload", "client"),
            ("request_protocol", "http"),
            ("connection_security_policy", "mutual_tls"),
        ])
    };
    assert!(reported("source") >= 200.0, "{}", m.node.metrics());
    assert_eq!(reported("destination"), reported("source"), "{}", m.node.metrics());
    assert_eq!(
        m.requests(&[
            ("reporter", "destination"),
            ("destination_workload", "v2"),
            ("source_principal", "spiffe://cluster.local/ns/demo/sa/default"),
            ("destination_principal", "spiffe://cluster.local/ns/demo/sa/default"),
        ]),
        reported("destination"),
        "{}",
        m.node.metrics()
    );
    assert_eq!(
        m.requests(&[("reporter", "destination"), ("response_code", "404")]),
        0.0
    );
    // One JSON access log line per request, with Envoy's field names.
    let log = m.node.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("\"response_flags\":\"NR\""))
        .unwrap_or_else(|| panic!("no NR access log line in:\n{log}"));
    let entry: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(entry["response_code"], 404);
    assert_eq!(entry["authority"], "unknown.example");
    assert_eq!(entry["method"], "GET");
    // Two Host headers: refused (400, DPE), never routed by one of them.
    let raw = m
        .client
        .exchange(
            vip(),
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nHost: evil\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap()
        .unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    drop(m.bed);
}

#[test]
fn timeout_retries_and_faults() {
    if !require_root() {
        return;
    }
    let m = mesh("l7resil", &["a", "b", "slow"], |pods| {
        let routes = r#"    - name: slow
      match: {prefix: "/slow"}
      route: {cluster: "outbound|8080|slow|web.demo.svc.cluster.local", timeout: 0.5s}
    - name: faulty
      match: {prefix: "/fault"}
      route: {cluster: "outbound|8080|ab|web.demo.svc.cluster.local"}
      typedPerFilterConfig:
        envoy.filters.http.fault:
          "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
          headers: [{name: x-fault, presentMatch: true}]
          abort: {httpStatus: 418, percentage: {numerator: 100}}
    - name: delayed
      match: {prefix: "/delay"}
      route: {cluster: "outbound|8080|ab|web.demo.svc.cluster.local"}
      typedPerFilterConfig:
        envoy.filters.http.fault:
          "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
          headers: [{name: x-delay, presentMatch: true}]
          delay: {fixedDelay: 0.6s, percentage: {numerator: 100}}
    - name: retried
      match: {prefix: "/"}
      route:
        cluster: "outbound|8080|ab|web.demo.svc.cluster.local"
        retryPolicy:
          retryOn: "5xx"
          numRetries: 2
          retryHostPredicate: [{name: envoy.retry_host_predicates.previous_hosts}]
          hostSelectionRetryMaxAttempts: "5"
"#;
        format!(
            "{}clusters:\n{}{}endpoints:\n{}{}",
            route_config(routes),
            cluster("ab", ""),
            cluster("slow", ""),
            endpoints("ab", &[&pods[0], &pods[1]]),
            endpoints("slow", &[&pods[2]]),
        )
    });

    // A 0.5 s route timeout against a 2 s upstream: 504 UT after about 0.5 s.
    let started = Instant::now();
    let r = m.get("/slow?delay_ms=2000", &[]);
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.text(), "upstream request timeout");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1800),
        "{took:?}"
    );
    assert_eq!(m.requests(&[("response_code", "504"), ("response_flags", "UT")]), 1.0);
    // The route timeout covers the response body too, as Envoy's: a head at once and a body
    // 2 s later is cut off after about 0.5 s (the client sees a broken response), flagged UT.
    let started = Instant::now();
    let r = m.client.http_request(
        vip(),
        HttpRequest::get("/slow?body_delay_ms=2000").authority(format!("{HOST}:{PORT}")),
    );
    let took = started.elapsed();
    assert!(r.is_err(), "the body must not arrive: {:?}", r.map(|r| r.text()));
    assert!(took < Duration::from_millis(1800), "{took:?}");
    assert_eq!(
        m.requests(&[
            ("reporter", "source"),
            ("response_code", "200"),
            ("response_flags", "UT")
        ]),
        1.0,
        "{}",
        m.node.metrics()
    );

    // Retries on 5xx: `a` fails every request, `b` answers; previous_hosts sends the retry to
    // `b`, which sees attempt 2. Every request succeeds.
    m.backend("a").set_status(Some(503));
    for _ in 0..10 {
        let r = m.get("/retry", &[]);
        assert_eq!((r.status, r.backend()), (200, Some("b")), "{}", r.text());
    }
    let a_seen = m.backend("a").received().len();
    let retried: Vec<_> = m
        .backend("b")
        .received()
        .into_iter()
        .filter(|r| r.header("x-envoy-attempt-count") == Some("2"))
        .collect();
    assert_eq!(
        retried.len(),
        a_seen,
        "every request that hit `a` was retried on `b` as attempt 2"
    );
    assert!(a_seen >= 1, "round robin sent some first attempts to `a`");
    // The retries are in the cluster's stats, under Envoy's names.
    let clusters = m.node.json("/clusters");
    let ab = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster_name("ab"))
        .unwrap();
    assert_eq!(ab["runtime"]["counters"]["upstream_rq_retry"], a_seen as u64, "{ab}");
    // Both down: 2 retries, 3 attempts in all, the last 503 goes back to the client.
    m.backend("b").set_status(Some(503));
    let before = m.backend("a").requests() + m.backend("b").requests();
    let r = m.get("/retry", &[]);
    assert_eq!(r.status, 503);
    assert_eq!(m.backend("a").requests() + m.backend("b").requests() - before, 3);
    m.backend("a").set_status(None);
    m.backend("b").set_status(None);
    // A body bigger than the retry buffer still goes through (streamed, without retries).
    let big = vec![b'x'; 3 << 20];
    let r = m
        .client
        .http_request(
            vip(),
            HttpRequest::new(hyper::Method::POST, "/upload")
                .authority(format!("{HOST}:{PORT}"))
                .body(big),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], 3 << 20);
    let r = m
        .client
        .http_request(
            vip(),
            HttpRequest::new(hyper::Method::POST, "/small")
                .authority(format!("{HOST}:{PORT}"))
                .body(&b"hello"[..]),
        )
        .unwrap();
    assert_eq!(r.json()["body_len"], 5);

    // Fault abort only for requests with the header; without it they pass.
    let r = m.get("/fault", &[("x-fault", "1")]);
    assert_eq!((r.status, r.text().as_str()), (418, "fault filter abort"));
    assert_eq!(m.get("/fault", &[]).status, 200);
    assert_eq!(m.requests(&[("response_code", "418"), ("response_flags", "FI")]), 1.0);
    // Fault delay only for requests with the header.
    let t = Instant::now();
    assert_eq!(m.get("/delay", &[("x-delay", "1")]).status, 200);
    assert!(t.elapsed() >= Duration::from_millis(550), "{:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(m.get("/delay", &[]).status, 200);
    assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());
    assert_eq!(m.requests(&[("response_code", "200"), ("response_flags", "DI")]), 1.0);
}

#[test]
fn circuit_breaker_outlier_ejection_mirror_and_grpc() {
    if !require_root() {
        return;
    }
    let m = mesh("l7cb", &["one", "good", "bad", "mirror", "grpc"], |pods| {
        let routes = r#"    - name: limited
      match: {prefix: "/limited"}
      route: {cluster: "outbound|8080|one|web.demo.svc.cluster.local"}
    - name: mirrored
      match: {prefix: "/mirrored"}
      route:
        cluster: "outbound|8080|good|web.demo.svc.cluster.local"
        requestMirrorPolicies: [{cluster: "outbound|8080|mirror|web.demo.svc.cluster.local"}]
    - name: grpc
      match: {prefix: "/grpc.health.v1.Health/"}
      route: {cluster: "outbound|8080|grpc|web.demo.svc.cluster.local"}
    - name: outlier
      match: {prefix: "/"}
      route: {cluster: "outbound|8080|pair|web.demo.svc.cluster.local"}
"#;
        format!(
            "{}clusters:\n{}{}{}{}{}endpoints:\n{}{}{}{}{}",
            route_config(routes),
            cluster(
                "one",
                "  circuitBreakers: {thresholds: [{maxConnections: 1, maxPendingRequests: 1, maxRequests: 100}]}\n"
            ),
            cluster(
                "pair",
                "  outlierDetection: {consecutive5xx: 3, interval: 0.2s, baseEjectionTime: 2s, maxEjectionPercent: 100}\n"
            ),
            cluster("good", ""),
            cluster("mirror", ""),
            cluster("grpc", "  http2ProtocolOptions: {}\n"),
            endpoints("one", &[&pods[0]]),
            endpoints("pair", &[&pods[1], &pods[2]]),
            endpoints("good", &[&pods[1]]),
            endpoints("mirror", &[&pods[3]]),
            endpoints("grpc", &[&pods[4]]),
        )
    });

    // 1 connection, 1 pending: of 8 concurrent slow requests some overflow at once with 503 UO.
    let results = concurrent(&m.client, vip(), 8, 8, |_| {
        HttpRequest::get("/limited?delay_ms=400").authority(format!("{HOST}:{PORT}"))
    })
    .unwrap();
    let overflowed: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.status == 503)
        .collect();
    let served = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    assert!(!overflowed.is_empty(), "no request overflowed");
    assert!(
        served >= 2,
        "the connection and the pending slot served requests: {served}"
    );
    assert!(
        overflowed.iter().all(|r| r.elapsed < Duration::from_millis(300)),
        "overflow is a fast local reply"
    );
    assert!(
        overflowed
            .iter()
            .all(|r| r.header("x-envoy-overloaded") == Some("true")),
        "an overflow is marked as Envoy marks it, so no other Envoy retries it"
    );
    assert_eq!(
        m.requests(&[("response_code", "503"), ("response_flags", "UO")]),
        overflowed.len() as f64
    );

    // Outlier detection: `bad` answers 500; after 3 in a row it is ejected and `good` takes
    // everything; after the 2 s ejection it is back.
    m.backend("bad").set_status(Some(500));
    let mut fails = 0;
    for _ in 0..20 {
        if m.get("/x", &[]).status == 500 {
            fails += 1;
        }
    }
    assert_eq!(fails, 3, "exactly the 3 consecutive failures before ejection");
    let bad_before = m.backend("bad").requests();
    for _ in 0..10 {
        assert_eq!(m.get("/x", &[]).backend(), Some("good"));
    }
    assert_eq!(m.backend("bad").requests(), bad_before, "ejected host got no traffic");
    // `nodeway inspect endpoints` shows it, like istioctl's OUTLIER CHECK column.
    let table = m.node.get("/endpoints?format=table");
    let row = |addr: SocketAddr| {
        table
            .lines()
            .find(|l| l.contains(&addr.to_string()) && l.contains("|pair|"))
            .unwrap_or_else(|| panic!("no row for {addr} in\n{table}"))
            .to_string()
    };
    assert!(row(m.backend("bad").addr).contains("FAILED"), "{table}");
    assert!(row(m.backend("good").addr).contains("OK"), "{table}");
    m.backend("bad").set_status(None);
    std::thread::sleep(Duration::from_millis(2300));
    let back = (0..10).filter(|_| m.get("/x", &[]).backend() == Some("bad")).count();
    assert!(back >= 3, "bad is back after its ejection time: {back}/10");

    // Mirroring: the mirror sees the request with `-shadow` on the authority; the client only
    // sees the primary's answer.
    let r = m.get("/mirrored/1", &[]);
    assert_eq!((r.status, r.backend()), (200, Some("good")));
    assert!(
        nodeway_tests::eventually(Duration::from_secs(3), || m.backend("mirror").requests() == 1),
        "mirror not reached"
    );
    let shadow = m.backend("mirror").received();
    assert_eq!(shadow[0].authority, format!("{HOST}-shadow:{PORT}"));
    assert_eq!(shadow[0].path, "/mirrored/1");

    // A gRPC unary call routed over HTTP/2 to its cluster.
    let status = grpc_health_check(&m.client, vip(), Some(&format!("{HOST}:{PORT}"))).unwrap();
    assert_eq!(
        status.unwrap(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    assert_eq!(m.backend("grpc").requests(), 1);
    assert_eq!(
        m.requests(&[
            ("request_protocol", "grpc"),
            ("response_code", "200"),
            ("destination_workload", "grpc"),
            ("grpc_response_status", "0"),
        ]),
        2.0,
        "one gRPC call, reported by the source and the destination:\n{}",
        m.node.metrics()
    );
}

/// A WebSocket-style upgrade passes through: the route allows `websocket`, the backend answers
/// 101, and from then on bytes flow both ways untouched.
#[test]
fn websocket_upgrade_passes_through() {
    use std::io::{Read, Write};
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("l7ws").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("ws", "demo").unwrap();
    let routes = r#"    - name: ws
      match: {prefix: "/"}
      route: {cluster: "outbound|8080|ws|web.demo.svc.cluster.local", upgradeConfigs: [{upgradeType: websocket}]}
"#;
    let cfg = bed.dir().join("node.yaml");
    let l7 = format!(
        "{}clusters:\n{}endpoints:\n{}",
        route_config(routes),
        cluster("ws", ""),
        endpoints("ws", &[&server])
    );
    fs::write(
        &cfg,
        format!(
            "{}{l7}",
            config_yaml("node-a", &["demo"], &[(&client).into(), (&server).into()])
        ),
    )
    .unwrap();
    let _node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    // A minimal upgrade server: reads the request head, answers 101, then echoes.
    let listener = server
        .run(|| std::net::TcpListener::bind(("0.0.0.0", PORT)))
        .unwrap()
        .unwrap();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            if s.read(&mut b).unwrap() == 0 {
                return head;
            }
            head.push(b[0]);
        }
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
        head
    });
    let mut c = client.connect(vip()).unwrap().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(
        format!("GET /chat HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        assert_eq!(
            c.read(&mut b).unwrap(),
            1,
            "closed before the response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    c.write_all(b"frame-bytes").unwrap();
    let mut echoed = [0u8; 11];
    c.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"frame-bytes");
    let seen = String::from_utf8_lossy(&srv.join().unwrap()).to_lowercase();
    assert!(
        seen.contains("upgrade: websocket") && seen.contains("connection: upgrade"),
        "{seen}"
    );
}

/// Authorization with HTTP fields (a local-file extension): requests are checked one by one on
/// the destination's inbound side, over HBONE and plaintext alike; a denial is Envoy's
/// `403 RBAC: access denied`, the connection stays usable.
#[test]
fn http_authorization_on_inbound() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("l7authz").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("api", "demo").unwrap();
    let outsider = bed.add_pod("outsider", "plain").unwrap();
    let policies = r#"policies:
- name: public-reads
  namespace: demo
  scope: NAMESPACE
  action: ALLOW
  rules: [{clauses: [{matches: [{methods: [{exact: GET}], paths: [{prefix: /public/}]}]}]}]
- name: no-secrets
  namespace: demo
  scope: NAMESPACE
  action: DENY
  rules: [{clauses: [{matches: [{paths: [{suffix: /secret}]}]}]}]
- name: no-debug
  namespace: demo
  scope: NAMESPACE
  action: DENY
  rules: [{clauses: [{matches: [{headers: [{name: x-debug, values: [{presence: {}}]}]}]}]}]
"#;
    let cfg = bed.dir().join("node.yaml");
    let pods = [(&client).into(), (&server).into(), (&outsider).into()];
    fs::write(&cfg, format!("{}{policies}", config_yaml("node-a", &["demo"], &pods))).unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let backend = HttpBackend::start(&server, PORT, "api").unwrap();
    let to = server.addr(PORT);
    for (who, pod) in [("hbone", &client), ("plaintext", &outsider)] {
        let get = |path: &str| pod.http_request(to, HttpRequest::get(path)).unwrap();
        let r = get("/public/a");
        assert_eq!((r.status, r.backend()), (200, Some("api")), "{who}: {}", r.text());
        let r = pod
            .http_request(to, HttpRequest::new(hyper::Method::POST, "/public/a").body(&b"x"[..]))
            .unwrap();
        assert_eq!((r.status, r.text().as_str()), (403, "RBAC: access denied"), "{who}");
        assert_eq!(get("/admin").status, 403, "{who}: no ALLOW policy matched");
        assert_eq!(get("/public/secret").status, 403, "{who}: DENY wins");
        let r = pod
            .http_request(to, HttpRequest::get("/public/a").header("x-debug", "1"))
            .unwrap();
        assert_eq!(r.status, 403, "{who}: header condition");
        // Not HTTP at all: an ALLOW rule with HTTP fields matches no such connection and a DENY
        // rule matches on its other fields (Istio's semantics): refused before the app.
        let raw = pod.exchange(to, b"hello, not http\n").unwrap();
        assert!(raw.as_ref().map_or(true, Vec::is_empty), "{who}: {raw:?}");
    }
    // Only the allowed requests reached the app.
    assert_eq!(backend.requests(), 2);
    let requests = |code, flags| {
        metric_value(
            &node.metrics(),
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", "api"),
                ("response_code", code),
                ("response_flags", flags),
            ],
        )
    };
    assert_eq!(requests("200", "-"), 2.0, "{}", node.metrics());
    assert_eq!(requests("403", "RBAC"), 8.0, "{}", node.metrics());
    let refused = metric_value(
        &node.metrics(),
        "nodeway_inbound_refused_total",
        &[("pod", "demo/api"), ("reason", "authorization")],
    );
    assert_eq!(refused, 10.0, "{}", node.metrics());
    assert!(
        node.log_text().contains("request POST /public/a"),
        "denial logged with the request"
    );
}

/// A connection the router serves is in the connection table (`/connections`) while it is open,
/// as an outbound connection of the client pod to the service address, and leaves it when the
/// client closes it; its bytes count in `istio_tcp_*` like any other connection's.
#[test]
fn routed_connections_are_in_the_connection_table() {
    use std::io::{Read, Write};
    if !require_root() {
        return;
    }
    let m = mesh("l7conns", &["v1"], |pods| {
        let routes = format!(
            "    - match: {{prefix: \"/\"}}\n      route: {{cluster: \"{}\"}}\n",
            cluster_name("v1")
        );
        format!(
            "{}clusters:\n{}endpoints:\n{}",
            route_config(&routes),
            cluster("v1", ""),
            endpoints("v1", &[&pods[0]])
        )
    });
    let mut conn = m.client.connect(vip()).unwrap().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(format!("GET /held HTTP/1.1\r\nHost: {HOST}:{PORT}\r\n\r\n").as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the response head");
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let routed = |c: &serde_json::Value| {
        c["direction"] == "outbound" && c["destination"] == vip().to_string() && c["pod"] == "demo/client"
    };
    let open = m.node.connections();
    assert_eq!(open.iter().filter(|c| routed(c)).count(), 1, "{open:#?}");
    // The proxy counts a write once the kernel took it, which the client may see first.
    let both_ways =
        |c: &serde_json::Value| routed(c) && c["bytesReceived"].as_u64() > Some(0) && c["bytesSent"].as_u64() > Some(0);
    assert!(
        nodeway_tests::eventually(Duration::from_secs(5), || m.node.connections().iter().any(both_ways)),
        "bytes not counted both ways: {:#?}",
        m.node.connections()
    );
    drop(conn);
    assert!(
        nodeway_tests::eventually(Duration::from_secs(5), || !m.node.connections().iter().any(routed)),
        "still listed after close: {:#?}",
        m.node.connections()
    );
    let opened = metric_value(
        &m.node.metrics(),
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_workload", "client"),
            ("destination_service", "unknown"),
        ],
    );
    assert!(opened >= 1.0, "opened {opened}");
}

/// A client that never finishes its request line is disconnected after the header-read timeout;
/// a well-formed request on another connection meanwhile is served.
#[test]
fn a_slowloris_client_is_disconnected_while_a_sibling_is_served() {
    use std::io::{Read, Write};
    if !require_root() {
        return;
    }
    let m = mesh_with("l7slow", &["v1"], &["--header-read-timeout", "1"], |p| {
        let routes = format!(
            "    - name: all\n      match: {{prefix: \"/\"}}\n      route: {{cluster: \"{}\"}}\n",
            cluster_name("v1")
        );
        format!(
            "{}clusters:\n{}endpoints:\n{}",
            route_config(&routes),
            cluster("v1", ""),
            endpoints("v1", &[&p[0]])
        )
    });
    let mut slow = m.client.connect(vip()).unwrap().unwrap();
    slow.write_all(b"GET /slow HTT").unwrap();
    assert_eq!(m.get("/fast", &[]).status, 200, "the sibling is served");
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    match slow.read_to_end(&mut got) {
        Ok(_) => assert!(!String::from_utf8_lossy(&got).contains(" 200 "), "{got:?}"),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "closed, not timed out: {e}"
        ),
    }
    let one = || m.requests(&[("reporter", "source")]) == 1.0;
    assert!(
        nodeway_tests::eventually(Duration::from_secs(5), one),
        "only the sibling was a request"
    );
    drop(m.bed);
}
