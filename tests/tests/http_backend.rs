//! The HTTP harness itself, without nodeway: a client pod talks to a backend pod directly over
//! the bed's bridge (HTTP/1.1, h2c, gRPC health, per-request and per-backend controls).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use hyper::{Method, Version};
use nodeway_tests::{
    http::{concurrent, grpc_health_check, HttpConnection, HttpRequest},
    require_root, TestBed,
};
use tonic_health::pb::health_check_response::ServingStatus;

const PORT: u16 = 8080;

#[test]
fn backend_and_clients_pod_to_pod() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("http").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let backend = server.http_backend(PORT, "v1").unwrap();
    let target = server.addr(PORT);

    // HTTP/1.1: the JSON names the backend and what it saw.
    let r = client
        .http_request(
            target,
            HttpRequest::new(Method::POST, "/hello?x=1")
                .authority("reviews.demo.svc.cluster.local:8080")
                .header("x-test", "one")
                .body("abc"),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.backend(), Some("v1"));
    let j = r.json();
    assert_eq!(j["backend"], "v1");
    assert_eq!(j["method"], "POST");
    assert_eq!(j["path"], "/hello?x=1");
    assert_eq!(j["authority"], "reviews.demo.svc.cluster.local:8080");
    assert_eq!(j["protocol"], "HTTP/1.1");
    assert_eq!(j["headers"]["x-test"], "one");
    assert_eq!(j["body_len"], 3);

    // Per-request controls.
    let r = client.http_get(target, "/?status=503").unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.backend(), Some("v1"));
    let r = client.http_get(target, "/slow?delay_ms=300").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.elapsed >= Duration::from_millis(300), "{:?}", r.elapsed);
    let r = client.http_get(target, "/?body_bytes=100000").unwrap();
    assert_eq!(r.body.len(), 100_000);
    // The client's own bound.
    let e = client
        .http_request(
            target,
            HttpRequest::get("/?delay_ms=2000").timeout(Duration::from_millis(200)),
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("no response within"), "{e:#}");

    // h2c with prior knowledge.
    let r = client.http_request(target, HttpRequest::get("/h2").http2()).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.version, Version::HTTP_2);
    let j = r.json();
    assert_eq!(j["protocol"], "HTTP/2");
    assert_eq!(j["authority"], target.to_string());

    // Per-backend status, then back.
    backend.set_status(Some(500));
    assert_eq!(client.http_get(target, "/").unwrap().status, 500);
    assert_eq!(client.http_get(target, "/?status=200").unwrap().status, 500);
    backend.set_status(None);
    assert_eq!(client.http_get(target, "/").unwrap().status, 200);

    // The log of received requests.
    backend.clear();
    client
        .http_request(
            target,
            HttpRequest::get("/logged")
                .authority("shadow-svc-shadow")
                .header("x-request-id", "abc-123"),
        )
        .unwrap();
    let log = backend.received();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].method, "GET");
    assert_eq!(log[0].path, "/logged");
    assert_eq!(log[0].authority, "shadow-svc-shadow");
    assert_eq!(log[0].protocol, "HTTP/1.1");
    assert_eq!(log[0].header("x-request-id"), Some("abc-123"));
    assert_eq!(backend.requests(), 1);

    // gRPC health: a real unary call, then NOT_SERVING.
    assert_eq!(
        grpc_health_check(&client, target, None).unwrap().unwrap(),
        ServingStatus::Serving
    );
    backend.set_grpc_status(tonic_health::ServingStatus::NotServing);
    assert_eq!(
        grpc_health_check(&client, target, Some("grpc.demo.svc:8080"))
            .unwrap()
            .unwrap(),
        ServingStatus::NotServing
    );
    let grpc = backend
        .received()
        .into_iter()
        .filter(|r| r.path.starts_with("/grpc.health.v1.Health/Check"))
        .collect::<Vec<_>>();
    assert_eq!(grpc.len(), 2);
    assert_eq!(grpc[1].authority, "grpc.demo.svc:8080");
    assert_eq!(grpc[1].protocol, "HTTP/2");

    // Bounded concurrency: 50 requests, 10 in flight, each on its own connection.
    backend.clear();
    let results = concurrent(&client, target, 10, 50, |i| {
        HttpRequest::get(&format!("/c/{i}?delay_ms=20"))
    })
    .unwrap();
    assert_eq!(results.len(), 50);
    for (i, r) in results.iter().enumerate() {
        let r = r.as_ref().unwrap_or_else(|e| panic!("request {i}: {e:#}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], format!("/c/{i}?delay_ms=20"));
    }
    assert_eq!(backend.requests(), 50);
    assert_eq!(backend.connections(), 50);

    // Keep-alive: many requests, one TCP connection, in both protocols.
    for version in [Version::HTTP_11, Version::HTTP_2] {
        backend.clear();
        let mut conn = HttpConnection::open(&client, target, version).unwrap();
        for i in 0..20 {
            let r = conn.send(HttpRequest::get(&format!("/k/{i}"))).unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.version, version);
        }
        assert_eq!(backend.requests(), 20);
        assert_eq!(backend.connections(), 1, "{version:?}");
    }

    // A stopped backend: connecting fails, bounded.
    drop(backend);
    assert!(client.http_get(target, "/").is_err());
}
