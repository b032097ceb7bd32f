//! The xDS client: istiod's delta ADS (`DeltaAggregatedResources`), as ztunnel speaks it.
//!
//! nodeway subscribes (wildcard) to `istio.workload.Address`, `istio.security.Authorization` and
//! Envoy's `Cluster`, `ClusterLoadAssignment` and `RouteConfiguration` (the L7 model, [`crate::l7`]).
//! Each response is decoded and checked whole ([`store`]); a good one is ACKed and the proxy's
//! workload, service and policy snapshots are rebuilt and swapped; a bad one is NACKed with an
//! `error_detail` naming every bad resource and why, and the last good config stays in force.
//! After a reconnect (exponential backoff with jitter) the client resumes with
//! `initial_resource_versions`, so the control plane sends only what changed.
pub mod client;
pub mod convert;
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
