//! The pod's HBONE server side: its tunnels enter the inbound pipeline with the peer's identity.
use std::{fmt::Display, net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;

use super::{Admitted, Arrival, Inbound};
use crate::hbone::server::{self, ConnectHandler, ConnectRequest, HboneStream, Refusal, Rejection, ServerSettings};
use crate::transport::Serving;

impl ConnectHandler for Inbound {
    type Admitted = Admitted;

    async fn admit(&self, req: &ConnectRequest) -> Result<Admitted, Rejection> {
        self.accept(&arrival(req)).await.map_err(|r| Rejection {
            status: r.status(),
            reason: r.describe(),
        })
    }

    async fn serve(self: Arc<Self>, req: ConnectRequest, admitted: Admitted, stream: HboneStream) -> Serving {
        self.deliver(arrival(&req), admitted, stream).await
    }

    fn refused(&self, peer: SocketAddr, reason: Refusal, detail: &dyn Display) {
        self.count_refusal(peer, reason.as_str(), detail);
    }
}

fn arrival(req: &ConnectRequest) -> Arrival {
    Arrival {
        peer: req.peer,
        peer_identity: Some(req.peer_identity.clone()),
        dst: req.target,
    }
}

/// Serves one pod's HBONE socket until the task is aborted (pod released).
pub async fn serve(listener: TcpListener, settings: Arc<ServerSettings>, pod: Arc<Inbound>) {
    server::serve(listener, settings, pod).await;
}
