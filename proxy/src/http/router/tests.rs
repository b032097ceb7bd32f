//! The router end to end in memory: a client on the router's server, backends behind the
//! in-memory connector, assertions on what the client got, what backends saw, and the metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use http::{header, Request};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::http::{
    body::{empty, full},
    testing::{l7, Backends, Client},
};

fn to(subset: &str) -> String {
    format!("outbound|8080|{subset}|web")
}

/// Waits until `f` holds (a request is reported once its response body has ended, which the
/// client may see a moment before the server does).
async fn eventually(f: impl Fn() -> bool) -> bool {
    for _ in 0..1000 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

fn route(name: &str, m: Value, action: Value) -> Value {
    let mut r = json!({"name": name, "match": m});
    if let (Some(r), Some(a)) = (r.as_object_mut(), action.as_object()) {
        r.extend(a.clone());
    }
    r
}

#[tokio::test]
async fn routes_by_header_and_prefix_with_rewrites_and_header_changes() {
    let b = Backends::new();
    let (v1, v2) = (b.http("v1"), b.http("v2"));
    let routes = json!([
        route(
            "jason",
            json!({"prefix": "/", "headers": [{"name": "end-user", "stringMatch": {"exact": "jason"}}]}),
            json!({"route": {"cluster": to("v2")}})
        ),
        route(
            "api",
            json!({"prefix": "/ratings/"}),
            json!({
            "route": {"cluster": to("v2"), "prefixRewrite": "/api/"},
            "requestHeadersToAdd": [{"header": {"key": "x-routed-by", "value": "nodeway"}}],
            "responseHeadersToAdd": [{"header": {"key": "x-route", "value": "ratings"}}]})
        ),
        route(
            "default",
            json!({"prefix": "/"}),
            json!({"route": {"cluster": to("v1")}})
        ),
    ]);
    let config = l7(routes, &[("v1", &[v1], json!({})), ("v2", &[v2], json!({}))]);
    let mut c = Client::new(config, b.clone()).await;

    let (r, body) = c.get("/reviews", &[("end-user", "jason")]).await;
    assert_eq!((r.status().as_u16(), body.as_str()), (200, "v2"));
    let (r, body) = c
        .get(
            "/reviews",
            &[
                ("connection", "x-secret"),
                ("x-secret", "1"),
                ("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/admin/sa/root"),
            ],
        )
        .await;
    assert_eq!((r.status().as_u16(), body.as_str()), (200, "v1"));
    let seen = &b.received("v1")[0];
    assert_eq!(seen.header("x-envoy-attempt-count"), Some("1"));
    assert!(seen.header("x-request-id").is_some_and(|id| id.len() == 36));
    assert_eq!(seen.header("x-secret"), None, "a header Connection lists is hop-by-hop");
    assert_eq!(
        seen.header("x-forwarded-client-cert"),
        None,
        "an app's XFCC is sanitized"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));

    let (r, _) = c.get("/ratings/7?x=1", &[]).await;
    assert_eq!(r.headers().get("x-route").unwrap(), "ratings");
    assert!(r.headers().contains_key("x-envoy-upstream-service-time"));
    let seen = b.received("v2").pop().unwrap();
    assert_eq!(seen.path, "/api/7?x=1");
    assert_eq!(seen.header("x-routed-by"), Some("nodeway"));
    assert!(
        eventually(|| c.requests(&[("response_code", "200"), ("destination_workload", "v2")]) == 2.0).await,
        "{}",
        c.metrics.encode()
    );
    assert_eq!(
        c.requests(&[("destination_service", "web"), ("reporter", "source")]),
        3.0
    );
}

#[tokio::test]
async fn local_replies_for_no_route_redirect_direct_response_and_protocol_errors() {
    let b = Backends::new();
    let routes = json!([
        route(
            "old",
            json!({"path": "/old"}),
            json!({"redirect": {"pathRedirect": "/new", "responseCode": "MOVED_PERMANENTLY"}})
        ),
        route(
            "health",
            json!({"path": "/health"}),
            json!({"directResponse": {"status": 200, "body": {"inlineString": "ok from nodeway"}}})
        ),
        route(
            "gone",
            json!({"prefix": "/gone"}),
            json!({"route": {"cluster": "outbound|8080|missing|web"}})
        ),
        route(
            "empty",
            json!({"prefix": "/empty"}),
            json!({"route": {"cluster": to("empty")}})
        ),
        route(
            "down",
            json!({"prefix": "/down"}),
            json!({"route": {"cluster": to("down")}})
        ),
    ]);
    let nowhere = "198.18.9.9:8080".parse().unwrap();
    let config = l7(routes, &[("empty", &[], json!({})), ("down", &[nowhere], json!({}))]);
    let mut c = Client::new(config, b).await;

    let (r, _) = c.get("/old?q=2", &[]).await;
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers().get(header::LOCATION).unwrap(), "http://web:8080/new?q=2");
    let (r, body) = c.get("/health", &[]).await;
    assert_eq!((r.status().as_u16(), body.as_str()), (200, "ok from nodeway"));
    let (r, body) = c.get("/health", &[("host", "other")]).await;
    assert_eq!(
        (r.status().as_u16(), body.as_str()),
        (400, "multiple Host headers"),
        "never routed by one of them"
    );
    let (r, body) = c.get("/gone", &[]).await;
    assert_eq!((r.status().as_u16(), body.as_str()), (503, ""));
    let (r, body) = c.get("/empty", &[]).await;
    assert_eq!((r.status().as_u16(), body.as_str()), (503, "no healthy upstream"));
    let (r, body) = c.get("/down", &[]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        body,
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
    );
    let req = Request::get("/").header(header::HOST, "unknown").body(empty()).unwrap();
    let (r, body) = c.send(req).await;
    assert_eq!((r.status().as_u16(), body.as_str()), (404, ""));
    // A gRPC client gets the trailers-only form.
    let req = Request::post("/nope")
        .header(header::HOST, "unknown")
        .header("content-type", "application/grpc")
        .body(empty())
        .unwrap();
    let (r, _) = c.send(req).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get("grpc-status").unwrap(), "12");

    let flags = |f: &str, code: &str| c.requests(&[("response_flags", f), ("response_code", code)]);
    assert!(eventually(|| flags("UF", "503") == 1.0).await, "{}", c.metrics.encode());
    assert_eq!(flags("NR", "404"), 1.0);
    assert_eq!(flags("DPE", "400"), 1.0);
    assert_eq!(flags("NC", "503"), 1.0);
    assert_eq!(flags("UH", "503"), 1.0);
    assert_eq!(
        c.requests(&[("response_flags", "NR"), ("grpc_response_status", "12")]),
        1.0
    );
    assert_eq!(flags("-", "301") + flags("-", "200"), 2.0);
}

#[tokio::test]
async fn retries_go_to_another_host_and_end_with_urx() {
    let b = Backends::new();
    let (a, bb) = (b.http("a"), b.http("b"));
    let retry = json!({"retryOn": "5xx", "numRetries": 2,
        "retryHostPredicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}], "hostSelectionRetryMaxAttempts": "5",
        "retryBackOff": {"baseInterval": "0.001s", "maxInterval": "0.002s"}});
    let routes = json!([route(
        "retried",
        json!({"prefix": "/"}),
        json!({"route": {"cluster": to("ab"), "retryPolicy": retry}})
    )]);
    let mut c = Client::new(l7(routes, &[("ab", &[a, bb], json!({}))]), b.clone()).await;

    b.set_status("a", Some(503));
    for _ in 0..6 {
        let (r, body) = c.get("/retry", &[]).await;
        assert_eq!((r.status().as_u16(), body.as_str()), (200, "b"));
    }
    let a_seen = b.received("a").len();
    assert!(a_seen >= 1, "round robin sent first attempts to a");
    let retried = b
        .received("b")
        .iter()
        .filter(|s| s.header("x-envoy-attempt-count") == Some("2"))
        .count();
    assert_eq!(
        retried, a_seen,
        "every request that hit a was retried on b as attempt 2"
    );
    let counters = c.source.upstreams.cluster_status(&to("ab")).unwrap().counters;
    assert_eq!(counters.upstream_rq_retry, a_seen as u64);

    // Both fail: 3 attempts, the last 503 goes back, flagged URX (retries used up).
    b.set_status("b", Some(503));
    let before = b.received("a").len() + b.received("b").len();
    let (r, _) = c.get("/retry", &[]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(b.received("a").len() + b.received("b").len() - before, 3);
    assert!(eventually(|| c.requests(&[("response_code", "503"), ("response_flags", "URX")]) == 1.0).await);

    // A body sent as a stream is not retried.
    let req = Request::post("/upload")
        .header(header::HOST, "web:8080")
        .body(full(vec![b'x'; 2 << 20].into()))
        .unwrap();
    let before = b.received("a").len() + b.received("b").len();
    let (r, _) = c.send(req).await;
    assert_eq!(r.status(), 503);
    assert_eq!(b.received("a").len() + b.received("b").len() - before, 1);
    assert_eq!(
        b.received("a")
            .iter()
            .chain(&b.received("b"))
            .map(|s| s.body.len())
            .max(),
        Some(2 << 20)
    );
}

#[tokio::test]
async fn per_try_and_route_timeouts_are_ut() {
    let b = Backends::new();
    let slow = b.http("slow");
    let per_try = json!({"retryOn": "5xx", "numRetries": 1, "perTryTimeout": "0.02s",
        "retryBackOff": {"baseInterval": "0.001s", "maxInterval": "0.002s"}});
    let routes = json!([
        route(
            "tries",
            json!({"prefix": "/tries"}),
            json!({"route": {"cluster": to("slow"), "retryPolicy": per_try}})
        ),
        route(
            "slow",
            json!({"prefix": "/"}),
            json!({"route": {"cluster": to("slow"), "timeout": "0.05s"}})
        ),
    ]);
    let mut c = Client::new(l7(routes, &[("slow", &[slow], json!({}))]), b.clone()).await;

    let (r, body) = c.get("/tries?delay_ms=2000", &[]).await;
    assert_eq!((r.status().as_u16(), body.as_str()), (504, "upstream request timeout"));
    assert_eq!(b.received("slow").len(), 0, "neither try got an answer in time");
    let (r, body) = c.get("/route?delay_ms=2000", &[]).await;
    assert_eq!((r.status().as_u16(), body.as_str()), (504, "upstream request timeout"));
    assert!(
        eventually(|| c.requests(&[("response_code", "504"), ("response_flags", "UT,URX")]) == 1.0).await,
        "{}",
        c.metrics.encode()
    );
    assert!(eventually(|| c.requests(&[("response_code", "504"), ("response_flags", "UT")]) == 1.0).await);
    // The access log names the endpoint the route timeout cut off, and how long it had.
    assert!(eventually(|| c.access_log().len() == 2).await);
    let cut = c
        .access_log()
        .into_iter()
        .find(|l| l["path"] == "/route?delay_ms=2000")
        .expect("logged");
    assert_eq!(cut["response_flags"], "UT", "{cut}");
    assert_eq!(cut["upstream_host"], slow.to_string(), "{cut}");
    assert!(
        cut["upstream_service_time"].as_u64().is_some_and(|ms| ms >= 50),
        "{cut}"
    );
}

#[tokio::test]
async fn refused_streams_are_retried_under_refused_stream() {
    let b = Backends::new();
    let (refuser, good) = (b.refuse_h2("refuser"), b.http("good"));
    let retry = json!({"retryOn": "refused-stream", "numRetries": 3,
        "retryHostPredicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
        "retryBackOff": {"baseInterval": "0.001s", "maxInterval": "0.002s"}});
    let h2 = json!({"http2ProtocolOptions": {}});
    let routes = json!([
        route(
            "retried",
            json!({"prefix": "/retried"}),
            json!({"route": {"cluster": to("pair"), "retryPolicy": retry}})
        ),
        route(
            "once",
            json!({"prefix": "/"}),
            json!({"route": {"cluster": to("refuser")}})
        ),
    ]);
    let config = l7(
        routes,
        &[("pair", &[refuser, good], h2.clone()), ("refuser", &[refuser], h2)],
    );
    let mut c = Client::new(config, b.clone()).await;
    for _ in 0..4 {
        let (r, body) = c.get("/retried", &[]).await;
        assert_eq!((r.status().as_u16(), body.as_str()), (200, "good"));
    }
    assert_eq!(b.received("good")[0].version, http::Version::HTTP_2);
    let (r, body) = c.get("/once", &[]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        body,
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
    );
    assert!(eventually(|| c.requests(&[("response_code", "503"), ("response_flags", "UC")]) == 1.0).await);
}

#[tokio::test]
async fn overflow_is_uo_and_faults_are_fi_and_di() {
    let b = Backends::new();
    let one = b.http("one");
    let fault = json!({"envoy.filters.http.fault": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "headers": [{"name": "x-fault", "presentMatch": true}],
        "delay": {"fixedDelay": "0.001s", "percentage": {"numerator": 100}},
        "abort": {"httpStatus": 418, "percentage": {"numerator": 100}}}});
    let routes = json!([
        route(
            "faulty",
            json!({"prefix": "/fault"}),
            json!({"route": {"cluster": to("one")}, "typedPerFilterConfig": fault})
        ),
        route(
            "limited",
            json!({"prefix": "/"}),
            json!({"route": {"cluster": to("one")}})
        ),
    ]);
    let limits = json!({"circuitBreakers": {"thresholds": [{"maxRequests": 1}]}});
    let config = l7(routes, &[("one", &[one], limits)]);
    let mut c = Client::new(config, b.clone()).await;

    let (r, body) = c.get("/fault", &[("x-fault", "1")]).await;
    assert_eq!((r.status().as_u16(), body.as_str()), (418, "fault filter abort"));
    let (r, _) = c.get("/fault", &[]).await;
    assert_eq!(r.status(), 200);
    // The one request slot taken: the next request overflows at once.
    let l7 = c.source.l7.clone();
    let cluster = l7.cluster(&to("one")).unwrap();
    let state = c.source.upstreams.cluster(cluster, l7.endpoints(cluster));
    let held = state.admit_request().unwrap();
    let (r, body) = c.get("/limited", &[]).await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        body,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow"
    );
    drop(held);
    assert_eq!(c.get("/limited", &[]).await.0.status(), 200);
    assert!(eventually(|| c.requests(&[("response_code", "503"), ("response_flags", "UO")]) == 1.0).await);
    assert_eq!(
        c.requests(&[("response_code", "418"), ("response_flags", "DI,FI")]),
        1.0
    );
}

#[tokio::test]
async fn mirrors_get_a_shadow_copy() {
    let b = Backends::new();
    let (good, mirror) = (b.http("good"), b.http("mirror"));
    let routes = json!([route(
        "mirrored",
        json!({"prefix": "/"}),
        json!({"route": {"cluster": to("good"),
        "requestMirrorPolicies": [{"cluster": to("mirror")}]}})
    )]);
    let config = l7(
        routes,
        &[("good", &[good], json!({})), ("mirror", &[mirror], json!({}))],
    );
    let mut c = Client::new(config, b.clone()).await;
    let req = Request::post("/mirrored/1")
        .header(header::HOST, "web:8080")
        .body(full("hello".into()))
        .unwrap();
    let (r, body) = c.send(req).await;
    assert_eq!((r.status().as_u16(), body.as_str()), (200, "good"));
    assert!(
        eventually(|| b.received("mirror").len() == 1).await,
        "mirror not reached"
    );
    let shadow = &b.received("mirror")[0];
    assert_eq!(shadow.authority, "web-shadow:8080");
    assert_eq!((shadow.method.as_str(), shadow.path.as_str()), ("POST", "/mirrored/1"));
    assert_eq!(&shadow.body[..], b"hello");
}

#[tokio::test]
async fn an_allowed_upgrade_is_bridged() {
    let b = Backends::new();
    let ws = b.http("ws");
    let routes = json!([route(
        "ws",
        json!({"prefix": "/"}),
        json!({"route": {"cluster": to("ws"), "upgradeConfigs": [{"upgradeType": "websocket"}]}})
    )]);
    let mut c = Client::new(l7(routes, &[("ws", &[ws], json!({}))]), b.clone()).await;
    let req = Request::get("/chat")
        .header(header::HOST, "web:8080")
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .body(empty())
        .unwrap();
    let resp = c.send_raw(req).await;
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers().get(header::UPGRADE).unwrap(), "websocket");
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"frame-bytes").await.unwrap();
    let mut echoed = [0u8; 11];
    io.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"frame-bytes");
    let seen = &b.received("ws")[0];
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(seen.version, http::Version::HTTP_11);
}

#[tokio::test]
async fn concurrent_uploads_stay_within_the_buffer_budget_and_the_rest_go_unretried() {
    const BUDGET: usize = 1 << 20;
    const UPLOAD: usize = 400 * 1024;
    let b = Backends::new();
    let up = b.http("up");
    let gate = b.hold("up");
    b.set_status("up", Some(503));
    let retry = json!({"retryOn": "5xx", "numRetries": 1,
        "retryBackOff": {"baseInterval": "0.001s", "maxInterval": "0.002s"}});
    let routes = json!([route(
        "r",
        json!({"prefix": "/"}),
        json!({"route": {"cluster": to("up"), "retryPolicy": retry}})
    )]);
    let config = l7(routes, &[("up", &[up], json!({}))]);
    let metrics = crate::metrics::Metrics::new();
    let limits = crate::http::body::BufferLimits {
        budget: crate::http::body::BufferBudget::new(
            BUDGET,
            metrics.buffer_budget_reserved_bytes.clone(),
            metrics.buffer_budget_exhausted.clone(),
        ),
        // Time enough for a whole body to arrive on a loaded machine: only the budget decides.
        wait: Duration::from_secs(10),
        ..Default::default()
    };
    let reserved = metrics.buffer_budget_reserved_bytes.clone();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(reserved.get(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    // Six uploads held at the backend together: two fit the budget, four find it spent.
    let mut uploads = Vec::new();
    for i in 0..6 {
        let mut c = Client::with_buffer(config.clone(), b.clone(), limits.clone()).await;
        uploads.push(tokio::spawn(async move {
            let req = Request::post("/upload")
                .header(header::HOST, "web:8080")
                .body(full(vec![b'x'; UPLOAD].into()))
                .unwrap();
            c.send(req).await.0.status()
        }));
        assert!(
            eventually(|| b.received("up").len() == i + 1).await,
            "upload {i} arrived"
        );
    }
    let text = metrics.encode();
    assert!(text.contains("nodeway_buffer_budget_exhausted_total 4"), "{text}");
    assert!(
        text.contains(&format!("nodeway_buffer_budget_reserved_bytes {}", 2 * UPLOAD)),
        "{text}"
    );
    gate.add_permits(100);
    for u in uploads {
        assert_eq!(u.await.unwrap(), 503);
    }
    sampler.abort();
    assert!(peak.load(std::sync::atomic::Ordering::Relaxed) <= BUDGET as i64);
    let seen = b.received("up");
    assert_eq!(seen.len(), 6 + 2, "only the two buffered uploads were retried");
    assert!(seen.iter().all(|s| s.body.len() == UPLOAD), "every body arrived whole");
    assert!(
        eventually(|| metrics.buffer_budget_reserved_bytes.get() == 0).await,
        "all given back"
    );
}
