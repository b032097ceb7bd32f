//! An in-test delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService`) over TLS
//! on 127.0.0.1, the way istiod serves ztunnel: it holds resources by type and name, answers each
//! subscription with what the client lacks (honouring `initial_resource_versions`), pushes updates
//! and removals to every open stream, records every request, and can drop all streams.
//! Runs on its own runtime thread, so blocking end-to-end tests can use it too.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use envoy_types::pb::{
    envoy::service::discovery::v3::{
        aggregated_discovery_service_server::{AggregatedDiscoveryService, AggregatedDiscoveryServiceServer},
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
    },
    google::protobuf::Any,
};
use nodeway_proxy::{
    identity::dev_ca::DevCa,
    proto::istio::{security as spb, workload as wpb},
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub use nodeway_proxy::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE};

/// The name the server's certificate carries, as istiod's does.
pub const XDS_SERVER_NAME: &str = "istiod.istio-system.svc";

type RespTx = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

#[derive(Default)]
struct State {
    /// type → name → (version, encoded body)
    resources: BTreeMap<String, BTreeMap<String, (String, Vec<u8>)>>,
    requests: Vec<DeltaDiscoveryRequest>,
    /// Responses sent, by nonce.
    sent: Vec<DeltaDiscoveryResponse>,
    streams: Vec<RespTx>,
    nonce: u64,
    version: u64,
    connects: u64,
    /// `authorization` and `clusterid` headers of each stream.
    headers: Vec<(Option<String>, Option<String>)>,
}

impl State {
    fn response(&mut self, type_url: &str, resources: Vec<Resource>, removed: Vec<String>) -> DeltaDiscoveryResponse {
        self.nonce += 1;
        let r = DeltaDiscoveryResponse {
            system_version_info: format!("v{}", self.version),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: format!("nonce-{}", self.nonce),
            ..Default::default()
        };
        self.sent.push(r.clone());
        r
    }

    fn broadcast(&mut self, r: DeltaDiscoveryResponse) {
        self.streams.retain(|tx| tx.try_send(Ok(r.clone())).is_ok());
    }
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn resource(type_url: &str, name: &str, version: &str, body: &[u8]) -> Resource {
    Resource {
        name: name.to_string(),
        version: version.to_string(),
        resource: Some(Any {
            type_url: type_url.to_string(),
            value: body.to_vec(),
        }),
        ..Default::default()
    }
}

#[derive(Clone)]
struct Ads {
    state: Arc<Mutex<State>>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("test xDS server: delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let header = |k: &str| req.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let seen = (header("authorization"), header("clusterid"));
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(4096);
        {
            let mut st = lock(&self.state);
            st.connects += 1;
            st.headers.push(seen);
            st.streams.push(tx.clone());
        }
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Some(Ok(r)) = incoming.next().await {
                let reply = {
                    let mut st = lock(&state);
                    st.requests.push(r.clone());
                    if !r.response_nonce.is_empty() {
                        continue; // an ACK or NACK
                    }
                    // A subscription: everything the client lacks, and what it has that is gone.
                    let known = st.resources.get(&r.type_url).cloned().unwrap_or_default();
                    let resources = known
                        .iter()
                        .filter(|(n, (v, _))| r.initial_resource_versions.get(*n) != Some(v))
                        .map(|(n, (v, b))| resource(&r.type_url, n, v, b))
                        .collect();
                    let removed = r
                        .initial_resource_versions
                        .keys()
                        .filter(|n| !known.contains_key(*n))
                        .cloned()
                        .collect();
                    st.response(&r.type_url, resources, removed)
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out)))
    }
}

pub struct FakeXds {
    pub addr: SocketAddr,
    /// The root (PEM) that verifies the server, what `--xds-root-cert` points at.
    pub root_cert: PathBuf,
    state: Arc<Mutex<State>>,
    /// Serves until dropped.
    _server: crate::grpc::TlsGrpcServer,
}

impl FakeXds {
    /// Starts on 127.0.0.1 (an ephemeral port) with a fresh root written into `dir`.
    pub fn start(dir: &Path) -> Result<Self> {
        let ca = DevCa::new("cluster.local", Duration::from_secs(3600))?;
        let root_cert = dir.join("xds-root-cert.pem");
        ca.write_root(&root_cert)
            .context("writing the test xDS server's root")?;
        let (cert_pem, key_pem) = ca.serving_cert(&[XDS_SERVER_NAME, "127.0.0.1"])?;
        let state = Arc::new(Mutex::new(State::default()));
        let service = Ads { state: state.clone() };
        let server = crate::grpc::TlsGrpcServer::start("test xDS", cert_pem, key_pem, move |server| {
            server.add_service(
                AggregatedDiscoveryServiceServer::new(service)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(512 << 20),
            )
        })?;
        let addr = server.addr;
        Ok(FakeXds {
            addr,
            root_cert,
            state,
            _server: server,
        })
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stores resources (name, encoded body) at a new version without telling anyone: what a
    /// control plane changes while a client is away.
    pub fn set(&self, type_url: &str, resources: &[(String, Vec<u8>)], removed: &[&str]) -> String {
        let mut st = lock(&self.state);
        st.version += 1;
        let version = format!("v{}", st.version);
        let map = st.resources.entry(type_url.to_string()).or_default();
        for n in removed {
            map.remove(*n);
        }
        for (n, b) in resources {
            map.insert(n.clone(), (version.clone(), b.clone()));
        }
        version
    }

    /// Stores and pushes to every open stream, as one response. Returns the response's nonce.
    pub fn push(&self, type_url: &str, resources: &[(String, Vec<u8>)], removed: &[&str]) -> String {
        let version = self.set(type_url, resources, removed);
        let mut st = lock(&self.state);
        let rs = resources
            .iter()
            .map(|(n, b)| resource(type_url, n, &version, b))
            .collect();
        let r = st.response(type_url, rs, removed.iter().map(|s| s.to_string()).collect());
        let nonce = r.nonce.clone();
        st.broadcast(r);
        nonce
    }

    /// Ends every open stream with UNAVAILABLE (as a restarting istiod does).
    pub fn disconnect_all(&self) {
        let streams = std::mem::take(&mut lock(&self.state).streams);
        for tx in streams {
            let _ = tx.try_send(Err(Status::unavailable("test xDS: going away")));
        }
    }

    pub fn requests(&self) -> Vec<DeltaDiscoveryRequest> {
        lock(&self.state).requests.clone()
    }

    /// (`authorization`, `clusterid`) headers of each stream opened so far.
    pub fn stream_headers(&self) -> Vec<(Option<String>, Option<String>)> {
        lock(&self.state).headers.clone()
    }

    /// Streams opened so far.
    pub fn connects(&self) -> u64 {
        lock(&self.state).connects
    }

    /// The reply (ACK or NACK) to the response with `nonce`, waiting up to `limit`.
    pub fn reply_to(&self, nonce: &str, limit: Duration) -> Option<DeltaDiscoveryRequest> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| r.response_nonce == nonce) {
                return Some(r);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The nonces of the responses sent so far.
    pub fn sent_nonces(&self) -> Vec<String> {
        lock(&self.state).sent.iter().map(|r| r.nonce.clone()).collect()
    }

    /// The responses sent so far.
    pub fn sent(&self) -> Vec<DeltaDiscoveryResponse> {
        lock(&self.state).sent.clone()
    }
}

impl Drop for FakeXds {
    fn drop(&mut self) {
        self.disconnect_all();
    }
}

/// An `istio.workload.Address` holding a workload, and its resource name (the uid, as istiod names it).
pub fn workload(namespace: &str, name: &str, ip: &[u8], node: &str) -> (String, Vec<u8>) {
    let uid = format!("Kubernetes//Pod/{namespace}/{name}");
    let body = wpb::Address {
        r#type: Some(wpb::address::Type::Workload(wpb::Workload {
            uid: uid.clone(),
            name: name.to_string(),
            namespace: namespace.to_string(),
            addresses: vec![ip.to_vec()],
            node: node.to_string(),
            tunnel_protocol: wpb::TunnelProtocol::Hbone as i32,
            canonical_name: name.to_string(),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    (uid, body)
}

/// The workload resource `w`, made an endpoint of the service `namespace/hostname` on `port`.
pub fn in_service(w: (String, Vec<u8>), service: &str, port: u32) -> (String, Vec<u8>) {
    let (name, body) = w;
    let Ok(mut a) = wpb::Address::decode(body.as_slice()) else {
        return (name, body);
    };
    if let Some(wpb::address::Type::Workload(wl)) = a.r#type.as_mut() {
        wl.services.insert(
            service.to_string(),
            wpb::PortList {
                ports: vec![wpb::Port {
                    service_port: port,
                    target_port: port,
                    ..Default::default()
                }],
            },
        );
    }
    (name, a.encode_to_vec())
}

/// An `istio.workload.Address` holding a service, named `namespace/hostname`.
pub fn service(namespace: &str, name: &str, vip: [u8; 4], port: u32) -> (String, Vec<u8>) {
    let hostname = format!("{name}.{namespace}.svc.cluster.local");
    let body = wpb::Address {
        r#type: Some(wpb::address::Type::Service(wpb::Service {
            name: name.to_string(),
            namespace: namespace.to_string(),
            hostname: hostname.clone(),
            addresses: vec![wpb::NetworkAddress {
                network: String::new(),
                address: vip.to_vec(),
                ..Default::default()
            }],
            ports: vec![wpb::Port {
                service_port: port,
                target_port: port,
                ..Default::default()
            }],
            ..Default::default()
        })),
    }
    .encode_to_vec();
    (format!("{namespace}/{hostname}"), body)
}

/// A namespace-scoped DENY of connections from `source_namespace` (or, with `port`, to that
/// destination port only), named `namespace/name`.
pub fn deny_from_namespace(
    namespace: &str,
    name: &str,
    source_namespace: &str,
    port: Option<u32>,
) -> (String, Vec<u8>) {
    let body = spb::Authorization {
        name: name.to_string(),
        namespace: namespace.to_string(),
        scope: spb::Scope::Namespace as i32,
        action: spb::Action::Deny as i32,
        rules: vec![spb::Rule {
            clauses: vec![spb::Clause {
                matches: vec![spb::Match {
                    namespaces: vec![spb::StringMatch {
                        match_type: Some(spb::string_match::MatchType::Exact(source_namespace.to_string())),
                    }],
                    destination_ports: port.into_iter().collect(),
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }
    .encode_to_vec();
    (format!("{namespace}/{name}"), body)
}

/// Versions a client sent on (re)subscription, per type.
pub fn initial_versions(requests: &[DeltaDiscoveryRequest], type_url: &str) -> Vec<HashMap<String, String>> {
    requests
        .iter()
        .filter(|r| r.type_url == type_url && r.response_nonce.is_empty())
        .map(|r| r.initial_resource_versions.clone())
        .collect()
}

/// An Envoy resource (`RouteConfiguration`, `Cluster`, `ClusterLoadAssignment`) written in
/// protobuf-JSON, encoded, with its resource name.
pub fn envoy<M: Message + prost::Name + Default>(name: &str, json: serde_json::Value) -> (String, Vec<u8>) {
    let msg: M = nodeway_proxy::envoy_json::from_json(&json).expect("valid Envoy JSON");
    (name.to_string(), msg.encode_to_vec())
}
