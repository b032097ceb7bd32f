//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` over mutual TLS to port 15008, as Istio ambient does.
//!
//! [`client`]: one pooled HTTP/2 connection per (source pod, destination identity, destination
//! address) carries many CONNECT streams, dialled through the pod's [`PodDialer`]. Both sides
//! drive `h2` directly (as ztunnel does): a tunnel is an [`H2Stream`] whose DATA frames the copy
//! loop moves as owned `Bytes`. [`server`]:
//! terminates TLS on a pod's 15008 socket, checks the peer and the CONNECT, and hands
//! `(stream, peer identity, target)` to a [`server::ConnectHandler`]; what happens to the stream
//! (authorization, delivery to the app) is the handler's business.
//!
//! [`PodDialer`]: crate::transport::PodDialer
use std::time::Duration;

pub mod client;
mod keepalive;
pub mod server;
pub mod stream;
pub mod tls;

pub use client::{HboneClient, Tunnel};
pub use stream::H2Stream;

pub const HBONE_PORT: u16 = nodeway_ebpf_common::HBONE_PORT;

/// Bytes h2 may hold queued per stream before its writer waits, both sides: hyper's value, so a
/// stream's send side holds at most this beyond what the socket took.
const MAX_SEND_BUFFER: usize = 400 * 1024;

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
    /// HTTP/2 PING on every HBONE connection (client and server, also while idle) and on
    /// downstream h2c connections: a peer that does not answer within `keepalive_timeout` is
    /// dead and its connection closed. 10 s and 20 s, ztunnel's values.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A CONNECT must be answered within this, or it fails with
    /// [`HboneError::ConnectTimeout`] (a frozen peer would otherwise hold it forever). 10 s,
    /// Istio's default `connectTimeout`.
    pub connect_timeout: Duration,
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
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
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
    /// Another connect's dial to the same destination, which this one waited for, failed.
    #[error("connecting to {dst} failed (a concurrent connect's dial): {reason}")]
    DialFailed { dst: std::net::SocketAddr, reason: String },
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(std::net::SocketAddr),
    #[error("CONNECT {target} via {dst} not answered in time")]
    ConnectTimeout {
        target: std::net::SocketAddr,
        dst: std::net::SocketAddr,
    },
    #[error("HTTP/2 with {dst}: {source}")]
    Http2 {
        dst: std::net::SocketAddr,
        source: h2::Error,
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
            HboneError::HandshakeTimeout(_) | HboneError::ConnectTimeout { .. } => std::io::ErrorKind::TimedOut,
            HboneError::Refused { .. } => std::io::ErrorKind::ConnectionRefused,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests;
