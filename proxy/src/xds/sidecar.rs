//! A delta ADS stream as a sidecar of one pod would open it: what istiod generates L7 config
//! (listeners, clusters, routes, endpoints) for. istiod answers a `ztunnel` node's CDS/RDS/EDS
//! with nothing, so the L7 model of a class of pods (namespace, labels, service account) comes
//! from a stream in the name of one pod of the class.
//!
//! istiod reads the node type from the id's first field (`sidecar`), the pod from its second
//! and third (`<ip>`, `<pod>.<namespace>`), and the rest from the metadata (its `NodeMetadata`
//! field names): `NAMESPACE`, `NAME`, `INSTANCE_IPS` (comma-separated), `CLUSTER_ID`,
//! `ISTIO_VERSION` (feature gates), `LABELS` (a JSON map: the pod's labels select
//! DestinationRule subsets' workloads, Sidecar resources, ...), `SERVICE_ACCOUNT`, and
//! `DISABLE_HBONE_SEND=true` so that endpoints arrive as socket addresses, not HBONE tunnels
//! (nodeway decides HBONE from the Address resources of the node stream).
//!
//! Subscriptions are Envoy's: LDS and CDS wildcard, RDS by the route names the listeners'
//! HTTP connection managers reference, EDS by the service names of the EDS clusters.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{cluster::v3 as cv3, core::v3::Node, endpoint::v3 as ev3, listener::v3 as lv3, route::v3 as rv3},
        extensions::filters::network::http_connection_manager::v3::{
            http_connection_manager::RouteSpecifier, HttpConnectionManager,
        },
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
            DeltaDiscoveryResponse, Resource,
        },
    },
    google::protobuf::{value::Kind, Struct, Value},
};
use prost::Message;
use tokio::sync::mpsc;
use tonic::{transport::Channel, Streaming};

pub use super::store::LISTENER_TYPE;
use super::{XdsError, CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE};

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const MAX_MESSAGE: usize = 512 << 20;

/// The pod a sidecar stream speaks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarNode {
    pub ip: String,
    pub pod_name: String,
    pub namespace: String,
    pub service_account: String,
    /// istiod's cluster (`CLUSTER_ID` of istiod; `Kubernetes` by default).
    pub cluster_id: String,
    pub istio_version: String,
    pub labels: BTreeMap<String, String>,
}

impl SidecarNode {
    /// `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`
    pub fn id(&self) -> String {
        let (ip, pod, ns) = (&self.ip, &self.pod_name, &self.namespace);
        format!("sidecar~{ip}~{pod}.{ns}~{ns}.svc.cluster.local")
    }

    pub fn node(&self) -> Node {
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_string())),
        };
        let labels = Struct {
            fields: self.labels.iter().map(|(k, v)| (k.clone(), s(v))).collect(),
        };
        let mut fields: HashMap<String, Value> = HashMap::new();
        fields.insert("NAME".into(), s(&self.pod_name));
        fields.insert("NAMESPACE".into(), s(&self.namespace));
        fields.insert("INSTANCE_IPS".into(), s(&self.ip));
        fields.insert("CLUSTER_ID".into(), s(&self.cluster_id));
        fields.insert("ISTIO_VERSION".into(), s(&self.istio_version));
        fields.insert("SERVICE_ACCOUNT".into(), s(&self.service_account));
        fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        fields.insert("DISABLE_HBONE_SEND".into(), s("true"));
        Node {
            id: self.id(),
            metadata: Some(Struct { fields }),
            user_agent_name: "nodeway".to_string(),
            ..Default::default()
        }
    }
}

/// The route names a listener's HTTP connection managers load over RDS.
pub fn route_names(l: &lv3::Listener) -> BTreeSet<String> {
    let chains = l.filter_chains.iter().chain(l.default_filter_chain.iter());
    chains
        .flat_map(|fc| fc.filters.iter())
        .filter_map(|f| match &f.config_type {
            Some(lv3::filter::ConfigType::TypedConfig(any)) if any.type_url == HCM_TYPE => {
                HttpConnectionManager::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .filter_map(|hcm| match hcm.route_specifier {
            Some(RouteSpecifier::Rds(rds)) => Some(rds.route_config_name),
            _ => None,
        })
        .collect()
}

/// Istio's `outboundTrafficPolicy` for destinations outside the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundPolicy {
    /// `ALLOW_ANY`: reached as the app addressed them (`PassthroughCluster`, ORIGINAL_DST).
    AllowAny,
    /// `REGISTRY_ONLY`: refused (`BlackHoleCluster`, no endpoints).
    RegistryOnly,
}

const TCP_PROXY_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
/// Istio's catch-all outbound listener (port 15001).
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";

/// The policy a sidecar's `virtualOutbound` listener applies to unmatched destinations: the
/// cluster of its catch-all chain's `tcp_proxy` (`virtualOutbound-catchall-tcp`, no match, or
/// the default chain). Istio's CDS always has both clusters, and the listener also sends
/// connections to its own port 15001 to `BlackHoleCluster` (a loop guard, not the policy).
pub fn outbound_policy(listeners: &BTreeMap<String, lv3::Listener>) -> Option<OutboundPolicy> {
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy::ClusterSpecifier, TcpProxy};
    let l = listeners.get(VIRTUAL_OUTBOUND)?;
    let catch_all = |fc: &&lv3::FilterChain| {
        fc.filter_chain_match
            .as_ref()
            .is_none_or(|m| m.destination_port.is_none() && m.prefix_ranges.is_empty())
    };
    l.default_filter_chain
        .iter()
        .chain(l.filter_chains.iter().filter(catch_all))
        .flat_map(|fc| fc.filters.iter())
        .filter_map(|f| match &f.config_type {
            Some(lv3::filter::ConfigType::TypedConfig(any)) if any.type_url == TCP_PROXY_TYPE => {
                TcpProxy::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .find_map(|t| match t.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) if c == crate::cluster::PASSTHROUGH_CLUSTER => {
                Some(OutboundPolicy::AllowAny)
            }
            Some(ClusterSpecifier::Cluster(c)) if c == crate::cluster::BLACKHOLE_CLUSTER => {
                Some(OutboundPolicy::RegistryOnly)
            }
            _ => None,
        })
}

/// The `ClusterLoadAssignment` name an EDS cluster asks for.
pub fn eds_name(c: &cv3::Cluster) -> Option<String> {
    use cv3::cluster::{ClusterDiscoveryType, DiscoveryType};
    match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32 => Some(
            c.eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| c.name.clone()),
        ),
        _ => None,
    }
}

/// Every resource of the four types, decoded, as last received.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub listeners: BTreeMap<String, lv3::Listener>,
    pub clusters: BTreeMap<String, cv3::Cluster>,
    pub routes: BTreeMap<String, rv3::RouteConfiguration>,
    pub endpoints: BTreeMap<String, ev3::ClusterLoadAssignment>,
    /// Type URL → responses received (LDS and CDS at least once before the snapshot is whole).
    pub responses: BTreeMap<String, usize>,
}

impl Snapshot {
    /// RDS and EDS names the listeners and clusters reference.
    pub fn wanted(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let routes = self.listeners.values().flat_map(route_names).collect();
        let eds = self.clusters.values().filter_map(eds_name).collect();
        (routes, eds)
    }

    /// What is still missing for a whole config: LDS/CDS never answered, referenced routes and
    /// assignments not received.
    pub fn missing(&self) -> Vec<String> {
        let mut out: Vec<String> = [LISTENER_TYPE, CLUSTER_TYPE]
            .iter()
            .filter(|t| !self.responses.contains_key(**t))
            .map(|t| t.to_string())
            .collect();
        let (routes, eds) = self.wanted();
        out.extend(
            routes
                .into_iter()
                .filter(|r| !self.routes.contains_key(r))
                .map(|r| format!("route {r}")),
        );
        out.extend(
            eds.into_iter()
                .filter(|e| !self.endpoints.contains_key(e))
                .map(|e| format!("endpoints {e}")),
        );
        out
    }

    /// Applies a response; errors name the resource that does not decode.
    pub fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<(), String> {
        *self.responses.entry(resp.type_url.clone()).or_default() += 1;
        match resp.type_url.as_str() {
            LISTENER_TYPE => apply(&mut self.listeners, resp),
            CLUSTER_TYPE => apply(&mut self.clusters, resp),
            ROUTE_TYPE => apply(&mut self.routes, resp),
            ENDPOINT_TYPE => apply(&mut self.endpoints, resp),
            other => Err(format!("unexpected type {other}")),
        }
    }
}

fn apply<M: Message + Default>(map: &mut BTreeMap<String, M>, resp: &DeltaDiscoveryResponse) -> Result<(), String> {
    for name in &resp.removed_resources {
        map.remove(name);
    }
    for Resource { name, resource, .. } in &resp.resources {
        let Some(any) = resource else { continue };
        let m = M::decode(any.value.as_slice()).map_err(|e| format!("{name}: {e}"))?;
        map.insert(name.clone(), m);
    }
    Ok(())
}

/// One open sidecar stream: requests go out through `tx`, responses come from `rx`.
pub struct SidecarStream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    address: String,
    subscribed: BTreeMap<&'static str, BTreeSet<String>>,
}

impl SidecarStream {
    /// Opens the stream on `channel` and subscribes LDS and CDS (wildcard).
    pub async fn open(channel: Channel, address: &str, node: &SidecarNode) -> Result<Self, XdsError> {
        let fail = |what: String| XdsError::Stream {
            address: address.to_string(),
            what,
        };
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        let n = node.node();
        for t in [CLUSTER_TYPE, LISTENER_TYPE] {
            let req = DeltaDiscoveryRequest {
                node: Some(n.clone()),
                type_url: t.to_string(),
                ..Default::default()
            };
            tx.send(req).await.map_err(|_| fail("request channel closed".into()))?;
        }
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Ok(cluster) = tonic::metadata::MetadataValue::try_from(node.cluster_id.as_str()) {
            request.metadata_mut().insert("clusterid", cluster);
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let rx = client
            .delta_aggregated_resources(request)
            .await
            .map_err(|s| fail(format!("{}: {}", s.code(), s.message())))?
            .into_inner();
        Ok(SidecarStream {
            tx,
            rx,
            address: address.to_string(),
            subscribed: BTreeMap::new(),
        })
    }

    fn fail(&self, what: String) -> XdsError {
        XdsError::Stream {
            address: self.address.clone(),
            what,
        }
    }

    /// The next response (`None`: the server closed the stream).
    pub async fn next(&mut self) -> Result<Option<DeltaDiscoveryResponse>, XdsError> {
        self.rx
            .message()
            .await
            .map_err(|s| self.fail(format!("{}: {}", s.code(), s.message())))
    }

    /// ACKs `resp`, or NACKs it with `error`.
    pub async fn reply(&mut self, resp: &DeltaDiscoveryResponse, error: Option<String>) -> Result<(), XdsError> {
        let req = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: error.map(|message| envoy_types::pb::google::rpc::Status {
                code: 3,
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        };
        self.send(req).await
    }

    /// Makes the subscription of `type_url` (RDS or EDS) exactly `names`.
    pub async fn subscribe(&mut self, type_url: &'static str, names: &BTreeSet<String>) -> Result<(), XdsError> {
        let current = self.subscribed.entry(type_url).or_default();
        let add: Vec<String> = names.difference(current).cloned().collect();
        let remove: Vec<String> = current.difference(names).cloned().collect();
        if add.is_empty() && remove.is_empty() {
            return Ok(());
        }
        *current = names.clone();
        let req = DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names_subscribe: add,
            resource_names_unsubscribe: remove,
            ..Default::default()
        };
        self.send(req).await
    }

    async fn send(&self, req: DeltaDiscoveryRequest) -> Result<(), XdsError> {
        self.tx
            .send(req)
            .await
            .map_err(|_| self.fail("request channel closed".into()))
    }
}

/// Follows a new sidecar stream until the first whole config arrived (LDS, CDS, and every
/// route and assignment they reference), ACKing every response, within `limit`.
pub async fn fetch(channel: Channel, address: &str, node: &SidecarNode, limit: Duration) -> Result<Snapshot, XdsError> {
    let mut stream = SidecarStream::open(channel, address, node).await?;
    let mut snap = Snapshot::default();
    let work = async {
        loop {
            let Some(resp) = stream.next().await? else {
                return Err(stream.fail("closed by the control plane".into()));
            };
            let applied = snap.apply(&resp);
            stream.reply(&resp, applied.err()).await?;
            let (routes, eds) = snap.wanted();
            if snap.responses.contains_key(LISTENER_TYPE) {
                stream.subscribe(ROUTE_TYPE, &routes).await?;
            }
            if snap.responses.contains_key(CLUSTER_TYPE) {
                stream.subscribe(ENDPOINT_TYPE, &eds).await?;
            }
            if snap.missing().is_empty() {
                return Ok(());
            }
        }
    };
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(())) => Ok(snap),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(XdsError::Stream {
            address: address.to_string(),
            what: format!("no whole config within {limit:?}; missing {:?}", snap.missing()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::{
        envoy::extensions::filters::network::http_connection_manager::v3::Rds, google::protobuf::Any,
    };

    use super::*;

    #[test]
    fn node_as_a_sidecar_of_the_pod() {
        let n = SidecarNode {
            ip: "198.18.1.10".into(),
            pod_name: "reviews-v1".into(),
            namespace: "demo".into(),
            service_account: "reviews".into(),
            cluster_id: "Kubernetes".into(),
            istio_version: "1.28.0".into(),
            labels: [("app".to_string(), "reviews".to_string())].into(),
        };
        let node = n.node();
        assert_eq!(node.id, "sidecar~198.18.1.10~reviews-v1.demo~demo.svc.cluster.local");
        let md = node.metadata.expect("metadata").fields;
        let Some(Kind::StructValue(labels)) = &md["LABELS"].kind else {
            panic!("LABELS is a map: {:?}", md["LABELS"])
        };
        assert_eq!(labels.fields["app"].kind, Some(Kind::StringValue("reviews".into())));
        assert_eq!(md["DISABLE_HBONE_SEND"].kind, Some(Kind::StringValue("true".into())));
        assert_eq!(md["INSTANCE_IPS"].kind, Some(Kind::StringValue("198.18.1.10".into())));
    }

    fn virtual_outbound(cluster: &str) -> BTreeMap<String, lv3::Listener> {
        use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
            tcp_proxy::ClusterSpecifier, TcpProxy,
        };
        let tcp = TcpProxy {
            stat_prefix: cluster.into(),
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        };
        let chain = |name: &str, cluster: &str, port: Option<u32>| {
            let tcp = TcpProxy {
                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
                ..tcp.clone()
            };
            lv3::FilterChain {
                name: name.into(),
                filter_chain_match: port.map(|p| lv3::FilterChainMatch {
                    destination_port: Some(envoy_types::pb::google::protobuf::UInt32Value { value: p }),
                    ..Default::default()
                }),
                filters: vec![lv3::Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(lv3::filter::ConfigType::TypedConfig(Any {
                        type_url: TCP_PROXY_TYPE.into(),
                        value: tcp.encode_to_vec(),
                    })),
                }],
                ..Default::default()
            }
        };
        // As istiod sends it: the loop guard on 15001 first, then the catch-all.
        let l = lv3::Listener {
            name: VIRTUAL_OUTBOUND.into(),
            filter_chains: vec![
                chain("virtualOutbound-blackhole", "BlackHoleCluster", Some(15001)),
                chain("virtualOutbound-catchall-tcp", cluster, None),
            ],
            ..Default::default()
        };
        [(l.name.clone(), l)].into()
    }

    #[test]
    fn outbound_traffic_policy_from_the_virtual_outbound_listener() {
        assert_eq!(
            outbound_policy(&virtual_outbound("PassthroughCluster")),
            Some(OutboundPolicy::AllowAny)
        );
        assert_eq!(
            outbound_policy(&virtual_outbound("BlackHoleCluster")),
            Some(OutboundPolicy::RegistryOnly)
        );
        assert_eq!(outbound_policy(&BTreeMap::new()), None);
    }

    #[test]
    fn subscriptions_follow_what_listeners_and_clusters_reference() {
        let hcm = HttpConnectionManager {
            route_specifier: Some(RouteSpecifier::Rds(Rds {
                route_config_name: "8080".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let listener = lv3::Listener {
            name: "0.0.0.0_8080".into(),
            filter_chains: vec![lv3::FilterChain {
                filters: vec![lv3::Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(lv3::filter::ConfigType::TypedConfig(Any {
                        type_url: HCM_TYPE.into(),
                        value: hcm.encode_to_vec(),
                    })),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let eds = cv3::Cluster {
            name: "outbound|8080|v1|reviews.demo.svc.cluster.local".into(),
            cluster_discovery_type: Some(cv3::cluster::ClusterDiscoveryType::Type(
                cv3::cluster::DiscoveryType::Eds as i32,
            )),
            ..Default::default()
        };
        let passthrough = cv3::Cluster {
            name: "PassthroughCluster".into(),
            cluster_discovery_type: Some(cv3::cluster::ClusterDiscoveryType::Type(
                cv3::cluster::DiscoveryType::OriginalDst as i32,
            )),
            ..Default::default()
        };
        let mut snap = Snapshot::default();
        snap.listeners.insert(listener.name.clone(), listener);
        snap.clusters.insert(eds.name.clone(), eds);
        snap.clusters.insert(passthrough.name.clone(), passthrough);
        let (routes, eds) = snap.wanted();
        assert_eq!(routes.into_iter().collect::<Vec<_>>(), ["8080"]);
        assert_eq!(
            eds.into_iter().collect::<Vec<_>>(),
            ["outbound|8080|v1|reviews.demo.svc.cluster.local"]
        );
        assert_eq!(snap.missing().len(), 4, "{:?}", snap.missing());
    }
}
