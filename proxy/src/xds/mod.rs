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
//! [`sidecar`] speaks to istiod as one pod's sidecar would (LDS/CDS wildcard, RDS/EDS by name),
//! which is what istiod generates L7 config for: the seed of the per-class L7 streams;
//! [`classes`] is the plan of which classes of captured pods need one (no I/O).
pub mod classes;
pub mod client;
pub mod convert;
pub mod sidecar;
pub mod store;

pub use client::{NodeInfo, XdsClient, XdsConfig};
pub use store::{ADDRESS_TYPE, AUTHORIZATION_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE};

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("xDS config: {0}")]
    Config(String),
    #[error("xDS stream to {address}: {what}")]
    Stream { address: String, what: String },
}
