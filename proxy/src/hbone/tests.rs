//! HBONE client against peers that stop answering: the CONNECT fails with a typed error instead
//! of hanging.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fmt::Display, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use super::{
    client::Source,
    server::{self, ConnectHandler, ConnectRequest, HboneStream, Refusal, Rejection, ServerSettings},
    tls, HboneClient, HboneConfig, HboneError,
};
use crate::{
    identity::{dev_ca::DevCa, manager::CertManager, Identity},
    netns::Netns,
    transport::{PodDialer, Serving},
};

/// A peer whose admission never decides: its CONNECTs are never answered.
struct Frozen;

impl ConnectHandler for Frozen {
    type Admitted = ();

    async fn admit(&self, _: &ConnectRequest) -> Result<(), Rejection> {
        std::future::pending().await
    }

    async fn serve(self: Arc<Self>, _: ConnectRequest, (): (), _: HboneStream) -> Serving {
        crate::transport::served()
    }

    fn refused(&self, _: SocketAddr, _: Refusal, _: &dyn Display) {}
}

struct Peer {
    client: HboneClient,
    certs: Arc<CertManager>,
    client_id: Identity,
    server_id: Identity,
    dialer: PodDialer,
}

fn config() -> HboneConfig {
    HboneConfig {
        connect_timeout: Duration::from_millis(300),
        handshake_timeout: Duration::from_millis(300),
        ..HboneConfig::default()
    }
}

async fn peer() -> Peer {
    let ca = DevCa::new("cluster.local", Duration::from_secs(86400)).unwrap();
    let root = ca.root_der();
    let certs = CertManager::new(Arc::new(ca));
    let client = HboneClient::new(certs.clone(), vec![root], "cluster.local".into(), config());
    let dialer = PodDialer::new(Arc::new(Netns::current().unwrap()), Duration::from_secs(5));
    Peer {
        client,
        certs,
        client_id: Identity::new("cluster.local", "demo", "client"),
        server_id: Identity::new("cluster.local", "demo", "server"),
        dialer,
    }
}

impl Peer {
    async fn connect(&self, dst: SocketAddr) -> Result<super::Tunnel, HboneError> {
        let source = Source {
            name: "demo/client",
            identity: &self.client_id,
            dialer: &self.dialer,
        };
        let target = SocketAddr::from(([198, 18, 0, 9], 8080));
        self.client.connect_via(source, &self.server_id, dst, target).await
    }

    /// An HBONE server on loopback whose handler never answers.
    async fn frozen_server(&self) -> SocketAddr {
        self.certs.get(&self.server_id).await.unwrap();
        serve_on_loopback(self, config(), Frozen).await
    }

    /// The server pod's TLS side (with or without its certificate yet).
    fn acceptor(&self) -> tls::PodAcceptor {
        tls::PodAcceptor::new(self.certs.clone(), self.server_id.clone(), &self.client.roots).unwrap()
    }
}

/// The server pod's HBONE server on a loopback port, with `config` and `handler`.
async fn serve_on_loopback<H: ConnectHandler>(p: &Peer, config: HboneConfig, handler: H) -> SocketAddr {
    let settings = Arc::new(ServerSettings {
        tls: p.acceptor(),
        trust_domain: "cluster.local".into(),
        config,
        first_connect_timeout: Duration::from_secs(30),
        http2_guards: Default::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve(listener, settings, Arc::new(handler)));
    addr
}

#[tokio::test]
async fn a_connect_the_peer_never_answers_times_out() {
    let p = peer().await;
    let dst = p.frozen_server().await;
    let r = tokio::time::timeout(Duration::from_secs(30), p.connect(dst)).await;
    let err = r.expect("the CONNECT does not hang").err().expect("no tunnel");
    assert!(matches!(err, HboneError::ConnectTimeout { .. }), "{err}");
    assert_eq!(std::io::Error::from(err).kind(), std::io::ErrorKind::TimedOut);
}

#[tokio::test]
async fn a_peer_that_accepts_and_never_speaks_fails_the_handshake() {
    let p = peer().await;
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dst = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let (s, _) = silent.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(s);
    });
    let r = tokio::time::timeout(Duration::from_secs(30), p.connect(dst)).await;
    let err = r.expect("the CONNECT does not hang").err().expect("no tunnel");
    assert!(matches!(err, HboneError::HandshakeTimeout(_)), "{err}");
    held.abort();
}

/// A peer that admits every CONNECT and echoes the tunnel.
struct Echo;

impl ConnectHandler for Echo {
    type Admitted = ();

    async fn admit(&self, _: &ConnectRequest) -> Result<(), Rejection> {
        Ok(())
    }

    async fn serve(self: Arc<Self>, _: ConnectRequest, (): (), stream: HboneStream) -> Serving {
        Box::pin(async move {
            let (mut r, mut w) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
    }

    fn refused(&self, _: SocketAddr, _: Refusal, _: &dyn Display) {}
}

/// A TCP relay to `to` that forwards until `frozen` is set, then holds both sockets silent.
async fn relay(to: SocketAddr, frozen: Arc<tokio::sync::Notify>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut down, _) = l.accept().await.unwrap();
        let mut up = tokio::net::TcpStream::connect(to).await.unwrap();
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
            () = frozen.notified() => std::future::pending::<()>().await,
        }
    });
    addr
}

#[tokio::test]
async fn a_peer_that_stops_answering_is_dropped_by_keepalive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut p = peer().await;
    p.client.config.keepalive_interval = Duration::from_millis(200);
    p.client.config.keepalive_timeout = Duration::from_millis(300);
    let server = echo_server(&p).await;
    let frozen = Arc::new(tokio::sync::Notify::new());
    let via = relay(server, frozen.clone()).await;
    let mut tunnel = p.connect(via).await.expect("tunnel");
    tunnel.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tunnel.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    // The peer goes silent without closing anything: only the PINGs can tell.
    frozen.notify_one();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), tunnel.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the tunnel of a dead peer ends instead of hanging");
}

/// A peer that connects while the server pod's first certificate is still being issued is
/// served once it arrives (before: the handshake failed at once, rustls has nothing to present).
#[tokio::test]
async fn a_handshake_waits_for_the_pods_first_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut p = peer().await;
    p.client.config.handshake_timeout = Duration::from_secs(20);
    let mut server_config = config();
    server_config.handshake_timeout = Duration::from_secs(20);
    assert!(!p.acceptor().has_certificate(), "the server pod has no certificate yet");
    let server = serve_on_loopback(&p, server_config, Echo).await;
    let (certs, server_id) = (p.certs.clone(), p.server_id.clone());
    let issue = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        certs.get(&server_id).await.unwrap();
    });
    let mut tunnel = p
        .connect(server)
        .await
        .expect("a tunnel once the certificate is issued");
    tunnel.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tunnel.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    issue.await.unwrap();
}

/// An HBONE server on loopback that echoes every tunnel.
async fn echo_server(p: &Peer) -> SocketAddr {
    p.certs.get(&p.server_id).await.unwrap();
    serve_on_loopback(p, config(), Echo).await
}

/// Connects to `dst` `n` times at once and returns each outcome.
async fn burst(p: &Arc<Peer>, dst: SocketAddr, n: usize) -> Vec<Result<super::Tunnel, HboneError>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let p = p.clone();
        set.spawn(async move { p.connect(dst).await });
    }
    set.join_all().await
}

/// A burst of connects to a destination with no pooled connection yet shares one connection
/// (before: one TLS handshake each, all at once).
#[tokio::test]
async fn a_burst_to_a_cold_destination_dials_once() {
    let p = Arc::new(peer().await);
    let dst = echo_server(&p).await;
    let tunnels = burst(&p, dst, 20).await;
    assert!(tunnels.iter().all(Result::is_ok), "every connect gets its tunnel");
    assert_eq!(p.client.pooled_connections(), 1, "20 streams on one connection");
}

/// Connects queued behind a dial that fails get its error instead of each repeating it (before:
/// one handshake timeout after the other).
#[tokio::test]
async fn a_failed_dial_fails_the_connects_waiting_for_it() {
    let p = Arc::new(peer().await);
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dst = silent.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let held = tokio::spawn(async move {
        let mut keep = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            keep.push(s);
        }
    });
    let outcomes = burst(&p, dst, 10).await;
    let timeouts = outcomes
        .iter()
        .filter(|r| matches!(r, Err(HboneError::HandshakeTimeout(_))))
        .count();
    let shared = outcomes
        .iter()
        .filter(|r| matches!(r, Err(HboneError::DialFailed { reason, .. }) if reason.contains("timed out")))
        .count();
    assert_eq!((timeouts, shared), (1, 9), "one dial, its failure shared");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the peer saw one connection"
    );
    // A connect after the failure dials again.
    assert!(matches!(p.connect(dst).await, Err(HboneError::HandshakeTimeout(_))));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    held.abort();
}

/// A peer that hands each tunnel to an in-memory app through the copy loop; the app reads all,
/// reports what it got, and answers after the client's half-close.
struct Relay(tokio::sync::mpsc::UnboundedSender<Vec<u8>>);

impl ConnectHandler for Relay {
    type Admitted = ();

    async fn admit(&self, _: &ConnectRequest) -> Result<(), Rejection> {
        Ok(())
    }

    async fn serve(self: Arc<Self>, _: ConnectRequest, (): (), stream: HboneStream) -> Serving {
        Box::pin(self.relay(stream))
    }

    fn refused(&self, _: SocketAddr, _: Refusal, _: &dyn Display) {}
}

impl Relay {
    async fn relay(self: Arc<Self>, mut stream: HboneStream) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut near, mut app) = tokio::io::duplex(64 << 10);
        let got = self.0.clone();
        tokio::spawn(async move {
            let mut all = Vec::new();
            app.read_to_end(&mut all).await.unwrap();
            let reply = format!("got {} bytes", all.len());
            got.send(all).unwrap();
            app.write_all(reply.as_bytes()).await.unwrap();
            app.shutdown().await.unwrap();
        });
        crate::transport::copy::bidirectional(&mut stream, &mut near)
            .await
            .unwrap();
    }
}

/// Bulk bytes cross a tunnel through the copy loop on both ends (the DATA frames handed over
/// as owned chunks) intact and in order; the half-close travels as END_STREAM and the answer
/// still comes back after it.
#[tokio::test]
async fn bulk_through_the_copy_loop_arrives_intact_with_half_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = peer().await;
    p.certs.get(&p.server_id).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = serve_on_loopback(&p, config(), Relay(tx)).await;
    let mut tunnel = p.connect(server).await.expect("tunnel");
    let (mut near, mut client) = tokio::io::duplex(64 << 10);
    let proxy = tokio::spawn(async move { crate::transport::copy::bidirectional(&mut near, &mut tunnel).await });
    let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    client.write_all(&up).await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&reply), "got 3000000 bytes");
    assert!(
        rx.recv().await.unwrap() == up,
        "the app got the client's bytes, in order"
    );
    let (sent, received) = proxy.await.unwrap().unwrap();
    assert_eq!((sent, received), (3_000_000, 17));
}
