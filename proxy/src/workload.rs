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
}

/// All known workloads by IP and by `namespace/name`. Persistent maps: a snapshot is cloned in
/// O(1) and one workload changes in O(log n), so an xDS update of one workload does not rebuild the
/// whole index; readers hold their snapshot (`Arc`) unchanged.
#[derive(Debug, Default, Clone)]
pub struct WorkloadIndex {
    by_ip: imbl::HashMap<IpAddr, Arc<Workload>>,
    by_key: imbl::OrdMap<(String, String), Arc<Workload>>,
}

impl WorkloadIndex {
    pub fn new(workloads: impl IntoIterator<Item = Arc<Workload>>) -> Self {
        let mut idx = WorkloadIndex::default();
        for w in workloads {
            idx.insert(w);
        }
        idx
    }

    /// Adds `w` (replacing an entry with the same namespace/name or IP).
    pub fn insert(&mut self, w: Arc<Workload>) {
        for ip in &w.ips {
            self.by_ip.insert(*ip, w.clone());
        }
        self.by_key.insert((w.namespace.clone(), w.name.clone()), w);
    }

    /// Removes `w` where it (this very entry) is still what the index holds.
    pub fn remove(&mut self, w: &Arc<Workload>) {
        for ip in &w.ips {
            if self.by_ip.get(ip).is_some_and(|x| Arc::ptr_eq(x, w)) {
                self.by_ip.remove(ip);
            }
        }
        let key = (w.namespace.clone(), w.name.clone());
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

    /// IPv4-mapped IPv6 addresses find the IPv4 workload.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.by_ip.get(&ip)
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
}
