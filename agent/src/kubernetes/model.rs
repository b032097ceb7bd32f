//! Namespaces and this node's pods as the API server reports them, turned into the same
//! [`Config`] the local file gives, so both sources go through one capture path.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::core::v1::{Namespace as KubeNamespace, Pod as KubePod};

use super::netns::{NetnsResolver, PodRef, NETNS_ANNOTATION};
use crate::config::{Config, Namespace, Pod, Uncapturable};

/// Istio's per-pod port exclusions (comma-separated), honoured the same way.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// The model of this node: every namespace, and every pod scheduled here. Pods that the capture
/// rule selects get their network namespace from `resolver`; pods that cannot be captured are
/// listed in `uncapturable` with the reason. Running pods of other nodes (`others`, which may hold
/// this node's too) are added as remote workloads. Returns the config and the pods whose network
/// namespace was not found (a subset of `uncapturable`).
pub fn build(
    node: &str,
    trust_domain: &str,
    namespaces: &[Arc<KubeNamespace>],
    pods: &[Arc<KubePod>],
    others: &[Arc<KubePod>],
    resolver: &mut NetnsResolver,
) -> (Config, Vec<Uncapturable>) {
    let mut cfg = Config {
        node: node.to_string(),
        trust_domain: trust_domain.to_string(),
        namespaces: namespaces_of(namespaces),
        // Policies, Services and the L7 config come from xDS in a cluster (`--xds-address`),
        // not from the API server.
        ..Default::default()
    };
    let mut candidates: Vec<(Pod, &KubePod)> = Vec::new();
    for kp in pods {
        match local_pod(node, kp) {
            Some(Ok(pod)) => candidates.push((pod, kp)),
            Some(Err(skip)) => cfg.uncapturable.push(skip),
            None => {}
        }
    }
    candidates.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
    let unresolved = place_in_netns(&mut cfg, candidates, resolver);
    cfg.uncapturable
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let taken = cfg.pods.iter().flat_map(|p| p.ips.clone()).collect();
    let remote = remote_pods(node, others, taken);
    cfg.pods.extend(remote);
    (cfg, unresolved)
}

/// The namespaces with their labels (the capture rule reads them), by name.
fn namespaces_of(namespaces: &[Arc<KubeNamespace>]) -> Vec<Namespace> {
    let mut out: Vec<Namespace> = namespaces
        .iter()
        .filter_map(|n| {
            Some(Namespace {
                name: n.metadata.name.clone()?,
                labels: n.metadata.labels.clone().unwrap_or_default(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// One of this node's pods as a capture candidate, or why it cannot be one; `None` for a pod
/// of another node or without a name.
fn local_pod(node: &str, kp: &KubePod) -> Option<Result<Pod, Uncapturable>> {
    let (Some(name), Some(namespace)) = (&kp.metadata.name, &kp.metadata.namespace) else {
        return None;
    };
    let spec = kp.spec.as_ref();
    if spec.and_then(|s| s.node_name.as_deref()) != Some(node) {
        return None;
    }
    let skip = |reason: String| {
        Some(Err(Uncapturable {
            namespace: namespace.clone(),
            name: name.clone(),
            reason,
        }))
    };
    if spec.and_then(|s| s.host_network) == Some(true) {
        return skip("host-network pod: it shares the node's network namespace and is never captured".into());
    }
    let phase = kp.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    // Pending with an IP: the sandbox's network is up and init containers may run; they
    // are captured too (as istio-cni does at sandbox creation), never let out around it.
    if phase != "Running" && phase != "Pending" {
        return skip(format!(
            "pod is {phase}; only Pending (with an IP) and Running pods are captured"
        ));
    }
    let ips = pod_ips(kp);
    if ips.is_empty() {
        return skip("pod has no IP yet".into());
    }
    let annotations = kp.metadata.annotations.clone().unwrap_or_default();
    let labels = kp.metadata.labels.clone().unwrap_or_default();
    Some(Ok(Pod {
        name: name.clone(),
        namespace: namespace.clone(),
        workload: workload_name(kp, &labels),
        service_account: spec.and_then(|s| s.service_account_name.clone()),
        node: Some(node.to_string()),
        ips,
        netns: None,
        labels,
        exclude_outbound_ports: ports(annotations.get(EXCLUDE_OUTBOUND_PORTS)),
        exclude_inbound_ports: ports(annotations.get(EXCLUDE_INBOUND_PORTS)),
        protocol: None,
        mtls: Default::default(),
        authorization_policies: Vec::new(),
    }))
}

/// Adds the candidates to `cfg.pods`, each pod the rule captures with its network namespace
/// (only those need one); a captured pod whose namespace is not found (or is refused) is listed
/// uncapturable instead, and returned.
fn place_in_netns(
    cfg: &mut Config,
    candidates: Vec<(Pod, &KubePod)>,
    resolver: &mut NetnsResolver,
) -> Vec<Uncapturable> {
    let wanted: Vec<bool> = candidates.iter().map(|(p, _)| cfg.decide(p).captured).collect();
    let names: Vec<String> = candidates
        .iter()
        .map(|(p, _)| format!("{}/{}", p.namespace, p.name))
        .collect();
    let refs: Vec<PodRef<'_>> = candidates
        .iter()
        .zip(&wanted)
        .zip(&names)
        .filter(|((_, w), _)| **w)
        .filter_map(|(((pod, kp), _), name)| {
            Some(PodRef {
                name,
                ips: &pod.ips,
                uid: kp.metadata.uid.as_deref()?,
                annotation: kp
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(NETNS_ANNOTATION))
                    .map(String::as_str),
            })
        })
        .collect();
    let resolved = resolver.resolve(&refs);
    let mut unresolved = Vec::new();
    for ((mut pod, kp), wanted) in candidates.into_iter().zip(wanted) {
        if wanted {
            let found = kp
                .metadata
                .uid
                .as_ref()
                .and_then(|uid| resolved.get(uid).cloned())
                .unwrap_or_else(|| Err("the pod has no UID".to_string()));
            match found {
                Ok(path) => pod.netns = Some(path),
                Err(why) => {
                    let u = Uncapturable {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        reason: format!("network namespace {why}"),
                    };
                    unresolved.push(u.clone());
                    cfg.uncapturable.push(u);
                    continue;
                }
            }
        }
        cfg.pods.push(pod);
    }
    unresolved
}

/// Other nodes' running pods, known by IP for identities, metrics and HBONE; an IP already
/// `taken` (by a local pod, or an earlier remote one) is not listed twice.
fn remote_pods(node: &str, others: &[Arc<KubePod>], mut taken: std::collections::BTreeSet<IpAddr>) -> Vec<Pod> {
    let mut remote: Vec<Pod> = Vec::new();
    for kp in others {
        let (Some(name), Some(namespace)) = (&kp.metadata.name, &kp.metadata.namespace) else {
            continue;
        };
        let spec = kp.spec.as_ref();
        let Some(pod_node) = spec.and_then(|s| s.node_name.as_deref()) else {
            continue;
        };
        if pod_node == node
            || spec.and_then(|s| s.host_network) == Some(true)
            || kp.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running")
        {
            continue;
        }
        let ips: Vec<IpAddr> = pod_ips(kp).into_iter().filter(|ip| taken.insert(*ip)).collect();
        if ips.is_empty() {
            continue;
        }
        let labels = kp.metadata.labels.clone().unwrap_or_default();
        remote.push(Pod {
            name: name.clone(),
            namespace: namespace.clone(),
            workload: workload_name(kp, &labels),
            service_account: spec.and_then(|s| s.service_account_name.clone()),
            node: Some(pod_node.to_string()),
            ips,
            labels,
            ..Default::default()
        });
    }
    remote.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    remote
}

/// `status.podIPs`, else `status.podIP`.
fn pod_ips(kp: &KubePod) -> Vec<IpAddr> {
    let Some(status) = &kp.status else { return Vec::new() };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(status.pod_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    ips
}

/// The controller's name, as Istio derives it: a Deployment's ReplicaSet without its hash.
fn workload_name(kp: &KubePod, labels: &BTreeMap<String, String>) -> Option<String> {
    let owner = kp
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))?;
    if owner.kind == "ReplicaSet" {
        if let Some(hash) = labels.get("pod-template-hash") {
            if let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}")) {
                return Some(deployment.to_string());
            }
        }
    }
    Some(owner.name.clone())
}

fn ports(v: Option<&String>) -> Vec<u16> {
    v.map(|s| {
        s.split(',')
            .filter_map(|p| p.trim().parse::<u16>().ok())
            .filter(|p| *p != 0)
            .collect()
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ns(name: &str, ambient: bool) -> Arc<KubeNamespace> {
        let labels = if ambient {
            serde_json::json!({"istio.io/dataplane-mode": "ambient"})
        } else {
            serde_json::json!({})
        };
        Arc::new(serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}})).unwrap())
    }

    fn pod(v: serde_json::Value) -> Arc<KubePod> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn running(name: &str, ns: &str, uid: &str, ip: &str) -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": {"app": name}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "sa-1", "containers": []},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        })
    }

    #[test]
    fn pods_of_this_node_in_the_file_model() {
        let dir = std::env::temp_dir().join(format!("nodeway-model-test-{}", std::process::id()));
        let proc_root = dir.join("proc");
        std::fs::create_dir_all(proc_root.join("100/ns")).unwrap();
        std::fs::write(proc_root.join("100/cgroup"), "0::/kubepods/poduid-web/c\n").unwrap();
        std::fs::write(proc_root.join("100/ns/net"), "198.18.0.10").unwrap();
        std::fs::create_dir_all(proc_root.join("101/ns")).unwrap();
        std::fs::write(proc_root.join("101/cgroup"), "0::/kubepods/poduid-init/c\n").unwrap();
        std::fs::write(proc_root.join("101/ns/net"), "198.18.0.16").unwrap();
        let mut resolver = NetnsResolver::with_inspector(
            &proc_root,
            dir.join("netns"),
            Box::new(super::super::netns::FakeFiles),
            None,
        );

        let mut web = running("web-7d4b9-x2x", "demo", "uid-web", "198.18.0.10");
        web["metadata"]["labels"]["pod-template-hash"] = "7d4b9".into();
        web["metadata"]["ownerReferences"] = serde_json::json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9", "uid": "rs", "controller": true}]);
        web["metadata"]["annotations"] = serde_json::json!({});
        web["metadata"]["annotations"][EXCLUDE_OUTBOUND_PORTS] = "5432, 0,x".into();
        let mut optout = running("optout", "demo", "uid-optout", "198.18.0.11");
        optout["metadata"]["labels"]["istio.io/dataplane-mode"] = "none".into();
        let mut host = running("host", "demo", "uid-host", "198.18.0.1");
        host["spec"]["hostNetwork"] = true.into();
        // Pending without an IP: nothing to capture yet; with one (init containers): captured.
        let mut pending = running("pending", "demo", "uid-pending", "198.18.0.12");
        pending["status"] = serde_json::json!({"phase": "Pending"});
        let mut init = running("init", "demo", "uid-init", "198.18.0.16");
        init["status"]["phase"] = "Pending".into();
        let mut done = running("done", "demo", "uid-done", "198.18.0.17");
        done["status"]["phase"] = "Succeeded".into();
        let mut elsewhere = running("elsewhere", "demo", "uid-else", "198.18.0.13");
        elsewhere["spec"]["nodeName"] = "node-b".into();
        let lost = running("lost", "demo", "uid-lost", "198.18.0.14");
        let plain = running("plain", "plain", "uid-plain", "198.18.0.15");
        let pods: Vec<_> = [web, optout, host, pending, init, done, elsewhere, lost, plain]
            .into_iter()
            .map(pod)
            .collect();
        let (cfg, unresolved) = build(
            "node-a",
            "cluster.local",
            &[ns("demo", true), ns("plain", false)],
            &pods,
            &pods,
            &mut resolver,
        );
        let names: Vec<&str> = cfg.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["init", "optout", "web-7d4b9-x2x", "plain", "elsewhere"]);
        let elsewhere = &cfg.pods[4];
        assert!(!cfg.is_local(elsewhere));
        assert_eq!(
            cfg.workload(elsewhere).protocol,
            nodeway_proxy::workload::Protocol::Hbone
        );
        assert_eq!(elsewhere.netns, None);
        let web = &cfg.pods[2];
        assert!(cfg.decide(web).captured);
        assert_eq!(
            web.netns.as_deref(),
            Some(proc_root.join("100/ns/net").to_str().unwrap())
        );
        assert_eq!(web.workload.as_deref(), Some("web"));
        assert_eq!(web.service_account.as_deref(), Some("sa-1"));
        assert_eq!(web.exclude_outbound_ports, [5432]);
        assert_eq!(web.ips, ["198.18.0.10".parse::<IpAddr>().unwrap()]);
        assert!(!cfg.decide(&cfg.pods[1]).captured, "opted out");
        assert_eq!(cfg.pods[1].netns, None, "not looked up when not captured");
        let why: BTreeMap<&str, &str> = cfg
            .uncapturable
            .iter()
            .map(|u| (u.name.as_str(), u.reason.as_str()))
            .collect();
        assert!(why["host"].contains("host-network"), "{why:?}");
        assert!(why["pending"].contains("no IP yet"), "{why:?}");
        assert!(why["done"].contains("Succeeded"), "{why:?}");
        let init = cfg
            .pods
            .iter()
            .find(|p| p.name == "init")
            .expect("a Pending pod with an IP");
        assert!(cfg.decide(init).captured);
        assert_eq!(
            init.netns.as_deref(),
            Some(proc_root.join("101/ns/net").to_str().unwrap())
        );
        assert!(why["lost"].contains("uid-lost"), "{why:?}");
        assert!(
            !why.contains_key("elsewhere"),
            "another node's pod is not this node's business"
        );
        assert_eq!(unresolved.len(), 1);
        assert_eq!(unresolved[0].name, "lost");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
