//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` over mutual TLS to port 15008, as Istio ambient does.
//!
//! [`client`]: one pooled HTTP/2 connection per (source pod, destination identity, destination
//! address) carries many CONNECT streams, dialled through the pod's [`PodDialer`]. [`server`]:
//! terminates TLS on a pod's 15008 socket, checks the peer and the CONNECT, and hands
//! `(stream, peer identity, target)` to a [`server::ConnectHandler`]; what happens to the stream
//! (authorization, delivery to the app) is the handler's business.
//!
//! [`PodDialer`]: crate::transport::PodDialer
use std::time::Duration;

pub mod client;
pub mod server;
pub mod tls;

pub use client::{HboneClient, Tunnel};

pub const HBONE_PORT: u16 = nodeway_ebpf_common::HBONE_PORT;

/// HTTP/2 settings of HBONE connections, both sides.
#[derive(Clone, Debug)]
pub struct HboneConfig {
    /// Flow-control windows sized for throughput over a pooled connection (ztunnel uses similar).
    pub stream_window: u32,
    pub connection_window: u32,
    /// Largest DATA frame accepted: fewer, larger frames per copied buffer (peers at the default
    /// 16 KiB, like Envoy, are still sent 16 KiB frames).
    pub max_frame_size: u32,
    /// Streams per connection: the server's limit, and when the client opens another connection.
    pub max_streams: u32,
    /// A client connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// TLS handshake limit, both sides.
    pub handshake_timeout: Duration,
}

impl Default for HboneConfig {
    fn default() -> Self {
        HboneConfig {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_streams: 100,
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Why an HBONE tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("no certificate for {identity}: {reason}")]
    Certificate { identity: String, reason: String },
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {dst}: {source}")]
    Handshake {
        dst: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(std::net::SocketAddr),
    #[error("HTTP/2 with {dst}: {source}")]
    Http2 {
        dst: std::net::SocketAddr,
        source: hyper::Error,
    },
    #[error("CONNECT {target} via {dst} answered {status}")]
    Refused {
        target: std::net::SocketAddr,
        dst: std::net::SocketAddr,
        status: http::StatusCode,
    },
}

impl From<HboneError> for std::io::Error {
    fn from(e: HboneError) -> Self {
        let kind = match &e {
            HboneError::Connect { source, .. } | HboneError::Handshake { source, .. } => source.kind(),
            HboneError::HandshakeTimeout(_) => std::io::ErrorKind::TimedOut,
            HboneError::Refused { .. } => std::io::ErrorKind::ConnectionRefused,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}
