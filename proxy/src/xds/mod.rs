//! The xDS client: istiod's delta ADS (`DeltaAggregatedResources`), as ztunnel speaks it.
//!
//! nodeway subscribes (wildcard) to `istio.workload.Address`, `istio.security.Authorization` and
//! Envoy's `Cluster`, `ClusterLoadAssignment` and `RouteConfiguration` (the L7 model, [`crate::l7`]).
//! Each resource of a response is decoded and checked on its own ([`store`]), as ztunnel does:
//! the good ones apply and the proxy's workload, service and policy snapshots are swapped; if any
//! is bad the response is NACKed with an `error_detail` naming every bad resource and why, and
//! each bad one keeps its last good value (and version, so a resumed stream does not claim it).
//! Until `Address` and `Authorization` have each been ACKed once the proxy is not synced
//! ([`crate::state::ProxyState::synced`]): not ready, and captured pods fail closed.
//! After a reconnect (exponential backoff with jitter) the client resumes with
//! `initial_resource_versions`, so the control plane sends only what changed.
//!
//! istiod generates L7 config (listeners, clusters, routes, endpoints) only for sidecars, never
//! for a `ztunnel` node: [`classes`] groups the captured pods istiod configures alike (no I/O),
//! and each class has one [`class_stream`] in the name of a representative pod, speaking as its
//! sidecar would ([`sidecar`]: LDS/CDS wildcard, RDS/EDS by name), into the class's own L7
//! model ([`crate::state::L7State`]) that its pods route by.
pub mod class_stream;
pub mod classes;
pub mod client;
pub mod convert;
pub mod sidecar;
pub mod store;

pub use client::{NodeInfo, XdsClient, XdsConfig};
pub use store::{ADDRESS_TYPE, AUTHORIZATION_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("xDS config: {0}")]
    Config(String),
    #[error("xDS stream to {address}: {what}")]
    Stream { address: String, what: String },
}
