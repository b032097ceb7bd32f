//! Tells the mesh which pods nodeway captures, the way istio-cni does for ztunnel: the pod
//! annotation `ambient.istio.io/redirection: enabled` once its traffic goes through the node proxy,
//! removed when it is released. istiod publishes a pod as HBONE (mutual TLS to its identity) only
//! with this annotation; without it every other proxy sends the pod plain TCP.
//!
//! The wanted state comes from the capture (pods captured right now); the current state from the
//! pod cache of the source. A plan of patches is made without I/O, then sent; failed patches are
//! retried on the next pass, and counted in `nodeway_kubernetes_api_errors_total`.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Patch, PatchParams},
    runtime::reflector::Store,
    Api, Client,
};
use nodeway_proxy::metrics::Metrics;
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

/// The annotation istiod reads to tell an ambient-captured pod (`enabled`) from others.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
pub const REDIRECTION_ENABLED: &str = "enabled";

/// (namespace, name) of a pod.
pub type PodKey = (String, String);

/// What one patch does: set the annotation (`true`) or remove it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub pod: PodKey,
    pub enable: bool,
}

/// The patches that make the annotations of `pods` (this node's, as cached) match `captured`.
/// A captured pod the cache does not hold yet is left for a later pass (it cannot be patched
/// before it exists), as is a pod being deleted.
pub fn plan(pods: &[Arc<Pod>], captured: &BTreeSet<PodKey>) -> Vec<Change> {
    let mut out = Vec::new();
    for p in pods {
        let (Some(ns), Some(name)) = (&p.metadata.namespace, &p.metadata.name) else {
            continue;
        };
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let key = (ns.clone(), name.clone());
        let has = annotation(p) == Some(REDIRECTION_ENABLED);
        let want = captured.contains(&key);
        if has != want {
            out.push(Change { pod: key, enable: want });
        }
    }
    out
}

fn annotation(p: &Pod) -> Option<&str> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a: &BTreeMap<String, String>| a.get(REDIRECTION_ANNOTATION))
        .map(String::as_str)
}

/// Keeps the annotations in line until the process ends.
pub fn spawn(client: Client, pods: Store<Pod>, captured: watch::Receiver<BTreeSet<PodKey>>, metrics: Arc<Metrics>) {
    tokio::spawn(run(client, pods, captured, metrics));
}

/// How often the annotations are compared again without a capture change: picks up pods that
/// arrived in the cache after their capture, failed patches, and annotations someone removed.
const RECHECK: Duration = Duration::from_secs(2);

async fn run(client: Client, pods: Store<Pod>, mut captured: watch::Receiver<BTreeSet<PodKey>>, metrics: Arc<Metrics>) {
    loop {
        let wanted = captured.borrow_and_update().clone();
        for change in plan(&pods.state(), &wanted) {
            apply(&client, &change, &metrics).await;
        }
        tokio::select! {
            changed = captured.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

async fn apply(client: &Client, change: &Change, metrics: &Metrics) {
    let (ns, name) = &change.pod;
    let value = change.enable.then_some(REDIRECTION_ENABLED);
    let patch = json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    match api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {
            info!(pod = %format!("{ns}/{name}"), annotation = REDIRECTION_ANNOTATION, enabled = change.enable, "pod annotation updated")
        }
        Err(e) => {
            metrics.kubernetes_api_errors.inc();
            warn!(pod = %format!("{ns}/{name}"), error = %e, "cannot update the pod's {REDIRECTION_ANNOTATION} annotation; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(name: &str, annotated: Option<&str>) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("demo".into()),
                annotations: annotated.map(|v| BTreeMap::from([(REDIRECTION_ANNOTATION.to_string(), v.to_string())])),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    fn key(name: &str) -> PodKey {
        ("demo".into(), name.into())
    }

    #[test]
    fn captured_pods_are_annotated_and_released_ones_cleared() {
        let pods = [
            pod("new", None),
            pod("kept", Some("enabled")),
            pod("released", Some("enabled")),
            pod("other", None),
        ];
        let captured = BTreeSet::from([key("new"), key("kept"), key("not-cached-yet")]);
        assert_eq!(
            plan(&pods, &captured),
            vec![
                Change {
                    pod: key("new"),
                    enable: true
                },
                Change {
                    pod: key("released"),
                    enable: false
                },
            ]
        );
    }

    #[test]
    fn another_value_counts_as_not_enabled() {
        // istio-cni only ever writes `enabled`; anything else is corrected.
        let pods = [pod("a", Some("disabled"))];
        assert_eq!(
            plan(&pods, &BTreeSet::from([key("a")])),
            vec![Change {
                pod: key("a"),
                enable: true
            }]
        );
    }

    #[test]
    fn pods_being_deleted_are_left_alone() {
        let mut p = (*pod("gone", Some("enabled"))).clone();
        p.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert!(plan(&[Arc::new(p)], &BTreeSet::new()).is_empty());
    }
}
