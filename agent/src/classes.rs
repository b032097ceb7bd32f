//! The sidecar classes of the node's captured pods, each with its stream to istiod and its own
//! L7 model ([`nodeway_proxy::xds::classes`] decides, this acts). istiod generates L7 config
//! only for sidecars, so with `--xds-address` and `--l7-xds per-class` every captured pod routes
//! by its class's model; the classes follow the pods on every capture pass.
use std::{collections::BTreeMap, sync::Arc};

use nodeway_proxy::{
    identity::{manager::CertManager, Identity},
    metrics::Metrics,
    xds::{
        class_stream::{ClassStream, ClassStreamConfig},
        classes::{CapturedPod, Change, ClassKey, ClassPlan},
        sidecar::SidecarNode,
    },
    L7Runtime, Proxy,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tracing::info;

/// The Istio version the class streams claim (istiod gates generated features on it): the
/// release line of the istiod nodeway is tested against.
pub const ISTIO_VERSION: &str = "1.28.0";

/// What the class streams need besides the pods.
pub struct ClassSettings {
    pub stream: Arc<ClassStreamConfig>,
    pub certs: Arc<CertManager>,
    pub trust_domain: String,
    pub cluster_id: String,
}

struct Open {
    runtime: Arc<L7Runtime>,
    stream: Arc<ClassStream>,
    task: JoinHandle<()>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct SidecarClasses {
    settings: ClassSettings,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    plan: ClassPlan,
    open: BTreeMap<ClassKey, Open>,
}

impl SidecarClasses {
    pub fn new(settings: ClassSettings, proxy: Arc<Proxy>, metrics: Arc<Metrics>) -> Self {
        SidecarClasses {
            settings,
            proxy,
            metrics,
            plan: ClassPlan::default(),
            open: BTreeMap::new(),
        }
    }

    /// Makes the classes those of `pods` (every pod to capture now): opens, switches and closes
    /// streams. Must run inside a tokio runtime.
    pub fn update(&mut self, pods: &[CapturedPod]) {
        for change in self.plan.update(pods) {
            match change {
                Change::Open { key, representative } => {
                    let runtime = self.proxy.new_l7_runtime();
                    info!(class = %describe(&key), representative = %representative.name, "sidecar class opened");
                    let open = self.start(runtime, &key, &representative);
                    self.open.insert(key, open);
                }
                Change::Switch { key, representative } => {
                    let Some(old) = self.open.remove(&key) else { continue };
                    info!(class = %describe(&key), representative = %representative.name, "sidecar class stream switched");
                    let open = self.start(old.runtime.clone(), &key, &representative);
                    self.open.insert(key, open);
                }
                Change::Close { key } => {
                    info!(class = %describe(&key), "sidecar class closed");
                    self.open.remove(&key);
                }
            }
        }
    }

    /// The L7 model the pod `uid` routes by (after [`Self::update`] with it).
    pub fn runtime_of(&self, uid: &str) -> Option<Arc<L7Runtime>> {
        let key = self.plan.class_of(uid)?;
        self.open.get(key).map(|o| o.runtime.clone())
    }

    /// Whether the class of `uid` has its config (else its outbound traffic is refused).
    pub fn synced(&self, uid: &str) -> Option<bool> {
        self.runtime_of(uid).map(|r| r.state.synced())
    }

    /// Whether every class has its first config (readiness waits for it, as for the node's).
    pub fn all_synced(&self) -> bool {
        self.open.values().all(|o| o.runtime.state.synced())
    }

    fn start(&self, runtime: Arc<L7Runtime>, key: &ClassKey, pod: &CapturedPod) -> Open {
        let node = SidecarNode {
            ip: pod.ip.clone(),
            pod_name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            cluster_id: self.settings.cluster_id.clone(),
            istio_version: ISTIO_VERSION.to_string(),
            labels: pod.labels.clone(),
        };
        let identity = Identity::new(&self.settings.trust_domain, &key.namespace, &key.service_account);
        self.settings.certs.track(identity.clone());
        let stream = ClassStream::new(
            self.settings.stream.clone(),
            node,
            identity,
            self.settings.certs.clone(),
            runtime.state.clone(),
            self.metrics.clone(),
        );
        let task = tokio::spawn(stream.clone().run());
        Open { runtime, stream, task }
    }

    /// Every class: its key, members, stream and model, for `/config_dump`.
    pub fn dump(&self) -> Value {
        let classes: Vec<Value> = self
            .plan
            .classes()
            .iter()
            .map(|(key, class)| {
                let open = self.open.get(key);
                json!({
                    "namespace": key.namespace,
                    "serviceAccount": key.service_account,
                    "labels": key.labels,
                    "representative": class.representative.uid,
                    "members": class.members,
                    "synced": open.is_some_and(|o| o.runtime.state.synced()),
                    "stream": open.map(|o| o.stream.status()),
                    "l7": open.map(|o| o.runtime.state.l7().to_json()),
                })
            })
            .collect();
        Value::Array(classes)
    }
}

fn describe(key: &ClassKey) -> String {
    let labels: Vec<String> = key.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{}/{} {{{}}}", key.namespace, key.service_account, labels.join(","))
}
