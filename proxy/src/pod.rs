//! A captured pod as the proxy serves it: its identity, its namespace, and the shared proxy state.
use std::{
    io,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use nodeway_ebpf_common::PROXY_SOCKET_MARK;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpSocket, TcpStream},
};

use crate::{
    authz::PolicyStore,
    connections::{ConnectionInfo, Connections},
    hbone::Hbone,
    identity::Identity,
    l7::L7Config,
    metrics::TcpLabels,
    netns::Netns,
    service::ServiceIndex,
    upstream::Upstreams,
    workload::{Workload, WorkloadIndex},
};

/// How the proxy learns where a redirected outbound connection was going.
pub trait OriginalDst: Send + Sync {
    /// `peer` is the accepted socket's peer (the app's source address inside the pod), `netns_cookie`
    /// the pod's namespace. `None`: the connection was not redirected by us; it is refused.
    fn original_dst(&self, netns_cookie: u64, peer: SocketAddr, stream: &TcpStream) -> Option<SocketAddr>;
}

/// State every pod's listeners share.
pub struct ProxyState {
    pub connections: Arc<Connections>,
    workloads: RwLock<Arc<WorkloadIndex>>,
    policies: RwLock<Arc<PolicyStore>>,
    services: RwLock<Arc<ServiceIndex>>,
    l7: RwLock<Arc<L7Config>>,
    pub original_dst: Arc<dyn OriginalDst>,
    pub connect_timeout: Duration,
    /// mTLS between pods; `None` when the agent runs without a CA (plaintext only).
    pub hbone: Option<Arc<Hbone>>,
    /// L7 upstream runtime state (pools, outlier detection, circuit breakers), by cluster name.
    pub upstreams: Arc<Upstreams>,
    /// One JSON line per HTTP request on stdout (Istio's `accessLogFile: /dev/stdout`).
    pub access_log: bool,
}

impl ProxyState {
    pub fn new(connections: Arc<Connections>, original_dst: Arc<dyn OriginalDst>) -> Self {
        ProxyState {
            connections,
            workloads: RwLock::new(Arc::new(WorkloadIndex::default())),
            policies: RwLock::new(Arc::new(PolicyStore::default())),
            services: RwLock::new(Arc::new(ServiceIndex::default())),
            l7: RwLock::new(Arc::new(L7Config::default())),
            original_dst,
            connect_timeout: Duration::from_secs(10),
            hbone: None,
            upstreams: Arc::new(Upstreams::new()),
            access_log: true,
        }
    }

    /// The current workload view; a config change swaps it whole.
    pub fn workloads(&self) -> Arc<WorkloadIndex> {
        match self.workloads.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_workloads(&self, index: WorkloadIndex) {
        swap(&self.workloads, index);
    }

    /// The current authorization policies; a change swaps them whole.
    pub fn policies(&self) -> Arc<PolicyStore> {
        match self.policies.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_policies(&self, store: PolicyStore) {
        swap(&self.policies, store);
    }

    /// The current services; a change swaps them whole.
    pub fn services(&self) -> Arc<ServiceIndex> {
        match self.services.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_services(&self, index: ServiceIndex) {
        swap(&self.services, index);
    }
}

impl ProxyState {
    /// The current routes, clusters and endpoints; a change swaps them whole.
    pub fn l7(&self) -> Arc<L7Config> {
        match self.l7.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_l7(&self, config: L7Config) {
        swap(&self.l7, config);
    }
}

fn swap<T>(slot: &RwLock<Arc<T>>, value: T) {
    let value = Arc::new(value);
    match slot.write() {
        Ok(mut g) => *g = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

/// One captured pod.
pub struct PodProxy {
    pub workload: Arc<Workload>,
    /// The pod's SPIFFE identity: its certificate is used on its connections.
    pub identity: Identity,
    pub netns: Arc<Netns>,
    pub state: Arc<ProxyState>,
}

impl PodProxy {
    /// Connects to `dst` from inside the pod (source address: the pod's), on a socket the capture
    /// programs leave alone.
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
        match tokio::time::timeout(self.state.connect_timeout, sock.connect(dst)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out"),
            )),
        }
    }

    pub fn name(&self) -> String {
        self.workload.key()
    }

    /// The pod as the mesh view (the file's, or xDS's) knows it: it says which selector-scoped
    /// policies select the pod.
    pub fn mesh_workload(&self) -> Arc<Workload> {
        let workloads = self.state.workloads();
        self.workload
            .ips
            .first()
            .and_then(|ip| workloads.by_ip(*ip))
            .filter(|w| w.namespace == self.workload.namespace)
            .cloned()
            .unwrap_or_else(|| self.workload.clone())
    }

    /// Whether inbound connections must be parsed as HTTP and checked per request (a policy
    /// with HTTP fields applies).
    pub fn needs_http_authz(&self) -> bool {
        self.state.policies().needs_http(&self.mesh_workload())
    }

    /// Applies the authorization policies to an inbound connection. A denial is logged with the
    /// policy and counted like every refusal; the caller closes the connection. With HTTP policies
    /// the decision waits for each request ([`PodProxy::authorize_request`]).
    pub fn authorize(&self, peer: SocketAddr, source_identity: Option<&Identity>, destination: SocketAddr) -> bool {
        if self.needs_http_authz() {
            return true;
        }
        self.check(peer, source_identity, destination, None)
    }

    /// Applies the authorization policies to an inbound connection that turned out not to be HTTP
    /// although HTTP policies apply (DENY rules with HTTP fields then match on their other fields).
    pub fn authorize_tcp(&self, peer: SocketAddr, source_identity: Option<&Identity>, destination: SocketAddr) -> bool {
        self.check(peer, source_identity, destination, None)
    }

    /// Whether inbound connections to `port` are served as HTTP (when their first bytes are):
    /// HTTP policies apply, or the port is an HTTP port: it has a route table, or a service of
    /// the pod maps an HTTP service port (one with a route table) to it. Istio's sidecars parse
    /// such ports on the inbound side too, for `reporter="destination"` request metrics.
    pub fn inbound_http(&self, port: u16) -> bool {
        if self.needs_http_authz() {
            return true;
        }
        let l7 = self.state.l7();
        if l7.routes_for_port(port).is_some() {
            return true;
        }
        let services = self.state.services();
        self.mesh_workload()
            .services
            .iter()
            .filter_map(|k| services.get(k))
            .flat_map(|s| &s.ports)
            .any(|p| {
                (p.target_port == port || (p.target_port == 0 && p.service_port == port))
                    && l7.routes_for_port(p.service_port).is_some()
            })
    }

    /// Applies the authorization policies to one HTTP request of an inbound connection.
    pub fn authorize_request(
        &self,
        peer: SocketAddr,
        source_identity: Option<&Identity>,
        destination: SocketAddr,
        request: crate::authz::RequestAttrs,
    ) -> bool {
        self.check(peer, source_identity, destination, Some(request))
    }

    fn check(
        &self,
        peer: SocketAddr,
        source_identity: Option<&Identity>,
        destination: SocketAddr,
        request: Option<crate::authz::RequestAttrs>,
    ) -> bool {
        let what = request
            .as_ref()
            .map(|r| format!("request {} {} (host {})", r.method, r.path, r.host));
        let conn = crate::authz::Connection {
            source: peer,
            source_identity: source_identity.cloned(),
            destination,
            request,
        };
        let workload = self.mesh_workload();
        let verdict = self.state.policies().check(&workload, &conn, |policy, what| {
            tracing::info!(pod = %self.name(), %peer, %destination, policy = %policy.key(), "{what}");
        });
        if verdict.allowed() {
            return true;
        }
        let who = source_identity.map_or_else(|| "plaintext".to_string(), ToString::to_string);
        let subject = what.unwrap_or_else(|| "connection".to_string());
        self.refuse(
            peer,
            "authorization",
            &format!("{subject} from {who} to {destination} {verdict}"),
        );
        false
    }

    /// Logs why an inbound connection from `peer` was refused, and counts it.
    pub fn refuse(&self, peer: SocketAddr, reason: &'static str, detail: &dyn std::fmt::Display) {
        tracing::warn!(pod = %self.name(), %peer, reason, %detail, "inbound connection refused");
        self.state
            .connections
            .metrics()
            .inc_inbound_refused(&self.name(), reason);
    }
}

/// Closes a stream with a RST so the app sees a refused/reset connection, not a clean EOF.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Istio's TCP labels for a connection between two (possibly unknown) workloads.
pub fn tcp_labels(reporter: &str, src: Option<&Workload>, dst: Option<&Workload>) -> TcpLabels {
    let s = |v: Option<&str>| v.map(str::to_string).unwrap_or_else(|| "unknown".to_string());
    TcpLabels {
        reporter: reporter.to_string(),
        source_workload: s(src.map(|w| w.workload_name.as_str())),
        source_workload_namespace: s(src.map(|w| w.namespace.as_str())),
        source_principal: "unknown".to_string(),
        source_app: s(src.and_then(Workload::app)),
        source_version: s(src.and_then(Workload::version)),
        destination_workload: s(dst.map(|w| w.workload_name.as_str())),
        destination_workload_namespace: s(dst.map(|w| w.namespace.as_str())),
        destination_principal: "unknown".to_string(),
        destination_app: s(dst.and_then(Workload::app)),
        destination_version: s(dst.and_then(Workload::version)),
        destination_service: "unknown".to_string(),
        destination_service_name: "unknown".to_string(),
        destination_service_namespace: "unknown".to_string(),
        request_protocol: "tcp".to_string(),
        response_flags: "-".to_string(),
        connection_security_policy: "none".to_string(),
    }
}

/// Copies both ways until both sides are done, passing half-closes through, and accounts the bytes.
pub async fn forward<C, U>(client: C, upstream: U, info: ConnectionInfo, state: &ProxyState)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (src, dst, pod) = (info.source, info.destination, info.pod.clone());
    let guard = state.connections.open(info);
    let mut client = guard.count_source(client);
    let mut upstream = guard.count_destination(upstream);
    if let Err(e) = crate::copy::bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%pod, %src, %dst, error = %e, "connection ended with an error");
    }
}
