//! What the proxy knows about services: hostname, VIPs and ports, as istiod describes them.
use std::{net::IpAddr, sync::Arc};

use serde::Serialize;

use crate::workload::Gateway;

/// One Kubernetes (or ServiceEntry) service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `reviews.default.svc.cluster.local`
    pub hostname: String,
    /// Virtual IPs, with the network each belongs to (empty: the default network).
    pub vips: Vec<Vip>,
    pub ports: Vec<ServicePort>,
    /// Identities its endpoints may present besides their own (istiod's `subject_alt_names`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// Traffic to the service goes through this waypoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<Gateway>,
    /// When not empty: one waypoint per connection by weight; `waypoint` stays the primary.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    /// `None`: istiod's default (random among healthy endpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<LoadBalancing>,
    pub visibility: Visibility,
    /// Preferred when several namespaces define the same hostname or VIP.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub canonical: bool,
    /// For ingress gateways (nodeway does not act on it).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ingress_use_waypoint: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Vip {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub network: String,
    pub address: IpAddr,
    /// A CIDR VIP (ServiceEntry addresses) when set; a host address otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub length: Option<u8>,
}

impl Vip {
    /// A host address (no prefix, or a full-length one).
    fn is_host(&self) -> bool {
        let full = if self.address.is_ipv4() { 32 } else { 128 };
        self.length.is_none_or(|l| l == full)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let Some(len) = self.length else {
            return self.address == ip;
        };
        crate::authz::Cidr::new(self.address, len).is_ok_and(|c| c.contains(ip))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub service_port: u16,
    /// 0: the same as the service port (or named, resolved per workload).
    pub target_port: u16,
    pub app_protocol: AppProtocol,
}

/// The port's declared application protocol (`appProtocol`, or the port name's prefix).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AppProtocol {
    #[default]
    Unknown,
    Http11,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedWaypoint {
    pub waypoint: Gateway,
    pub weight: u32,
}

/// Who may resolve the service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Visibility {
    /// Every client.
    #[default]
    Public,
    /// Only clients in the service's namespace; to others its VIP is not a service.
    Namespace,
}

/// istiod's `LoadBalancing`: how an endpoint is picked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancing {
    /// Compared in order with the client's; the endpoints matching the most win.
    pub routing_preference: Vec<Scope>,
    pub mode: LbMode,
    /// Unhealthy endpoints are candidates too.
    pub allow_unhealthy: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LbMode {
    /// Random among the (healthy) endpoints; the preferences are ignored.
    #[default]
    Standard,
    /// Only endpoints matching every preference.
    Strict,
    /// The endpoints matching the most preferences.
    Failover,
    /// To the original destination address, unresolved.
    Passthrough,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

impl Service {
    /// `namespace/hostname`, how istiod names the resource.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// Whether a client in `namespace` may resolve it (ztunnel's `visible_to`).
    pub fn visible_to(&self, namespace: &str) -> bool {
        self.visibility != Visibility::Namespace || self.namespace == namespace
    }

    pub fn port(&self, service_port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.service_port == service_port)
    }
}

/// All known services, by `namespace/hostname` and by VIP. Persistent maps, like
/// [`crate::workload::WorkloadIndex`]: O(1) snapshots, O(log n) changes. Several services (in
/// different namespaces) may share a VIP; CIDR VIPs are checked when no host VIP matches.
#[derive(Debug, Default, Clone)]
pub struct ServiceIndex {
    by_key: imbl::OrdMap<String, Arc<Service>>,
    by_vip: imbl::HashMap<(String, IpAddr), imbl::Vector<Arc<Service>>>,
    by_cidr: imbl::Vector<Arc<Service>>,
}

impl ServiceIndex {
    pub fn new(services: impl IntoIterator<Item = Arc<Service>>) -> Self {
        let mut idx = ServiceIndex::default();
        for s in services {
            idx.insert(s);
        }
        idx
    }

    pub fn insert(&mut self, s: Arc<Service>) {
        if let Some(old) = self.by_key.get(&s.key()).cloned() {
            self.remove(&old);
        }
        for v in &s.vips {
            if v.is_host() {
                self.by_vip
                    .entry((v.network.clone(), v.address))
                    .or_default()
                    .push_back(s.clone());
            }
        }
        if s.vips.iter().any(|v| !v.is_host()) {
            self.by_cidr.push_back(s.clone());
        }
        self.by_key.insert(s.key(), s);
    }

    /// Removes `s` where it (this very entry) is still what the index holds.
    pub fn remove(&mut self, s: &Arc<Service>) {
        for v in &s.vips {
            let k = (v.network.clone(), v.address);
            if let Some(list) = self.by_vip.get_mut(&k) {
                list.retain(|x| !Arc::ptr_eq(x, s));
                if list.is_empty() {
                    self.by_vip.remove(&k);
                }
            }
        }
        self.by_cidr.retain(|x| !Arc::ptr_eq(x, s));
        let key = s.key();
        if self.by_key.get(&key).is_some_and(|x| Arc::ptr_eq(x, s)) {
            self.by_key.remove(&key);
        }
    }

    /// The service at `ip` on the default network, whoever asks.
    pub fn by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.best_by_vip("", ip, None)
    }

    /// The service a client in `client_ns` reaches at `ip` on `network`, as ztunnel picks it:
    /// only services visible to the client; then one in the client's namespace, then a canonical
    /// one; CIDR VIPs (the most specific first) when no host VIP matches.
    pub fn best_by_vip(&self, network: &str, ip: IpAddr, client_ns: Option<&str>) -> Option<&Arc<Service>> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let visible = |s: &&Arc<Service>| client_ns.is_none_or(|ns| s.visible_to(ns));
        let rank = |s: &Arc<Service>| (client_ns.is_some_and(|ns| s.namespace == ns), s.canonical);
        let exact = self
            .by_vip
            .get(&(network.to_string(), ip))
            .and_then(|list| best(list.iter().filter(visible), |s| rank(s)));
        exact.or_else(|| {
            let with_len = self.by_cidr.iter().filter(visible).filter_map(|s| {
                let len = s
                    .vips
                    .iter()
                    .filter(|v| v.network == network && !v.is_host() && v.contains(ip))
                    .filter_map(|v| v.length)
                    .max()?;
                Some((s, len))
            });
            let in_ns = |s: &Arc<Service>| client_ns.is_some_and(|ns| s.namespace == ns);
            with_len
                .max_by_key(|(s, l)| (in_ns(s), *l, s.canonical))
                .map(|(s, _)| s)
        })
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Service>> {
        self.by_key.get(key)
    }

    /// Sorted by `namespace/hostname`.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.by_key.values()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// The first of the best ranked (ztunnel keeps the first match of equal rank).
fn best<'a, T, K: Ord>(items: impl Iterator<Item = &'a T>, rank: impl Fn(&T) -> K) -> Option<&'a T> {
    let mut out: Option<(&T, K)> = None;
    for it in items {
        let r = rank(it);
        if out.as_ref().is_none_or(|(_, b)| r > *b) {
            out = Some((it, r));
        }
    }
    out.map(|(it, _)| it)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, vip: &str, visibility: Visibility, canonical: bool) -> Arc<Service> {
        Arc::new(Service {
            name: "s".into(),
            namespace: ns.into(),
            hostname: "s.example.com".into(),
            vips: vec![Vip {
                network: String::new(),
                address: vip.parse().unwrap(),
                length: None,
            }],
            visibility,
            canonical,
            ..Default::default()
        })
    }

    #[test]
    fn a_namespace_scoped_service_is_a_service_only_to_its_namespace() {
        let ip = "198.18.10.1".parse().unwrap();
        let idx = ServiceIndex::new([svc("a", "198.18.10.1", Visibility::Namespace, false)]);
        assert!(idx.best_by_vip("", ip, Some("a")).is_some());
        assert!(idx.best_by_vip("", ip, Some("b")).is_none());
    }

    #[test]
    fn a_shared_vip_prefers_the_clients_namespace_then_canonical() {
        let ip = "198.18.10.1".parse().unwrap();
        let idx = ServiceIndex::new([
            svc("a", "198.18.10.1", Visibility::Public, false),
            svc("b", "198.18.10.1", Visibility::Public, true),
            svc("c", "198.18.10.1", Visibility::Public, false),
        ]);
        assert_eq!(idx.best_by_vip("", ip, Some("c")).unwrap().namespace, "c");
        assert_eq!(idx.best_by_vip("", ip, Some("x")).unwrap().namespace, "b");
        let mut idx = idx;
        let b = idx.get("b/s.example.com").unwrap().clone();
        idx.remove(&b);
        assert_eq!(idx.best_by_vip("", ip, Some("x")).unwrap().namespace, "a");
    }

    #[test]
    fn cidr_vips_match_when_no_host_vip_does() {
        let mut wide = Service::clone(&svc("a", "198.18.0.0", Visibility::Public, false));
        wide.vips[0].length = Some(16);
        let mut narrow = Service::clone(&svc("b", "198.18.10.0", Visibility::Public, false));
        narrow.vips[0].length = Some(24);
        let idx = ServiceIndex::new([Arc::new(wide), Arc::new(narrow)]);
        let at = |ip: &str| {
            idx.best_by_vip("", ip.parse().unwrap(), None)
                .map(|s| s.namespace.clone())
        };
        assert_eq!(at("198.18.10.7").as_deref(), Some("b"));
        assert_eq!(at("198.18.11.7").as_deref(), Some("a"));
        assert_eq!(at("198.19.0.1"), None);
    }
}
