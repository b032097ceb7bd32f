//! Upstream clusters and their endpoints: Envoy's `Cluster` and `ClusterLoadAssignment`, compiled
//! into what the data path needs (load-balancing policy, limits, outlier detection, endpoints).
//!
//! Istio names clusters `outbound|<port>|<subset>|<fqdn>`; a DestinationRule subset is its own
//! cluster with its own load assignment, so subsets need nothing special here.
mod convert;
pub mod dns;
#[cfg(test)]
mod istio_tests;

use std::{net::SocketAddr, time::Duration};

pub use convert::{cluster, cluster_status, load_assignment, ConvertError};
use serde::Serialize;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub name: String,
    pub discovery: Discovery,
    pub lb_policy: LbPolicy,
    pub connect_timeout: Duration,
    pub limits: Limits,
    pub outlier_detection: Option<OutlierDetection>,
    /// Endpoints given inline (`STATIC`, or an EDS cluster's `load_assignment`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_assignment: Option<LoadAssignment>,
    /// Upstream HTTP/2 (`http2_protocol_options` / `HttpProtocolOptions`); else HTTP/1.1, or the
    /// downstream's protocol when `use_downstream_protocol_config` is set.
    pub upstream_protocol: UpstreamProtocol,
    /// The DestinationRule this cluster came from (`metadata.filterMetadata.istio.config`), as
    /// `name.namespace`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub istio_config: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Discovery {
    Static,
    /// Endpoints arrive as the `ClusterLoadAssignment` of this name
    /// (`eds_cluster_config.service_name`, else the cluster's name).
    Eds {
        service_name: String,
    },
    /// Istio's `PassthroughCluster` (outbound traffic policy `ALLOW_ANY`: a destination
    /// outside the registry is reached as addressed) and `InboundPassthroughCluster`: the
    /// connection's original destination.
    OriginalDst,
    /// `STRICT_DNS` / `LOGICAL_DNS`: the load assignment names hosts, resolved by nodeway
    /// ([`dns`]) at start and every `refresh_rate`, as Envoy does.
    Dns(dns::DnsDiscovery),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    RoundRobin,
    /// Power of `choice_count` choices (default 2) by active requests.
    LeastRequest {
        choice_count: u32,
    },
    Random,
    RingHash {
        minimum_ring_size: u64,
        maximum_ring_size: u64,
    },
    Maglev {
        table_size: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// Same as the downstream request.
    Downstream,
}

/// Circuit breakers (`circuit_breakers.thresholds`, DEFAULT priority). Envoy's defaults: 1024
/// connections, pending requests and requests, 3 retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// `max_requests_per_connection` (common HTTP protocol options); 0: unlimited.
    pub max_requests_per_connection: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            max_requests_per_connection: 0,
        }
    }
}

/// Outlier detection (consecutive 5xx / gateway failures), Envoy's defaults where unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx (incl. connect failures and resets) before ejection; 0 disables it.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (and connect failures); 0 disables it.
    pub consecutive_gateway_failure: u32,
    pub interval: Duration,
    /// An ejected host stays out `base_ejection_time × times ejected` (capped by
    /// `max_ejection_time`).
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub enforcing_consecutive_5xx: u32,
    pub enforcing_consecutive_gateway_failure: u32,
}

/// A cluster's endpoints (`ClusterLoadAssignment`), flattened over localities; priorities kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadAssignment {
    pub cluster_name: String,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub address: SocketAddr,
    /// ≥ 1.
    pub weight: u32,
    /// Priority 0 is used while it has healthy hosts; higher ones are failover.
    pub priority: u32,
    pub health: Health,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    /// HEALTHY or UNKNOWN: takes traffic.
    Healthy,
    /// DEGRADED: used only when no healthy host is left.
    Degraded,
    /// UNHEALTHY, DRAINING, TIMEOUT: no traffic.
    Unhealthy,
}

/// Istio's cluster for outbound traffic to a destination the registry does not know when the
/// outbound traffic policy is `REGISTRY_ONLY`: `STATIC` with no endpoints, so every connection
/// to it is refused (503 `UH` for HTTP), as Envoy does.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
/// Istio's `ALLOW_ANY` cluster: `ORIGINAL_DST`, the destination as the app addressed it.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Istio's sidecar inbound cluster for ports no Service names: `ORIGINAL_DST` with
/// `upstreamBindConfig` 127.0.0.6 (to escape the sidecar's iptables; nodeway delivers from its
/// own marked socket inside the pod, so the bind address does not apply).
pub const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";

/// The service host an Istio cluster name stands for: `outbound|<port>|<subset>|<fqdn>` → fqdn.
pub fn istio_service_host(cluster: &str) -> Option<&str> {
    let mut parts = cluster.split('|');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("outbound"), Some(_port), Some(_subset), Some(fqdn), None) if !fqdn.is_empty() => Some(fqdn),
        _ => None,
    }
}

impl Cluster {
    /// The name of the `ClusterLoadAssignment` that feeds this cluster, if EDS.
    pub fn eds_name(&self) -> Option<&str> {
        match &self.discovery {
            Discovery::Eds { service_name } => Some(service_name),
            _ => None,
        }
    }
}
