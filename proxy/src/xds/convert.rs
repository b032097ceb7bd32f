//! istiod's resources into the proxy's model. Anything that cannot be represented exactly is an
//! error naming the resource and the field: that resource is NACKed (the rest of its response
//! still applies).
use std::{collections::BTreeMap, sync::Arc};

use crate::{
    authz::{ip_from_bytes, Policy},
    proto::istio::{security as spb, workload as wpb},
    service::{self, AppProtocol, LbMode, LoadBalancing, Service, ServicePort, Vip, Visibility, WeightedWaypoint},
    workload::{Gateway, GatewayDestination, Locality, MtlsMode, Protocol, Workload},
};

/// One decoded `istio.workload.Address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

/// Decodes and converts one `istio.workload.Address`.
pub fn address(bytes: &[u8]) -> Result<Address, String> {
    use prost::Message;
    let a = wpb::Address::decode(bytes).map_err(|e| format!("not an istio.workload.Address: {e}"))?;
    match a.r#type {
        Some(wpb::address::Type::Workload(w)) => workload(w).map(|w| Address::Workload(Arc::new(w))),
        Some(wpb::address::Type::Service(s)) => service(s).map(|s| Address::Service(Arc::new(s))),
        None => Err("an Address with neither a workload nor a service".to_string()),
    }
}

/// Converts one `istio.workload.Workload` (also used for the local file's `workloads:`).
pub fn workload(w: wpb::Workload) -> Result<Workload, String> {
    if w.name.is_empty() {
        return Err("workload: name is empty".to_string());
    }
    if w.namespace.is_empty() {
        return Err(format!("workload {}: namespace is empty", w.name));
    }
    let at = |what: String| format!("workload {}/{}: {what}", w.namespace, w.name);
    let ips = w
        .addresses
        .iter()
        .map(|b| ip_from_bytes(b).map_err(|e| at(format!("addresses: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = tunnel_protocol(w.tunnel_protocol).map_err(at)?;
    let waypoint = w
        .waypoint
        .as_ref()
        .map(|g| gateway(g).map_err(|e| at(format!("waypoint: {e}"))))
        .transpose()?;
    let unhealthy = workload_unhealthy(w.status).map_err(at)?;
    let host_network = host_network(w.network_mode).map_err(at)?;
    let service_ports = workload_service_ports(&w.services).map_err(at)?;
    Ok(Workload {
        workload_name: workload_label_name(&w),
        labels: canonical_labels(&w),
        locality: w.locality.clone().map_or_else(Locality::default, |l| Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.subzone,
        }),
        uid: w.uid,
        network: w.network,
        host_network,
        unhealthy,
        waypoint,
        cluster_id: w.cluster_id,
        capacity: w.capacity.unwrap_or(0),
        service_ports,
        service_account: if w.service_account.is_empty() {
            "default".to_string()
        } else {
            w.service_account
        },
        node: w.node,
        ips,
        protocol,
        // istiod folds PeerAuthentication into policies; the workload itself carries no mode.
        mtls_mode: MtlsMode::Permissive,
        authorization_policies: w.authorization_policies,
        // A map in the proto: sorted here so equal workloads compare equal.
        services: {
            let mut v: Vec<String> = w.services.into_keys().collect();
            v.sort();
            v
        },
        name: w.name,
        namespace: w.namespace,
    })
}

fn tunnel_protocol(p: i32) -> Result<Protocol, String> {
    match wpb::TunnelProtocol::try_from(p) {
        Ok(wpb::TunnelProtocol::Hbone) => Ok(Protocol::Hbone),
        // A sidecar: it speaks Istio's mTLS, which a node proxy does not send (ztunnel neither);
        // it accepts plaintext from outside the mesh unless STRICT.
        Ok(wpb::TunnelProtocol::None | wpb::TunnelProtocol::LegacyIstioMtls) => Ok(Protocol::Tcp),
        Err(_) => Err(format!("unknown tunnelProtocol {p}")),
    }
}

fn workload_unhealthy(status: i32) -> Result<bool, String> {
    match wpb::WorkloadStatus::try_from(status) {
        Ok(wpb::WorkloadStatus::Healthy) => Ok(false),
        Ok(wpb::WorkloadStatus::Unhealthy) => Ok(true),
        Err(_) => Err(format!("unknown status {status}")),
    }
}

fn host_network(mode: i32) -> Result<bool, String> {
    match wpb::NetworkMode::try_from(mode) {
        Ok(wpb::NetworkMode::Standard) => Ok(false),
        Ok(wpb::NetworkMode::HostNetwork) => Ok(true),
        Err(_) => Err(format!("unknown networkMode {mode}")),
    }
}

/// Istio's `*_workload` label is the workload (deployment) name; the canonical name (the app)
/// stands in when istiod leaves it empty.
fn workload_label_name(w: &wpb::Workload) -> String {
    [&w.workload_name, &w.canonical_name, &w.name]
        .into_iter()
        .find(|s| !s.is_empty())
        .cloned()
        .unwrap_or_default()
}

/// `app` and `version` from the canonical name and revision, where istiod sends them.
fn canonical_labels(w: &wpb::Workload) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if !w.canonical_name.is_empty() {
        labels.insert("app".to_string(), w.canonical_name.clone());
    }
    if !w.canonical_revision.is_empty() {
        labels.insert("version".to_string(), w.canonical_revision.clone());
    }
    labels
}

/// Each service's port map (service port to target port).
fn workload_service_ports(
    services: &std::collections::HashMap<String, wpb::PortList>,
) -> Result<BTreeMap<String, BTreeMap<u16, u16>>, String> {
    let mut service_ports = BTreeMap::new();
    for (svc, list) in services {
        let mut m = BTreeMap::new();
        for p in &list.ports {
            let (sp, tp) = ports(p).map_err(|e| format!("services[{svc}]: {e}"))?;
            m.insert(sp, tp);
        }
        service_ports.insert(svc.clone(), m);
    }
    Ok(service_ports)
}

/// Converts one `istio.workload.Service` (also used for the local file's `services:`).
pub fn service(s: wpb::Service) -> Result<Service, String> {
    if s.hostname.is_empty() {
        return Err(format!("service {}/{}: hostname is empty", s.namespace, s.name));
    }
    let at = |what: String| format!("service {}/{}: {what}", s.namespace, s.hostname);
    let vips = s
        .addresses
        .iter()
        .map(|a| network_address(a).map_err(|e| at(format!("addresses: {e}"))))
        .collect::<Result<Vec<_>, String>>()?;
    let ports = s
        .ports
        .iter()
        .map(|p| {
            let (service_port, target_port) = ports(p).map_err(|e| at(format!("ports: {e}")))?;
            Ok(ServicePort {
                service_port,
                target_port,
                app_protocol: app_protocol(p.app_protocol).map_err(|e| at(format!("ports: {e}")))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let waypoint = s
        .waypoint
        .as_ref()
        .map(|g| gateway(g).map_err(|e| at(format!("waypoint: {e}"))))
        .transpose()?;
    let weighted_waypoints = s
        .weighted_waypoints
        .iter()
        .map(|ww| {
            let g = ww
                .destination
                .as_ref()
                .ok_or_else(|| at("weightedWaypoints: an entry with no destination".into()))?;
            Ok(WeightedWaypoint {
                waypoint: gateway(g).map_err(|e| at(format!("weightedWaypoints: {e}")))?,
                weight: ww.weight,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let load_balancing = s
        .load_balancing
        .as_ref()
        .map(|lb| load_balancing(lb).map_err(|e| at(format!("loadBalancing: {e}"))))
        .transpose()?;
    let visibility = match wpb::service::Visibility::try_from(s.visibility) {
        Ok(wpb::service::Visibility::Public) => Visibility::Public,
        Ok(wpb::service::Visibility::Namespace) => Visibility::Namespace,
        Err(_) => return Err(at(format!("unknown visibility {}", s.visibility))),
    };
    Ok(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        ports,
        subject_alt_names: s.subject_alt_names,
        waypoint,
        weighted_waypoints,
        load_balancing,
        visibility,
        canonical: s.canonical,
        ingress_use_waypoint: s.ingress_use_waypoint,
    })
}

/// `(service port, target port)`, both in range.
fn ports(p: &wpb::Port) -> Result<(u16, u16), String> {
    let port = |v: u32, field: &str| u16::try_from(v).map_err(|_| format!("{field} {v} out of range"));
    Ok((port(p.service_port, "servicePort")?, port(p.target_port, "targetPort")?))
}

fn app_protocol(v: i32) -> Result<AppProtocol, String> {
    Ok(match wpb::AppProtocol::try_from(v) {
        Ok(wpb::AppProtocol::Unknown) => AppProtocol::Unknown,
        Ok(wpb::AppProtocol::Http11) => AppProtocol::Http11,
        Ok(wpb::AppProtocol::Http2) => AppProtocol::Http2,
        Ok(wpb::AppProtocol::Grpc) => AppProtocol::Grpc,
        Ok(wpb::AppProtocol::Tcp) => AppProtocol::Tcp,
        Ok(wpb::AppProtocol::Tls) => AppProtocol::Tls,
        Err(_) => return Err(format!("unknown appProtocol {v}")),
    })
}

fn network_address(a: &wpb::NetworkAddress) -> Result<Vip, String> {
    let address = ip_from_bytes(&a.address).map_err(|e| e.to_string())?;
    let length = match a.length {
        None => None,
        Some(l) => {
            let max = if address.is_ipv4() { 32 } else { 128 };
            match u8::try_from(l) {
                Ok(l) if l <= max => Some(l),
                _ => return Err(format!("{address}/{l}: prefix longer than {max}")),
            }
        }
    };
    Ok(Vip {
        network: a.network.clone(),
        address,
        length,
    })
}

fn gateway(g: &wpb::GatewayAddress) -> Result<Gateway, String> {
    use wpb::gateway_address::Destination;
    let destination = match &g.destination {
        Some(Destination::Address(a)) => GatewayDestination::Address {
            network: a.network.clone(),
            address: ip_from_bytes(&a.address).map_err(|e| e.to_string())?,
        },
        Some(Destination::Hostname(h)) => GatewayDestination::Hostname {
            namespace: h.namespace.clone(),
            hostname: h.hostname.clone(),
        },
        None => return Err("neither an address nor a hostname".into()),
    };
    let hbone_port =
        u16::try_from(g.hbone_mtls_port).map_err(|_| format!("hboneMtlsPort {} out of range", g.hbone_mtls_port))?;
    Ok(Gateway {
        destination,
        hbone_port: if hbone_port == 0 { 15008 } else { hbone_port },
    })
}

fn load_balancing(lb: &wpb::LoadBalancing) -> Result<LoadBalancing, String> {
    use wpb::load_balancing::{HealthPolicy, Mode, Scope};
    let mode = match Mode::try_from(lb.mode) {
        Ok(Mode::UnspecifiedMode) => LbMode::Standard,
        Ok(Mode::Strict) => LbMode::Strict,
        Ok(Mode::Failover) => LbMode::Failover,
        Ok(Mode::Passthrough) => LbMode::Passthrough,
        Err(_) => return Err(format!("unknown mode {}", lb.mode)),
    };
    let routing_preference = lb
        .routing_preference
        .iter()
        .map(|v| match Scope::try_from(*v) {
            Ok(Scope::Region) => Ok(service::Scope::Region),
            Ok(Scope::Zone) => Ok(service::Scope::Zone),
            Ok(Scope::Subzone) => Ok(service::Scope::Subzone),
            Ok(Scope::Node) => Ok(service::Scope::Node),
            Ok(Scope::Cluster) => Ok(service::Scope::Cluster),
            Ok(Scope::Network) => Ok(service::Scope::Network),
            Ok(Scope::UnspecifiedScope) | Err(_) => Err(format!("routingPreference: unknown scope {v}")),
        })
        .collect::<Result<Vec<_>, String>>()?;
    let allow_unhealthy = match HealthPolicy::try_from(lb.health_policy) {
        Ok(HealthPolicy::OnlyHealthy) => false,
        Ok(HealthPolicy::AllowAll) => true,
        Err(_) => return Err(format!("unknown healthPolicy {}", lb.health_policy)),
    };
    Ok(LoadBalancing {
        routing_preference,
        mode,
        allow_unhealthy,
    })
}

/// Decodes and converts one `istio.security.Authorization`.
pub fn authorization(bytes: &[u8]) -> Result<Arc<Policy>, String> {
    use prost::Message;
    let a = spb::Authorization::decode(bytes).map_err(|e| format!("not an istio.security.Authorization: {e}"))?;
    Policy::try_from(a).map(Arc::new).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn encode(w: wpb::Workload) -> Vec<u8> {
        wpb::Address {
            r#type: Some(wpb::address::Type::Workload(w)),
        }
        .encode_to_vec()
    }

    #[test]
    fn workload_fields() {
        let b = encode(wpb::Workload {
            name: "client-1".into(),
            namespace: "demo".into(),
            addresses: vec![vec![198, 18, 1, 2]],
            tunnel_protocol: wpb::TunnelProtocol::Hbone as i32,
            canonical_name: "client".into(),
            node: "node-a".into(),
            authorization_policies: vec!["demo/p".into()],
            services: [("demo/api.demo.svc.cluster.local".to_string(), wpb::PortList::default())].into(),
            ..Default::default()
        });
        let Address::Workload(w) = address(&b).unwrap() else {
            panic!("not a workload")
        };
        assert_eq!(w.service_account, "default");
        assert_eq!(w.workload_name, "client");
        assert_eq!(w.protocol, Protocol::Hbone);
        assert_eq!(w.ips, vec!["198.18.1.2".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(w.authorization_policies, vec!["demo/p".to_string()]);
        assert_eq!(w.services, vec!["demo/api.demo.svc.cluster.local".to_string()]);
    }

    #[test]
    fn bad_address_names_the_workload() {
        let b = encode(wpb::Workload {
            name: "w".into(),
            namespace: "demo".into(),
            addresses: vec![vec![1, 2, 3]],
            ..Default::default()
        });
        let e = address(&b).unwrap_err();
        assert!(e.contains("demo/w") && e.contains("3 bytes"), "{e}");
    }

    #[test]
    fn current_istio_fields_reach_the_model() {
        let b = encode(wpb::Workload {
            uid: "c1//Pod/demo/w".into(),
            name: "w".into(),
            namespace: "demo".into(),
            network: "net-1".into(),
            addresses: vec![vec![198, 18, 1, 2]],
            tunnel_protocol: wpb::TunnelProtocol::LegacyIstioMtls as i32,
            network_mode: wpb::NetworkMode::HostNetwork as i32,
            status: wpb::WorkloadStatus::Unhealthy as i32,
            capacity: Some(3),
            waypoint: Some(wpb::GatewayAddress {
                destination: Some(wpb::gateway_address::Destination::Hostname(wpb::NamespacedHostname {
                    namespace: "demo".into(),
                    hostname: "wp.demo.svc.cluster.local".into(),
                })),
                hbone_mtls_port: 0,
            }),
            services: [(
                "demo/api.demo.svc.cluster.local".to_string(),
                wpb::PortList {
                    ports: vec![wpb::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: wpb::AppProtocol::Http11 as i32,
                    }],
                },
            )]
            .into(),
            ..Default::default()
        });
        let Address::Workload(w) = address(&b).unwrap() else {
            panic!("not a workload")
        };
        assert_eq!((w.uid.as_str(), w.network.as_str()), ("c1//Pod/demo/w", "net-1"));
        assert_eq!(w.protocol, Protocol::Tcp, "a sidecar gets no HBONE");
        assert!(w.host_network && w.unhealthy);
        assert_eq!(w.capacity, 3);
        assert_eq!(w.waypoint.as_ref().map(|g| g.hbone_port), Some(15008));
        assert_eq!(w.service_ports["demo/api.demo.svc.cluster.local"][&80], 8080);

        let s = wpb::Service {
            name: "api".into(),
            namespace: "demo".into(),
            hostname: "api.example.com".into(),
            addresses: vec![wpb::NetworkAddress {
                network: String::new(),
                address: vec![198, 18, 64, 0],
                length: Some(18),
            }],
            ports: vec![wpb::Port {
                service_port: 443,
                target_port: 0,
                app_protocol: wpb::AppProtocol::Tls as i32,
            }],
            visibility: wpb::service::Visibility::Namespace as i32,
            ingress_use_waypoint: true,
            weighted_waypoints: vec![wpb::WeightedWaypoint {
                destination: Some(wpb::GatewayAddress {
                    destination: Some(wpb::gateway_address::Destination::Address(wpb::NetworkAddress {
                        network: String::new(),
                        address: vec![198, 18, 0, 50],
                        length: None,
                    })),
                    hbone_mtls_port: 15008,
                }),
                weight: 7,
            }],
            load_balancing: Some(wpb::LoadBalancing {
                routing_preference: vec![wpb::load_balancing::Scope::Zone as i32],
                mode: wpb::load_balancing::Mode::Failover as i32,
                health_policy: wpb::load_balancing::HealthPolicy::AllowAll as i32,
            }),
            ..Default::default()
        };
        let b = wpb::Address {
            r#type: Some(wpb::address::Type::Service(s.clone())),
        }
        .encode_to_vec();
        let Address::Service(m) = address(&b).unwrap() else {
            panic!("not a service")
        };
        assert_eq!(m.vips[0].length, Some(18));
        assert_eq!(m.ports[0].app_protocol, AppProtocol::Tls);
        assert_eq!(m.visibility, Visibility::Namespace);
        assert!(m.ingress_use_waypoint);
        assert_eq!(m.weighted_waypoints[0].weight, 7);
        let lb = m.load_balancing.as_ref().unwrap();
        assert_eq!((lb.mode, lb.allow_unhealthy), (LbMode::Failover, true));
        assert_eq!(lb.routing_preference, vec![service::Scope::Zone]);

        let mut bad = s;
        bad.addresses[0].length = Some(33);
        let e = service(bad).unwrap_err();
        assert!(e.contains("demo/api.example.com") && e.contains("/33"), "{e}");
    }
}
