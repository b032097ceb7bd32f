//! Outbound: the app's connects, redirected by `connect4/6` to the pod's loopback listener. Each
//! connection gets a [`plan::Plan`] from the config snapshots, then the plan is carried out:
//! refused, routed as HTTP, tunnelled over HBONE or passed through as TCP, from inside the pod.
pub mod plan;

use std::{io, net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use self::plan::{Endpoint, Inputs, Plan, L4};
use crate::{
    connections::{ConnectionInfo, Connections, Direction},
    hbone::{client::Source, HboneClient},
    http::{
        access_log::AccessLogSink,
        body::BufferLimits,
        observe::Reporter,
        router::{self, Downstream, Outbound as RouterSource},
        server::ServerLimits,
    },
    identity::Identity,
    l7::L7Config,
    metrics::TcpLabels,
    service::Service,
    state::{L7State, ProxyState},
    transport::{
        self,
        local::{LocalArrival, LocalPeer, LocalPeers},
        PodDialer, Serving,
    },
    upstream::{BoxIo, Connect, Connecting, Outcome, Upstreams},
    workload::Workload,
};

/// How the proxy learns where a redirected outbound connection was going.
pub trait OriginalDst: Send + Sync {
    /// `peer` is the accepted socket's peer (the app's source address inside the pod), `netns_cookie`
    /// the pod's namespace. `None`: the connection was not redirected by us; it is refused.
    fn original_dst(&self, netns_cookie: u64, peer: SocketAddr, stream: &TcpStream) -> Option<SocketAddr>;
}

/// One captured pod's outbound side.
pub struct Outbound {
    /// `namespace/name`: logs, metrics, and the key of the pod's upstream pools.
    pub name: String,
    pub workload: Arc<Workload>,
    pub identity: Identity,
    pub dialer: PodDialer,
    pub state: Arc<ProxyState>,
    pub hbone: Option<Arc<HboneClient>>,
    /// The node's captured pods, for HBONE to one of them handed over in-process
    /// ([`transport::local`]); `None`: HBONE goes through the TCP stack even on this node.
    pub local: Option<Arc<LocalPeers>>,
    /// The L7 model the pod routes by (its sidecar class's, or the node's), and its clusters.
    pub l7: Arc<L7State>,
    pub upstreams: Arc<Upstreams>,
    pub connections: Arc<Connections>,
    pub original_dst: Arc<dyn OriginalDst>,
    pub access_log: Option<AccessLogSink>,
    /// Request bodies the router buffers for retries and mirrors.
    pub buffer: BufferLimits,
    /// Timeouts and stream cap of the pod's HTTP connections.
    pub http_server: ServerLimits,
    /// Outbound connections the pod may have open at once; more are reset.
    pub connection_slots: Arc<tokio::sync::Semaphore>,
}

/// Accepts on one of the pod's outbound listeners until the task is aborted (pod released).
pub async fn serve(listener: TcpListener, pod: Arc<Outbound>) {
    let local = listener.local_addr().ok();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(slot) = pod.connection_slots.clone().try_acquire_owned() else {
                    pod.refuse_over_limit(stream, peer);
                    continue;
                };
                let pod = pod.clone();
                tokio::spawn(async move {
                    transport::set_up_then_serve(pod.handle(stream, peer, local)).await;
                    drop(slot);
                });
            }
            Err(e) => {
                warn!(pod = %pod.name(), error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

impl Outbound {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection past the pod's cap: reset, logged and counted.
    fn refuse_over_limit(&self, stream: TcpStream, peer: SocketAddr) {
        debug!(pod = %self.name(), %peer, "outbound connection refused: connection limit");
        self.connections
            .metrics()
            .inc_outbound_failed(&self.name, "connection_limit");
        crate::transport::reset(stream);
    }

    fn trust_domain(&self) -> Option<&str> {
        self.hbone.as_ref().map(|h| h.trust_domain.as_str())
    }

    /// Decides, then sets up what the plan says and returns what serves the connection from
    /// then on (see [`transport::Serving`]).
    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr, listener: Option<SocketAddr>) -> Serving {
        let dst = self
            .original_dst
            .original_dst(self.dialer.netns().cookie(), peer, &client);
        let (workloads, services, l7) = (self.state.workloads(), self.state.services(), self.l7.l7());
        let source = self.mesh_source(&workloads);
        let plan = plan::plan(&Inputs {
            dst,
            listener,
            source: &source,
            workloads: &workloads,
            services: &services,
            l7: &l7,
            trust_domain: self.trust_domain(),
            synced: self.state.synced() && self.l7.synced(),
            random: fastrand::u64(..),
        });
        debug!(pod = %self.name(), %peer, ?plan, "outbound plan");
        // The snapshots are the plan's; the connection does not keep them alive.
        drop((workloads, services, l7, source));
        match plan {
            Plan::Refuse(why) => self.refuse(client, peer, dst, why),
            Plan::Route { dst, route, fallback } => {
                let _ = client.set_nodelay(true);
                // Bytes that cannot be HTTP keep the connection L4; a client that has sent
                // nothing yet (a pooled connection) is served as HTTP, as Istio does for a
                // declared HTTP port.
                if crate::http::sniff::sniff(&client).await != crate::http::sniff::Sniffed::Other {
                    Box::pin(self.route(client, peer, dst, route))
                } else {
                    self.l4(client, peer, fallback).await
                }
            }
            Plan::RouteOnly { dst, route, otherwise } => {
                let _ = client.set_nodelay(true);
                if crate::http::sniff::sniff(&client).await != crate::http::sniff::Sniffed::Other {
                    Box::pin(self.route(client, peer, dst, route))
                } else {
                    self.refuse(client, peer, Some(dst), otherwise)
                }
            }
            Plan::L4(l4) => {
                let _ = client.set_nodelay(true);
                self.l4(client, peer, l4).await
            }
        }
    }

    fn refuse(&self, client: TcpStream, peer: SocketAddr, dst: Option<SocketAddr>, why: plan::Refusal) -> Serving {
        warn!(pod = %self.name(), %peer, ?dst, reason = why.as_str(), "outbound connection refused");
        self.connections
            .metrics()
            .inc_outbound_failed(self.name(), why.as_str());
        transport::reset(client);
        transport::served()
    }

    /// The pod as the mesh view knows it (network, locality, node for load balancing), else as
    /// the capture does.
    fn mesh_source(&self, workloads: &crate::workload::WorkloadIndex) -> Arc<Workload> {
        workloads
            .named(&self.workload.namespace, &self.workload.name)
            .cloned()
            .unwrap_or_else(|| self.workload.clone())
    }

    /// connect4 sent the app to the pod's loopback listener, so its socket is on 127.0.0.1: the
    /// pod's own address (what the destination sees) with the app's port stands for it.
    fn source_of(&self, peer: SocketAddr, dst: SocketAddr) -> SocketAddr {
        match self.workload.ips.iter().find(|ip| ip.is_ipv4() == dst.ip().is_ipv4()) {
            Some(ip) if peer.ip().is_loopback() => SocketAddr::new(*ip, peer.port()),
            _ => peer,
        }
    }

    fn info(&self, peer: SocketAddr, dst: SocketAddr, labels: TcpLabels) -> ConnectionInfo {
        ConnectionInfo {
            direction: Direction::Outbound,
            pod: self.name.clone(),
            source: self.source_of(peer, dst),
            destination: dst,
            labels,
        }
    }

    fn labels(&self, dst: SocketAddr) -> TcpLabels {
        let workloads = self.state.workloads();
        let me = self.mesh_source(&workloads);
        TcpLabels::between("source", Some(&me), workloads.by_ip(dst.ip()).map(|w| &**w))
    }

    /// HTTP through the router. The downstream connection is in the connection table (and its
    /// bytes in `istio_tcp_*`) for as long as it lasts.
    async fn route(self: Arc<Self>, client: TcpStream, peer: SocketAddr, dst: SocketAddr, route_config: String) {
        let info = self.info(peer, dst, self.labels(dst));
        let source = info.source;
        let guard = self.connections.open(info);
        let client = guard.count_downstream(client);
        let downstream = Downstream {
            source: self.clone(),
            dst,
            route_config,
            peer: source,
            labels: TcpLabels::between("source", Some(&self.mesh_source(&self.state.workloads())), None),
            reporter: Reporter {
                metrics: self.connections.metrics().clone(),
                access_log: self.access_log.clone(),
            },
            buffer: self.buffer.clone(),
            server: self.http_server,
            drain: self.connections.drain_signal(),
        };
        router::serve(client, Arc::new(downstream)).await;
        drop(guard);
    }

    async fn l4(&self, client: TcpStream, peer: SocketAddr, l4: L4) -> Serving {
        match l4 {
            L4::Hbone { target, identity } => {
                let labels = self.labels(target);
                let via = SocketAddr::new(target.ip(), crate::hbone::HBONE_PORT);
                self.hbone(client, peer, (via, target), &identity, labels).await
            }
            L4::Passthrough { dst, why } => {
                debug!(pod = %self.name(), %dst, ?why, "plain TCP");
                self.tcp(client, peer, dst, self.labels(dst)).await
            }
            L4::Service { service, endpoint } => {
                let mut labels = TcpLabels::between(
                    "source",
                    Some(&self.mesh_source(&self.state.workloads())),
                    Some(endpoint.workload()),
                );
                set_service(&mut labels, &service);
                debug!(pod = %self.name(), service = %service.key(), endpoint = %endpoint.address(), "service VIP resolved");
                match endpoint {
                    Endpoint::Hbone { target, identity, .. } => {
                        let via = SocketAddr::new(target.ip(), crate::hbone::HBONE_PORT);
                        self.hbone(client, peer, (via, target), &identity, labels).await
                    }
                    Endpoint::Tcp { dst, why, .. } => {
                        debug!(pod = %self.name(), service = %service.hostname, %dst, ?why, "plain TCP to a service endpoint");
                        self.tcp(client, peer, dst, labels).await
                    }
                }
            }
            L4::Waypoint {
                via,
                target,
                identity,
                waypoint,
                service,
            } => {
                let mut labels = TcpLabels::between(
                    "source",
                    Some(&self.mesh_source(&self.state.workloads())),
                    Some(&waypoint),
                );
                if let Some(s) = &service {
                    set_service(&mut labels, s);
                }
                self.hbone(client, peer, (via, target), &identity, labels).await
            }
            L4::Cluster { cluster, dst, service } => {
                self.tcp_route(client, peer, (&cluster, dst), service.as_deref()).await
            }
        }
    }

    /// A TCP route: one endpoint of `cluster` by its load balancing, reached as the router
    /// reaches endpoints (HBONE to mesh workloads that speak it, else TCP from the pod), the
    /// outcome counted by outlier detection; `istio_tcp_*` name the cluster's service.
    async fn tcp_route(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        (cluster, dst): (&str, SocketAddr),
        service: Option<&Service>,
    ) -> Serving {
        let Some(state) = self.upstreams.get(cluster) else {
            return self.refuse(client, peer, Some(dst), plan::Refusal::NoCluster);
        };
        let Some(endpoint) = state.pick_for(dst, None, &[], 1) else {
            return self.refuse(client, peer, Some(dst), plan::Refusal::NoHealthyEndpoint);
        };
        let mut labels = TcpLabels::between("source", Some(&self.mesh_source(&self.state.workloads())), None);
        RouterSource::label_destination(self, endpoint, &mut labels);
        match service {
            Some(s) => set_service(&mut labels, s),
            None => labels.set_destination_cluster(cluster),
        }
        debug!(pod = %self.name(), %cluster, %endpoint, "TCP route");
        match Connect::connect(self, endpoint).await {
            Ok(upstream) => {
                state.report(endpoint, Outcome::Status(200));
                let guard = self.connections.open(self.info(peer, endpoint, labels));
                Box::pin(transport::forward(client, upstream, guard))
            }
            Err(e) => {
                warn!(pod = %self.name(), %cluster, %endpoint, error = %e, "TCP route: connect failed");
                state.report(endpoint, Outcome::ConnectFailure);
                self.connections.metrics().inc_outbound_failed(self.name(), "connect");
                transport::reset(client);
                transport::served()
            }
        }
    }

    /// HBONE through `via` (the HBONE server) asking for `target`.
    async fn hbone(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        (via, target): (SocketAddr, SocketAddr),
        identity: &Identity,
        mut labels: TcpLabels,
    ) -> Serving {
        if let Some(local) = self.local_peer(via, target) {
            return self.handoff(client, peer, target, identity, labels, local).await;
        }
        match self.tunnel(identity, via, target).await {
            Ok(tunnel) => {
                labels.set_mutual_tls(&self.identity, identity);
                let guard = self.connections.open(self.info(peer, target, labels));
                Box::pin(transport::forward(client, tunnel, guard))
            }
            Err(e) => {
                warn!(pod = %self.name(), %via, dst = %target, %identity, error = %e, "HBONE connection failed");
                self.connections.metrics().inc_outbound_failed(self.name(), "hbone");
                transport::reset(client);
                transport::served()
            }
        }
    }

    /// The pod of this node that `target` is, when HBONE would go straight to its own socket
    /// (not through a waypoint or a gateway).
    fn local_peer(&self, via: SocketAddr, target: SocketAddr) -> Option<Arc<dyn LocalPeer>> {
        let direct = via.ip() == target.ip() && via.port() == crate::hbone::HBONE_PORT;
        self.local.as_ref().filter(|_| direct)?.get(target.ip())
    }

    /// HBONE to a pod of this node, without TLS or a second trip through the TCP stack: the
    /// destination's inbound pipeline checks and serves the connection with this pod's identity.
    async fn handoff(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        target: SocketAddr,
        identity: &Identity,
        mut labels: TcpLabels,
        local: Arc<dyn LocalPeer>,
    ) -> Serving {
        if !self.is_expected(&*local, identity, target) {
            self.connections.metrics().inc_outbound_failed(self.name(), "hbone");
            transport::reset(client);
            return transport::served();
        }
        let arrival = LocalArrival {
            peer: self.source_of(peer, target),
            peer_identity: self.identity.clone(),
            dst: target,
        };
        match local.admit(arrival).await {
            Ok(admitted) => {
                labels.set_mutual_tls(&self.identity, identity);
                self.connections.metrics().same_node_connections.inc();
                let guard = self.connections.open(self.info(peer, target, labels));
                Box::pin(async move {
                    admitted.serve(guard.count_downstream(client)).await;
                    drop(guard);
                })
            }
            Err(e) => {
                debug!(pod = %self.name(), dst = %target, error = %e, "same-node connection refused");
                self.connections.metrics().inc_outbound_failed(self.name(), "hbone");
                transport::reset(client);
                transport::served()
            }
        }
    }

    /// The same-node peer is the workload the plan expects: what HBONE's server certificate
    /// check would refuse otherwise.
    fn is_expected(&self, local: &dyn LocalPeer, identity: &Identity, dst: SocketAddr) -> bool {
        let ok = local.identity() == identity;
        if !ok {
            warn!(pod = %self.name(), %dst, expected = %identity, found = %local.identity(), "same-node peer has another identity");
        }
        ok
    }

    /// The router's upstream connection to a pod of this node: an in-memory pipe into the
    /// destination's inbound pipeline (the same checks as for an L4 handoff), where HBONE would
    /// open a tunnel stream. A refusal fails the connect, as a refused CONNECT would.
    async fn handoff_pipe(
        &self,
        endpoint: SocketAddr,
        identity: &Identity,
        local: Arc<dyn LocalPeer>,
    ) -> io::Result<BoxIo> {
        if !self.is_expected(&*local, identity, endpoint) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "same-node peer has another identity",
            ));
        }
        let arrival = LocalArrival {
            // The router's connection stands for no one downstream socket: the pod's address.
            peer: self.source_of(SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 0), endpoint),
            peer_identity: self.identity.clone(),
            dst: endpoint,
        };
        let admitted = local
            .admit(arrival)
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e))?;
        self.connections.metrics().same_node_connections.inc();
        let (near, far) = tokio::io::duplex(transport::local::PIPE_BUFFER);
        tokio::spawn(admitted.serve_pipe(far));
        Ok(Box::new(near) as BoxIo)
    }

    async fn tcp(&self, client: TcpStream, peer: SocketAddr, dst: SocketAddr, labels: TcpLabels) -> Serving {
        match self.dialer.connect(dst).await {
            Ok(upstream) => {
                let guard = self.connections.open(self.info(peer, dst, labels));
                Box::pin(transport::forward(client, upstream, guard))
            }
            Err(e) => {
                debug!(pod = %self.name(), %dst, error = %e, "outbound connect failed");
                self.connections.metrics().inc_outbound_failed(self.name(), "connect");
                transport::reset(client);
                transport::served()
            }
        }
    }

    async fn tunnel(
        &self,
        identity: &Identity,
        via: SocketAddr,
        target: SocketAddr,
    ) -> Result<crate::hbone::Tunnel, crate::hbone::HboneError> {
        let Some(hbone) = &self.hbone else {
            // The plan only picks HBONE when this node does mTLS.
            return Err(crate::hbone::HboneError::Certificate {
                identity: self.identity.to_string(),
                reason: "this node has no certificates".into(),
            });
        };
        let source = Source {
            name: &self.name,
            identity: &self.identity,
            dialer: &self.dialer,
        };
        hbone.connect_via(source, identity, via, target).await
    }
}

/// Istio's `destination_service*` labels for a connection addressed to `s`.
fn set_service(labels: &mut TcpLabels, s: &Service) {
    labels.set_destination_service(s);
}

/// The router's upstream streams: HBONE to mesh workloads that speak it, else TCP from the
/// pod (the plan's own decision).
impl Connect for Outbound {
    fn source(&self) -> &str {
        &self.name
    }

    fn connect(&self, endpoint: SocketAddr) -> Connecting<'_> {
        Box::pin(async move {
            let workloads = self.state.workloads();
            // Router endpoints are pods (EDS), never VIPs: HBONE to them or plain TCP.
            match plan::mesh_identity(endpoint, &workloads, self.trust_domain()) {
                Ok(identity) => {
                    let via = SocketAddr::new(endpoint.ip(), crate::hbone::HBONE_PORT);
                    if let Some(local) = self.local_peer(via, endpoint) {
                        return self.handoff_pipe(endpoint, &identity, local).await;
                    }
                    Ok(Box::new(self.tunnel(&identity, via, endpoint).await?) as BoxIo)
                }
                Err(_) => Ok(Box::new(self.dialer.connect(endpoint).await?) as BoxIo),
            }
        })
    }
}

/// What the router needs of the source pod.
impl RouterSource for Outbound {
    fn l7(&self) -> Arc<L7Config> {
        self.l7.l7()
    }

    fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    fn connector(&self) -> &dyn Connect {
        self
    }

    fn label_destination(&self, endpoint: SocketAddr, labels: &mut TcpLabels) {
        let workloads = self.state.workloads();
        let Some(w) = workloads.by_ip(endpoint.ip()) else {
            return;
        };
        labels.set_destination_workload(w);
        if let Ok(identity) = plan::mesh_identity(endpoint, &workloads, self.trust_domain()) {
            labels.set_mutual_tls(&self.identity, &identity);
        }
    }
}
