//! What the proxy knows about workloads: enough to label connections with Istio's names.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

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

/// All known workloads by IP. Replaced whole on every config change, so readers see one version.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    all: Vec<Arc<Workload>>,
}

impl WorkloadIndex {
    pub fn new(workloads: impl IntoIterator<Item = Arc<Workload>>) -> Self {
        let mut by_ip = HashMap::new();
        let mut all = Vec::new();
        for w in workloads {
            for ip in &w.ips {
                by_ip.insert(*ip, w.clone());
            }
            all.push(w);
        }
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        WorkloadIndex { by_ip, all }
    }

    /// Every workload, sorted by namespace and name.
    pub fn all(&self) -> &[Arc<Workload>] {
        &self.all
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
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
