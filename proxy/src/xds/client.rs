//! The delta ADS stream: connect, subscribe, ACK/NACK, reconnect with backoff, resume.
use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, Hasher},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
            DeltaDiscoveryResponse,
        },
    },
    google::{
        protobuf::{value::Kind, Struct, Value},
        rpc::Status as RpcStatus,
    },
};
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use super::{
    store::{Rejected, Store, ADDRESS_TYPE, AUTHORIZATION_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE, TYPES},
    XdsError,
};
use crate::state::ProxyState;

/// gRPC's INVALID_ARGUMENT, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;
/// istiod sends the whole mesh in one response at start-up; tonic's default 4 MiB is too small.
const MAX_MESSAGE: usize = 512 << 20;

#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// `https://istiod.istio-system.svc:15012` (`http://` only for local testing).
    pub address: String,
    /// PEM root that verifies the control plane's serving certificate.
    pub root_cert: Option<PathBuf>,
    /// Bearer token, re-read on every connect (projected tokens rotate).
    pub token_file: Option<PathBuf>,
    /// Name to expect in the serving certificate, when the address is not it.
    pub tls_server_name: Option<String>,
    pub node: NodeInfo,
    /// First reconnect delay; doubles per failed attempt up to `backoff_max`, with jitter.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// Who this proxy is to the control plane. istiod recognises a node proxy by the `ztunnel` prefix
/// of the node id, and reads the pod and node from the metadata, as ztunnel sends them.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    /// The agent pod's IP (`INSTANCE_IP`).
    pub ip: String,
    /// The agent pod's name and namespace (`POD_NAME`, `POD_NAMESPACE`).
    pub pod_name: String,
    pub pod_namespace: String,
    /// The Kubernetes node (`NODE_NAME`).
    pub node_name: String,
    pub cluster_id: String,
    /// Extra metadata (string values).
    pub metadata: BTreeMap<String, String>,
}

impl NodeInfo {
    /// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`
    pub fn id(&self) -> String {
        let (ip, pod, ns) = (&self.ip, &self.pod_name, &self.pod_namespace);
        format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local")
    }

    fn node(&self) -> Node {
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_string())),
        };
        let mut fields: HashMap<String, Value> = self.metadata.iter().map(|(k, v)| (k.clone(), s(v))).collect();
        fields.insert("NAME".into(), s(&self.pod_name));
        fields.insert("NAMESPACE".into(), s(&self.pod_namespace));
        fields.insert("INSTANCE_IPS".into(), s(&self.ip));
        fields.insert("NODE_NAME".into(), s(&self.node_name));
        fields.insert("CLUSTER_ID".into(), s(&self.cluster_id));
        Node {
            id: self.id(),
            metadata: Some(Struct { fields }),
            user_agent_name: "nodeway".to_string(),
            ..Default::default()
        }
    }
}

/// What the last response of one type led to.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    pub resources: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_ack: Option<Reply>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<Reply>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    /// The response's `system_version_info`.
    pub version: String,
    pub nonce: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    store: Store,
    status: BTreeMap<String, TypeStatus>,
    connected: bool,
    /// Streams tried, and streams opened.
    attempts: u64,
    connects: u64,
    last_error: Option<String>,
}

pub struct XdsClient {
    config: XdsConfig,
    channel: Channel,
    proxy: Arc<ProxyState>,
    metrics: Arc<crate::metrics::Metrics>,
    inner: Mutex<Inner>,
}

impl XdsClient {
    /// Checks the address and the root file now; the connection is made by [`XdsClient::run`],
    /// which retries, so an unreachable control plane is not fatal.
    pub fn new(
        config: XdsConfig,
        proxy: Arc<ProxyState>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Self>, XdsError> {
        let bad = |what: String| XdsError::Config(format!("--xds-address {:?}: {what}", config.address));
        let mut endpoint = Endpoint::from_shared(config.address.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if config.address.starts_with("https://") {
            let root = config
                .root_cert
                .as_ref()
                .ok_or_else(|| bad("an https address needs a root certificate (--xds-root-cert)".into()))?;
            let pem = std::fs::read_to_string(root)
                .map_err(|e| XdsError::Config(format!("xDS root certificate {}: {e}", root.display())))?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pem));
            if let Some(name) = &config.tls_server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(format!("TLS: {e}")))?;
        } else if !config.address.starts_with("http://") {
            return Err(bad("want https://HOST:PORT".into()));
        }
        // Captured pods are served only once workloads and policies are known (fail closed).
        proxy.require_sync(&[ADDRESS_TYPE, AUTHORIZATION_TYPE]);
        Ok(Arc::new(XdsClient {
            channel: endpoint.connect_lazy(),
            config,
            proxy,
            metrics,
            inner: Mutex::new(Inner::default()),
        }))
    }

    pub fn address(&self) -> &str {
        &self.config.address
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a stream open for as long as the task lives: reconnects with exponential backoff and
    /// jitter, resetting the backoff once a stream has delivered a response.
    pub async fn run(self: Arc<Self>) {
        let mut delay = self.config.backoff_initial;
        loop {
            let got_response = match self.session().await {
                Ok(got) => {
                    tracing::warn!(address = %self.config.address, "xDS stream closed by the control plane");
                    got
                }
                Err((got, e)) => {
                    tracing::warn!(error = %e, "xDS stream failed");
                    self.inner().last_error = Some(e.to_string());
                    got
                }
            };
            self.inner().connected = false;
            if got_response {
                delay = self.config.backoff_initial;
            }
            let wait = jitter(delay);
            tracing::info!(retry_in_ms = wait.as_millis() as u64, "reconnecting to the xDS server");
            tokio::time::sleep(wait).await;
            delay = (delay * 2).min(self.config.backoff_max);
        }
    }

    /// One stream, until it ends. Returns whether any response arrived.
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
        self.inner().attempts += 1;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        for req in self.initial_requests() {
            tx.send(req)
                .await
                .map_err(|_| err(false, "request channel closed".into()))?;
        }
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(path) = &self.config.token_file {
            let token =
                std::fs::read_to_string(path).map_err(|e| err(false, format!("token {}: {e}", path.display())))?;
            let bearer = MetadataValue::try_from(format!("Bearer {}", token.trim()))
                .map_err(|_| err(false, format!("token {}: not a valid header value", path.display())))?;
            request.metadata_mut().insert("authorization", bearer);
        }
        if let Ok(cluster) = MetadataValue::try_from(self.config.node.cluster_id.as_str()) {
            request.metadata_mut().insert("clusterid", cluster);
        }
        let mut client = AggregatedDiscoveryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut stream = client
            .delta_aggregated_resources(request)
            .await
            .map_err(|s| err(false, format!("{}: {}", s.code(), s.message())))?
            .into_inner();
        {
            let mut inner = self.inner();
            inner.connected = true;
            inner.connects += 1;
        }
        self.metrics.xds_streams.inc();
        tracing::info!(address = %self.config.address, node = %self.config.node.id(), "xDS stream open");
        let mut got = false;
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    got = true;
                    // A start-up snapshot of a big mesh takes a while to decode and index: off the
                    // runtime's workers, which carry the data path.
                    let me = self.clone();
                    let reply = tokio::task::spawn_blocking(move || me.handle(resp))
                        .await
                        .map_err(|e| err(got, format!("applying a response: {e}")))?;
                    if tx.send(reply).await.is_err() {
                        return Err(err(got, "request channel closed".into()));
                    }
                }
                Ok(None) => return Ok(got),
                Err(s) => return Err(err(got, format!("{}: {}", s.code(), s.message()))),
            }
        }
    }

    /// The subscription of every type, with the versions held (resumption after a reconnect).
    pub fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        let inner = self.inner();
        let node = self.config.node.node();
        TYPES
            .iter()
            .map(|t| DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: t.to_string(),
                // Empty subscription on the first request: wildcard (all resources of the type).
                initial_resource_versions: inner.store.versions(t),
                ..Default::default()
            })
            .collect()
    }

    /// Applies a response, resource by resource, and returns its ACK, or a NACK naming every
    /// resource it could not apply (the others are in force).
    pub fn handle(&self, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let mut inner = self.inner();
        let rejected = inner
            .store
            .apply(&resp.type_url, &resp.resources, &resp.removed_resources);
        let result = if rejected.is_empty() { Ok(()) } else { Err(rejected) };
        self.publish(&inner.store, &resp.type_url);
        let reply = Reply {
            version: resp.system_version_info.clone(),
            nonce: resp.nonce.clone(),
            at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            error: None,
        };
        let resources = inner.store.len(&resp.type_url);
        self.metrics
            .xds_responses
            .get_or_create(&crate::metrics::XdsLabels {
                type_url: resp.type_url.clone(),
                result: if result.is_ok() { "ack" } else { "nack" }.to_string(),
            })
            .inc();
        match result {
            Ok(()) => {
                // As ztunnel: a type counts as synced once a response of it was ACKed.
                self.proxy.mark_synced(&resp.type_url);
                // One line per push would flood the log of a busy mesh: counted in the metrics,
                // logged at debug.
                tracing::debug!(
                    type_url = %resp.type_url,
                    updated = resp.resources.len(),
                    removed = resp.removed_resources.len(),
                    resources,
                    nonce = %resp.nonce,
                    "xDS ACK"
                );
                let st = inner.status.entry(resp.type_url.clone()).or_default();
                st.resources = resources;
                st.last_ack = Some(reply);
                DeltaDiscoveryRequest {
                    type_url: resp.type_url,
                    response_nonce: resp.nonce,
                    ..Default::default()
                }
            }
            Err(rejected) => {
                let message = nack_message(&rejected);
                tracing::warn!(type_url = %resp.type_url, nonce = %resp.nonce, error = %message, "xDS NACK: the named resources keep their last good config, the rest applied");
                let st = inner.status.entry(resp.type_url.clone()).or_default();
                st.resources = resources;
                st.last_nack = Some(Reply {
                    error: Some(message.clone()),
                    ..reply
                });
                DeltaDiscoveryRequest {
                    type_url: resp.type_url,
                    response_nonce: resp.nonce,
                    error_detail: Some(RpcStatus {
                        code: INVALID_ARGUMENT,
                        message,
                        details: Vec::new(),
                    }),
                    ..Default::default()
                }
            }
        }
    }

    /// Makes the store's view of `type_url` the proxy's (what applied of a response, NACKed or
    /// not).
    fn publish(&self, store: &Store, type_url: &str) {
        match type_url {
            ADDRESS_TYPE => {
                self.proxy.set_workloads(store.workloads());
                self.proxy.set_services(store.services());
            }
            AUTHORIZATION_TYPE => self.proxy.set_policies(store.policies()),
            ROUTE_TYPE | CLUSTER_TYPE | ENDPOINT_TYPE => self.proxy.set_l7(store.l7()),
            _ => {}
        }
    }

    /// Every resource with its version, the last ACK/NACK per type, the connection.
    pub fn dump(&self) -> serde_json::Value {
        let inner = self.inner();
        serde_json::json!({
            "address": self.config.address,
            "node": self.config.node.id(),
            "connected": inner.connected,
            "attempts": inner.attempts,
            "connects": inner.connects,
            "lastError": inner.last_error,
            "types": inner.status,
            "resources": inner.store.dump(),
        })
    }
}

pub(crate) fn nack_message(rejected: &[Rejected]) -> String {
    let mut parts: Vec<String> = rejected.iter().map(ToString::to_string).collect();
    parts.sort();
    format!("rejected {} resource(s): {}", rejected.len(), parts.join("; "))
}

/// A delay between half and all of `d`, so that many agents do not reconnect in step.
pub(crate) fn jitter(d: Duration) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos()),
    );
    let frac = (h.finish() % 1000) as f64 / 1000.0;
    d.mul_f64(0.5 + frac / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_like_ztunnel() {
        let n = NodeInfo {
            ip: "198.18.0.1".into(),
            pod_name: "nodeway-abc".into(),
            pod_namespace: "istio-system".into(),
            ..Default::default()
        };
        assert_eq!(
            n.id(),
            "ztunnel~198.18.0.1~nodeway-abc.istio-system~istio-system.svc.cluster.local"
        );
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(1000));
            assert!(
                j >= Duration::from_millis(500) && j <= Duration::from_millis(1000),
                "{j:?}"
            );
        }
    }
}
