//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` over mutual TLS to port 15008, as Istio ambient does.
//!
//! Client: one pooled HTTP/2 connection per (source pod, destination identity, destination
//! address) carries many CONNECT streams. Server: each captured pod's 15008 socket (steered there by
//! `sk_lookup`) terminates TLS with the pod's own certificate and delivers to the app over `lo`.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{client::conn::http2::SendRequest, Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, warn};

use crate::{
    connections::{ConnectionInfo, Direction},
    identity::{manager::CertManager, Identity},
    pod::{forward, tcp_labels, PodProxy},
};

pub mod tls;

pub const HBONE_PORT: u16 = nodeway_ebpf_common::HBONE_PORT;
/// Flow-control windows sized for throughput over a pooled connection (ztunnel uses similar).
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_STREAMS: u32 = 100;
/// Largest DATA frame we accept: fewer, larger frames per copied buffer (peers at the default
/// 16 KiB, like Envoy, are still sent 16 KiB frames).
const MAX_FRAME_SIZE: u32 = 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Identity material shared by every pod's HBONE client and server, and the client's pool.
pub struct Hbone {
    pub certs: Arc<CertManager>,
    pub roots: Vec<CertificateDer<'static>>,
    pub trust_domain: String,
    pool: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    /// An HTTP/2 connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// Streams per pooled connection before another connection is opened.
    pub max_streams_per_connection: usize,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    pod: String,
    dst_identity: Identity,
    dst: SocketAddr,
}

struct PooledConn {
    sender: SendRequest<Empty<Bytes>>,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl PooledConn {
    fn usable(&self, max: usize) -> bool {
        !self.sender.is_closed() && self.active.load(Ordering::Relaxed) < max
    }
}

/// A CONNECT stream; holds its connection's stream count until dropped.
pub struct Tunnel {
    io: TokioIo<hyper::upgrade::Upgraded>,
    conn: Arc<PooledConn>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            *self.conn.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Hbone {
    pub fn new(certs: Arc<CertManager>, roots: Vec<CertificateDer<'static>>, trust_domain: String) -> Self {
        Hbone {
            certs,
            roots,
            trust_domain,
            pool: Mutex::new(HashMap::new()),
            idle_timeout: Duration::from_secs(60),
            max_streams_per_connection: MAX_STREAMS as usize,
        }
    }

    /// Closes idle pooled connections every few seconds, for as long as the returned task runs.
    pub fn start_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(me) = me.upgrade() else { return };
                me.reap();
            }
        })
    }

    fn reap(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        for conns in pool.values_mut() {
            conns.retain(|c| {
                let idle = c.active.load(Ordering::Relaxed) == 0
                    && c.idle_since.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= self.idle_timeout;
                !c.sender.is_closed() && !idle
            });
        }
        pool.retain(|_, v| !v.is_empty());
    }

    /// Pooled HTTP/2 connections open now (for `/connections`-style inspection and tests).
    pub fn pooled_connections(&self) -> usize {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Opens a CONNECT stream from `pod` to `target` through the destination's HBONE port,
    /// authenticating the destination as `dst_identity`.
    pub async fn connect(&self, pod: &PodProxy, dst_identity: &Identity, target: SocketAddr) -> io::Result<Tunnel> {
        let dst = SocketAddr::new(target.ip(), HBONE_PORT);
        let key = PoolKey {
            pod: pod.name(),
            dst_identity: dst_identity.clone(),
            dst,
        };
        for attempt in 0..2 {
            let conn = match self.pooled(&key) {
                Some(c) => c,
                None => self.dial(pod, &key).await?,
            };
            let req = Request::builder()
                .method(Method::CONNECT)
                .version(Version::HTTP_2)
                .uri(target.to_string())
                .body(Empty::<Bytes>::new())
                .map_err(io::Error::other)?;
            let mut sender = conn.sender.clone();
            match sender.send_request(req).await {
                Ok(res) if res.status() == StatusCode::OK => {
                    // From here the tunnel owns the stream count, also if the upgrade fails.
                    let up = hyper::upgrade::on(res).await;
                    let tunnel = up.map(|u| Tunnel {
                        io: TokioIo::new(u),
                        conn: conn.clone(),
                    });
                    if tunnel.is_err() {
                        conn.active.fetch_sub(1, Ordering::Relaxed);
                    }
                    return tunnel.map_err(io::Error::other);
                }
                Ok(res) => {
                    conn.active.fetch_sub(1, Ordering::Relaxed);
                    let status = res.status();
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("HBONE CONNECT {target} via {dst}: {status}"),
                    ));
                }
                Err(e) => {
                    conn.active.fetch_sub(1, Ordering::Relaxed);
                    if attempt == 0 {
                        debug!(%dst, error = %e, "pooled HBONE connection unusable, dialling anew");
                        continue;
                    }
                    return Err(io::Error::other(e));
                }
            }
        }
        Err(io::Error::other("HBONE connect failed"))
    }

    /// A pooled connection with room for one more stream, already counted for it.
    fn pooled(&self, key: &PoolKey) -> Option<Arc<PooledConn>> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.get_mut(key)?;
        conns.retain(|c| !c.sender.is_closed());
        let c = conns
            .iter()
            .find(|c| c.usable(self.max_streams_per_connection))?
            .clone();
        c.active.fetch_add(1, Ordering::Relaxed);
        Some(c)
    }

    async fn dial(&self, pod: &PodProxy, key: &PoolKey) -> io::Result<Arc<PooledConn>> {
        let own = self.certs.get(&pod.identity).await.map_err(io::Error::other)?;
        let config = tls::client_config(&own, key.dst_identity.clone()).map_err(io::Error::other)?;
        let tcp = pod.connect(key.dst).await?;
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(config).connect(ServerName::IpAddress(key.dst.ip().into()), tcp),
        )
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TLS handshake with {} timed out", key.dst),
            )
        })??;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(io::Error::other)?;
        let dst = key.dst;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%dst, error = %e, "HBONE connection closed");
            }
        });
        let pooled = Arc::new(PooledConn {
            sender,
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
        });
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(pooled.clone());
        Ok(pooled)
    }
}

/// Serves one pod's HBONE socket until the task is aborted (pod released).
pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>, hbone: Arc<Hbone>) {
    let config = match tls::server_config(hbone.certs.clone(), pod.identity.clone(), &hbone.roots) {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %pod.name(), error = %e, "no HBONE server for this pod");
            return;
        }
    };
    let acceptor = TlsAcceptor::from(config);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(pod = %pod.name(), error = %e, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Many streams share the connection: a small response must not wait for the ACK of
        // another stream's data (Nagle).
        let _ = tcp.set_nodelay(true);
        let (pod, acceptor, hbone) = (pod.clone(), acceptor.clone(), hbone.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return pod.refuse(peer, "tls_handshake", &format!("HBONE TLS handshake refused: {e}")),
                Err(_) => return pod.refuse(peer, "tls_handshake", &"HBONE TLS handshake refused: timeout"),
            };
            let peer_id = match tls::peer_identity(tls.get_ref().1.peer_certificates()) {
                Ok(id) if id.trust_domain == hbone.trust_domain => id,
                Ok(id) => {
                    let why = format!("HBONE peer {id} is not in trust domain {}", hbone.trust_domain);
                    return pod.refuse(peer, "trust_domain", &why);
                }
                Err(e) => return pod.refuse(peer, "peer_identity", &format!("HBONE peer identity: {e}")),
            };
            let service = hyper::service::service_fn(move |req| {
                let (pod, peer_id) = (pod.clone(), peer_id.clone());
                async move { Ok::<_, std::convert::Infallible>(handle_connect(req, peer, peer_id, pod).await) }
            });
            let r = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME_SIZE)
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(16 * 1024)
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(e) = r {
                debug!(%peer, error = %e, "HBONE connection ended");
            }
        });
    }
}

async fn handle_connect(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    peer_id: Identity,
    pod: Arc<PodProxy>,
) -> Response<Empty<Bytes>> {
    let reply = |code: StatusCode| {
        let mut r = Response::new(Empty::new());
        *r.status_mut() = code;
        r
    };
    if req.method() != Method::CONNECT {
        pod.refuse(
            peer,
            "not_connect",
            &format!("HBONE request {} is not CONNECT", req.method()),
        );
        return reply(StatusCode::METHOD_NOT_ALLOWED);
    }
    let target: Option<SocketAddr> = req.uri().authority().and_then(|a| a.as_str().parse().ok());
    let Some(target) = target.filter(|t| {
        pod.workload
            .ips
            .iter()
            .any(|ip| ip.to_canonical() == t.ip().to_canonical())
    }) else {
        pod.refuse(
            peer,
            "connect_target",
            &format!("HBONE CONNECT {} is not an address of this pod", req.uri()),
        );
        return reply(StatusCode::BAD_REQUEST);
    };
    if !pod.authorize(peer, Some(&peer_id), target) {
        return reply(StatusCode::UNAUTHORIZED);
    }
    let upstream = match pod.connect(target).await {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = %pod.name(), %target, error = %e, "HBONE delivery to the application failed");
            return reply(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let state = pod.state.clone();
    let source = state.workloads().by_ip(peer.ip()).cloned();
    let mut labels = tcp_labels("destination", source.as_deref(), Some(&pod.workload));
    labels.source_principal = peer_id.to_string();
    labels.destination_principal = pod.identity.to_string();
    labels.connection_security_policy = "mutual_tls".into();
    let info = ConnectionInfo {
        direction: Direction::Inbound,
        pod: pod.name(),
        source: peer,
        destination: target,
        labels,
    };
    let http = pod.inbound_http(target.port());
    tokio::spawn(async move {
        let up = match hyper::upgrade::on(req).await {
            Ok(up) => TokioIo::new(up),
            Err(e) => return debug!(error = %e, "HBONE upgrade failed"),
        };
        if !http {
            return forward(up, upstream, info, &state).await;
        }
        use crate::http::sniff::{sniff_stream, Sniffed};
        let (sniffed, up) = sniff_stream(up).await;
        if sniffed != Sniffed::Other {
            return crate::http::serve_inbound(up, upstream, pod, Some(peer_id), info).await;
        }
        if pod.needs_http_authz() && !pod.authorize_tcp(peer, Some(&peer_id), target) {
            return;
        }
        forward(up, upstream, info, &state).await
    });
    reply(StatusCode::OK)
}
