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
        dst,
        labels,
        reporter: Reporter {
            metrics: metrics.clone(),
            access_log: false,
        },
        app: cluster_state(&format!("inbound|{}||", dst.port()), 3),
        connector: Arc::new(backends.clone()),
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
