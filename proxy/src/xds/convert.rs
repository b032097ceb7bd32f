//! istiod's resources into the proxy's model. Anything that cannot be represented exactly is an
//! error naming the resource and the field, so the whole response is NACKed.
use std::sync::Arc;

use crate::{
    authz::{ip_from_bytes, Policy},
    proto::istio::{security as spb, workload as wpb},
    service::{Service, ServicePort, Vip},
    workload::{MtlsMode, Protocol, Workload},
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
    let ips = w
        .addresses
        .iter()
        .map(|b| ip_from_bytes(b).map_err(|e| format!("workload {}/{}: addresses: {e}", w.namespace, w.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match wpb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(wpb::TunnelProtocol::Hbone) => Protocol::Hbone,
        Ok(wpb::TunnelProtocol::None) => Protocol::Tcp,
        Err(_) => {
            return Err(format!(
                "workload {}/{}: unknown tunnelProtocol {}",
                w.namespace, w.name, w.tunnel_protocol
            ))
        }
    };
    // Istio's `*_workload` label is the workload (deployment) name; the canonical name (the app)
    // stands in when istiod leaves it empty.
    let workload_name = [&w.workload_name, &w.canonical_name, &w.name]
        .into_iter()
        .find(|s| !s.is_empty())
        .cloned()
        .unwrap_or_default();
    let mut labels = std::collections::BTreeMap::new();
    if !w.canonical_name.is_empty() {
        labels.insert("app".to_string(), w.canonical_name.clone());
    }
    if !w.canonical_revision.is_empty() {
        labels.insert("version".to_string(), w.canonical_revision.clone());
    }
    Ok(Workload {
        service_account: if w.service_account.is_empty() {
            "default".to_string()
        } else {
            w.service_account
        },
        workload_name,
        node: w.node,
        ips,
        labels,
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

/// Converts one `istio.workload.Service` (also used for the local file's `services:`).
pub fn service(s: wpb::Service) -> Result<Service, String> {
    if s.hostname.is_empty() {
        return Err(format!("service {}/{}: hostname is empty", s.namespace, s.name));
    }
    let at = |what: String| format!("service {}/{}: {what}", s.namespace, s.hostname);
    let vips = s
        .addresses
        .iter()
        .map(|a| {
            Ok(Vip {
                network: a.network.clone(),
                address: ip_from_bytes(&a.address).map_err(|e| at(format!("addresses: {e}")))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let port = |p: u32, field: &str| u16::try_from(p).map_err(|_| at(format!("ports: {field} {p} out of range")));
    let ports = s
        .ports
        .iter()
        .map(|p| {
            Ok(ServicePort {
                service_port: port(p.service_port, "servicePort")?,
                target_port: port(p.target_port, "targetPort")?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        ports,
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
}
