//! Authorization of inbound connections and requests, and the one place refusals are logged and
//! counted.
use std::net::{IpAddr, SocketAddr};

use super::{Arrival, Inbound};
use crate::{
    authz::{Connection, RequestAttrs},
    workload::Workload,
};

/// Why an inbound connection was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not an address of the pod's application.
    Target,
    /// Plaintext to a STRICT pod.
    StrictPlaintext,
    /// The authorization policies deny it.
    Authorization,
    /// The app could not be reached.
    AppUnavailable,
    /// The control plane's workloads and policies have not arrived yet.
    NotSynced,
    /// The pod has as many inbound connections (and HBONE tunnels) open as it may.
    ConnectionLimit,
}

impl Refused {
    /// The `reason` label of `nodeway_inbound_refused_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Target => "connect_target",
            Refused::StrictPlaintext => "strict_plaintext",
            Refused::Authorization => "authorization",
            Refused::AppUnavailable => "app_unavailable",
            Refused::NotSynced => "config_not_synced",
            Refused::ConnectionLimit => "connection_limit",
        }
    }

    /// Why, in the words an HBONE peer gets in the refusal's body. It names the class of
    /// reason only: which policy denied is for the node's log and metrics, not for the peer.
    pub fn describe(self) -> &'static str {
        match self {
            Refused::Target => "the target is not an address of this pod",
            Refused::StrictPlaintext => "the pod accepts only mutual TLS (PeerAuthentication STRICT)",
            Refused::Authorization => "denied by the pod's authorization policies",
            Refused::AppUnavailable => "the application did not accept the connection",
            Refused::NotSynced => "the node has not received its workloads and policies yet",
            Refused::ConnectionLimit => "the pod has as many inbound connections open as it may",
        }
    }

    /// The CONNECT status an HBONE peer gets.
    pub fn status(self) -> http::StatusCode {
        match self {
            Refused::Target => http::StatusCode::BAD_REQUEST,
            Refused::StrictPlaintext | Refused::Authorization => http::StatusCode::UNAUTHORIZED,
            Refused::AppUnavailable | Refused::NotSynced | Refused::ConnectionLimit => {
                http::StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
}

impl Inbound {
    /// The pod as the mesh view (the file's, or xDS's) knows it: it says which selector-scoped
    /// policies select the pod.
    pub fn mesh_workload(&self) -> std::sync::Arc<Workload> {
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

    /// Whether inbound connections to `port` are served as HTTP (when their first bytes are):
    /// outbound connections to the pod on that port would be (its listener, or without
    /// listeners a route table named after the port), or to a service of the pod whose port
    /// maps to it. Istio's sidecars parse such ports on the inbound side too, for
    /// `reporter="destination"` request metrics.
    pub fn inbound_http(&self, port: u16) -> bool {
        let l7 = self.l7.l7();
        let me = self.mesh_workload();
        let http = |ip: IpAddr, port: u16| l7.outbound(SocketAddr::new(ip, port)).is_http();
        if me.ips.iter().any(|ip| http(*ip, port)) {
            return true;
        }
        let services = self.state.services();
        me.services.iter().filter_map(|k| services.get(k)).any(|s| {
            let vips: Vec<IpAddr> = match s.vips.is_empty() {
                true => me.ips.clone(),
                false => s.vips.iter().map(|v| v.address).collect(),
            };
            s.ports.iter().any(|p| {
                (p.target_port == port || (p.target_port == 0 && p.service_port == port))
                    && vips.iter().any(|ip| http(*ip, p.service_port))
            })
        })
    }

    /// Applies the policies to a connection (`request: None`) or one HTTP request of it.
    pub fn authorize(&self, a: &Arrival, request: Option<RequestAttrs>) -> Result<(), Refused> {
        let what = request
            .as_ref()
            .map(|r| format!("request {} {} (host {})", r.method, r.path, r.host));
        let conn = Connection {
            source: a.peer,
            source_identity: a.peer_identity.clone(),
            destination: a.dst,
            request,
        };
        let verdict = self.state.policies().check(&self.mesh_workload(), &conn, |policy, what| {
            tracing::info!(pod = %self.name(), peer = %a.peer, destination = %a.dst, policy = %policy.key(), "{what}");
        });
        if verdict.allowed() {
            return Ok(());
        }
        let who = a
            .peer_identity
            .as_ref()
            .map_or_else(|| "plaintext".to_string(), ToString::to_string);
        let subject = what.unwrap_or_else(|| "connection".to_string());
        let why = format!("{subject} from {who} to {} {verdict}", a.dst);
        Err(self.refuse(a.peer, Refused::Authorization, &why))
    }

    /// Logs why an inbound connection from `peer` was refused, and counts it.
    pub fn refuse(&self, peer: SocketAddr, reason: Refused, detail: &dyn std::fmt::Display) -> Refused {
        self.count_refusal(peer, reason.as_str(), detail);
        reason
    }

    pub(crate) fn count_refusal(&self, peer: SocketAddr, reason: &'static str, detail: &dyn std::fmt::Display) {
        tracing::warn!(pod = %self.name(), %peer, reason, %detail, "inbound connection refused");
        self.connections.metrics().inc_inbound_refused(&self.name(), reason);
    }
}
