//! Inbound: connections for a captured pod, plaintext (steered by `sk_lookup` to the pod's
//! inbound socket) or HBONE (a CONNECT stream from the pod's HBONE server). Both go through one
//! pipeline: identify the peer → authorize (per connection, or per request when HTTP policies
//! apply: decided once) → deliver to the app (over `lo` inside the pod, which the capture
//! programs do not touch) → sniff → HTTP or copy.
mod authorize;
mod hbone;
mod http;
mod local;

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::{debug, warn};

pub use self::authorize::Refused;
use crate::{
    connections::{ConnectionInfo, Connections, Direction},
    http::{
        access_log::AccessLogSink,
        server::ServerLimits,
        sniff::{sniff, sniff_stream, Prefixed, Sniffed},
    },
    identity::Identity,
    metrics::TcpLabels,
    state::{L7State, ProxyState},
    transport::{
        self,
        copy::{ReadChunks, WriteChunks},
        PodDialer, Serving,
    },
    workload::{MtlsMode, Workload},
};

/// One captured pod's inbound side.
pub struct Inbound {
    pub workload: Arc<Workload>,
    pub identity: Identity,
    pub dialer: PodDialer,
    pub state: Arc<ProxyState>,
    /// The pod's L7 model (its sidecar class's, or the node's): which ports carry HTTP.
    pub l7: Arc<L7State>,
    pub connections: Arc<Connections>,
    pub access_log: Option<AccessLogSink>,
    /// Timeouts and stream cap of HTTP connections to the pod.
    pub http_server: ServerLimits,
    /// Inbound connections and HBONE tunnels the pod may have open at once.
    pub connection_slots: Arc<Semaphore>,
    /// Connections to the app unused for this long are closed
    /// ([`crate::config::Config::upstream_idle_timeout`]).
    pub upstream_idle_timeout: std::time::Duration,
    /// The pod has the policy routing for transparent delivery: the app sees the client's
    /// address ([`PodDialer::connect_from`]), else the pod's own.
    pub transparent_delivery: bool,
}

/// A connection as it arrives, before any decision.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub peer: SocketAddr,
    /// The peer's mTLS identity (HBONE); `None` for plaintext.
    pub peer_identity: Option<Identity>,
    /// Where it is going: the pod's address and the app's port.
    pub dst: SocketAddr,
}

/// An arrival that passed the checks, with its connection to the app.
pub struct Admitted {
    app: TcpStream,
    info: ConnectionInfo,
    /// Parse as HTTP when the first bytes are.
    http: bool,
    /// Authorization waits for each request (HTTP policies apply).
    per_request: bool,
    /// The connection's place under the pod's connection cap.
    slot: OwnedSemaphorePermit,
    /// Subscribed before the checks: a policy or workload change from then on is seen.
    authz: tokio::sync::watch::Receiver<u64>,
}

/// Accepts plaintext connections on one of the pod's inbound sockets until aborted.
pub async fn serve(listener: TcpListener, pod: Arc<Inbound>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = pod.clone();
                tokio::spawn(transport::set_up_then_serve(pod.plaintext(stream, peer)));
            }
            Err(e) => {
                warn!(pod = %pod.name(), error = %e, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

pub use self::hbone::serve as serve_hbone;

impl Inbound {
    pub fn name(&self) -> String {
        self.workload.key()
    }

    /// Admits and sets up a plaintext connection; returns what serves it.
    async fn plaintext(self: Arc<Self>, client: TcpStream, peer: SocketAddr) -> Serving {
        // sk_lookup keeps the original destination as the accepted socket's local address.
        let dst = match client.local_addr() {
            Ok(a) => a,
            Err(e) => {
                debug!(pod = %self.name(), %peer, error = %e, "inbound socket gone");
                return transport::served();
            }
        };
        let arrival = Arrival {
            peer,
            peer_identity: None,
            dst,
        };
        match self.accept(&arrival).await {
            Ok(admitted) => {
                let _ = client.set_nodelay(true);
                self.deliver(arrival, admitted, client).await
            }
            Err(_) => {
                transport::reset(client);
                transport::served()
            }
        }
    }

    /// Identify, authorize (unless per request), connect to the app. A refusal is logged and
    /// counted here; the caller only closes the connection its own way.
    /// The address the app sees a connection come from: the client's (IPv4, with the pod's
    /// delivery routing), else `None`, the pod's own. A client in the pod itself, or on
    /// loopback, is left to the kernel.
    pub(crate) fn delivery_source(&self, a: &Arrival) -> Option<std::net::IpAddr> {
        let (src, dst) = (a.peer.ip(), a.dst.ip());
        let v4 = src.is_ipv4() && dst.is_ipv4();
        (self.transparent_delivery && v4 && !src.is_loopback() && src != dst).then_some(src)
    }

    async fn dial_app(&self, a: &Arrival) -> std::io::Result<TcpStream> {
        match self.delivery_source(a) {
            Some(src) => self.dialer.connect_from(src, a.dst).await,
            None => self.dialer.connect(a.dst).await,
        }
    }

    pub async fn accept(&self, a: &Arrival) -> Result<Admitted, Refused> {
        let authz = self.state.authz_changes();
        self.check_target(a)?;
        let Ok(slot) = self.connection_slots.clone().try_acquire_owned() else {
            let why = format!("{} has its maximum of inbound connections open", self.name());
            return Err(self.refuse(a.peer, Refused::ConnectionLimit, &why));
        };
        if !self.state.synced() {
            // Fail closed: with no policies known yet, an empty policy set would allow all.
            let why = format!("awaiting xDS {:?}", self.state.awaiting());
            return Err(self.refuse(a.peer, Refused::NotSynced, &why));
        }
        if a.peer_identity.is_none() && self.workload.mtls_mode == MtlsMode::Strict {
            let why = format!("plaintext to {} refused: mTLS mode STRICT", a.dst);
            return Err(self.refuse(a.peer, Refused::StrictPlaintext, &why));
        }
        let per_request = self.needs_http_authz();
        if !per_request {
            self.authorize(a, None)?;
        }
        let app = self.dial_app(a).await.map_err(|e| {
            let why = format!("delivery to the application at {} failed: {e}", a.dst);
            self.refuse(a.peer, Refused::AppUnavailable, &why)
        })?;
        Ok(Admitted {
            app,
            info: self.info(a),
            http: per_request || self.inbound_http(a.dst.port()),
            per_request,
            slot,
            authz,
        })
    }

    /// Only the pod's own addresses, never its HBONE port, are delivered to.
    fn check_target(&self, a: &Arrival) -> Result<(), Refused> {
        let own = self
            .workload
            .ips
            .iter()
            .any(|ip| ip.to_canonical() == a.dst.ip().to_canonical());
        if own && (a.peer_identity.is_some() || a.dst.port() != crate::hbone::HBONE_PORT) {
            return Ok(());
        }
        let why = format!("{} is not an address of this pod's application", a.dst);
        Err(self.refuse(a.peer, Refused::Target, &why))
    }

    /// The service a connection to `port` most likely came through, as ztunnel guesses it on the
    /// inbound side (the CONNECT names the endpoint, not the service): the first of the pod's
    /// services with a port that maps to `port`.
    fn guess_service(
        &self,
        w: &crate::workload::Workload,
        port: u16,
    ) -> Option<std::sync::Arc<crate::service::Service>> {
        let services = self.state.services();
        w.services.iter().find_map(|key| {
            let s = services.get(key)?;
            let mapped = w.service_ports.get(key).is_some_and(|m| m.values().any(|p| *p == port));
            let declared = s
                .ports
                .iter()
                .any(|p| p.target_port == port || (p.target_port == 0 && p.service_port == port));
            (mapped || declared).then(|| s.clone())
        })
    }

    fn info(&self, a: &Arrival) -> ConnectionInfo {
        let workloads = self.state.workloads();
        let source = workloads.by_ip(a.peer.ip()).map(|w| &**w);
        let me = self.mesh_workload();
        let mut labels = TcpLabels::between("destination", source, Some(&me));
        if let Some(s) = self.guess_service(&me, a.dst.port()) {
            labels.set_destination_service(&s);
        }
        if let Some(peer_id) = &a.peer_identity {
            labels.set_mutual_tls(peer_id, &self.identity);
        }
        ConnectionInfo {
            direction: Direction::Inbound,
            pod: self.name(),
            source: a.peer,
            destination: a.dst,
            labels,
        }
    }

    /// Sets up an admitted connection (the sniff, where HTTP may be served) and returns what
    /// serves it (see [`transport::Serving`]): HTTP or copy until the connection ends, or until
    /// a policy or workload change refuses a connection that was authorized as a whole (as
    /// ztunnel closes them): what a new DENY names must not go on through connections opened
    /// before it.
    pub async fn deliver<D: Downstream>(self: Arc<Self>, a: Arrival, admitted: Admitted, downstream: D) -> Serving {
        let Admitted {
            app,
            info,
            http,
            per_request,
            slot,
            authz,
        } = admitted;
        let mut changes = (!per_request).then_some(authz);
        let serving: Serving = if !http {
            Box::pin(transport::forward(downstream, app, self.connections.open(info)))
        } else {
            let (sniffed, downstream) = downstream.sniff().await;
            if sniffed != Sniffed::Other {
                // Its own box: an L4 stream's serving does not carry the HTTP server's space.
                Box::pin(self.clone().serve_http(a.clone(), app, info, downstream))
            } else {
                // Not HTTP although HTTP policies apply: DENY rules with HTTP fields then match
                // on their other fields, now and after each change.
                if per_request {
                    let now = self.state.authz_changes();
                    if self.authorize(&a, None).is_err() {
                        downstream.refuse();
                        return transport::served();
                    }
                    changes = Some(now);
                }
                Box::pin(transport::forward(downstream, app, self.connections.open(info)))
            }
        };
        Box::pin(async move {
            match changes {
                Some(mut changes) => tokio::select! {
                    () = serving => {}
                    () = self.revoked(&a, &mut changes) => {}
                },
                None => serving.await,
            }
            drop(slot);
        })
    }

    /// Resolves when a change of policies or workloads refuses `a` (logged and counted as a
    /// refusal); never while it stays allowed.
    async fn revoked(&self, a: &Arrival, changes: &mut tokio::sync::watch::Receiver<u64>) {
        while changes.changed().await.is_ok() {
            if self.authorize(a, None).is_err() {
                return;
            }
        }
        std::future::pending::<()>().await;
    }
}

/// A downstream byte stream the pipeline can sniff.
pub trait Downstream: AsyncRead + AsyncWrite + ReadChunks + WriteChunks + Send + Unpin + 'static {
    type Sniffed: Refusable;
    /// Looks at the first bytes without losing them.
    fn sniff(self) -> impl Future<Output = (Sniffed, Self::Sniffed)> + Send;
}

/// A stream that can be closed so the peer sees a refusal.
pub trait Refusable: AsyncRead + AsyncWrite + ReadChunks + WriteChunks + Send + Unpin + 'static {
    fn refuse(self);
}

impl Downstream for TcpStream {
    type Sniffed = TcpStream;
    async fn sniff(self) -> (Sniffed, TcpStream) {
        (sniff(&self).await, self)
    }
}

impl Refusable for TcpStream {
    fn refuse(self) {
        transport::reset(self);
    }
}

impl Downstream for crate::hbone::server::HboneStream {
    type Sniffed = Prefixed<crate::hbone::server::HboneStream>;
    async fn sniff(self) -> (Sniffed, Self::Sniffed) {
        // A tunnel cannot be peeked: the bytes read are put back in front.
        sniff_stream(self).await
    }
}

/// Closing the stream ends the tunnel (the HBONE peer sees its stream end).
impl<T: AsyncRead + AsyncWrite + ReadChunks + WriteChunks + Send + Unpin + 'static> Refusable for Prefixed<T> {
    fn refuse(self) {}
}
