//! One sidecar class's stream for as long as its task lives: the L7 model istiod generates for
//! a sidecar of the class's representative pod ([`super::sidecar::SidecarNode`]), kept in the
//! class's [`L7State`].
//!
//! The stream authenticates with the workload certificate of the class's service account (what
//! a sidecar's agent presents; istiod checks that the identity's namespace and service account
//! are the node's). Subscriptions are a sidecar's: LDS and CDS wildcard, RDS and EDS by the names
//! the listeners and clusters reference, changed as they change. Each resource is accepted or
//! refused on its own ([`Store`]), as on the node stream.
//!
//! Like Envoy's warming, nothing is published until a first whole model arrived (LDS and CDS
//! answered and every referenced route and assignment received), or until
//! [`INITIAL_FETCH_TIMEOUT`] after the first LDS/CDS answer (Envoy's default): a pod never routes
//! by half a config, and a switched stream (new representative) keeps the old model until then.
//! Until the first publication the class is not synced and its pods fail closed.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use envoy_types::pb::{
    envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
        DeltaDiscoveryResponse,
    },
    google::rpc::Status as RpcStatus,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

use super::{
    client::{jitter, nack_message},
    sidecar::{eds_name, route_names, SidecarNode},
    store::{Store, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE},
    XdsError,
};
use crate::{
    identity::{manager::CertManager, Identity},
    metrics::{Metrics, XdsLabels},
    state::L7State,
};

/// How long a class waits for the routes and assignments its listeners and clusters reference
/// before it publishes what it has (Envoy's `initial_fetch_timeout` default).
pub const INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_MESSAGE: usize = 512 << 20;
const INVALID_ARGUMENT: i32 = 3;

/// Where the class streams go: istiod's xDS port and how to verify it.
#[derive(Clone, Debug)]
pub struct ClassStreamConfig {
    /// `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// PEM roots that verify istiod's serving certificate.
    pub root_pem: String,
    pub tls_server_name: Option<String>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// What `/config_dump` shows of a class's stream.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClassStatus {
    pub node: String,
    pub connected: bool,
    pub attempts: u64,
    pub connects: u64,
    pub published: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<String>,
    /// Resources held per type.
    pub resources: BTreeMap<String, usize>,
    /// What the first whole model still waits for.
    pub missing: Vec<String>,
}

#[derive(Default)]
struct Inner {
    store: Store,
    status: ClassStatus,
    /// Types answered at least once.
    answered: BTreeSet<String>,
    /// RDS and EDS names asked for.
    subscribed: BTreeMap<&'static str, BTreeSet<String>>,
    /// When LDS and CDS had both been answered (the initial fetch timeout runs from there).
    answered_at: Option<Instant>,
}

pub struct ClassStream {
    config: Arc<ClassStreamConfig>,
    node: SidecarNode,
    identity: Identity,
    certs: Arc<CertManager>,
    l7: Arc<L7State>,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

impl ClassStream {
    pub fn new(
        config: Arc<ClassStreamConfig>,
        node: SidecarNode,
        identity: Identity,
        certs: Arc<CertManager>,
        l7: Arc<L7State>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let status = ClassStatus {
            node: node.id(),
            ..Default::default()
        };
        Arc::new(ClassStream {
            config,
            node,
            identity,
            certs,
            l7,
            metrics,
            inner: Mutex::new(Inner {
                status,
                ..Default::default()
            }),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> ClassStatus {
        let inner = self.inner();
        let mut s = inner.status.clone();
        s.missing = missing(&inner);
        s
    }

    /// Keeps the stream open while the task lives: reconnects with backoff and jitter.
    pub async fn run(self: Arc<Self>) {
        let mut delay = self.config.backoff_initial;
        loop {
            let (got, error) = match self.session().await {
                Ok(got) => (got, "closed by the control plane".to_string()),
                Err((got, e)) => (got, e.to_string()),
            };
            tracing::warn!(node = %self.node.id(), %error, "sidecar class stream ended");
            {
                let mut inner = self.inner();
                inner.status.connected = false;
                inner.status.last_error = Some(error);
            }
            if got {
                delay = self.config.backoff_initial;
            }
            tokio::time::sleep(jitter(delay)).await;
            delay = (delay * 2).min(self.config.backoff_max);
        }
    }

    /// istiod's channel, with the class's workload certificate as the client identity.
    async fn channel(&self) -> Result<Channel, String> {
        let cert = self
            .certs
            .get(&self.identity)
            .await
            .map_err(|e| format!("certificate for {}: {e}", self.identity))?;
        let (chain, key) = cert.to_pem();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.config.root_pem))
            .identity(TlsIdentity::from_pem(chain, key));
        if let Some(name) = &self.config.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        Endpoint::from_shared(self.config.address.clone())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .tls_config(tls)
            .map_err(|e| format!("TLS: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))
    }

    /// One stream until it ends; whether any response arrived.
    async fn session(self: &Arc<Self>) -> Result<bool, (bool, XdsError)> {
        let err = |got: bool, what: String| {
            (
                got,
                XdsError::Stream {
                    address: self.config.address.clone(),
                    what,
                },
            )
        };
        self.inner().status.attempts += 1;
        let channel = self.channel().await.map_err(|e| err(false, e))?;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        for req in self.initial_requests() {
            tx.send(req)
                .await
                .map_err(|_| err(false, "request channel closed".into()))?;
        }
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Ok(cluster) = tonic::metadata::MetadataValue::try_from(self.node.cluster_id.as_str()) {
            request.metadata_mut().insert("clusterid", cluster);
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut stream = client
            .delta_aggregated_resources(request)
            .await
            .map_err(|s| err(false, format!("{}: {}", s.code(), s.message())))?
            .into_inner();
        {
            let mut inner = self.inner();
            inner.status.connected = true;
            inner.status.connects += 1;
        }
        self.metrics.xds_streams.inc();
        tracing::info!(address = %self.config.address, node = %self.node.id(), "sidecar class stream open");
        let mut got = false;
        loop {
            let message = match self.fetch_deadline() {
                Some(at) => match tokio::time::timeout_at(at.into(), stream.message()).await {
                    Ok(m) => m,
                    Err(_) => {
                        self.publish(&mut self.inner());
                        continue;
                    }
                },
                None => stream.message().await,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => return Ok(got),
                Err(s) => return Err(err(got, format!("{}: {}", s.code(), s.message()))),
            };
            got = true;
            let me = self.clone();
            let replies = tokio::task::spawn_blocking(move || me.handle(resp))
                .await
                .map_err(|e| err(got, format!("applying a response: {e}")))?;
            for r in replies {
                tx.send(r)
                    .await
                    .map_err(|_| err(got, "request channel closed".into()))?;
            }
        }
    }

    /// When the initial fetch times out, while nothing is published yet.
    fn fetch_deadline(&self) -> Option<Instant> {
        let inner = self.inner();
        match inner.status.published {
            true => None,
            false => inner.answered_at.map(|t| t + INITIAL_FETCH_TIMEOUT),
        }
    }

    /// LDS and CDS wildcard, and (after a reconnect) RDS and EDS by the names held, each with the
    /// versions held so that istiod sends only what changed.
    fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        let inner = self.inner();
        let node = self.node.node();
        let mut out = Vec::new();
        for t in [CLUSTER_TYPE, LISTENER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE] {
            let names = inner.subscribed.get(t).cloned().unwrap_or_default();
            let by_name = t == ENDPOINT_TYPE || t == ROUTE_TYPE;
            if by_name && names.is_empty() {
                continue;
            }
            out.push(DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: t.to_string(),
                resource_names_subscribe: names.into_iter().collect(),
                initial_resource_versions: inner.store.versions(t),
                ..Default::default()
            });
        }
        out
    }

    /// Applies a response; returns its ACK or NACK, then any change of the RDS/EDS
    /// subscriptions it caused.
    fn handle(&self, resp: DeltaDiscoveryResponse) -> Vec<DeltaDiscoveryRequest> {
        let mut inner = self.inner();
        let rejected = inner
            .store
            .apply(&resp.type_url, &resp.resources, &resp.removed_resources);
        inner.answered.insert(resp.type_url.clone());
        if inner.answered_at.is_none()
            && inner.answered.contains(LISTENER_TYPE)
            && inner.answered.contains(CLUSTER_TYPE)
        {
            inner.answered_at = Some(Instant::now());
        }
        let n = inner.store.len(&resp.type_url);
        inner.status.resources.insert(resp.type_url.clone(), n);
        self.count(&resp.type_url, rejected.is_empty());
        let error_detail = (!rejected.is_empty()).then(|| {
            let message = nack_message(&rejected);
            tracing::warn!(node = %self.node.id(), type_url = %resp.type_url, error = %message, "sidecar class xDS NACK: the named resources keep their last good config, the rest applied");
            inner.status.last_nack = Some(message.clone());
            RpcStatus {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            }
        });
        let mut out = vec![DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            error_detail,
            ..Default::default()
        }];
        out.extend(resubscribe(&mut inner));
        self.publish(&mut inner);
        out
    }

    fn count(&self, type_url: &str, ack: bool) {
        self.metrics
            .xds_responses
            .get_or_create(&XdsLabels {
                type_url: type_url.to_string(),
                result: if ack { "ack" } else { "nack" }.to_string(),
            })
            .inc();
    }

    /// Makes the store's model the class's, once it is whole (or waited for long enough).
    fn publish(&self, inner: &mut Inner) {
        if !inner.status.published {
            let waited = inner.answered_at.is_some_and(|t| t.elapsed() >= INITIAL_FETCH_TIMEOUT);
            let whole = inner.answered_at.is_some() && missing(inner).is_empty();
            if !(whole || waited) {
                return;
            }
            if !whole {
                tracing::warn!(node = %self.node.id(), missing = ?missing(inner), "sidecar class: initial fetch timed out, using what arrived");
            }
            inner.status.published = true;
            tracing::info!(node = %self.node.id(), "sidecar class config in force");
        }
        self.l7.set_l7(inner.store.l7());
        self.l7.mark_synced();
    }
}

/// The RDS and EDS names the held listeners and clusters reference.
fn wanted(store: &Store) -> (BTreeSet<String>, BTreeSet<String>) {
    let routes = store
        .listeners
        .values()
        .flat_map(|e| route_names(&e.value.raw))
        .collect();
    let eds = store.clusters.values().filter_map(|e| eds_name(&e.value.raw)).collect();
    (routes, eds)
}

/// What a first whole model still waits for.
fn missing(inner: &Inner) -> Vec<String> {
    let mut out: Vec<String> = [LISTENER_TYPE, CLUSTER_TYPE]
        .into_iter()
        .filter(|t| !inner.answered.contains(*t))
        .map(str::to_string)
        .collect();
    let (routes, eds) = wanted(&inner.store);
    out.extend(
        routes
            .into_iter()
            .filter(|r| !inner.store.routes.contains_key(r))
            .map(|r| format!("route {r}")),
    );
    out.extend(
        eds.into_iter()
            .filter(|e| !inner.store.assignments.contains_key(e))
            .map(|e| format!("endpoints {e}")),
    );
    out
}

/// Requests that make the RDS and EDS subscriptions what the listeners and clusters reference.
fn resubscribe(inner: &mut Inner) -> Vec<DeltaDiscoveryRequest> {
    let (routes, eds) = wanted(&inner.store);
    let mut out = Vec::new();
    for (t, names, ready) in [
        (ROUTE_TYPE, routes, inner.answered.contains(LISTENER_TYPE)),
        (ENDPOINT_TYPE, eds, inner.answered.contains(CLUSTER_TYPE)),
    ] {
        if !ready {
            continue;
        }
        let current = inner.subscribed.entry(t).or_default();
        let add: Vec<String> = names.difference(current).cloned().collect();
        let remove: Vec<String> = current.difference(&names).cloned().collect();
        if add.is_empty() && remove.is_empty() {
            continue;
        }
        *current = names;
        out.push(DeltaDiscoveryRequest {
            type_url: t.to_string(),
            resource_names_subscribe: add,
            resource_names_unsubscribe: remove,
            ..Default::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::{envoy::service::discovery::v3::Resource, google::protobuf::Any};
    use prost::Message;
    use serde_json::json;

    use super::*;
    use crate::identity::dev_ca::DevCa;

    fn stream() -> Arc<ClassStream> {
        let config = Arc::new(ClassStreamConfig {
            address: "https://istiod.test:15012".into(),
            root_pem: String::new(),
            tls_server_name: None,
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(1),
        });
        let ca = Arc::new(DevCa::new("cluster.local", Duration::from_secs(60)).unwrap());
        let node = SidecarNode {
            ip: "198.18.1.10".into(),
            pod_name: "client".into(),
            namespace: "demo".into(),
            service_account: "client".into(),
            ..Default::default()
        };
        ClassStream::new(
            config,
            node,
            Identity::new("cluster.local", "demo", "client"),
            CertManager::new(ca),
            Arc::new(L7State::new(false)),
            Arc::new(Metrics::new()),
        )
    }

    fn response<M: Message + prost::Name + Default>(
        type_url: &str,
        items: &[serde_json::Value],
    ) -> DeltaDiscoveryResponse {
        let resources = items
            .iter()
            .map(|v| {
                let msg: M = crate::envoy_json::from_json(v).unwrap();
                Resource {
                    name: v["name"].as_str().or(v["clusterName"].as_str()).unwrap().into(),
                    version: "1".into(),
                    resource: Some(Any {
                        type_url: type_url.into(),
                        value: msg.encode_to_vec(),
                    }),
                    ..Default::default()
                }
            })
            .collect();
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: format!("n-{type_url}"),
            resources,
            ..Default::default()
        }
    }

    fn listeners() -> Vec<serde_json::Value> {
        let text = include_str!("../listener/testdata/istiod-sidecar-listeners.json");
        serde_json::from_str(text).unwrap()
    }

    const CLUSTER: &str = "outbound|9080||reviews.demo.svc.cluster.local";

    fn eds_cluster() -> serde_json::Value {
        json!({"name": CLUSTER, "type": "EDS", "edsClusterConfig": {"edsConfig": {"ads": {}}, "serviceName": CLUSTER}})
    }

    fn subscriptions(replies: &[DeltaDiscoveryRequest], type_url: &str) -> Vec<String> {
        replies
            .iter()
            .filter(|r| r.type_url == type_url)
            .flat_map(|r| r.resource_names_subscribe.clone())
            .collect()
    }

    #[test]
    fn a_class_publishes_only_a_whole_config_and_subscribes_what_it_references() {
        use envoy_types::pb::envoy::config::{
            cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
            route::v3::RouteConfiguration,
        };
        let s = stream();
        let replies = s.handle(response::<Listener>(LISTENER_TYPE, &listeners()));
        assert!(replies[0].error_detail.is_none(), "ACK: {:?}", replies[0]);
        let mut routes = subscriptions(&replies, ROUTE_TYPE);
        routes.sort();
        assert_eq!(routes, ["80", "9080"], "RDS by the names the HTTP listeners reference");
        let replies = s.handle(response::<Cluster>(CLUSTER_TYPE, &[eds_cluster()]));
        assert_eq!(subscriptions(&replies, ENDPOINT_TYPE), [CLUSTER]);
        assert!(
            !s.l7.synced() && s.l7.l7().clusters.is_empty(),
            "nothing published before RDS and EDS"
        );
        let missing = s.status().missing;
        assert_eq!(missing, ["route 80", "route 9080", &format!("endpoints {CLUSTER}")]);

        let route = |name: &str| json!({"name": name, "virtualHosts": [{"name": "r", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": CLUSTER}}]}]});
        s.handle(response::<RouteConfiguration>(
            ROUTE_TYPE,
            &[route("80"), route("9080")],
        ));
        assert!(!s.l7.synced());
        let cla = json!({"clusterName": CLUSTER, "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {"address": "198.18.1.20", "portValue": 9080}}}}]}]});
        let replies = s.handle(response::<ClusterLoadAssignment>(ENDPOINT_TYPE, &[cla]));
        assert_eq!(replies.len(), 1, "the ACK only: subscriptions unchanged");
        assert!(s.l7.synced(), "{:?}", s.status());
        let l7 = s.l7.l7();
        assert!(l7.outbound("198.18.1.20:9080".parse().unwrap()).is_http());
        assert_eq!(l7.endpoints(&l7.clusters[CLUSTER]).len(), 1);

        // A listener dropped: its route is unsubscribed.
        let gone = DeltaDiscoveryResponse {
            type_url: LISTENER_TYPE.into(),
            nonce: "n2".into(),
            removed_resources: vec!["0.0.0.0_80".into()],
            ..Default::default()
        };
        let replies = s.handle(gone);
        let unsub: Vec<&String> = replies.iter().flat_map(|r| &r.resource_names_unsubscribe).collect();
        assert_eq!(unsub, ["80"]);
    }

    #[test]
    fn a_bad_resource_is_nacked_alone_and_the_rest_published() {
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        let s = stream();
        s.handle(response::<envoy_types::pb::envoy::config::listener::v3::Listener>(
            LISTENER_TYPE,
            &[],
        ));
        let bad = json!({"name": "outbound|1||bad.test", "type": "STATIC", "lbPolicy": "CLUSTER_PROVIDED"});
        let ok = json!({"name": "outbound|2||ok.test", "type": "STATIC"});
        let replies = s.handle(response::<Cluster>(CLUSTER_TYPE, &[bad, ok]));
        let nack = replies[0].error_detail.as_ref().expect("a NACK");
        assert!(nack.message.contains("outbound|1||bad.test"), "{}", nack.message);
        assert!(s.l7.synced());
        assert!(s.l7.l7().clusters.contains_key("outbound|2||ok.test"));
        assert!(!s.l7.l7().clusters.contains_key("outbound|1||bad.test"));
    }
}
