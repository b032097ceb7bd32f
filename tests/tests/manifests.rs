//! Every manifest parses into the API's own types (k8s-openapi), and the fields that decide
//! whether the agent works on a node are what the agent needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// (file, document) of every YAML document under manifests/ except the kustomization.
fn documents() -> Vec<(String, serde_yaml::Value)> {
    let mut files = Vec::new();
    let mut dirs = vec![manifests_dir()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") && p.file_name().unwrap() != "kustomization.yaml" {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).unwrap();
        let name = f.strip_prefix(manifests_dir()).unwrap().display().to_string();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !v.is_null() {
                docs.push((name.clone(), v));
            }
        }
    }
    docs
}

/// Every document, typed; fails on unknown kinds and on fields of the wrong type.
struct Objects {
    daemonsets: Vec<DaemonSet>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    configmaps: Vec<ConfigMap>,
    namespaces: Vec<(String, Namespace)>,
    accounts: Vec<ServiceAccount>,
}

fn typed<T: serde::de::DeserializeOwned>(file: &str, v: &serde_yaml::Value) -> T {
    let json = serde_json::to_value(v).unwrap();
    serde_json::from_value(json).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn objects() -> Objects {
    let mut o = Objects {
        daemonsets: vec![],
        roles: vec![],
        bindings: vec![],
        configmaps: vec![],
        namespaces: vec![],
        accounts: vec![],
    };
    for (file, v) in documents() {
        match v["kind"].as_str().unwrap_or_default() {
            "DaemonSet" => o.daemonsets.push(typed(&file, &v)),
            "ClusterRole" => o.roles.push(typed(&file, &v)),
            "ClusterRoleBinding" => o.bindings.push(typed(&file, &v)),
            "ConfigMap" => o.configmaps.push(typed(&file, &v)),
            "Namespace" => o.namespaces.push((file.clone(), typed(&file, &v))),
            "ServiceAccount" => o.accounts.push(typed(&file, &v)),
            other => panic!("{file}: unexpected kind {other:?}"),
        }
    }
    o
}

#[test]
fn kustomization_lists_every_agent_manifest() {
    let k: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(manifests_dir().join("kustomization.yaml")).unwrap()).unwrap();
    let listed: Vec<&str> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for f in [
        "namespace.yaml",
        "serviceaccount.yaml",
        "rbac.yaml",
        "configmap.yaml",
        "daemonset.yaml",
    ] {
        assert!(listed.contains(&f), "{f} not in kustomization.yaml: {listed:?}");
        assert!(manifests_dir().join(f).exists(), "{f} listed but missing");
    }
    assert!(
        !listed.iter().any(|f| f.starts_with("example")),
        "the example is applied on its own"
    );
}

#[test]
fn daemonset_has_what_the_agent_needs_and_nothing_broader() {
    let o = objects();
    assert_eq!(o.daemonsets.len(), 1);
    let ds = &o.daemonsets[0];
    let spec = ds.spec.as_ref().unwrap();
    let ns = ds.metadata.namespace.as_deref().unwrap();

    // Selector matches the template; rolling update one node at a time.
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let tmpl_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    for (k, v) in selector {
        assert_eq!(
            tmpl_labels.get(k),
            Some(v),
            "selector {k}={v} does not match the template"
        );
    }
    assert_eq!(
        tmpl_labels.get("istio.io/dataplane-mode").map(String::as_str),
        Some("none")
    );
    let update = spec.update_strategy.as_ref().unwrap();
    assert_eq!(update.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        update.rolling_update.as_ref().unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "must tolerate every taint: {tolerations:?}"
    );
    let sa = pod.service_account_name.as_deref().unwrap();
    assert!(o
        .accounts
        .iter()
        .any(|a| a.metadata.name.as_deref() == Some(sa) && a.metadata.namespace.as_deref() == Some(ns)));

    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    // The image's binary, as manifests/image/Dockerfile installs it.
    let dockerfile = fs::read_to_string(manifests_dir().join("image/Dockerfile")).unwrap();
    let bin = c.command.as_ref().unwrap()[0].clone();
    assert!(dockerfile.contains(&format!("COPY nodeway {bin}")), "{bin}");
    assert_eq!(c.args.as_deref(), Some(&["run".to_string()][..]));
    // Capabilities: exactly the three, everything else dropped, not privileged.
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    let mut add = caps.add.clone().unwrap();
    add.sort();
    assert_eq!(add, ["BPF", "NET_ADMIN", "SYS_ADMIN"]);
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));

    // Readiness on the agent's readiness port and path.
    let probe = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021)
    );

    // Requests and limits.
    let res = c.resources.as_ref().unwrap();
    for r in [res.requests.as_ref().unwrap(), res.limits.as_ref().unwrap()] {
        assert!(r.contains_key("cpu") && r.contains_key("memory"), "{r:?}");
    }

    // NODE_NAME from the downward API; the rest from the ConfigMap.
    let env = c.env.as_ref().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    // istiod's CA checks the caller's pod: its name, namespace and a token bound to it.
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("INSTANCE_IP", "status.podIP"),
    ] {
        let e = env
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let f = e.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        assert_eq!(f.field_path, path, "{name}");
    }
    let token = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|v| v.projected.as_ref())
        .and_then(|p| p.sources.as_ref()?.iter().find_map(|s| s.service_account_token.clone()))
        .expect("a projected service-account token");
    assert_eq!(token.audience.as_deref(), Some("istio-ca"));
    let from = c.env_from.as_ref().unwrap()[0]
        .config_map_ref
        .as_ref()
        .unwrap()
        .name
        .clone();
    let cm = o
        .configmaps
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(from.as_str()))
        .unwrap_or_else(|| panic!("ConfigMap {from} missing"));
    let data = cm.data.clone().unwrap();
    assert_eq!(data.get("NODEWAY_SOURCE").map(String::as_str), Some("kubernetes"));
    let token_file = data.get("NODEWAY_CA_TOKEN_FILE").unwrap();
    let token_mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "istio-token")
        .expect("the token is mounted");
    assert_eq!(
        format!("{}/{}", token_mount.mount_path, token.path),
        *token_file,
        "the ConfigMap points the agent at the projected token"
    );

    // Mounts: bpffs, the host's cgroup2 tree (where the ConfigMap points the agent), netns dir.
    let volumes: BTreeMap<String, String> = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect();
    let mounts: BTreeMap<String, String> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.mount_path.clone(), volumes.get(&m.name).cloned().unwrap_or_default()))
        .collect();
    assert_eq!(mounts.get("/sys/fs/bpf").map(String::as_str), Some("/sys/fs/bpf"));
    assert_eq!(mounts.get("/var/run/netns").map(String::as_str), Some("/var/run/netns"));
    let cgroup = data.get("NODEWAY_CGROUP").unwrap();
    assert_eq!(
        mounts.get(cgroup).map(String::as_str),
        Some("/sys/fs/cgroup"),
        "{mounts:?}"
    );
    let netns_dir = data.get("NODEWAY_NETNS_DIR").unwrap();
    assert!(mounts.contains_key(netns_dir));
    // New namespaces and pins created on the host after start must show up inside.
    for m in c.volume_mounts.as_ref().unwrap() {
        if m.mount_path == "/var/run/netns" || m.mount_path == "/sys/fs/bpf" {
            assert_eq!(
                m.mount_propagation.as_deref(),
                Some("HostToContainer"),
                "{}",
                m.mount_path
            );
        }
    }
    // Every setting in the ConfigMap is one the agent reads.
    let help = std::process::Command::new(nodeway_tests::nodeway_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for k in data.keys() {
        assert!(
            help.contains(&format!("[env: {k}=")),
            "ConfigMap key {k} is not a `nodeway run` setting"
        );
    }
}

#[test]
fn rbac_reads_what_the_agent_watches_and_only_patches_pods() {
    let o = objects();
    assert_eq!(o.roles.len(), 1);
    let role = &o.roles[0];
    let mut granted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rule in role.rules.as_ref().unwrap() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        if verbs == ["patch"] {
            // The redirection annotation on captured pods, nothing else.
            assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]), "{rule:?}");
            assert_eq!(rule.resources.as_deref(), Some(&["pods".to_string()][..]), "{rule:?}");
            continue;
        }
        assert_eq!(verbs, ["get", "list", "watch"], "read-only: {rule:?}");
        for g in rule.api_groups.as_ref().unwrap() {
            for r in rule.resources.as_ref().unwrap() {
                granted.entry(g.clone()).or_default().push(r.clone());
            }
        }
    }
    for r in ["pods", "namespaces", "services"] {
        assert!(granted[""].contains(&r.to_string()), "{r}: {granted:?}");
    }
    assert!(granted["discovery.k8s.io"].contains(&"endpointslices".to_string()));

    let ds = &o.daemonsets[0];
    let sa = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .service_account_name
        .clone()
        .unwrap();
    let b = &o.bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(b.role_ref.name.as_str()), role.metadata.name.as_deref());
    let subject = &b.subjects.as_ref().unwrap()[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(subject.name, sa);
    assert_eq!(subject.namespace, ds.metadata.namespace);
}

#[test]
fn example_namespace_turns_capture_on() {
    let o = objects();
    let (_, ns) = o
        .namespaces
        .iter()
        .find(|(f, _)| f.starts_with("example"))
        .expect("an example namespace");
    let labels = ns.metadata.labels.as_ref().unwrap();
    assert_eq!(
        labels.get("istio.io/dataplane-mode").map(String::as_str),
        Some("ambient")
    );
    let agent_ns = o.daemonsets[0].metadata.namespace.clone();
    assert!(o.namespaces.iter().any(|(_, n)| n.metadata.name == agent_ns));
}

/// The base's documents of `kind` as JSON, with the overlay `overlays/<name>`'s JSON patches for
/// that kind applied (what `kubectl kustomize` renders; its patches are RFC 6902).
fn rendered(overlay: &str, kind: &str) -> serde_json::Value {
    let dir = manifests_dir().join("../overlays").join(overlay);
    let k: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).unwrap();
    assert_eq!(
        k["resources"][0].as_str(),
        Some("../../manifests"),
        "{overlay} builds on the base"
    );
    let (file, doc) = documents()
        .into_iter()
        .find(|(_, v)| v["kind"].as_str() == Some(kind))
        .unwrap();
    let mut doc = serde_json::to_value(doc).unwrap();
    for p in k["patches"].as_sequence().unwrap() {
        if p["target"]["kind"].as_str() != Some(kind) {
            continue;
        }
        let ops: json_patch::Patch = serde_yaml::from_str(p["patch"].as_str().unwrap()).unwrap();
        json_patch::patch(&mut doc, &ops).unwrap_or_else(|e| panic!("{overlay} over {file}: {e}"));
    }
    doc
}

#[test]
fn istiods_ca_is_the_default_and_the_dev_ca_an_overlay_with_a_private_host_dir() {
    let o = objects();
    let data = o.configmaps[0].data.clone().unwrap();
    assert_eq!(data.get("NODEWAY_CA").map(String::as_str), Some("istio"));
    assert!(data.contains_key("XDS_ADDRESS"));
    let ds = &o.daemonsets[0];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let host_paths: Vec<String> = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|v| Some(v.host_path.as_ref()?.path.clone()))
        .collect();
    assert!(
        !host_paths.iter().any(|p| p.contains("nodeway/ca")),
        "no CA key on the nodes' disks by default: {host_paths:?}"
    );

    let cm: ConfigMap = serde_json::from_value(rendered("dev-ca", "ConfigMap")).unwrap();
    let data = cm.data.unwrap();
    assert_eq!(data.get("NODEWAY_CA").map(String::as_str), Some("dev"));
    assert!(!data.contains_key("XDS_ADDRESS"), "no istiod without Istio");
    let dir = data.get("NODEWAY_CA_DIR").unwrap();
    let ds: DaemonSet = serde_json::from_value(rendered("dev-ca", "DaemonSet")).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.host_path.as_ref().is_some_and(|h| &h.path == dir))
        .expect("the dev CA's host directory");
    let mount = pod.containers[0]
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .find(|m| m.name == volume.name)
        .expect("mounted");
    assert_eq!(&mount.mount_path, dir);
}
