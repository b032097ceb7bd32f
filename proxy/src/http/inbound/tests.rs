//! Inbound HTTP in memory: a fake destination pod, its app behind the in-memory connector.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{header, Request};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Delivery, Inbound};
use crate::{
    authz::RequestAttrs,
    http::{
        body::empty,
        observe::Reporter,
        testing::{cluster_state, requests, Backends},
    },
    identity::Identity,
    metrics::{Metrics, TcpLabels},
    service::Service,
    upstream::Body,
};

/// Denies requests whose path ends in `/secret`; knows no services.
struct Pod;

impl Inbound for Pod {
    fn name(&self) -> String {
        "demo/api".into()
    }

    fn needs_request_authz(&self) -> bool {
        true
    }

    fn authorize(&self, _: SocketAddr, _: Option<&Identity>, _: SocketAddr, request: RequestAttrs) -> bool {
        !request.path.ends_with("/secret")
    }

    fn destination_service(&self, _: &str, _: u16) -> Option<Arc<Service>> {
        None
    }
}

struct App {
    backends: Backends,
    metrics: Arc<Metrics>,
    sender: hyper::client::conn::http1::SendRequest<Body>,
}

fn delivery(backends: &Backends, dst: SocketAddr, metrics: &Arc<Metrics>) -> Delivery {
    let mut labels = TcpLabels::new("destination");
    labels.destination_workload = "api".into();
    Delivery {
        pod: Arc::new(Pod),
        peer: "198.18.0.1:40000".parse().unwrap(),
        identity: None,
        own_identity: Identity::new("cluster.local", "demo", "api"),
        dst,
        labels,
        reporter: Reporter {
            metrics: metrics.clone(),
            access_log: None,
        },
        app: cluster_state(&format!("inbound|{}||", dst.port()), 3),
        connector: Arc::new(backends.clone()),
        server: crate::http::server::ServerLimits::default(),
        drain: crate::connections::Drain::never(),
    }
}

async fn app(dst: impl Fn(&Backends) -> SocketAddr) -> App {
    let backends = Backends::new();
    let dst = dst(&backends);
    let metrics = Arc::new(Metrics::new());
    let conn = delivery(&backends, dst, &metrics);
    let (near, far) = tokio::io::duplex(1 << 16);
    tokio::spawn(super::serve(far, Arc::new(conn)));
    let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(near)).await.unwrap();
    tokio::spawn(driver.with_upgrades());
    App {
        backends,
        metrics,
        sender,
    }
}

impl App {
    async fn get(&mut self, path: &str) -> (u16, String) {
        let req = Request::get(path)
            .header(header::HOST, "api:8080")
            .body(empty())
            .unwrap();
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn reported(&self, labels: &[(&str, &str)], n: f64) -> bool {
        for _ in 0..1000 {
            if requests(&self.metrics, labels) == n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }
}

#[tokio::test]
async fn requests_are_authorized_delivered_and_reported_by_the_destination() {
    let mut a = app(|b| b.http("api")).await;
    assert_eq!(a.get("/public/a").await, (200, "api".into()));
    assert_eq!(a.get("/public/secret").await, (403, "RBAC: access denied".into()));
    assert_eq!(
        a.backends.received("api").len(),
        1,
        "the denied request never reached the app"
    );
    let ok = [
        ("reporter", "destination"),
        ("destination_workload", "api"),
        ("response_code", "200"),
        ("response_flags", "-"),
    ];
    assert!(a.reported(&ok, 1.0).await, "{}", a.metrics.encode());
    assert!(
        a.reported(&[("response_code", "403"), ("response_flags", "RBAC")], 1.0)
            .await
    );
}

#[tokio::test]
async fn a_closed_app_connection_is_reopened() {
    let mut a = app(|b| b.http("api")).await;
    assert_eq!(a.get("/one").await.0, 200);
    assert_eq!(a.get("/two").await.0, 200);
    assert_eq!(a.backends.connections("api"), 1, "kept alive");
    assert_eq!(a.get("/close?close=1").await.0, 200);
    assert_eq!(a.get("/three").await.0, 200);
    assert_eq!(a.backends.connections("api"), 2);
    assert_eq!(a.backends.received("api").len(), 4);
}

#[tokio::test]
async fn an_unreachable_app_is_503_uf() {
    let mut a = app(|_| "198.18.9.9:8080".parse().unwrap()).await;
    let (status, body) = a.get("/").await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
    );
    assert!(
        a.reported(&[("response_code", "503"), ("response_flags", "UF")], 1.0)
            .await
    );
}

#[tokio::test]
async fn upgrades_pass_through_to_the_app() {
    let mut a = app(|b| b.http("ws")).await;
    let req = Request::get("/chat")
        .header(header::HOST, "api:8080")
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .body(empty())
        .unwrap();
    a.sender.ready().await.unwrap();
    let resp = a.sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    io.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
}

#[tokio::test]
async fn http2_requests_reach_the_app_as_http2() {
    let backends = Backends::new();
    let dst = backends.http("api");
    let metrics = Arc::new(Metrics::new());
    let (near, far) = tokio::io::duplex(1 << 16);
    tokio::spawn(super::serve(far, Arc::new(delivery(&backends, dst, &metrics))));
    let (mut sender, driver) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(near))
            .await
            .unwrap();
    tokio::spawn(driver);
    for _ in 0..3 {
        let req = Request::get("http://api.demo:8080/h2").body(empty()).unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    let seen = backends.received("api");
    assert_eq!(seen.len(), 3);
    assert!(seen
        .iter()
        .all(|s| s.version == http::Version::HTTP_2 && s.authority == "api.demo:8080"));
    assert_eq!(backends.connections("api"), 1, "the streams share one app connection");
}

/// The path is normalized before authorization and the app receives the normalized form; a
/// path that cannot be normalized is a 400 that never reaches the app.
#[tokio::test]
async fn paths_are_normalized_before_authorization_and_delivery() {
    let mut a = app(|b| b.http("api")).await;
    for bypass in [
        "/public/../secret",
        "//public//secret",
        "/public/%73ecret",
        "/public/secret;x=y",
    ] {
        assert_eq!(a.get(bypass).await.0, 403, "{bypass}");
    }
    assert_eq!(a.get("/public/./%61//b/..?q=/../x").await, (200, "api".into()));
    assert_eq!(a.get("/public/a%zz").await.0, 400);
    assert_eq!(a.get("/public/%00").await.0, 400);
    let seen = a.backends.received("api");
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/public/a/?q=/../x"]);
    assert!(
        a.reported(&[("response_code", "400"), ("response_flags", "DPE")], 2.0)
            .await
    );
}

/// A request over HTTP/1.1 with `headers`; the status the client got.
async fn send_h1(a: &mut App, headers: &[(&str, &str)]) -> u16 {
    let mut req = Request::get("/dest");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    a.sender.ready().await.unwrap();
    let resp = a.sender.send_request(req.body(empty()).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test]
async fn only_websocket_upgrades_pass_and_h2c_is_served_as_http1() {
    let mut a = app(|b| b.http("api")).await;
    let h2c = [
        ("host", "api:8080"),
        ("upgrade", "h2c"),
        ("connection", "Upgrade, HTTP2-Settings"),
        ("http2-settings", "AAMAAABkAAQAAP__"),
    ];
    assert_eq!(send_h1(&mut a, &h2c).await, 200, "h2c is dropped, the request served");
    let other = [("host", "api:8080"), ("upgrade", "tls/1.2"), ("connection", "Upgrade")];
    assert_eq!(send_h1(&mut a, &other).await, 403, "an upgrade the port does not allow");
    let seen = a.backends.received("api");
    assert_eq!(seen.len(), 1, "the refused upgrade never reached the app");
    for h in ["upgrade", "connection", "http2-settings"] {
        assert!(
            seen[0].header(h).is_none(),
            "{h} reached the app: {:?}",
            seen[0].headers
        );
    }
    assert_eq!(seen[0].version, http::Version::HTTP_11);
}

#[tokio::test]
async fn host_and_authority_must_agree() {
    let mut a = app(|b| b.http("api")).await;
    // HTTP/1.1 in absolute form: the URI's authority and Host.
    for (uri, host, want) in [
        ("http://api:8080/x", "API:8080", 200),
        ("http://api:8080/x", "evil:8080", 400),
    ] {
        let req = Request::get(uri).header(header::HOST, host).body(empty()).unwrap();
        a.sender.ready().await.unwrap();
        let resp = a.sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), want, "{uri} with Host {host}");
    }
    // HTTP/2: `:authority` and a Host header.
    let backends = a.backends.clone();
    let metrics = Arc::new(Metrics::new());
    let dst = SocketAddr::from(([198, 18, 1, 1], 8080));
    let (near, far) = tokio::io::duplex(1 << 16);
    tokio::spawn(super::serve(far, Arc::new(delivery(&backends, dst, &metrics))));
    let (mut h2, driver) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(near))
            .await
            .unwrap();
    tokio::spawn(driver);
    for (host, want) in [("api.demo:8080", 200), ("other:8080", 400)] {
        let req = Request::get("http://api.demo:8080/h2")
            .header(header::HOST, host)
            .body(empty())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), want, "Host {host}");
    }
    let seen = backends.received("api");
    assert_eq!(seen.len(), 2, "only the agreeing requests reached the app");
}

#[tokio::test]
async fn forged_peer_headers_are_removed_and_xfcc_comes_from_the_verified_peer() {
    let forged = [
        ("host", "api:8080"),
        (
            "x-forwarded-client-cert",
            "By=spiffe://x;URI=spiffe://cluster.local/ns/admin/sa/root",
        ),
        ("x-envoy-peer-metadata", "Zm9yZ2Vk"),
        ("x-envoy-peer-metadata-id", "sidecar~1.2.3.4~admin"),
    ];
    // Plaintext peer: nothing about a certificate reaches the app.
    let mut a = app(|b| b.http("api")).await;
    assert_eq!(send_h1(&mut a, &forged).await, 200);
    let seen = a.backends.received("api");
    for h in [
        "x-forwarded-client-cert",
        "x-envoy-peer-metadata",
        "x-envoy-peer-metadata-id",
    ] {
        assert!(seen[0].header(h).is_none(), "{h} reached the app");
    }
    // mTLS peer: XFCC names it, from its certificate, and nothing else.
    let backends = Backends::new();
    let dst = backends.http("api");
    let metrics = Arc::new(Metrics::new());
    let mut conn = delivery(&backends, dst, &metrics);
    conn.identity = Some(Identity::new("cluster.local", "demo", "client"));
    let (near, far) = tokio::io::duplex(1 << 16);
    tokio::spawn(super::serve(far, Arc::new(conn)));
    let (mut h2, driver) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(near))
            .await
            .unwrap();
    tokio::spawn(driver);
    let mut req = Request::get("http://api:8080/dest");
    for (k, v) in &forged[1..] {
        req = req.header(*k, *v);
    }
    let resp = h2.send_request(req.body(empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = backends.received("api");
    assert_eq!(
        seen[0].header("x-forwarded-client-cert"),
        Some("By=spiffe://cluster.local/ns/demo/sa/api;URI=spiffe://cluster.local/ns/demo/sa/client")
    );
    assert!(seen[0].header("x-envoy-peer-metadata").is_none());
    assert_eq!(seen[0].headers.get_all("x-forwarded-client-cert").iter().count(), 1);
}
