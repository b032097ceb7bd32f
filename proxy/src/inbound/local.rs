//! The pod's side of a same-node handoff ([`crate::transport::local`]): the connection enters
//! the inbound pipeline with the source pod's identity, as an HBONE tunnel would.
use std::sync::Arc;

use tokio::{io::DuplexStream, net::TcpStream};

use super::{Admitted, Arrival, Downstream, Inbound, Refusable};
use crate::{
    connections::Counted,
    http::sniff::{sniff, sniff_stream, Prefixed, Sniffed},
    identity::Identity,
    transport::{
        self,
        local::{BoxFuture, LocalAdmitted, LocalArrival, LocalPeer, LocalRefused},
    },
};

impl LocalPeer for Inbound {
    fn identity(&self) -> &Identity {
        &self.identity
    }

    fn admit(self: Arc<Self>, a: LocalArrival) -> BoxFuture<'static, Result<Box<dyn LocalAdmitted>, LocalRefused>> {
        Box::pin(async move {
            let arrival = Arrival {
                peer: a.peer,
                peer_identity: Some(a.peer_identity),
                dst: a.dst,
            };
            match self.accept(&arrival).await {
                Ok(admitted) => Ok(Box::new(Handoff {
                    pod: self,
                    arrival,
                    admitted,
                }) as Box<dyn LocalAdmitted>),
                Err(r) => Err(LocalRefused { reason: r.as_str() }),
            }
        })
    }
}

struct Handoff {
    pod: Arc<Inbound>,
    arrival: Arrival,
    admitted: Admitted,
}

impl LocalAdmitted for Handoff {
    fn serve(self: Box<Self>, client: Counted<TcpStream>) -> BoxFuture<'static, ()> {
        let Handoff { pod, arrival, admitted } = *self;
        Box::pin(transport::set_up_then_serve(pod.deliver(arrival, admitted, client)))
    }

    fn serve_pipe(self: Box<Self>, pipe: DuplexStream) -> BoxFuture<'static, ()> {
        let Handoff { pod, arrival, admitted } = *self;
        Box::pin(transport::set_up_then_serve(pod.deliver(arrival, admitted, pipe)))
    }
}

/// An L7 router's upstream connection, handed over: a pipe cannot be peeked, so the bytes
/// read are put back in front, as for a tunnel stream.
impl Downstream for DuplexStream {
    type Sniffed = Prefixed<DuplexStream>;
    async fn sniff(self) -> (Sniffed, Self::Sniffed) {
        sniff_stream(self).await
    }
}

/// The source pod's socket, counted by its outbound side: it can be peeked like any socket.
impl Downstream for Counted<TcpStream> {
    type Sniffed = Counted<TcpStream>;
    async fn sniff(self) -> (Sniffed, Self) {
        (sniff(self.get_ref()).await, self)
    }
}

impl Refusable for Counted<TcpStream> {
    fn refuse(self) {
        transport::reset(self.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The router writes a request into the pipe; the inbound side sniffs HTTP and still reads
    /// every byte, the sniffed ones first.
    #[tokio::test]
    async fn a_pipe_is_sniffed_without_losing_bytes() {
        let (mut near, far) = tokio::io::duplex(PIPE);
        let request = b"GET /hello HTTP/1.1\r\nhost: api\r\n\r\n";
        near.write_all(request).await.unwrap();
        let (sniffed, mut far) = far.sniff().await;
        assert_eq!(sniffed, Sniffed::Http);
        drop(near);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, request);
    }

    #[tokio::test]
    async fn a_pipe_that_is_not_http_is_other() {
        let (mut near, far) = tokio::io::duplex(PIPE);
        near.write_all(&[0x16, 0x03, 0x01, 0x00, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        assert_eq!(far.sniff().await.0, Sniffed::Other);
    }

    const PIPE: usize = crate::transport::local::PIPE_BUFFER;
}
