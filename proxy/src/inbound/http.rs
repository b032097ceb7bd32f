//! The pipeline's HTTP branch: the connection is served by inbound HTTP (per-request
//! authorization, `reporter="destination"` request metrics, the access log), which delivers to
//! the app through the upstream send path.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{Arrival, Inbound};
use crate::{
    authz::RequestAttrs,
    cluster::{Cluster, Discovery, LbPolicy, Limits, UpstreamProtocol},
    connections::ConnectionInfo,
    http::{
        inbound::{self as http_inbound, Delivery},
        observe::Reporter,
    },
    identity::Identity,
    service::Service,
    transport::PodDialer,
    upstream::{BoxIo, ClusterState, Connect, Connecting, Upstreams},
};

impl Inbound {
    /// Serves `downstream` as HTTP until it closes; `app` (already connected) carries the first
    /// request. The connection stays in the connection table while it lasts.
    pub(super) async fn serve_http<D>(self: Arc<Self>, a: Arrival, app: TcpStream, info: ConnectionInfo, downstream: D)
    where
        D: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let labels = info.labels.clone();
        let guard = self.connections.open(info);
        let downstream = guard.count_downstream(downstream);
        let delivery = Delivery {
            reporter: Reporter {
                metrics: self.connections.metrics().clone(),
                access_log: self.access_log.clone(),
            },
            app: app_cluster(a.dst.port(), &self.dialer, self.upstream_idle_timeout),
            connector: Arc::new(AppConnector {
                name: self.name(),
                first: Mutex::new(Some(app)),
                dialer: self.dialer.clone(),
                source: self.delivery_source(&a),
            }),
            drain: self.connections.drain_signal(),
            server: self.http_server,
            peer: a.peer,
            identity: a.peer_identity,
            own_identity: self.identity.clone(),
            dst: a.dst,
            labels,
            pod: self,
        };
        http_inbound::serve(downstream, Arc::new(delivery)).await;
        drop(guard);
    }
}

/// The app's `inbound|<port>||` cluster of one downstream connection: its connections to the
/// app follow the downstream's (the first is the one the pipeline opened; a closed one is
/// reopened), as before requests were parsed.
fn app_cluster(port: u16, dialer: &PodDialer, idle_timeout: std::time::Duration) -> Arc<ClusterState> {
    let cluster = Cluster {
        name: format!("inbound|{port}||"),
        discovery: Discovery::Static,
        lb_policy: LbPolicy::RoundRobin,
        connect_timeout: dialer.connect_timeout(),
        limits: Limits::default(),
        outlier_detection: None,
        load_assignment: None,
        upstream_protocol: UpstreamProtocol::Downstream,
        istio_config: None,
    };
    Upstreams::with_idle_timeout(idle_timeout).cluster(&Arc::new(cluster), &[])
}

/// TCP to the app inside the pod; the socket the pipeline opened is used first.
struct AppConnector {
    name: String,
    first: Mutex<Option<TcpStream>>,
    dialer: PodDialer,
    /// The client's address the app sees ([`super::Inbound::delivery_source`]).
    source: Option<std::net::IpAddr>,
}

impl Connect for AppConnector {
    fn source(&self) -> &str {
        &self.name
    }

    fn connect(&self, endpoint: SocketAddr) -> Connecting<'_> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        Box::pin(async move {
            let stream = match first {
                Some(s) => s,
                None => match self.source {
                    Some(src) => self.dialer.connect_from(src, endpoint).await?,
                    None => self.dialer.connect(endpoint).await?,
                },
            };
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as BoxIo)
        })
    }
}

/// What inbound HTTP needs of the destination pod.
impl http_inbound::Inbound for Inbound {
    fn name(&self) -> String {
        Inbound::name(self)
    }

    fn needs_request_authz(&self) -> bool {
        self.needs_http_authz()
    }

    fn authorize(&self, peer: SocketAddr, identity: Option<&Identity>, dst: SocketAddr, request: RequestAttrs) -> bool {
        let a = Arrival {
            peer,
            peer_identity: identity.cloned(),
            dst,
        };
        Inbound::authorize(self, &a, Some(request)).is_ok()
    }

    /// The service the authority names (FQDN, short name, or VIP), else the one service of the
    /// pod whose target port this is.
    fn destination_service(&self, authority: &str, port: u16) -> Option<Arc<Service>> {
        let services = self.state.services();
        let host = crate::route::strip_port(authority).to_ascii_lowercase();
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            if let Some(s) = services.by_vip(ip) {
                return Some(s.clone());
            }
        }
        // `name.namespace.svc.<domain>`: the resource is keyed `namespace/hostname`.
        if let Some(ns) = host.split('.').nth(1) {
            if let Some(s) = services.get(&format!("{ns}/{host}")) {
                return Some(s.clone());
            }
        }
        let workload = self.mesh_workload();
        let own: Vec<&Arc<Service>> = workload.services.iter().filter_map(|k| services.get(k)).collect();
        let short = |s: &Service| {
            host == s.name
                || host == format!("{}.{}", s.name, s.namespace)
                || host.starts_with(&format!("{}.{}.", s.name, s.namespace))
        };
        if let Some(s) = own.iter().find(|s| short(s)) {
            return Some((*s).clone());
        }
        let mut by_port = own.iter().filter(|s| {
            s.ports
                .iter()
                .any(|p| p.target_port == port || (p.target_port == 0 && p.service_port == port))
        });
        match (by_port.next(), by_port.next()) {
            (Some(s), None) => Some((*s).clone()),
            _ => None,
        }
    }
}
