//! The local config file: this node's pods and which namespaces are captured, the mesh's other
//! workloads and services (istiod's `istio.workload` Workload/Service in camelCase), authorization
//! policies, and the L7 config as Envoy resources in protobuf-JSON (`routes:`, `clusters:`,
//! `endpoints:`, `listeners:`, as `istioctl proxy-config routes|clusters|endpoint|listeners -o json`
//! prints them).
//!
//! With `--source kubernetes` the same model is built from the API server (see
//! `crate::kubernetes`), so both sources go through one capture path.
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::Path,
    sync::Arc,
};

use nodeway_proxy::{
    authz::{Policy, Scope},
    l7::L7Config,
    proto::istio::workload as wpb,
    service::Service,
    workload::{MtlsMode, Protocol, Workload},
    xds::convert,
};
use serde::{Deserialize, Serialize};

/// Namespace label that turns capture on (Istio ambient's).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: String, source: serde_yaml::Error },
    #[error("config file {path}: {what}")]
    Invalid { path: String, what: String },
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// This agent's node; pods whose `node` differs are known for telemetry only.
    #[serde(default = "default_node")]
    pub node: String,
    /// SPIFFE trust domain of the mesh (Istio's default).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
    /// Authorization policies: istiod's `istio.security.Authorization` in camelCase, address
    /// blocks written as `198.18.0.0/16`.
    #[serde(default)]
    pub policies: Vec<Policy>,
    /// Workloads of the mesh besides the pods (typically on other nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<FileWorkload>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<FileService>,
    /// Envoy `RouteConfiguration`s in protobuf-JSON; outbound ones named after the port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<serde_json::Value>,
    /// Envoy `Cluster`s in protobuf-JSON (`outbound|<port>|<subset>|<fqdn>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<serde_json::Value>,
    /// Envoy `ClusterLoadAssignment`s in protobuf-JSON, by `clusterName`, or Envoy's admin
    /// `ClusterStatus` (`name`, `hostStatuses`: what `istioctl proxy-config endpoint -o json`
    /// prints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<serde_json::Value>,
    /// Envoy `Listener`s in protobuf-JSON (`istioctl proxy-config listeners -o json`): when
    /// given, the outbound ones decide which destinations carry HTTP and which are TCP routes
    /// (`nodeway_proxy::listener`); without them a port carries HTTP when it has a route table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<serde_json::Value>,
    /// Pods of this node the source knows but cannot capture (not running, host network, no
    /// network namespace found), with why; shown on `/captured`. Never in the file.
    #[serde(skip)]
    pub uncapturable: Vec<Uncapturable>,
}

/// A pod of this node that cannot be captured, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uncapturable {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
    /// `ip netns` name or a path to a netns file; required for pods on this node.
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    /// How peers reach the pod; by default HBONE when its capture rule captures it (as istiod
    /// marks ambient pods), TCP otherwise.
    #[serde(default)]
    pub protocol: Option<WorkloadProtocol>,
    /// STRICT: plaintext inbound is refused; PERMISSIVE (default): accepted and labelled `none`.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// WORKLOAD_SELECTOR-scoped policies (`namespace/name`) that apply to this pod.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
}

/// istiod's `istio.workload.Workload` in camelCase, addresses written as IPs. Fields nodeway has
/// no use for are refused rather than ignored.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileWorkload {
    #[serde(default)]
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub network: String,
    /// `HBONE` or `NONE` (plain TCP, the default).
    #[serde(default)]
    pub tunnel_protocol: Option<TunnelProtocol>,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub service_account: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub workload_name: String,
    #[serde(default)]
    pub cluster_id: String,
    /// `namespace/hostname` → its ports.
    #[serde(default)]
    pub services: BTreeMap<String, FilePortList>,
    #[serde(default)]
    pub authorization_policies: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum TunnelProtocol {
    None,
    Hbone,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilePortList {
    #[serde(default)]
    pub ports: Vec<FilePort>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilePort {
    pub service_port: u32,
    #[serde(default)]
    pub target_port: u32,
}

/// istiod's `istio.workload.Service` in camelCase, addresses written as IPs.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileService {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    #[serde(default)]
    pub addresses: Vec<FileNetworkAddress>,
    #[serde(default)]
    pub ports: Vec<FilePort>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileNetworkAddress {
    #[serde(default)]
    pub network: String,
    pub address: IpAddr,
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn port(p: &FilePort) -> wpb::Port {
    wpb::Port {
        service_port: p.service_port,
        target_port: p.target_port,
        ..Default::default()
    }
}

impl FileWorkload {
    pub fn to_model(&self) -> Result<Workload, String> {
        let w = wpb::Workload {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            addresses: self.addresses.iter().map(ip_bytes).collect(),
            network: self.network.clone(),
            tunnel_protocol: match self.tunnel_protocol {
                Some(TunnelProtocol::Hbone) => wpb::TunnelProtocol::Hbone as i32,
                Some(TunnelProtocol::None) | None => wpb::TunnelProtocol::None as i32,
            },
            trust_domain: self.trust_domain.clone(),
            service_account: self.service_account.clone(),
            node: self.node.clone(),
            canonical_name: self.canonical_name.clone(),
            canonical_revision: self.canonical_revision.clone(),
            workload_name: self.workload_name.clone(),
            cluster_id: self.cluster_id.clone(),
            services: self
                .services
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        wpb::PortList {
                            ports: v.ports.iter().map(port).collect(),
                        },
                    )
                })
                .collect(),
            authorization_policies: self.authorization_policies.clone(),
            ..Default::default()
        };
        convert::workload(w)
    }
}

impl FileService {
    pub fn to_model(&self) -> Result<Service, String> {
        convert::service(wpb::Service {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            hostname: self.hostname.clone(),
            addresses: self
                .addresses
                .iter()
                .map(|a| wpb::NetworkAddress {
                    network: a.network.clone(),
                    address: ip_bytes(&a.address),
                    ..Default::default()
                })
                .collect(),
            ports: self.ports.iter().map(port).collect(),
            subject_alt_names: self.subject_alt_names.clone(),
            ..Default::default()
        })
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum WorkloadProtocol {
    Tcp,
    Hbone,
}

fn default_trust_domain() -> String {
    "cluster.local".to_string()
}

fn default_node() -> String {
    hostname().unwrap_or_else(|| "node".to_string())
}

fn hostname() -> Option<String> {
    nix::unistd::gethostname().ok()?.into_string().ok()
}

/// Whether a pod is captured, and why (shown on `/captured`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub captured: bool,
    pub reason: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }

    /// Parses and validates; errors name the file and, from serde_yaml, the field, line and column.
    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        let cfg: Config = if text.trim().is_empty() {
            Config {
                node: default_node(),
                ..Default::default()
            }
        } else {
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_string(),
                source,
            })?
        };
        cfg.validate().map_err(|what| ConfigError::Invalid {
            path: path.to_string(),
            what,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let mut names = HashSet::new();
        let mut ips = HashSet::new();
        for (i, pod) in self.pods.iter().enumerate() {
            let at = format!("pods[{i}] ({}/{})", pod.namespace, pod.name);
            if pod.name.is_empty() || pod.namespace.is_empty() {
                return Err(format!("pods[{i}]: name and namespace must not be empty"));
            }
            if !names.insert((pod.namespace.as_str(), pod.name.as_str())) {
                return Err(format!("{at}: pod listed twice"));
            }
            if pod.ips.is_empty() {
                return Err(format!("{at}.ips: a pod needs at least one IP"));
            }
            for ip in &pod.ips {
                if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                    return Err(format!("{at}.ips: {ip} cannot be a pod address"));
                }
                if !ips.insert(*ip) {
                    return Err(format!("{at}.ips: {ip} belongs to two pods"));
                }
            }
            if self.is_local(pod) && pod.netns.as_deref().is_none_or(str::is_empty) {
                return Err(format!(
                    "{at}.netns: a pod on this node ({}) needs its network namespace",
                    self.node
                ));
            }
            if pod.exclude_outbound_ports.contains(&0) || pod.exclude_inbound_ports.contains(&0) {
                return Err(format!("{at}: port 0 cannot be excluded"));
            }
        }
        for (i, w) in self.workloads.iter().enumerate() {
            let at = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
            w.to_model().map_err(|e| format!("{at}: {e}"))?;
            if !names.insert((w.namespace.as_str(), w.name.as_str())) {
                return Err(format!("{at}: listed twice (in pods or workloads)"));
            }
            for ip in &w.addresses {
                if !ips.insert(*ip) {
                    return Err(format!("{at}.addresses: {ip} belongs to two workloads"));
                }
            }
        }
        let mut hostnames = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({}/{})", s.namespace, s.hostname);
            s.to_model().map_err(|e| format!("{at}: {e}"))?;
            if !hostnames.insert((s.namespace.as_str(), s.hostname.as_str())) {
                return Err(format!("{at}: service listed twice"));
            }
        }
        self.l7()?;
        let mut keys = HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            let at = format!("policies[{i}] ({}/{})", p.namespace, p.name);
            if p.name.is_empty() || p.namespace.is_empty() {
                return Err(format!("policies[{i}]: name and namespace must not be empty"));
            }
            if !keys.insert(p.key()) {
                return Err(format!("{at}: policy listed twice"));
            }
        }
        for (i, pod) in self.pods.iter().enumerate() {
            for key in &pod.authorization_policies {
                let selector = self
                    .policies
                    .iter()
                    .any(|p| &p.key() == key && p.scope == Scope::WorkloadSelector);
                if !selector {
                    return Err(format!(
                        "pods[{i}] ({}/{}).authorizationPolicies: {key:?} is not a WORKLOAD_SELECTOR policy of this file",
                        pod.namespace, pod.name
                    ));
                }
            }
        }
        let mut ns_names = HashSet::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            if !ns_names.insert(ns.name.as_str()) {
                return Err(format!("namespaces[{i}] ({}): namespace listed twice", ns.name));
            }
            if let Some(v) = ns.labels.get(DATAPLANE_MODE_LABEL) {
                if v != DATAPLANE_MODE_AMBIENT && v != DATAPLANE_MODE_NONE {
                    return Err(format!(
                        "namespaces[{i}] ({}).labels.{DATAPLANE_MODE_LABEL}: \"{v}\" is neither \"{DATAPLANE_MODE_AMBIENT}\" nor \"{DATAPLANE_MODE_NONE}\"",
                        ns.name
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    pub fn is_local(&self, pod: &Pod) -> bool {
        pod.node.as_deref().is_none_or(|n| n == self.node)
    }

    /// Istio ambient's rule: the namespace label captures, a pod label `none` opts out.
    pub fn decide(&self, pod: &Pod) -> Decision {
        if pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_MODE_NONE) {
            return Decision {
                captured: false,
                reason: format!("pod has {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_NONE}"),
            };
        }
        let ns_mode = self
            .namespaces
            .iter()
            .find(|n| n.name == pod.namespace)
            .and_then(|n| n.labels.get(DATAPLANE_MODE_LABEL));
        match ns_mode.map(String::as_str) {
            Some(DATAPLANE_MODE_AMBIENT) => Decision {
                captured: true,
                reason: format!(
                    "namespace {} has {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}",
                    pod.namespace
                ),
            },
            _ => Decision {
                captured: false,
                reason: format!(
                    "namespace {} is not labelled {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}",
                    pod.namespace
                ),
            },
        }
    }

    pub fn workload(&self, pod: &Pod) -> Workload {
        Workload {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            workload_name: pod.workload.clone().unwrap_or_else(|| pod.name.clone()),
            service_account: pod.service_account.clone().unwrap_or_else(|| "default".to_string()),
            node: pod.node.clone().unwrap_or_else(|| self.node.clone()),
            ips: pod.ips.clone(),
            labels: pod.labels.clone(),
            protocol: match pod.protocol {
                Some(WorkloadProtocol::Hbone) => Protocol::Hbone,
                Some(WorkloadProtocol::Tcp) => Protocol::Tcp,
                None if self.decide(pod).captured => Protocol::Hbone,
                None => Protocol::Tcp,
            },
            mtls_mode: pod.mtls,
            authorization_policies: pod.authorization_policies.clone(),
            ..Workload::default()
        }
    }

    /// The pods, then the file's other workloads (checked by [`Config::parse`]).
    pub fn workloads(&self) -> Vec<Arc<Workload>> {
        let pods = self.pods.iter().map(|p| Arc::new(self.workload(p)));
        let others = self.workloads.iter().filter_map(|w| w.to_model().ok().map(Arc::new));
        pods.chain(others).collect()
    }

    /// The file's services (checked by [`Config::parse`]).
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.services
            .iter()
            .filter_map(|s| s.to_model().ok().map(Arc::new))
            .collect()
    }

    /// The file's routes, clusters and endpoints compiled into the L7 model.
    pub fn l7(&self) -> Result<L7Config, String> {
        let listeners = L7Config::listeners_from_json(&self.listeners)?;
        let mut l7 = L7Config::from_json(&self.routes, &self.clusters, &self.endpoints)?;
        l7.listeners = listeners;
        Ok(l7)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: node-a
namespaces:
- name: demo
  labels: {istio.io/dataplane-mode: ambient}
- name: plain
pods:
- name: client
  namespace: demo
  ips: [198.18.1.2]
  netns: nwt-client
- name: optout
  namespace: demo
  ips: [198.18.1.3]
  netns: nwt-optout
  labels: {istio.io/dataplane-mode: none}
- name: other
  namespace: plain
  ips: [198.18.1.4]
  netns: nwt-other
- name: remote
  namespace: demo
  node: node-b
  ips: [198.18.1.5]
"#;

    #[test]
    fn decides_like_istio_ambient() {
        let cfg = Config::parse(GOOD, "t.yaml").expect("valid");
        let d: Vec<bool> = cfg.pods.iter().map(|p| cfg.decide(p).captured).collect();
        assert_eq!(d, [true, false, false, true]);
        assert!(!cfg.is_local(&cfg.pods[3]));
        assert!(cfg.decide(&cfg.pods[1]).reason.contains("none"));
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let e = Config::parse("pods:\n- name: a\n  namespace: b\n  ips: [nope]\n", "x.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.yaml") && e.contains("line 4"), "{e}");
        let e = Config::parse("pods:\n- name: a\n  namespace: b\n  ipz: []\n", "x.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ipz"), "{e}");
        let e = Config::parse(
            "node: n\npods:\n- name: a\n  namespace: b\n  ips: [198.18.0.1]\n",
            "x.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pods[0] (b/a).netns"), "{e}");
        let bad_label = "namespaces:\n- name: a\n  labels: {istio.io/dataplane-mode: yes-please}\n";
        assert!(Config::parse(bad_label, "x")
            .unwrap_err()
            .to_string()
            .contains("yes-please"));
    }

    #[test]
    fn policies_are_checked_and_reach_the_workloads() {
        let with = |extra: &str| {
            format!("node: n\npods:\n- name: a\n  namespace: demo\n  node: m\n  ips: [198.18.0.1]\n{extra}")
        };
        let good = with(
            "  authorizationPolicies: [demo/db-only]\npolicies:\n- {name: db-only, namespace: demo, scope: WORKLOAD_SELECTOR, rules: [{}]}\n",
        );
        let cfg = Config::parse(&good, "x.yaml").expect("valid");
        assert_eq!(cfg.workloads()[0].authorization_policies, ["demo/db-only"]);
        let e = Config::parse(&with("  authorizationPolicies: [demo/nope]\n"), "x.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pods[0] (demo/a).authorizationPolicies") && e.contains("demo/nope"),
            "{e}"
        );
        let twice = with("policies:\n- {name: p, namespace: demo}\n- {name: p, namespace: demo}\n");
        let e = Config::parse(&twice, "x.yaml").unwrap_err().to_string();
        assert!(e.contains("policies[1] (demo/p): policy listed twice"), "{e}");
        let bad = with(
            "policies:\n- {name: p, namespace: demo, rules: [{clauses: [{matches: [{sourceIps: [10.0.0.0/99]}]}]}]}\n",
        );
        let e = Config::parse(&bad, "x.yaml").unwrap_err().to_string();
        assert!(e.contains("sourceIps") && e.contains("10.0.0.0/99"), "{e}");
    }

    /// The example in the repository (the demo's config) parses with the real loader.
    #[test]
    fn the_example_file_loads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/nodeway.yaml");
        let cfg = Config::load(Path::new(path)).expect("the example config loads");
        assert_eq!(cfg.pods.len(), 4);
        let workloads = cfg.workloads();
        assert!(workloads
            .iter()
            .any(|w| w.name == "server-v2" && w.protocol == Protocol::Hbone));
        assert!(workloads.iter().any(|w| w.name == "web" && w.protocol == Protocol::Tcp));
        assert_eq!(cfg.services()[0].hostname, "server.demo.svc.cluster.local");
        let l7 = cfg.l7().expect("L7 config");
        let table = l7.routes_for_port(8080).expect("route table 8080");
        assert_eq!(table.virtual_hosts[0].routes.len(), 2);
        assert_eq!(l7.clusters.len(), 2);
        for c in l7.clusters.values() {
            assert_eq!(l7.endpoints(c).len(), 1, "{}", c.name);
        }
    }

    #[test]
    fn l7_errors_name_the_file_the_resource_and_the_field() {
        let route = |extra: &str| {
            format!(
                "routes:\n- name: \"9080\"\n  virtualHosts:\n  - name: r\n    domains: [r]\n    routes:\n    - match: {{prefix: /}}\n      route: {{cluster: c{extra}}}\n"
            )
        };
        let cfg = Config::parse(&route(""), "x.yaml").expect("valid");
        assert!(cfg.l7().expect("l7").routes_for_port(9080).is_some());
        let e = Config::parse(&route(", hedgePolicy: {hedgeOnPerTryTimeout: true}"), "x.yaml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config file x.yaml: routes[0] (\"9080\"): virtualHosts[0].routes[0].route.hedgePolicy: not supported by nodeway"
        );
        let e = Config::parse(&route(", clusterr: x"), "x.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes[0] (\"9080\")") && e.contains("clusterr"), "{e}");
        let e = Config::parse("clusters:\n- name: c\n  type: EDS\n  connectTimeout: soon\n", "x.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("clusters[0] (\"c\")"), "{e}");
        let e = Config::parse(
            "endpoints:\n- clusterName: c\n  endpoints: [{lbEndpoints: [{endpoint: {address: {socketAddress: {address: nope, portValue: 1}}}}]}]\n",
            "x.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("endpoints[0] (\"c\")") && e.contains("nope"), "{e}");
    }

    #[test]
    fn workloads_and_services_in_istio_form() {
        let y = "workloads:\n- {name: w, namespace: demo, node: m, addresses: [198.18.0.9], tunnelProtocol: HBONE, canonicalName: app}\nservices:\n- {name: s, namespace: demo, hostname: s.demo.svc.cluster.local, addresses: [{address: 198.19.0.1}], ports: [{servicePort: 80, targetPort: 8080}]}\n";
        let cfg = Config::parse(y, "x.yaml").expect("valid");
        let w = &cfg.workloads()[0];
        assert_eq!((w.workload_name.as_str(), w.protocol), ("app", Protocol::Hbone));
        assert_eq!(cfg.services()[0].ports[0].target_port, 8080);
        let e = Config::parse(
            "workloads:\n- {name: w, namespace: demo, addresses: [198.18.0.9], waypoint: x}\n",
            "x.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("waypoint"), "{e}");
        let e = Config::parse(
            "pods:\n- {name: p, namespace: demo, node: m, ips: [198.18.0.9]}\nworkloads:\n- {name: w, namespace: demo, addresses: [198.18.0.9]}\n",
            "x.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("workloads[0] (demo/w).addresses: 198.18.0.9"), "{e}");
    }

    /// The README's config file example parses too.
    #[test]
    fn the_readme_example_loads() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```yaml\nnode:").expect("the README's config example") + "```yaml\n".len();
        let len = readme[start..].find("```").expect("end of the example");
        let cfg = Config::parse(&readme[start..start + len], "README.md").expect("the README example loads");
        let l7 = cfg.l7().expect("l7");
        assert_eq!(l7.routes_for_port(8080).expect("8080").virtual_hosts[0].routes.len(), 2);
        assert_eq!(cfg.services().len(), 1);
    }
}
