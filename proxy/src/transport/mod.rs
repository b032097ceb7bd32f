//! Moving bytes for a pod: sockets dialled from inside its network namespace (the way ztunnel's
//! `SocketFactory` does for in-pod mode), and the copy loop that joins two streams.
//!
//! Everything above this layer dials through a [`PodDialer`] and never enters a namespace itself.
pub mod copy;
pub mod h2;
pub mod idle;
pub mod local;
pub mod splice;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use nodeway_ebpf_common::{DELIVERY_SOCKET_MARK, PROXY_SOCKET_MARK};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

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
        let sock = self.socket(dst, None)?;
        self.finish(sock, dst).await
    }

    /// Connects to `dst` (the pod's app) from `src`, the client's IPv4 address (`IP_TRANSPARENT`),
    /// so that the app sees who is calling, as with ztunnel and sidecars. Needs the pod's policy
    /// routing for [`DELIVERY_SOCKET_MARK`] (installed by the agent at capture), else the app's
    /// replies would leave the pod.
    pub async fn connect_from(&self, src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
        let sock = self.socket(dst, Some(src))?;
        self.finish(sock, dst).await
    }

    fn socket(&self, dst: SocketAddr, src: Option<IpAddr>) -> io::Result<Socket> {
        self.netns
            .run(|| -> io::Result<Socket> {
                let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                let Some(src) = src else {
                    s.set_mark(PROXY_SOCKET_MARK)?;
                    return Ok(s);
                };
                s.set_mark(DELIVERY_SOCKET_MARK)?;
                s.set_ip_transparent(true)?;
                // Bound to loopback: the mark's table routes it there, and it arrives as from
                // loopback, which the pod's inbound capture (`sk_lookup`) leaves alone; from
                // the client's address on the pod's interface it would be captured again.
                s.bind_device(Some(b"lo"))?;
                s.bind(&SocketAddr::new(src, 0).into())?;
                Ok(s)
            })
            .map_err(io::Error::other)?
    }

    async fn finish(&self, sock: Socket, dst: SocketAddr) -> io::Result<TcpStream> {
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

/// The TCP socket under `stream`, when it is one (plain, or counted by the side that handed it
/// over). Rust cannot specialise `forward` on the stream type, so it asks at run time, once
/// per connection.
fn tcp_end<S: 'static>(stream: &S) -> Option<splice::End<'_>> {
    let any: &dyn std::any::Any = stream;
    if let Some(tcp) = any.downcast_ref::<TcpStream>() {
        return Some(splice::End {
            tcp,
            reads: None,
            writes: None,
        });
    }
    let counted = any.downcast_ref::<crate::connections::Counted<TcpStream>>()?;
    let (reads, writes) = counted.counters();
    Some(splice::End {
        tcp: counted.get_ref(),
        reads: Some(reads),
        writes,
    })
}

/// Closes a stream with a RST so the app sees a refused/reset connection, not a clean EOF.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// What serves a connection once it is set up, boxed at its own size.
///
/// A task's future is as large as its largest state for the task's whole life, and an async fn
/// nested in another keeps its arguments in both. A connection's task therefore sets up in a
/// boxed future (plan, sniff, dial, admission: a few KB, freed when done) that returns its
/// `Serving`, then awaits only that (a forward's copy state, about 700 bytes): an idle HBONE
/// stream cost its task 4.4 KB on the client node and 6.6 KB on the server node before
/// (`bench memory`).
pub type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// The `Serving` of a connection that was refused or ended during set-up (no allocation).
pub fn served() -> Serving {
    Box::pin(std::future::ready(()))
}

/// Sets up with `setup` in a box of its own (boxed before the returned future holds it, or it
/// would be part of that future's size), then serves what it returned.
pub fn set_up_then_serve<F>(setup: F) -> impl std::future::Future<Output = ()> + Send
where
    F: std::future::Future<Output = Serving> + Send + 'static,
{
    let setup = Box::pin(setup);
    async move {
        let serving = setup.await;
        serving.await;
    }
}

/// Copies both ways until both sides are done, passing half-closes through, and accounts the
/// bytes on `guard` (the connection's entry in the connection table). Two TCP sockets are
/// joined in the kernel ([`splice`]); anything else (a tunnel stream, a pipe, bytes put back
/// after a sniff) through the copy loop.
pub async fn forward<C, U>(client: C, upstream: U, guard: ConnectionGuard)
where
    C: copy::ReadChunks + copy::WriteChunks + 'static,
    U: copy::ReadChunks + copy::WriteChunks + 'static,
{
    if let (Some(c), Some(u)) = (tcp_end(&client), tcp_end(&upstream)) {
        let (received, sent) = (guard.received_counter(), guard.sent_counter());
        if let Err(e) = splice::bidirectional(c, u, &received, &sent).await {
            tracing::debug!(connection = guard.id(), error = %e, "connection ended with an error");
        }
        return;
    }
    let mut client = guard.count_source(client);
    let mut upstream = guard.count_destination(upstream);
    if let Err(e) = copy::bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(connection = guard.id(), error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Only two TCP sockets are spliced: anything else must keep the copy loop, and a socket
    /// counted by the side that handed it over keeps that side's counters.
    #[tokio::test]
    async fn sockets_are_spliced_and_other_streams_copied() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let end = tcp_end(&tcp).expect("a socket is spliced");
        assert!(end.reads.is_none() && end.writes.is_none());

        let guard = splice::tests::guard();
        let counted = guard.count_downstream(tcp);
        let end = tcp_end(&counted).expect("a counted socket is spliced");
        assert!(end.reads.is_some() && end.writes.is_some(), "with both of its counters");

        let (pipe, _far) = tokio::io::duplex(64);
        assert!(tcp_end(&pipe).is_none(), "a pipe is copied");
        assert!(tcp_end(&guard.count_source(pipe)).is_none(), "a counted pipe too");
    }
}
