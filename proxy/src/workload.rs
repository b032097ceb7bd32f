//! What the proxy knows about workloads: enough to label connections with Istio's names.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::Serialize;

/// One pod as the mesh sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Pod name.
    pub name: String,
    pub namespace: String,
    /// Istio's `source_workload` / `destination_workload` (the deployment; the pod name if unset).
    pub workload_name: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// How peers reach it: HBONE (mTLS, port 15008) for captured pods, plain TCP otherwise.
    pub protocol: Protocol,
    /// PeerAuthentication-style mode: STRICT refuses plaintext inbound.
    pub mtls_mode: MtlsMode,
    /// Selector-scoped authorization policies (`namespace/name`) that apply to it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<String>,
    /// Services (`namespace/hostname`) it is an endpoint of (from xDS).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Per service it is an endpoint of: service port → this workload's target port (istiod
    /// resolves named target ports against the pod's container ports into this map).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub service_ports: BTreeMap<String, BTreeMap<u16, u16>>,
    /// istiod's key (`cluster//Pod/namespace/name`); empty for the local file.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// The network its addresses are on (empty: the default network).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// Shares the node's addresses: never looked up by IP (another pod's traffic would be
    /// attributed to it).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
    /// Not ready: no traffic to it through a service (unless the service allows all).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unhealthy: bool,
    /// Its waypoint, when traffic addressed to it goes through one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<Gateway>,
    #[serde(skip_serializing_if = "Locality::is_empty")]
    pub locality: Locality,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cluster_id: String,
    /// Relative weight among a service's endpoints; 0 counts as 1 (istiod's default).
    #[serde(skip_serializing_if = "is_zero")]
    pub capacity: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Where a workload is, for locality-aware load balancing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }
}

/// A waypoint (or gateway) reference, as istiod's `GatewayAddress`: by address (a workload or
/// the waypoint's service VIP) or by service hostname, reached over HBONE on `hbone_port`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    pub destination: GatewayDestination,
    pub hbone_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayDestination {
    Address { network: String, address: IpAddr },
    Hostname { namespace: String, hostname: String },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    #[default]
    Permissive,
    Strict,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Hbone,
}

impl Workload {
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service account>`
    pub fn identity(&self, trust_domain: &str) -> crate::identity::Identity {
        crate::identity::Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// `app` label, or `app.kubernetes.io/name`, as Istio's `*_app` labels use.
    pub fn app(&self) -> Option<&str> {
        self.labels
            .get("app")
            .or_else(|| self.labels.get("app.kubernetes.io/name"))
            .map(String::as_str)
    }

    pub fn version(&self) -> Option<&str> {
        self.labels
            .get("version")
            .or_else(|| self.labels.get("app.kubernetes.io/version"))
            .map(String::as_str)
    }

    /// `namespace/name`, how logs and the admin API name a pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Which of several workloads on one address a lookup returns, as ztunnel ranks them: pods
    /// (not spoofable, most likely what is really behind the address) before other kinds, then
    /// HBONE before plain TCP; among equals, the one added last.
    fn address_rank(&self) -> u8 {
        let is_pod = self.uid.contains("//Pod/");
        let is_hbone = self.protocol == Protocol::Hbone;
        u8::from(is_pod) * 2 + u8::from(is_hbone)
    }
}

type IndexKey = (String, String, String);

/// All known workloads by (network, IP), by service and by `namespace/name`. Persistent maps: a
/// snapshot is cloned in O(1) and one workload changes in O(log n), so an xDS update of one
/// workload does not rebuild the whole index; readers hold their snapshot (`Arc`) unchanged.
/// Several workloads may share an address (a pod and a WorkloadEntry, or a pod being replaced):
/// all are kept and a lookup picks one as ztunnel does ([`Workload::address_rank`]).
#[derive(Debug, Default, Clone)]
pub struct WorkloadIndex {
    by_addr: imbl::HashMap<(String, IpAddr), imbl::Vector<Arc<Workload>>>,
    by_key: imbl::OrdMap<IndexKey, Arc<Workload>>,
    /// `namespace/hostname` → the workloads that are its endpoints.
    by_service: imbl::HashMap<String, imbl::OrdMap<IndexKey, Arc<Workload>>>,
}

fn index_key(w: &Workload) -> IndexKey {
    (w.namespace.clone(), w.name.clone(), w.uid.clone())
}

/// IPv4-mapped IPv6 addresses are the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl WorkloadIndex {
    pub fn new(workloads: impl IntoIterator<Item = Arc<Workload>>) -> Self {
        let mut idx = WorkloadIndex::default();
        for w in workloads {
            idx.insert(w);
        }
        idx
    }

    /// Adds `w`, replacing an entry with the same namespace, name and uid.
    pub fn insert(&mut self, w: Arc<Workload>) {
        let key = index_key(&w);
        if let Some(old) = self.by_key.get(&key).cloned() {
            self.remove(&old);
        }
        if !w.host_network {
            for ip in &w.ips {
                self.by_addr
                    .entry((w.network.clone(), canonical(*ip)))
                    .or_default()
                    .push_back(w.clone());
            }
        }
        for s in w.services.iter().chain(w.service_ports.keys()) {
            self.by_service
                .entry(s.clone())
                .or_default()
                .insert(key.clone(), w.clone());
        }
        self.by_key.insert(key, w);
    }

    /// Removes `w` where it (this very entry) is still what the index holds.
    pub fn remove(&mut self, w: &Arc<Workload>) {
        for ip in &w.ips {
            let k = (w.network.clone(), canonical(*ip));
            if let Some(list) = self.by_addr.get_mut(&k) {
                list.retain(|x| !Arc::ptr_eq(x, w));
                if list.is_empty() {
                    self.by_addr.remove(&k);
                }
            }
        }
        let key = index_key(w);
        for s in w.services.iter().chain(w.service_ports.keys()) {
            if let Some(m) = self.by_service.get_mut(s) {
                if m.get(&key).is_some_and(|x| Arc::ptr_eq(x, w)) {
                    m.remove(&key);
                }
                if m.is_empty() {
                    self.by_service.remove(s);
                }
            }
        }
        if self.by_key.get(&key).is_some_and(|x| Arc::ptr_eq(x, w)) {
            self.by_key.remove(&key);
        }
    }

    /// Every workload, sorted by namespace and name.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_key.values()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The workload at `ip` on the default network (the one istiod uses unless a network is
    /// configured). IPv4-mapped IPv6 addresses find the IPv4 workload.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_addr("", ip)
    }

    /// The workload at `ip` on `network`; with several, the best ranked (ztunnel's choice).
    pub fn by_addr(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        let list = self.by_addr.get(&(network.to_string(), canonical(ip)))?;
        // `max_by_key` keeps the last of equal maxima: the most recently added wins a tie.
        list.iter().max_by_key(|w| w.address_rank())
    }

    /// Every workload at `ip` on `network`, in the order they were added.
    pub fn all_at(&self, network: &str, ip: IpAddr) -> Vec<Arc<Workload>> {
        self.by_addr
            .get(&(network.to_string(), canonical(ip)))
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The workload `namespace/name` (the first by uid, if several clusters have one).
    pub fn named(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        let from = (namespace.to_string(), name.to_string(), String::new());
        self.by_key
            .range(from..)
            .next()
            .filter(|((ns, n, _), _)| ns == namespace && n == name)
            .map(|(_, w)| w)
    }

    /// The workloads that are endpoints of the service `namespace/hostname`.
    pub fn endpoints_of(&self, service: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_service.get(service).into_iter().flat_map(|m| m.values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mapped_addresses() {
        let w = Arc::new(Workload {
            name: "a".into(),
            ips: vec!["198.18.0.2".parse().unwrap()],
            ..Default::default()
        });
        let idx = WorkloadIndex::new([w]);
        assert_eq!(idx.by_ip("::ffff:198.18.0.2".parse().unwrap()).unwrap().name, "a");
        assert!(idx.by_ip("198.18.0.3".parse().unwrap()).is_none());
    }

    fn at(name: &str, uid: &str, protocol: Protocol) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: "demo".into(),
            uid: uid.into(),
            ips: vec!["198.18.0.2".parse().unwrap()],
            protocol,
            ..Default::default()
        })
    }

    #[test]
    fn several_workloads_share_an_address_and_pods_in_the_mesh_win() {
        let ip = "198.18.0.2".parse().unwrap();
        let entry = at("we", "c1/networking.istio.io/WorkloadEntry/demo/we", Protocol::Hbone);
        let plain_pod = at("p1", "c1//Pod/demo/p1", Protocol::Tcp);
        let mesh_pod = at("p2", "c1//Pod/demo/p2", Protocol::Hbone);
        let mut idx = WorkloadIndex::new([entry.clone(), mesh_pod.clone(), plain_pod.clone()]);
        assert_eq!(idx.by_ip(ip).unwrap().name, "p2", "a pod in the mesh first");
        assert_eq!(idx.all_at("", ip).len(), 3);
        idx.remove(&mesh_pod);
        assert_eq!(idx.by_ip(ip).unwrap().name, "p1", "then any pod");
        idx.remove(&plain_pod);
        assert_eq!(idx.by_ip(ip).unwrap().name, "we");
        idx.remove(&entry);
        assert!(idx.by_ip(ip).is_none());
        // Equal rank: the one added last.
        let idx = WorkloadIndex::new([
            at("a", "c//Pod/demo/a", Protocol::Hbone),
            at("b", "c//Pod/demo/b", Protocol::Hbone),
        ]);
        assert_eq!(idx.by_ip(ip).unwrap().name, "b");
    }

    #[test]
    fn networks_are_separate_and_host_network_pods_are_not_indexed_by_ip() {
        let ip = "198.18.0.2".parse().unwrap();
        let mut remote = Workload::clone(&at("r", "c2//Pod/demo/r", Protocol::Hbone));
        remote.network = "net-2".into();
        let mut host = Workload::clone(&at("h", "c1//Pod/demo/h", Protocol::Tcp));
        host.host_network = true;
        let idx = WorkloadIndex::new([Arc::new(remote), Arc::new(host)]);
        assert!(idx.by_ip(ip).is_none(), "neither is on the default network by IP");
        assert_eq!(idx.by_addr("net-2", ip).unwrap().name, "r");
        assert_eq!(idx.len(), 2, "the host-network pod is still known by name");
        assert_eq!(idx.named("demo", "h").unwrap().uid, "c1//Pod/demo/h");
        assert!(idx.named("demo", "x").is_none());
    }
}
