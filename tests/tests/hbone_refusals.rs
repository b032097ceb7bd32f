//! Bad HBONE peers are refused, logged with the peer and the reason, and counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fs, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodeway_proxy::{
    hbone::tls::client_config,
    identity::{dev_ca::DevCa, Identity, WorkloadCert},
};
use nodeway_tests::{config_yaml, eventually, metric_value, require_root, Node, Pod, TestBed};
use rustls::pki_types::ServerName;

const PORT: u16 = 8080;

/// What a hand-made HBONE client got: the TLS/h2 error, or the CONNECT status.
#[derive(Debug, PartialEq)]
enum Outcome {
    Failed(String),
    Status(StatusCode),
    /// A refusal and the text of its body.
    Refused(StatusCode, String),
}

/// From inside `from`, dials `to`:15008 with `cert`, expecting the server to be `expected`, and
/// sends CONNECT `authority` with `extra_header` bytes of header.
fn hbone_client(
    from: &Pod,
    to: SocketAddr,
    cert: WorkloadCert,
    expected: Identity,
    authority: String,
    extra_header: usize,
) -> Outcome {
    hbone_request(from, to, cert, expected, Method::CONNECT, authority, extra_header)
}

/// [`hbone_client`] with any method; a non-200 answer comes with its body.
fn hbone_request(
    from: &Pod,
    to: SocketAddr,
    cert: WorkloadCert,
    expected: Identity,
    method: Method,
    authority: String,
    extra_header: usize,
) -> Outcome {
    from.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let cfg = match client_config(&cert, expected) {
                Ok(c) => c,
                Err(e) => return Outcome::Failed(e.to_string()),
            };
            let tcp = tokio::net::TcpStream::connect(to).await.unwrap();
            let tls = match tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::IpAddress(to.ip().into()), tcp)
                .await
            {
                Ok(t) => t,
                Err(e) => return Outcome::Failed(e.to_string()),
            };
            let (mut send, conn) =
                match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await {
                    Ok(x) => x,
                    Err(e) => return Outcome::Failed(e.to_string()),
                };
            tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .version(Version::HTTP_2)
                .uri(authority);
            if extra_header > 0 {
                req = req.header("x-padding", "a".repeat(extra_header));
            }
            match tokio::time::timeout(
                Duration::from_secs(5),
                send.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
            )
            .await
            {
                Ok(Ok(r)) if r.status() == StatusCode::OK => Outcome::Status(r.status()),
                Ok(Ok(r)) => {
                    let status = r.status();
                    let body = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    Outcome::Refused(status, String::from_utf8_lossy(&body).into_owned())
                }
                Ok(Err(e)) => Outcome::Failed(e.to_string()),
                Err(_) => Outcome::Failed("timeout".into()),
            }
        })
    })
    .unwrap()
}

#[test]
fn bad_peers_are_refused_logged_and_counted() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("refusals").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let other = bed.add_pod("other", "demo").unwrap();
    let peer = bed.add_pod("peer", "plain").unwrap();
    let cfg = bed.dir().join("n.yaml");
    fs::write(
        &cfg,
        config_yaml(
            "node-a",
            &["demo"],
            &[(&server).into(), (&other).into(), (&peer).into()],
        ),
    )
    .unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let app = server.echo_server(PORT).unwrap();
    let ca = DevCa::load_or_create(&bed.dir().join("ca"), "cluster.local", Duration::from_secs(3600)).unwrap();
    let me = Identity::new("cluster.local", "plain", "peer");
    let server_id = Identity::new("cluster.local", "demo", "default");
    let hbone = server.addr(15008);
    let target = server.addr(PORT).to_string();
    let refused = |reason| {
        metric_value(
            &node.metrics(),
            "nodeway_inbound_refused_total",
            &[("pod", "demo/server"), ("reason", reason)],
        )
    };

    // A good peer gets 200: the harness itself is right.
    let ok = hbone_client(
        &peer,
        hbone,
        ca.issue(&me).unwrap(),
        server_id.clone(),
        target.clone(),
        0,
    );
    assert_eq!(ok, Outcome::Status(StatusCode::OK));

    // Expired and not-yet-valid client certificates.
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue_valid(&me, now - time::Duration::hours(2), now - time::Duration::hours(1))
        .unwrap();
    assert!(matches!(
        hbone_client(&peer, hbone, expired, server_id.clone(), target.clone(), 0),
        Outcome::Failed(_)
    ));
    let future = ca
        .issue_valid(&me, now + time::Duration::hours(1), now + time::Duration::hours(2))
        .unwrap();
    assert!(matches!(
        hbone_client(&peer, hbone, future, server_id.clone(), target.clone(), 0),
        Outcome::Failed(_)
    ));
    assert!(
        eventually(Duration::from_secs(3), || refused("tls_handshake") >= 2.0),
        "{}",
        node.metrics()
    );
    assert!(
        node.log_text().contains("Expired") || node.log_text().contains("expired"),
        "{}",
        node.log_text()
    );

    // Same root, other trust domain.
    let foreign = ca.issue(&Identity::new("evil.local", "plain", "peer")).unwrap();
    assert!(matches!(
        hbone_client(&peer, hbone, foreign, server_id.clone(), target.clone(), 0),
        Outcome::Failed(_) | Outcome::Status(_)
    ));
    assert!(eventually(Duration::from_secs(3), || refused("trust_domain") == 1.0));
    assert!(node.log_text().contains("is not in trust domain cluster.local"));

    // CONNECT to an address that is not this pod (another pod of the same node).
    let elsewhere = other.addr(PORT).to_string();
    let r = hbone_client(
        &peer,
        hbone,
        ca.issue(&me).unwrap(),
        server_id.clone(),
        elsewhere.clone(),
        0,
    );
    let why = format!("HBONE CONNECT {elsewhere} refused: the target is not an address of this pod\n");
    assert_eq!(r, Outcome::Refused(StatusCode::BAD_REQUEST, why));
    assert_eq!(refused("connect_target"), 1.0);
    // CONNECT to a port of the pod where nothing listens: 503, saying so, and counted.
    let closed = server.addr(PORT + 1).to_string();
    let r = hbone_client(
        &peer,
        hbone,
        ca.issue(&me).unwrap(),
        server_id.clone(),
        closed.clone(),
        0,
    );
    let why = format!("HBONE CONNECT {closed} refused: the application did not accept the connection\n");
    assert_eq!(r, Outcome::Refused(StatusCode::SERVICE_UNAVAILABLE, why));
    assert_eq!(refused("app_unavailable"), 1.0);

    // A plain GET to the HBONE port: 405, and the body says why (what curl shows).
    let r = hbone_request(
        &peer,
        hbone,
        ca.issue(&me).unwrap(),
        server_id.clone(),
        Method::GET,
        format!("https://{hbone}/"),
        0,
    );
    assert_eq!(
        r,
        Outcome::Refused(
            StatusCode::METHOD_NOT_ALLOWED,
            "HBONE request GET is not CONNECT: this is an HBONE port, only CONNECT is served\n".into()
        )
    );
    // A CONNECT without an IP:port target: 400, saying so.
    let r = hbone_client(
        &peer,
        hbone,
        ca.issue(&me).unwrap(),
        server_id.clone(),
        "example.com:80".into(),
        0,
    );
    assert_eq!(
        r,
        Outcome::Refused(
            StatusCode::BAD_REQUEST,
            "HBONE CONNECT example.com:80 has no IP:port target\n".into()
        )
    );

    // Oversized headers.
    let r = hbone_client(&peer, hbone, ca.issue(&me).unwrap(), server_id, target, 64 * 1024);
    assert_ne!(r, Outcome::Status(StatusCode::OK), "{r:?}");

    // Every log line names the peer.
    let log = node.log_text();
    for line in log.lines().filter(|l| l.contains("inbound connection refused")) {
        assert!(line.contains(&peer.ip.to_string()), "{line}");
    }
    // Only the good CONNECT reached the app; the node still serves.
    assert_eq!(app.accepted(), 1);
    assert_eq!(peer.exchange(server.addr(PORT), b"still").unwrap().unwrap(), b"still");
}
