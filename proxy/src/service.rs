//! What the proxy knows about services: hostname, VIPs and ports, as istiod describes them.
use std::{net::IpAddr, sync::Arc};

use serde::Serialize;

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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Vip {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub network: String,
    pub address: IpAddr,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub service_port: u16,
    /// 0: the same as the service port (or named, resolved per workload).
    pub target_port: u16,
}

impl Service {
    /// `namespace/hostname`, how istiod names the resource.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// All known services, by `namespace/hostname` and by VIP. Persistent maps, like
/// [`crate::workload::WorkloadIndex`]: O(1) snapshots, O(log n) changes.
#[derive(Debug, Default, Clone)]
pub struct ServiceIndex {
    by_key: imbl::OrdMap<String, Arc<Service>>,
    by_vip: imbl::HashMap<IpAddr, Arc<Service>>,
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
        for v in &s.vips {
            self.by_vip.insert(v.address, s.clone());
        }
        self.by_key.insert(s.key(), s);
    }

    /// Removes `s` where it (this very entry) is still what the index holds.
    pub fn remove(&mut self, s: &Arc<Service>) {
        for v in &s.vips {
            if self.by_vip.get(&v.address).is_some_and(|x| Arc::ptr_eq(x, s)) {
                self.by_vip.remove(&v.address);
            }
        }
        let key = s.key();
        if self.by_key.get(&key).is_some_and(|x| Arc::ptr_eq(x, s)) {
            self.by_key.remove(&key);
        }
    }

    pub fn by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
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
