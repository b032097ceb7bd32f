//! What to do with one redirected outbound connection, decided from the config snapshots alone
//! (no I/O), as ztunnel's `build_request` does. The caller then acts on the [`Plan`].
//!
//! Service VIPs (resolve to an endpoint, HBONE to `podIP:targetPort`) and waypoints (HBONE to the
//! waypoint with the original `VIP:port` as the CONNECT authority) are further [`L4`] shapes of
//! the same decision: the HBONE variant already separates where the tunnel goes from what it
//! asks for.
use std::net::SocketAddr;

use crate::{
    identity::Identity,
    l7::L7Config,
    workload::{Protocol, WorkloadIndex},
};

/// The decision for one connection, with the reason it was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Reset the app's connection.
    Refuse(Refusal),
    /// The port carries HTTP (it has a route table): serve the connection with the router when
    /// its first bytes are HTTP, else as `fallback`.
    Route { dst: SocketAddr, fallback: L4 },
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassthroughReason {
    /// The destination is not a known workload (outside the mesh, or a VIP).
    UnknownDestination,
    /// The destination workload is known but does not speak HBONE.
    PlaintextWorkload,
    /// This node has no certificates (no CA configured): plaintext only.
    NoMtls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The connection was not redirected by the capture (someone dialled the listener).
    NoOriginalDestination,
    /// The original destination is the proxy's own listener: a loop.
    ToProxy,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoOriginalDestination => "no_original_destination",
            Refusal::ToProxy => "to_proxy",
        }
    }
}

/// What the plan is made from.
pub struct Inputs<'a> {
    /// The recorded original destination, if the capture recorded one.
    pub dst: Option<SocketAddr>,
    /// The listener the connection arrived on.
    pub listener: Option<SocketAddr>,
    pub workloads: &'a WorkloadIndex,
    pub l7: &'a L7Config,
    /// The trust domain when this node does mTLS; `None`: plaintext only.
    pub trust_domain: Option<&'a str>,
}

pub fn plan(i: &Inputs<'_>) -> Plan {
    let Some(dst) = i.dst else {
        return Plan::Refuse(Refusal::NoOriginalDestination);
    };
    if Some(dst) == i.listener || dst.port() == 0 {
        return Plan::Refuse(Refusal::ToProxy);
    }
    let l4 = l4(dst, i.workloads, i.trust_domain);
    // Istio names outbound route tables after the port and makes them only for HTTP ports.
    if i.l7.routes_for_port(dst.port()).is_some() {
        return Plan::Route { dst, fallback: l4 };
    }
    Plan::L4(l4)
}

/// HBONE to mesh workloads that speak it, else plain TCP.
pub fn l4(dst: SocketAddr, workloads: &WorkloadIndex, trust_domain: Option<&str>) -> L4 {
    match mesh_identity(dst, workloads, trust_domain) {
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
    let w = workloads.by_ip(dst.ip()).ok_or(PassthroughReason::UnknownDestination)?;
    if w.protocol != Protocol::Hbone {
        return Err(PassthroughReason::PlaintextWorkload);
    }
    let td = trust_domain.ok_or(PassthroughReason::NoMtls)?;
    Ok(w.identity(td))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::workload::Workload;

    fn workloads() -> WorkloadIndex {
        let w = |name: &str, ip: &str, protocol| Workload {
            name: name.into(),
            namespace: "demo".into(),
            service_account: name.into(),
            ips: vec![ip.parse().expect("ip")],
            protocol,
            ..Workload::default()
        };
        WorkloadIndex::new(vec![
            Arc::new(w("mesh", "198.18.0.2", Protocol::Hbone)),
            Arc::new(w("plain", "198.18.0.3", Protocol::Tcp)),
        ])
    }

    fn l7_with_port(port: &str) -> L7Config {
        let route = serde_json::json!({"name": port, "virtualHosts": []});
        L7Config::from_json(&[route], &[], &[]).expect("route table")
    }

    fn run(dst: &str, l7: &L7Config, td: Option<&str>) -> Plan {
        plan(&Inputs {
            dst: Some(dst.parse().expect("addr")),
            listener: Some("127.0.0.1:15001".parse().expect("addr")),
            workloads: &workloads(),
            l7,
            trust_domain: td,
        })
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
        let Plan::Route { dst, fallback } = p else {
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
    fn loops_and_unrecorded_connections_are_refused() {
        let l7 = L7Config::default();
        assert_eq!(run("127.0.0.1:15001", &l7, None), Plan::Refuse(Refusal::ToProxy));
        assert_eq!(run("198.18.0.2:0", &l7, None), Plan::Refuse(Refusal::ToProxy));
        let p = plan(&Inputs {
            dst: None,
            listener: None,
            workloads: &workloads(),
            l7: &l7,
            trust_domain: None,
        });
        assert_eq!(p, Plan::Refuse(Refusal::NoOriginalDestination));
    }
}
