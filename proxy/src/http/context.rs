//! The pod adapter: the one place the HTTP layer touches a captured pod and the proxy state
//! around it. It implements the router's [`Outbound`] and inbound's [`Inbound`] for a
//! [`PodProxy`], the pod's [`Connect`]ors (HBONE to mesh workloads, else TCP from the pod's
//! netns; TCP to the app for inbound), and the two entry points the listeners call.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{
    inbound::{self, Delivery, Inbound},
    observe::Reporter,
    router::{self, Downstream, Outbound},
};
use crate::{
    authz::RequestAttrs,
    cluster::{Cluster, Discovery, LbPolicy, Limits, UpstreamProtocol},
    connections::ConnectionInfo,
    identity::Identity,
    l7::L7Config,
    metrics::TcpLabels,
    pod::{tcp_labels, PodProxy},
    service::Service,
    upstream::{BoxIo, ClusterState, Connect, Connecting, Upstreams},
    workload::Protocol,
};

/// Serves one redirected outbound connection of `pod` as HTTP until the client closes it.
/// `source` is the app's address as the destination sees it.
pub async fn serve_outbound(client: TcpStream, pod: Arc<PodProxy>, dst: SocketAddr, source: SocketAddr) {
    let conn = Downstream {
        labels: tcp_labels("source", Some(&pod.workload), None),
        reporter: reporter(&pod),
        source: Arc::new(PodOutbound {
            connector: PodConnector::new(pod.clone()),
            pod,
        }),
        dst,
        peer: source,
    };
    router::serve(client, Arc::new(conn)).await;
}

/// Serves an inbound connection to `pod` as HTTP until it closes; `app` is the (already
/// connected) socket to the application, used by the first request. The connection stays in
/// the connection table while it lasts.
pub async fn serve_inbound<D>(
    downstream: D,
    app: TcpStream,
    pod: Arc<PodProxy>,
    identity: Option<Identity>,
    info: ConnectionInfo,
) where
    D: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (peer, dst, labels) = (info.source, info.destination, info.labels.clone());
    let _guard = pod.state.connections.open(info);
    let _ = app.set_nodelay(true);
    let conn = Delivery {
        reporter: reporter(&pod),
        app: app_cluster(dst.port(), pod.state.connect_timeout),
        connector: Arc::new(AppConnector {
            name: pod.name(),
            first: Mutex::new(Some(app)),
            pod: pod.clone(),
        }),
        pod: Arc::new(PodInbound(pod)),
        peer,
        identity,
        dst,
        labels,
    };
    inbound::serve(downstream, Arc::new(conn)).await;
}

fn reporter(pod: &PodProxy) -> Reporter {
    Reporter {
        metrics: pod.state.connections.metrics().clone(),
        access_log: pod.state.access_log,
    }
}

/// The app's `inbound|<port>||` cluster of one downstream connection: its connections to the
/// app follow the downstream's (one per connection, reopened when the app closes it).
fn app_cluster(port: u16, connect_timeout: Duration) -> Arc<ClusterState> {
    let cluster = Cluster {
        name: format!("inbound|{port}||"),
        discovery: Discovery::Static,
        lb_policy: LbPolicy::RoundRobin,
        connect_timeout,
        limits: Limits::default(),
        outlier_detection: None,
        load_assignment: None,
        upstream_protocol: UpstreamProtocol::Downstream,
        istio_config: None,
    };
    Upstreams::new().cluster(&Arc::new(cluster), &[])
}

/// A pod's streams to endpoints: HBONE to mesh workloads that speak it, else TCP from the pod's
/// netns.
pub struct PodConnector {
    pod: Arc<PodProxy>,
    name: String,
}

impl PodConnector {
    pub fn new(pod: Arc<PodProxy>) -> Self {
        PodConnector { name: pod.name(), pod }
    }
}

impl Connect for PodConnector {
    fn source(&self) -> &str {
        &self.name
    }

    fn connect(&self, endpoint: SocketAddr) -> Connecting<'_> {
        Box::pin(async move {
            let state = &self.pod.state;
            if let Some(hbone) = &state.hbone {
                let workload = state.workloads().by_ip(endpoint.ip()).cloned();
                if let Some(w) = workload.filter(|w| w.protocol == Protocol::Hbone) {
                    let id = w.identity(&hbone.trust_domain);
                    let tunnel = hbone.connect(&self.pod, &id, endpoint).await?;
                    return Ok(Box::new(tunnel) as BoxIo);
                }
            }
            Ok(Box::new(self.pod.connect(endpoint).await?) as BoxIo)
        })
    }
}

/// TCP to the app inside the pod; the socket opened before serving is used first.
struct AppConnector {
    pod: Arc<PodProxy>,
    name: String,
    first: Mutex<Option<TcpStream>>,
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
                None => self.pod.connect(endpoint).await?,
            };
            Ok(Box::new(stream) as BoxIo)
        })
    }
}

/// The router's view of a source pod.
struct PodOutbound {
    pod: Arc<PodProxy>,
    connector: PodConnector,
}

impl Outbound for PodOutbound {
    fn l7(&self) -> Arc<L7Config> {
        self.pod.state.l7()
    }

    fn upstreams(&self) -> &Upstreams {
        &self.pod.state.upstreams
    }

    fn connector(&self) -> &dyn Connect {
        &self.connector
    }

    fn label_destination(&self, endpoint: SocketAddr, labels: &mut TcpLabels) {
        let state = &self.pod.state;
        let workloads = state.workloads();
        let Some(w) = workloads.by_ip(endpoint.ip()) else {
            return;
        };
        let d = tcp_labels("source", None, Some(w));
        labels.destination_workload = d.destination_workload;
        labels.destination_workload_namespace = d.destination_workload_namespace;
        labels.destination_app = d.destination_app;
        labels.destination_version = d.destination_version;
        if let (Some(h), Protocol::Hbone) = (&state.hbone, w.protocol) {
            labels.destination_principal = w.identity(&h.trust_domain).to_string();
            labels.source_principal = self.pod.identity.to_string();
            labels.connection_security_policy = "mutual_tls".to_string();
        }
    }
}

/// Inbound HTTP's view of a destination pod.
struct PodInbound(Arc<PodProxy>);

impl Inbound for PodInbound {
    fn name(&self) -> String {
        self.0.name()
    }

    fn needs_request_authz(&self) -> bool {
        self.0.needs_http_authz()
    }

    fn authorize(&self, peer: SocketAddr, identity: Option<&Identity>, dst: SocketAddr, request: RequestAttrs) -> bool {
        self.0.authorize_request(peer, identity, dst, request)
    }

    /// The service the authority names (FQDN, short name, or VIP), else the one service of the
    /// pod whose target port this is.
    fn destination_service(&self, authority: &str, port: u16) -> Option<Arc<Service>> {
        let services = self.0.state.services();
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
        let workload = self.0.mesh_workload();
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
