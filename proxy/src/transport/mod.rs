//! Moving bytes for a pod: sockets dialled from inside its network namespace (the way ztunnel's
//! `SocketFactory` does for in-pod mode), and the copy loop that joins two streams.
//!
//! Everything above this layer dials through a [`PodDialer`] and never enters a namespace itself.
pub mod copy;
pub mod h2;
pub mod idle;

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use nodeway_ebpf_common::PROXY_SOCKET_MARK;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpSocket, TcpStream},
};

use crate::{connections::ConnectionGuard, netns::Netns};

/// Opens TCP connections as a pod: from inside its network namespace (source address: the
/// pod's), marked so the capture programs leave them alone, with a connect timeout.
#[derive(Clone, Debug)]
pub struct PodDialer {
    netns: Arc<Netns>,
    connect_timeout: Duration,
}

impl PodDialer {
    pub fn new(netns: Arc<Netns>, connect_timeout: Duration) -> Self {
        PodDialer { netns, connect_timeout }
    }

    pub fn connect_timeout(&self) -> std::time::Duration {
        self.connect_timeout
    }

    pub fn netns(&self) -> &Arc<Netns> {
        &self.netns
    }

    /// Connects to `dst`; a connect that takes longer than the timeout fails with `TimedOut`.
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let sock = self
            .netns
            .run(|| -> io::Result<Socket> {
                let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
                s.set_mark(PROXY_SOCKET_MARK)?;
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                Ok(s)
            })
            .map_err(io::Error::other)??;
        let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
        match tokio::time::timeout(self.connect_timeout, sock.connect(dst)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out after {:?}", self.connect_timeout),
            )),
        }
    }
}

/// Closes a stream with a RST so the app sees a refused/reset connection, not a clean EOF.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Copies both ways until both sides are done, passing half-closes through, and accounts the
/// bytes on `guard` (the connection's entry in the connection table).
pub async fn forward<C, U>(client: C, upstream: U, guard: ConnectionGuard)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = guard.count_source(client);
    let mut upstream = guard.count_destination(upstream);
    if let Err(e) = copy::bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(connection = guard.id(), error = %e, "connection ended with an error");
    }
}
