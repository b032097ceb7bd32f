//! What to do with one redirected outbound connection, decided from the config snapshots alone
//! (no I/O), as ztunnel's `build_request` does. The caller then acts on the [`Plan`].
//!
//! In ztunnel's order: a destination that is a Service VIP (visible to the client) goes to the
//! service's waypoint if it has one, else to one of its endpoints picked by the service's load
//! balancing, over HBONE to `podIP:targetPort` (plain TCP only to an endpoint outside the mesh);
//! a destination that is a workload goes to its waypoint if it has one, else to it directly;
//! anything else is outside the mesh and goes as plain TCP. Through a waypoint, the tunnel
//! goes to the waypoint and asks (CONNECT `:authority`) for the original `VIP:port`.
//!
//! The L7 config then says whether the destination carries HTTP (served by the router, the
//! mesh decision above being the fallback for bytes that are not HTTP) or is a TCP route (a
//! cluster picked by weight, one of its endpoints when connecting): the outbound listeners
//! when configured ([`crate::listener`]), else a route table named after the port.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::{
    cluster::{Discovery, BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER},
    identity::Identity,
    l7::{L7Config, Outbound},
    listener::{ChainAction, Selection, TcpRoute},
    service::{LbMode, Scope, Service, ServiceIndex},
    workload::{Gateway, GatewayDestination, Protocol, Workload, WorkloadIndex},
};

/// The decision for one connection, with the reason it was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Reset the app's connection.
    Refuse(Refusal),
    /// The destination carries HTTP: serve the connection with the router (route table
    /// `route`) when its first bytes are HTTP, else as `fallback`.
    Route {
        dst: SocketAddr,
        route: String,
        fallback: L4,
    },
    /// As `Route`, but bytes that are not HTTP are refused (the L4 decision was a refusal, e.g.
    /// a service whose endpoints the router's clusters know but the workload view does not).
    RouteOnly {
        dst: SocketAddr,
        route: String,
        otherwise: Refusal,
    },
    /// Forward the bytes.
    L4(L4),
}

/// How the bytes of an L4 connection leave the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// Plain TCP from the pod to `dst`.
    Passthrough { dst: SocketAddr, why: PassthroughReason },
    /// A CONNECT to `target` through the HBONE port of `target`'s address, whose server must
    /// prove `identity`.
    Hbone { target: SocketAddr, identity: Identity },
    /// A Service VIP resolved to one of its endpoints.
    Service { service: Arc<Service>, endpoint: Endpoint },
    /// Through a waypoint: HBONE to `via` (the waypoint's `ip:port`), whose server must prove
    /// `identity`, asking for `target`, the original destination.
    Waypoint {
        via: SocketAddr,
        target: SocketAddr,
        identity: Identity,
        waypoint: Arc<Workload>,
        /// The service the connection was addressed to, if any.
        service: Option<Arc<Service>>,
    },
    /// A TCP route (`tcp_proxy`) to `cluster`: one of its endpoints, picked by the cluster's
    /// load balancing when connecting (`dst` for an ORIGINAL_DST cluster).
    Cluster {
        cluster: String,
        dst: SocketAddr,
        /// The service the cluster stands for (`outbound|<port>|<subset>|<host>`), if known.
        service: Option<Arc<Service>>,
    },
}

/// The endpoint a service connection goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// HBONE to the endpoint's node, CONNECT `podIP:targetPort`.
    Hbone {
        target: SocketAddr,
        identity: Identity,
        workload: Arc<Workload>,
    },
    /// An endpoint outside the mesh (or this node has no certificates): plain TCP to
    /// `podIP:targetPort`.
    Tcp {
        dst: SocketAddr,
        workload: Arc<Workload>,
        why: PassthroughReason,
    },
}

impl Endpoint {
    pub fn address(&self) -> SocketAddr {
        match self {
            Endpoint::Hbone { target, .. } => *target,
            Endpoint::Tcp { dst, .. } => *dst,
        }
    }

    pub fn workload(&self) -> &Arc<Workload> {
        match self {
            Endpoint::Hbone { workload, .. } | Endpoint::Tcp { workload, .. } => workload,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassthroughReason {
    /// The destination is not a known workload or service (outside the mesh).
    UnknownDestination,
    /// The destination workload is known but does not speak HBONE.
    PlaintextWorkload,
    /// This node has no certificates (no CA configured): plaintext only.
    NoMtls,
    /// The service's load balancing is PASSTHROUGH: to the address as dialled.
    ServicePassthrough,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The connection was not redirected by the capture (someone dialled the listener).
    NoOriginalDestination,
    /// The original destination is the proxy's own listener: a loop.
    ToProxy,
    /// The control plane's workloads and policies have not arrived yet: fail closed.
    NotSynced,
    /// A Service VIP with no usable endpoint for the port (none healthy, none with the port,
    /// or the service has no such port).
    NoHealthyEndpoint,
    /// The waypoint named by the service or workload is not known, or has no usable address.
    NoWaypoint,
    /// A waypoint needs HBONE, and this node has no certificates.
    WaypointWithoutMtls,
    /// The destination's listener has no filter chain for the connection (Envoy closes it).
    NoFilterChain,
    /// A TCP route names a cluster the config does not have (Envoy's `NC`).
    NoCluster,
    /// A TCP route to `BlackHoleCluster` (outbound traffic policy `REGISTRY_ONLY`).
    BlackHole,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoOriginalDestination => "no_original_destination",
            Refusal::ToProxy => "to_proxy",
            Refusal::NotSynced => "config_not_synced",
            Refusal::NoHealthyEndpoint => "no_healthy_endpoint",
            Refusal::NoWaypoint => "no_waypoint",
            Refusal::WaypointWithoutMtls => "waypoint_without_mtls",
            Refusal::NoFilterChain => "no_filter_chain",
            Refusal::NoCluster => "no_cluster",
            Refusal::BlackHole => "blackhole_cluster",
        }
    }
}

/// What the plan is made from.
pub struct Inputs<'a> {
    /// The recorded original destination, if the capture recorded one.
    pub dst: Option<SocketAddr>,
    /// The listener the connection arrived on.
    pub listener: Option<SocketAddr>,
    /// The client pod (namespace for visibility, network and locality for load balancing).
    pub source: &'a Workload,
    pub workloads: &'a WorkloadIndex,
    pub services: &'a ServiceIndex,
    pub l7: &'a L7Config,
    /// The trust domain when this node does mTLS; `None`: plaintext only.
    pub trust_domain: Option<&'a str>,
    /// Whether the config sources have delivered workloads and policies once.
    pub synced: bool,
    /// A random number for load balancing (the caller draws it; tests fix it).
    pub random: u64,
}

pub fn plan(i: &Inputs<'_>) -> Plan {
    let Some(dst) = i.dst else {
        return Plan::Refuse(Refusal::NoOriginalDestination);
    };
    if Some(dst) == i.listener || dst.port() == 0 {
        return Plan::Refuse(Refusal::ToProxy);
    }
    if !i.synced {
        return Plan::Refuse(Refusal::NotSynced);
    }
    match i.l7.outbound(dst) {
        Outbound::Unrouted => l4_only(mesh(i, dst)),
        Outbound::Http { route_config } => routed(dst, route_config, mesh(i, dst)),
        Outbound::Listener(Selection::None) => Plan::Refuse(Refusal::NoFilterChain),
        Outbound::Listener(Selection::Always(ChainAction::Http { route_config })) => {
            routed(dst, route_config, mesh(i, dst))
        }
        Outbound::Listener(Selection::Always(ChainAction::Tcp(t))) => l4_only(tcp_route(i, dst, t)),
        Outbound::Listener(Selection::Sniff { http, other }) => {
            let fallback = match other {
                None => Err(Refusal::NoFilterChain),
                Some(ChainAction::Tcp(t)) => tcp_route(i, dst, t),
                Some(ChainAction::Http { .. }) => mesh(i, dst),
            };
            routed(dst, http, fallback)
        }
    }
}

/// The mesh's own L4 decision: to a service, else to a workload, else out of the mesh.
fn mesh(i: &Inputs<'_>, dst: SocketAddr) -> Result<L4, Refusal> {
    to_service(i, dst).unwrap_or_else(|| to_workload(i, dst))
}

fn l4_only(l4: Result<L4, Refusal>) -> Plan {
    match l4 {
        Ok(l4) => Plan::L4(l4),
        Err(why) => Plan::Refuse(why),
    }
}

fn routed(dst: SocketAddr, route: &str, l4: Result<L4, Refusal>) -> Plan {
    let route = route.to_string();
    match l4 {
        Ok(fallback) => Plan::Route { dst, route, fallback },
        Err(otherwise) => Plan::RouteOnly { dst, route, otherwise },
    }
}

/// A `tcp_proxy` route: a cluster by weight. `PassthroughCluster` (and any ORIGINAL_DST
/// cluster) is the destination as addressed, which is the mesh's own decision; a cluster the
/// config does not have and `BlackHoleCluster` refuse, as in Envoy.
fn tcp_route(i: &Inputs<'_>, dst: SocketAddr, t: &TcpRoute) -> Result<L4, Refusal> {
    let name = t.pick(i.random).ok_or(Refusal::NoCluster)?;
    if name == BLACKHOLE_CLUSTER {
        return Err(Refusal::BlackHole);
    }
    let original_dst = name == PASSTHROUGH_CLUSTER
        || i.l7
            .cluster(name)
            .is_some_and(|c| c.discovery == Discovery::OriginalDst);
    if original_dst || is_default_cluster_of(i, dst, name) {
        // Another draw for the endpoint, independent of the cluster pick.
        let i = &Inputs {
            random: i.random.rotate_left(32),
            ..*i
        };
        return mesh(i, dst);
    }
    if i.l7.cluster(name).is_none() {
        return Err(Refusal::NoCluster);
    }
    Ok(L4::Cluster {
        cluster: name.to_string(),
        dst,
        service: service_of_cluster(i.services, name),
    })
}

/// Whether `cluster` is the one istiod routes a service's VIP port to when no VirtualService
/// says otherwise (`outbound|<port>||<host>` of the service `dst` is a VIP of). That route is
/// ztunnel's own L4 decision, and takes it: the endpoints and HBONE from the workload view
/// (the Address resources), as ztunnel would, not from EDS.
fn is_default_cluster_of(i: &Inputs<'_>, dst: SocketAddr, cluster: &str) -> bool {
    let Some(svc) = i
        .services
        .best_by_vip(&i.source.network, dst.ip(), Some(&i.source.namespace))
    else {
        return false;
    };
    cluster == format!("outbound|{}||{}", dst.port(), svc.hostname)
}

/// The service an Istio cluster name stands for, by host (a Kubernetes host names its
/// namespace second: `<name>.<namespace>.svc...`).
fn service_of_cluster(services: &ServiceIndex, cluster: &str) -> Option<Arc<Service>> {
    let host = crate::cluster::istio_service_host(cluster)?;
    let by_namespace = host
        .split('.')
        .nth(1)
        .and_then(|ns| services.get(&format!("{ns}/{host}")));
    by_namespace
        .or_else(|| services.all().find(|s| s.hostname == host))
        .cloned()
}

/// `None`: `dst` is no service this client can see.
fn to_service(i: &Inputs<'_>, dst: SocketAddr) -> Option<Result<L4, Refusal>> {
    let svc = i
        .services
        .best_by_vip(&i.source.network, dst.ip(), Some(&i.source.namespace))?;
    if let Some(g) = pick_waypoint(svc, i.random) {
        return Some(via_waypoint(i, g, dst, Some(svc.clone())));
    }
    if svc
        .load_balancing
        .as_ref()
        .is_some_and(|lb| lb.mode == LbMode::Passthrough)
    {
        return Some(Ok(L4::Passthrough {
            dst,
            why: PassthroughReason::ServicePassthrough,
        }));
    }
    let (w, port) = match load_balance(i, svc, dst.port()) {
        Some(x) => x,
        None => return Some(Err(Refusal::NoHealthyEndpoint)),
    };
    let Some(ip) = pick_ip(&w, dst.ip()) else {
        return Some(Err(Refusal::NoHealthyEndpoint));
    };
    let target = SocketAddr::new(ip, port);
    let endpoint = match (w.protocol, i.trust_domain) {
        (Protocol::Hbone, Some(td)) => Endpoint::Hbone {
            target,
            identity: w.identity(td),
            workload: w,
        },
        (Protocol::Hbone, None) => Endpoint::Tcp {
            dst: target,
            workload: w,
            why: PassthroughReason::NoMtls,
        },
        (Protocol::Tcp, _) => Endpoint::Tcp {
            dst: target,
            workload: w,
            why: PassthroughReason::PlaintextWorkload,
        },
    };
    Some(Ok(L4::Service {
        service: svc.clone(),
        endpoint,
    }))
}

/// A workload's waypoint, else HBONE to it, else plain TCP.
fn to_workload(i: &Inputs<'_>, dst: SocketAddr) -> Result<L4, Refusal> {
    if let Some(w) = i.workloads.by_addr(&i.source.network, dst.ip()) {
        if let Some(g) = &w.waypoint {
            match via_waypoint(i, g, dst, None) {
                // The waypoint itself sending to its workload goes direct.
                Ok(L4::Waypoint { waypoint, .. }) if waypoint.key() == i.source.key() => {}
                other => return other,
            }
        }
    }
    Ok(l4_in(dst, i.workloads, &i.source.network, i.trust_domain))
}

/// ztunnel's waypoint choice: one of the weighted set by weight, else the single waypoint.
fn pick_waypoint(svc: &Service, random: u64) -> Option<&Gateway> {
    crate::listener::by_weight(&svc.weighted_waypoints, |w| w.weight, random)
        .map(|w| &w.waypoint)
        .or(svc.waypoint.as_ref())
}

/// HBONE to the waypoint `g` names, asking for `target` (ztunnel's `fetch_waypoint`): by
/// address, the waypoint service at that VIP (load balanced to one of its pods, on the port
/// the service maps the HBONE port to) or the workload at that IP; by hostname, that service.
fn via_waypoint(i: &Inputs<'_>, g: &Gateway, target: SocketAddr, service: Option<Arc<Service>>) -> Result<L4, Refusal> {
    let td = i.trust_domain.ok_or(Refusal::WaypointWithoutMtls)?;
    // A second draw for the endpoint, independent of the waypoint pick.
    let i = &Inputs {
        random: i.random.rotate_left(32),
        ..*i
    };
    let (w, port, family) = match &g.destination {
        GatewayDestination::Address { network, address } => {
            match i.services.best_by_vip(network, *address, Some(&i.source.namespace)) {
                Some(s) => {
                    let (w, port) = load_balance(i, s, g.hbone_port).ok_or(Refusal::NoWaypoint)?;
                    (w, port, *address)
                }
                None => {
                    let w = i.workloads.by_addr(network, *address).ok_or(Refusal::NoWaypoint)?;
                    (w.clone(), g.hbone_port, *address)
                }
            }
        }
        GatewayDestination::Hostname { namespace, hostname } => {
            let s = i
                .services
                .get(&format!("{namespace}/{hostname}"))
                .ok_or(Refusal::NoWaypoint)?;
            let (w, port) = load_balance(i, s, g.hbone_port).ok_or(Refusal::NoWaypoint)?;
            (w, port, target.ip())
        }
    };
    let ip = pick_ip(&w, family).ok_or(Refusal::NoWaypoint)?;
    Ok(L4::Waypoint {
        via: SocketAddr::new(ip, port),
        target,
        identity: w.identity(td),
        waypoint: w,
        service,
    })
}

/// One endpoint of `svc` for `svc_port` and the port to reach it on, as ztunnel's
/// `load_balance` picks it: endpoints that are healthy (unless the service allows all), on the
/// client's network (nodeway has no network gateways) and have the port (their own mapping,
/// else the service's numeric target port); with STRICT or FAILOVER, only those matching the
/// most routing preferences (STRICT: all of them); then at random, weighted by capacity.
fn load_balance(i: &Inputs<'_>, svc: &Service, svc_port: u16) -> Option<(Arc<Workload>, u16)> {
    let svc_target = svc.port(svc_port)?.target_port;
    let key = svc.key();
    let lb = svc.load_balancing.as_ref();
    let allow_unhealthy = lb.is_some_and(|lb| lb.allow_unhealthy);
    let candidates = i.workloads.endpoints_of(&key).filter_map(|w| {
        if (w.unhealthy && !allow_unhealthy) || w.network != i.source.network || w.ips.is_empty() {
            return None;
        }
        let own = w.service_ports.get(&key).and_then(|m| m.get(&svc_port)).copied();
        let port = own.filter(|p| *p != 0).or((svc_target != 0).then_some(svc_target))?;
        Some((w, port))
    });
    let options: Vec<(&Arc<Workload>, u16)> = match lb {
        Some(lb) if matches!(lb.mode, LbMode::Strict | LbMode::Failover) => {
            let ranked: Vec<_> = candidates
                .filter_map(|(w, port)| {
                    let rank = locality_rank(i.source, w, &lb.routing_preference);
                    (lb.mode == LbMode::Failover || rank == lb.routing_preference.len()).then_some((rank, w, port))
                })
                .collect();
            let best = ranked.iter().map(|(r, _, _)| *r).max()?;
            ranked
                .into_iter()
                .filter(|(r, _, _)| *r == best)
                .map(|(_, w, p)| (w, p))
                .collect()
        }
        _ => candidates.collect(),
    };
    let weight = |w: &Workload| u64::from(w.capacity.max(1));
    let total: u64 = options.iter().map(|(w, _)| weight(w)).sum();
    if total == 0 {
        return None;
    }
    let mut at = i.random % total;
    for (w, port) in &options {
        if at < weight(w) {
            return Some((Arc::clone(w), *port));
        }
        at -= weight(w);
    }
    None
}

/// How many of the preferences, in order, `w` shares with the client (ztunnel's rank: a
/// leading NETWORK preference, when it matches, counts as all the ones after it).
fn locality_rank(src: &Workload, w: &Workload, prefs: &[Scope]) -> usize {
    let network_first = prefs.first() == Some(&Scope::Network);
    let mut rank = 0;
    let mut adjust = 0;
    for p in prefs {
        let matches = match p {
            Scope::Region => src.locality.region == w.locality.region,
            Scope::Zone => src.locality.zone == w.locality.zone,
            Scope::Subzone => src.locality.subzone == w.locality.subzone,
            Scope::Node => src.node == w.node,
            Scope::Cluster => src.cluster_id == w.cluster_id,
            Scope::Network => {
                let m = src.network == w.network;
                if network_first {
                    if !m {
                        continue;
                    }
                    adjust = prefs.len() - 1;
                }
                m
            }
        };
        if !matches {
            break;
        }
        rank += 1;
    }
    rank + adjust
}

/// The workload's address of the family the client dialled, else its first.
fn pick_ip(w: &Workload, like: IpAddr) -> Option<IpAddr> {
    w.ips
        .iter()
        .find(|ip| ip.is_ipv4() == like.is_ipv4())
        .or(w.ips.first())
        .copied()
}

/// HBONE to mesh workloads that speak it, else plain TCP.
fn l4_in(dst: SocketAddr, workloads: &WorkloadIndex, network: &str, trust_domain: Option<&str>) -> L4 {
    match identity_in(dst, workloads, network, trust_domain) {
        Ok(identity) => L4::Hbone { target: dst, identity },
        Err(why) => L4::Passthrough { dst, why },
    }
}

/// The identity to tunnel to for `dst`, or why the connection goes as plain TCP.
pub fn mesh_identity(
    dst: SocketAddr,
    workloads: &WorkloadIndex,
    trust_domain: Option<&str>,
) -> Result<Identity, PassthroughReason> {
    identity_in(dst, workloads, "", trust_domain)
}

fn identity_in(
    dst: SocketAddr,
    workloads: &WorkloadIndex,
    network: &str,
    trust_domain: Option<&str>,
) -> Result<Identity, PassthroughReason> {
    let w = workloads
        .by_addr(network, dst.ip())
        .ok_or(PassthroughReason::UnknownDestination)?;
    if w.protocol != Protocol::Hbone {
        return Err(PassthroughReason::PlaintextWorkload);
    }
    let td = trust_domain.ok_or(PassthroughReason::NoMtls)?;
    Ok(w.identity(td))
}
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::{json, Value};

    use super::*;
    use crate::{
        service::{LoadBalancing, ServicePort, Vip, Visibility, WeightedWaypoint},
        workload::Locality,
    };

    const SVC: &str = "demo/api.demo.svc.cluster.local";

    fn wl(name: &str, ip: &str, protocol: Protocol) -> Workload {
        Workload {
            name: name.into(),
            namespace: "demo".into(),
            service_account: name.into(),
            uid: format!("c//Pod/demo/{name}"),
            ips: vec![ip.parse().expect("ip")],
            protocol,
            ..Workload::default()
        }
    }

    /// An endpoint of `SVC` mapping service port 80 to `target`.
    fn endpoint(name: &str, ip: &str, protocol: Protocol, target: u16) -> Workload {
        let mut w = wl(name, ip, protocol);
        w.services = vec![SVC.to_string()];
        w.service_ports = BTreeMap::from([(SVC.to_string(), BTreeMap::from([(80, target)]))]);
        w
    }

    fn workloads() -> WorkloadIndex {
        WorkloadIndex::new(vec![
            Arc::new(wl("mesh", "198.18.0.2", Protocol::Hbone)),
            Arc::new(wl("plain", "198.18.0.3", Protocol::Tcp)),
        ])
    }

    fn api(target_port: u16) -> Service {
        service("api", "198.18.100.1", 80, target_port)
    }

    /// `<name>.demo.svc.cluster.local` at `vip`, mapping `port` to `target_port`.
    fn service(name: &str, vip: &str, port: u16, target_port: u16) -> Service {
        Service {
            name: name.into(),
            namespace: "demo".into(),
            hostname: format!("{name}.demo.svc.cluster.local"),
            vips: vec![Vip {
                network: String::new(),
                address: vip.parse().expect("ip"),
                length: None,
            }],
            ports: vec![ServicePort {
                service_port: port,
                target_port,
                ..ServicePort::default()
            }],
            ..Service::default()
        }
    }

    fn client() -> Workload {
        wl("client", "198.18.0.9", Protocol::Hbone)
    }

    fn l7_with_port(port: &str) -> L7Config {
        let route = serde_json::json!({"name": port, "virtualHosts": []});
        L7Config::from_json(&[route], &[], &[]).expect("route table")
    }

    struct World {
        workloads: WorkloadIndex,
        services: ServiceIndex,
        source: Workload,
        synced: bool,
        random: u64,
    }

    impl World {
        fn new(workloads: Vec<Workload>, services: Vec<Service>) -> Self {
            World {
                workloads: WorkloadIndex::new(workloads.into_iter().map(Arc::new)),
                services: ServiceIndex::new(services.into_iter().map(Arc::new)),
                source: client(),
                synced: true,
                random: 0,
            }
        }

        fn plan(&self, dst: &str, l7: &L7Config, td: Option<&str>) -> Plan {
            plan(&Inputs {
                dst: Some(dst.parse().expect("addr")),
                listener: Some("127.0.0.1:15001".parse().expect("addr")),
                source: &self.source,
                workloads: &self.workloads,
                services: &self.services,
                l7,
                trust_domain: td,
                synced: self.synced,
                random: self.random,
            })
        }

        fn to(&self, dst: &str) -> Plan {
            self.plan(dst, &L7Config::default(), Some("cluster.local"))
        }
    }

    fn run(dst: &str, l7: &L7Config, td: Option<&str>) -> Plan {
        let mut w = World::new(Vec::new(), Vec::new());
        w.workloads = workloads();
        w.plan(dst, l7, td)
    }

    /// The endpoint a service connection went to, or the plan.
    fn endpoint_of(p: &Plan) -> Result<&Endpoint, String> {
        match p {
            Plan::L4(L4::Service { endpoint, .. }) => Ok(endpoint),
            other => Err(format!("not to a service endpoint: {other:?}")),
        }
    }

    #[test]
    fn mesh_workloads_get_hbone_with_their_identity() {
        let p = run("198.18.0.2:8080", &L7Config::default(), Some("cluster.local"));
        assert_eq!(
            p,
            Plan::L4(L4::Hbone {
                target: "198.18.0.2:8080".parse().expect("addr"),
                identity: Identity::new("cluster.local", "demo", "mesh"),
            })
        );
    }

    #[test]
    fn the_rest_goes_as_plain_tcp_and_says_why() {
        let l7 = L7Config::default();
        let why = |p: Plan| match p {
            Plan::L4(L4::Passthrough { why, .. }) => Some(why),
            _ => None,
        };
        let td = Some("cluster.local");
        assert_eq!(
            why(run("198.18.0.3:80", &l7, td)),
            Some(PassthroughReason::PlaintextWorkload)
        );
        assert_eq!(
            why(run("198.18.9.9:80", &l7, td)),
            Some(PassthroughReason::UnknownDestination)
        );
        assert_eq!(why(run("198.18.0.2:80", &l7, None)), Some(PassthroughReason::NoMtls));
    }

    #[test]
    fn a_port_with_a_route_table_is_routed_with_an_l4_fallback() {
        let p = run("198.18.0.2:9080", &l7_with_port("9080"), Some("cluster.local"));
        let Plan::Route { dst, fallback, .. } = p else {
            panic!("not routed: {p:?}")
        };
        assert_eq!(dst.port(), 9080);
        assert!(matches!(fallback, L4::Hbone { .. }));
        assert!(matches!(
            run("198.18.0.2:9081", &l7_with_port("9080"), None),
            Plan::L4(_)
        ));
    }

    #[test]
    fn a_routed_port_of_a_service_without_endpoints_is_routed_and_refuses_other_bytes() {
        let w = World::new(Vec::new(), vec![api(8080)]);
        assert_eq!(
            w.plan("198.18.100.1:80", &l7_with_port("80"), Some("cluster.local")),
            Plan::RouteOnly {
                dst: "198.18.100.1:80".parse().expect("addr"),
                route: "80".into(),
                otherwise: Refusal::NoHealthyEndpoint
            }
        );
    }

    #[test]
    fn loops_and_unrecorded_connections_are_refused() {
        let l7 = L7Config::default();
        assert_eq!(run("127.0.0.1:15001", &l7, None), Plan::Refuse(Refusal::ToProxy));
        assert_eq!(run("198.18.0.2:0", &l7, None), Plan::Refuse(Refusal::ToProxy));
        let w = World::new(Vec::new(), Vec::new());
        let p = plan(&Inputs {
            dst: None,
            listener: None,
            source: &w.source,
            workloads: &workloads(),
            services: &w.services,
            l7: &l7,
            trust_domain: None,
            synced: true,
            random: 0,
        });
        assert_eq!(p, Plan::Refuse(Refusal::NoOriginalDestination));
    }

    #[test]
    fn before_the_first_sync_everything_is_refused() {
        let mut w = World::new(vec![wl("mesh", "198.18.0.2", Protocol::Hbone)], Vec::new());
        w.synced = false;
        assert_eq!(w.to("198.18.0.2:8080"), Plan::Refuse(Refusal::NotSynced));
        assert_eq!(
            w.to("198.18.9.9:8080"),
            Plan::Refuse(Refusal::NotSynced),
            "not even plain TCP"
        );
    }

    #[test]
    fn a_vip_goes_over_hbone_to_an_endpoint_on_its_target_port() {
        let w = World::new(
            vec![endpoint("api-1", "198.18.0.20", Protocol::Hbone, 8080)],
            vec![api(8080)],
        );
        let p = w.to("198.18.100.1:80");
        let Plan::L4(L4::Service { service, endpoint }) = &p else {
            panic!("{p:?}")
        };
        assert_eq!(service.hostname, "api.demo.svc.cluster.local");
        assert_eq!(
            endpoint,
            &Endpoint::Hbone {
                target: "198.18.0.20:8080".parse().expect("addr"),
                identity: Identity::new("cluster.local", "demo", "api-1"),
                workload: w
                    .workloads
                    .by_ip("198.18.0.20".parse().expect("ip"))
                    .expect("ep")
                    .clone(),
            }
        );
        // An unknown port of the service: no endpoint has it.
        assert_eq!(w.to("198.18.100.1:81"), Plan::Refuse(Refusal::NoHealthyEndpoint));
    }

    #[test]
    fn named_target_ports_come_from_each_endpoints_port_map() {
        // The service's target port is named (0 on the wire); each pod maps it its own way, and
        // a pod without that port name is no endpoint for it.
        let mut no_port = endpoint("api-3", "198.18.0.22", Protocol::Hbone, 0);
        no_port.service_ports.insert(SVC.to_string(), BTreeMap::new());
        let mut w = World::new(
            vec![
                endpoint("api-1", "198.18.0.20", Protocol::Hbone, 8080),
                endpoint("api-2", "198.18.0.21", Protocol::Hbone, 9090),
                no_port,
            ],
            vec![api(0)],
        );
        let mut seen = std::collections::BTreeSet::new();
        for r in 0..12 {
            w.random = r;
            seen.insert(
                endpoint_of(&w.to("198.18.100.1:80"))
                    .map(Endpoint::address)
                    .expect("endpoint"),
            );
        }
        let want: std::collections::BTreeSet<SocketAddr> = ["198.18.0.20:8080", "198.18.0.21:9090"]
            .into_iter()
            .map(|a| a.parse().expect("addr"))
            .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn only_healthy_endpoints_unless_the_service_allows_all() {
        let mut sick = endpoint("api-1", "198.18.0.20", Protocol::Hbone, 8080);
        sick.unhealthy = true;
        let mut w = World::new(vec![sick], vec![api(8080)]);
        assert_eq!(w.to("198.18.100.1:80"), Plan::Refuse(Refusal::NoHealthyEndpoint));
        let mut all = api(8080);
        all.load_balancing = Some(LoadBalancing {
            allow_unhealthy: true,
            ..LoadBalancing::default()
        });
        w.services = ServiceIndex::new([Arc::new(all)]);
        assert!(endpoint_of(&w.to("198.18.100.1:80")).is_ok());
    }

    #[test]
    fn a_plaintext_endpoint_gets_plain_tcp_to_its_pod_not_the_vip() {
        let w = World::new(
            vec![endpoint("legacy", "198.18.0.30", Protocol::Tcp, 8080)],
            vec![api(8080)],
        );
        let p = w.to("198.18.100.1:80");
        let Ok(Endpoint::Tcp { dst, why, .. }) = endpoint_of(&p) else {
            panic!("{p:?}")
        };
        assert_eq!(
            (*dst, *why),
            (
                "198.18.0.30:8080".parse().expect("addr"),
                PassthroughReason::PlaintextWorkload
            )
        );
    }

    #[test]
    fn failover_prefers_the_closest_endpoints_and_strict_only_those() {
        let near = |mut w: Workload| {
            w.locality = Locality {
                region: "r1".into(),
                zone: "z1".into(),
                subzone: String::new(),
            };
            w
        };
        let far = endpoint("far", "198.18.0.41", Protocol::Hbone, 8080);
        let mut w = World::new(
            vec![
                near(endpoint("near", "198.18.0.40", Protocol::Hbone, 8080)),
                far.clone(),
            ],
            Vec::new(),
        );
        w.source = near(client());
        let with = |mode| {
            let mut s = api(8080);
            s.load_balancing = Some(LoadBalancing {
                routing_preference: vec![Scope::Region, Scope::Zone],
                mode,
                allow_unhealthy: false,
            });
            ServiceIndex::new([Arc::new(s)])
        };
        w.services = with(LbMode::Failover);
        for r in 0..8 {
            w.random = r;
            assert_eq!(
                endpoint_of(&w.to("198.18.100.1:80")).expect("ep").workload().name,
                "near"
            );
        }
        // Without the near one, FAILOVER falls over; STRICT refuses.
        w.workloads = WorkloadIndex::new([Arc::new(far)]);
        assert_eq!(
            endpoint_of(&w.to("198.18.100.1:80")).expect("ep").workload().name,
            "far"
        );
        w.services = with(LbMode::Strict);
        assert_eq!(w.to("198.18.100.1:80"), Plan::Refuse(Refusal::NoHealthyEndpoint));
    }

    #[test]
    fn a_namespace_scoped_service_is_not_a_service_to_other_namespaces() {
        let mut s = api(8080);
        s.visibility = Visibility::Namespace;
        let mut w = World::new(vec![endpoint("api-1", "198.18.0.20", Protocol::Hbone, 8080)], vec![s]);
        assert!(endpoint_of(&w.to("198.18.100.1:80")).is_ok());
        w.source.namespace = "other".into();
        assert_eq!(
            w.to("198.18.100.1:80"),
            Plan::L4(L4::Passthrough {
                dst: "198.18.100.1:80".parse().expect("addr"),
                why: PassthroughReason::UnknownDestination
            })
        );
    }

    fn waypoint_by_vip() -> Gateway {
        Gateway {
            destination: GatewayDestination::Address {
                network: String::new(),
                address: "198.18.100.9".parse().expect("ip"),
            },
            hbone_port: 15008,
        }
    }

    /// The waypoint's own service (VIP 198.18.100.9, port 15008) and pod.
    fn waypoint_parts() -> (Service, Workload) {
        let svc = Service {
            name: "waypoint".into(),
            namespace: "demo".into(),
            hostname: "waypoint.demo.svc.cluster.local".into(),
            vips: vec![Vip {
                network: String::new(),
                address: "198.18.100.9".parse().expect("ip"),
                length: None,
            }],
            ports: vec![ServicePort {
                service_port: 15008,
                target_port: 15008,
                ..ServicePort::default()
            }],
            ..Service::default()
        };
        let mut pod = wl("waypoint-1", "198.18.0.50", Protocol::Hbone);
        pod.service_account = "waypoint".into();
        pod.services = vec!["demo/waypoint.demo.svc.cluster.local".into()];
        (svc, pod)
    }

    #[test]
    fn a_service_with_a_waypoint_goes_to_it_asking_for_the_vip() {
        let (wp_svc, wp_pod) = waypoint_parts();
        let mut s = api(8080);
        s.waypoint = Some(waypoint_by_vip());
        let w = World::new(
            vec![endpoint("api-1", "198.18.0.20", Protocol::Hbone, 8080), wp_pod],
            vec![s, wp_svc],
        );
        let p = w.to("198.18.100.1:80");
        let Plan::L4(L4::Waypoint {
            via,
            target,
            identity,
            service,
            ..
        }) = &p
        else {
            panic!("{p:?}")
        };
        assert_eq!(*via, "198.18.0.50:15008".parse().expect("addr"));
        assert_eq!(
            *target,
            "198.18.100.1:80".parse().expect("addr"),
            "the original VIP:port"
        );
        assert_eq!(*identity, Identity::new("cluster.local", "demo", "waypoint"));
        assert_eq!(
            service.as_ref().map(|s| s.hostname.as_str()),
            Some("api.demo.svc.cluster.local")
        );
        // No certificates: no waypoint (never around it).
        assert_eq!(
            w.plan("198.18.100.1:80", &L7Config::default(), None),
            Plan::Refuse(Refusal::WaypointWithoutMtls)
        );
    }

    #[test]
    fn a_workload_with_a_waypoint_goes_to_it_and_weighted_waypoints_split() {
        let (wp_svc, wp_pod) = waypoint_parts();
        let mut target = wl("mesh", "198.18.0.2", Protocol::Hbone);
        target.waypoint = Some(Gateway {
            destination: GatewayDestination::Hostname {
                namespace: "demo".into(),
                hostname: "waypoint.demo.svc.cluster.local".into(),
            },
            hbone_port: 15008,
        });
        let mut w = World::new(vec![target, wp_pod.clone()], vec![wp_svc.clone()]);
        let p = w.to("198.18.0.2:8080");
        assert!(
            matches!(&p, Plan::L4(L4::Waypoint { via, target, service: None, .. })
                if *via == "198.18.0.50:15008".parse().expect("addr") && *target == "198.18.0.2:8080".parse().expect("addr")),
            "{p:?}"
        );
        // The waypoint itself reaches its workload directly.
        w.source = wp_pod;
        assert!(matches!(w.to("198.18.0.2:8080"), Plan::L4(L4::Hbone { .. })));

        // A weighted set: a zero weight gets nothing; the weights share the rest.
        let mut canary_pod = wl("canary-1", "198.18.0.51", Protocol::Hbone);
        canary_pod.uid = "c//Pod/demo/canary-1".into();
        let mut s = api(8080);
        s.waypoint = Some(waypoint_by_vip());
        let by_ip = |ip: &str| Gateway {
            destination: GatewayDestination::Address {
                network: String::new(),
                address: ip.parse().expect("ip"),
            },
            hbone_port: 15008,
        };
        s.weighted_waypoints = vec![
            WeightedWaypoint {
                waypoint: by_ip("198.18.0.50"),
                weight: 0,
            },
            WeightedWaypoint {
                waypoint: by_ip("198.18.0.51"),
                weight: 3,
            },
        ];
        let (_, primary) = waypoint_parts();
        let mut w = World::new(vec![primary, canary_pod], vec![s]);
        for r in 0..6 {
            w.random = r;
            let p = w.to("198.18.100.1:80");
            assert!(
                matches!(&p, Plan::L4(L4::Waypoint { waypoint, .. }) if waypoint.name == "canary-1"),
                "{p:?}"
            );
        }
    }

    #[test]
    fn a_service_addressed_connection_ignores_the_endpoints_own_waypoint() {
        // ztunnel: the workload's waypoint is for traffic addressed to the workload only.
        let (wp_svc, wp_pod) = waypoint_parts();
        let mut ep = endpoint("api-1", "198.18.0.20", Protocol::Hbone, 8080);
        ep.waypoint = Some(waypoint_by_vip());
        let w = World::new(vec![ep, wp_pod], vec![api(8080), wp_svc]);
        let p = w.to("198.18.100.1:80");
        assert_eq!(
            endpoint_of(&p).map(Endpoint::address),
            Ok("198.18.0.20:8080".parse().expect("addr"))
        );
        assert!(matches!(w.to("198.18.0.20:8080"), Plan::L4(L4::Waypoint { .. })));
    }

    #[test]
    fn passthrough_services_go_to_the_address_dialled() {
        let mut s = api(8080);
        s.load_balancing = Some(LoadBalancing {
            mode: LbMode::Passthrough,
            ..LoadBalancing::default()
        });
        let w = World::new(Vec::new(), vec![s]);
        assert_eq!(
            w.to("198.18.100.1:80"),
            Plan::L4(L4::Passthrough {
                dst: "198.18.100.1:80".parse().expect("addr"),
                why: PassthroughReason::ServicePassthrough
            })
        );
    }

    /// The TCP service `echo` (VIP 198.18.100.2:9000) with subsets v1/v2, and the outbound
    /// listeners a sidecar gets for it and for the HTTP port 9080: `listeners` are extra ones.
    fn l7_with_listeners(tcp: Value, extra: &[Value]) -> L7Config {
        let cluster = |subset: &str| json!({"name": format!("outbound|9000|{subset}|echo.demo.svc.cluster.local"), "type": "EDS"});
        let mut l7 = L7Config::from_json(
            &[
                json!({"name": "9080", "virtualHosts": []}),
                json!({"name": "7000", "virtualHosts": []}),
            ],
            &[
                cluster("v1"),
                cluster("v2"),
                json!({"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lbPolicy": "CLUSTER_PROVIDED"}),
            ],
            &[],
        )
        .expect("clusters");
        let mut listeners = vec![
            json!({"name": "198.18.100.2_9000", "address": {"socketAddress": {"address": "198.18.100.2", "portValue": 9000}},
                   "filterChains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": tcp}]}]}),
            json!({"name": "0.0.0.0_9080", "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 9080}},
                   "filterChains": [{"filterChainMatch": {"applicationProtocols": ["http/1.1", "h2c"], "transportProtocol": "raw_buffer"},
                                     "filters": [hcm("9080")]}],
                   "defaultFilterChain": {"filters": [{"name": "envoy.filters.network.tcp_proxy",
                       "typedConfig": tcp_proxy(json!({"cluster": "PassthroughCluster"}))}]}}),
        ];
        listeners.extend(extra.iter().cloned());
        l7.listeners = L7Config::listeners_from_json(&listeners).expect("listeners");
        l7
    }

    fn hcm(route: &str) -> Value {
        json!({"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "statPrefix": "outbound", "rds": {"routeConfigName": route}}})
    }

    fn tcp_proxy(spec: Value) -> Value {
        let mut t = json!({"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "statPrefix": "x"});
        if let (Some(t), Some(spec)) = (t.as_object_mut(), spec.as_object()) {
            t.extend(spec.clone());
        }
        t
    }

    fn echo() -> Service {
        service("echo", "198.18.100.2", 9000, 9000)
    }

    fn weighted_80_20() -> Value {
        tcp_proxy(json!({"weightedClusters": {"clusters": [
            {"name": "outbound|9000|v1|echo.demo.svc.cluster.local", "weight": 80},
            {"name": "outbound|9000|v2|echo.demo.svc.cluster.local", "weight": 20}]}}))
    }

    #[test]
    fn a_tcp_route_picks_a_cluster_by_weight_and_names_its_service() {
        let l7 = l7_with_listeners(weighted_80_20(), &[]);
        let mut w = World::new(Vec::new(), vec![echo()]);
        let mut counts = BTreeMap::<String, usize>::new();
        for r in 0..1000 {
            w.random = r;
            let p = w.plan("198.18.100.2:9000", &l7, Some("cluster.local"));
            let Plan::L4(L4::Cluster { cluster, dst, service }) = p else {
                panic!("not a TCP route: {p:?}")
            };
            assert_eq!(dst, "198.18.100.2:9000".parse().expect("addr"));
            assert_eq!(
                service.map(|s| s.key()).as_deref(),
                Some("demo/echo.demo.svc.cluster.local")
            );
            *counts.entry(cluster).or_default() += 1;
        }
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            [
                ("outbound|9000|v1|echo.demo.svc.cluster.local".to_string(), 800),
                ("outbound|9000|v2|echo.demo.svc.cluster.local".to_string(), 200)
            ]
        );
    }

    #[test]
    fn a_services_own_default_tcp_route_is_ztunnels_l4_decision() {
        // What istiod sends for a TCP port no VirtualService touches: its default cluster.
        let l7 = l7_with_listeners(
            tcp_proxy(json!({"cluster": "outbound|9000||echo.demo.svc.cluster.local"})),
            &[],
        );
        let mut e = wl("echo-1", "198.18.0.40", Protocol::Hbone);
        let key = echo().key();
        e.services = vec![key.clone()];
        e.service_ports = BTreeMap::from([(key, BTreeMap::from([(9000, 9000)]))]);
        let w = World::new(vec![e], vec![echo()]);
        let plan = w.plan("198.18.100.2:9000", &l7, Some("cluster.local"));
        let without = w.plan("198.18.100.2:9000", &L7Config::default(), Some("cluster.local"));
        assert!(matches!(plan, Plan::L4(L4::Service { .. })), "{plan:?}");
        assert_eq!(plan, without, "the endpoints and HBONE of the workload view, not EDS");
        // A subset (a DestinationRule's, routed by a VirtualService) is the cluster's.
        let l7 = l7_with_listeners(
            tcp_proxy(json!({"cluster": "outbound|9000|v1|echo.demo.svc.cluster.local"})),
            &[],
        );
        let plan = w.plan("198.18.100.2:9000", &l7, Some("cluster.local"));
        assert!(matches!(plan, Plan::L4(L4::Cluster { .. })), "{plan:?}");
    }

    #[test]
    fn with_listeners_http_ports_are_theirs_not_the_route_tables_names() {
        let extra = json!({"name": "0.0.0.0_7001", "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 7001}},
                           "filterChains": [{"filters": [hcm("7000")]}]});
        let l7 = l7_with_listeners(weighted_80_20(), &[extra]);
        let w = World::new(vec![wl("mesh", "198.18.0.2", Protocol::Hbone)], vec![echo()]);
        let td = Some("cluster.local");
        // Sniffed HTTP port: the router with table "9080", else the mesh decision (Passthrough).
        let p = w.plan("198.18.0.2:9080", &l7, td);
        assert!(
            matches!(&p, Plan::Route { route, fallback: L4::Hbone { .. }, .. } if route == "9080"),
            "{p:?}"
        );
        // A listener naming route table "7000" makes port 7001 HTTP; port 7000 has a table
        // named after it but no listener: not HTTP.
        let p = w.plan("198.18.0.2:7001", &l7, td);
        assert!(matches!(&p, Plan::Route { route, .. } if route == "7000"), "{p:?}");
        assert!(matches!(w.plan("198.18.0.2:7000", &l7, td), Plan::L4(L4::Hbone { .. })));
        // Without listeners, the table's name decides, as before.
        let mut before = l7.clone();
        before.listeners = None;
        assert!(matches!(w.plan("198.18.0.2:7000", &before, td), Plan::Route { route, .. } if route == "7000"));
        assert!(matches!(w.plan("198.18.0.2:7001", &before, td), Plan::L4(_)));
    }

    #[test]
    fn tcp_routes_to_passthrough_blackhole_and_unknown_clusters() {
        let mut pod = wl("echo-1", "198.18.0.60", Protocol::Hbone);
        pod.services = vec![echo().key()];
        let w = World::new(vec![pod], vec![echo()]);
        let td = Some("cluster.local");
        let route = |cluster: &str| l7_with_listeners(tcp_proxy(json!({"cluster": cluster})), &[]);
        // PassthroughCluster: the destination as addressed, the mesh's own decision (the VIP's
        // endpoint over HBONE).
        let p = w.plan("198.18.100.2:9000", &route("PassthroughCluster"), td);
        assert!(matches!(p, Plan::L4(L4::Service { .. })), "{p:?}");
        assert_eq!(
            w.plan("198.18.100.2:9000", &route("BlackHoleCluster"), td),
            Plan::Refuse(Refusal::BlackHole)
        );
        assert_eq!(
            w.plan(
                "198.18.100.2:9000",
                &route("outbound|9000||nope.demo.svc.cluster.local"),
                td
            ),
            Plan::Refuse(Refusal::NoCluster)
        );
    }

    #[test]
    fn no_filter_chain_refuses_and_a_sniffed_port_without_one_for_tcp_routes_only_http() {
        // 0.0.0.0_6000: only a sniffed HTTP chain; 198.18.100.2_6001: a chain for another port.
        let sniffed_only = json!({"name": "0.0.0.0_6000", "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 6000}},
            "filterChains": [{"filterChainMatch": {"applicationProtocols": ["http/1.1", "h2c"]}, "filters": [hcm("6000")]}]});
        let other_port = json!({"name": "198.18.100.2_6001", "address": {"socketAddress": {"address": "198.18.100.2", "portValue": 6001}},
            "filterChains": [{"filterChainMatch": {"destinationPort": 7}, "filters": [{"name": "envoy.filters.network.tcp_proxy",
                "typedConfig": tcp_proxy(json!({"cluster": "PassthroughCluster"}))}]}]});
        let l7 = l7_with_listeners(weighted_80_20(), &[sniffed_only, other_port]);
        let w = World::new(vec![wl("mesh", "198.18.0.2", Protocol::Hbone)], vec![echo()]);
        let td = Some("cluster.local");
        assert_eq!(
            w.plan("198.18.0.2:6000", &l7, td),
            Plan::RouteOnly {
                dst: "198.18.0.2:6000".parse().expect("addr"),
                route: "6000".into(),
                otherwise: Refusal::NoFilterChain
            }
        );
        assert_eq!(
            w.plan("198.18.100.2:6001", &l7, td),
            Plan::Refuse(Refusal::NoFilterChain)
        );
    }
}
