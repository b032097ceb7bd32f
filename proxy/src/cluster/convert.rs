//! `Cluster` / `ClusterLoadAssignment` → [`Cluster`] / [`LoadAssignment`]. Istio's cluster fields
//! that only matter to Envoy's own plumbing (transport sockets: nodeway does mTLS as HBONE
//! itself; metadata; stats; network filters like `istio.metadata_exchange`) are accepted and
//! ignored; behaviour nodeway does not implement is refused by name.
// Istio still sends deprecated fields (`exact_match`, `http2_protocol_options`, ...).
#![allow(deprecated)]

use std::{net::IpAddr, time::Duration};

use envoy_types::pb::envoy::{
    config::{cluster::v3 as cv3, core::v3 as core, endpoint::v3 as ev3},
    extensions::upstreams::http::v3::{http_protocol_options as hpo, HttpProtocolOptions},
};
use prost::Message;

use super::*;

pub use crate::route::ConvertError;

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_PROTOCOL_OPTIONS_TYPE: &str = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

use crate::route::convert::{err, refuse, unsupported};

pub fn cluster(c: &cv3::Cluster) -> Result<Cluster, ConvertError> {
    if c.name.is_empty() {
        return err("name", "a Cluster needs a name");
    }
    let p = "";
    refuse!(p, c,
        health_checks => "healthChecks",
        lb_subset_config => "lbSubsetConfig",
        upstream_bind_config => "upstreamBindConfig",
        load_balancing_policy => "loadBalancingPolicy",
        lrs_server => "lrsServer",
        upstream_config => "upstreamConfig",
        connection_pool_per_downstream_connection => "connectionPoolPerDownstreamConnection",
        queuing_policies => "queuingPolicies",
    );
    use cv3::cluster::{ClusterDiscoveryType as T, DiscoveryType as D, LbConfig, LbPolicy as L};
    let discovery = match &c.cluster_discovery_type {
        None => Discovery::Static,
        Some(T::Type(t)) => match D::try_from(*t) {
            Ok(D::Static) => Discovery::Static,
            Ok(D::Eds) => Discovery::Eds {
                service_name: c
                    .eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| c.name.clone()),
            },
            Ok(D::OriginalDst) => Discovery::OriginalDst,
            Ok(D::StrictDns) => return Err(unsupported(p, "type: STRICT_DNS")),
            Ok(D::LogicalDns) => return Err(unsupported(p, "type: LOGICAL_DNS")),
            Err(_) => return err("type", format!("unknown discovery type {t}")),
        },
        Some(T::ClusterType(ct)) => {
            return err(
                "clusterType",
                format!("custom cluster type {:?} not supported by nodeway", ct.name),
            )
        }
    };
    let lb_policy = match L::try_from(c.lb_policy) {
        Ok(L::RoundRobin) => LbPolicy::RoundRobin,
        Ok(L::LeastRequest) => LbPolicy::LeastRequest {
            choice_count: match &c.lb_config {
                Some(LbConfig::LeastRequestLbConfig(l)) => l.choice_count.as_ref().map_or(2, |n| n.value.max(2)),
                _ => 2,
            },
        },
        Ok(L::Random) => LbPolicy::Random,
        Ok(L::RingHash) => {
            let (min, max) = match &c.lb_config {
                Some(LbConfig::RingHashLbConfig(r)) => (
                    r.minimum_ring_size.as_ref().map_or(1024, |n| n.value),
                    r.maximum_ring_size.as_ref().map_or(8 * 1024 * 1024, |n| n.value),
                ),
                _ => (1024, 8 * 1024 * 1024),
            };
            if min > max || max > 8 * 1024 * 1024 {
                return err("ringHashLbConfig", "minimumRingSize must be ≤ maximumRingSize ≤ 8M");
            }
            LbPolicy::RingHash {
                minimum_ring_size: min,
                maximum_ring_size: max,
            }
        }
        Ok(L::Maglev) => {
            let table_size = match &c.lb_config {
                Some(LbConfig::MaglevLbConfig(m)) => m.table_size.as_ref().map_or(65537, |n| n.value),
                _ => 65537,
            };
            if !is_prime(table_size) || table_size > 5_000_011 {
                return err(
                    "maglevLbConfig.tableSize",
                    format!("{table_size} is not a prime ≤ 5000011"),
                );
            }
            LbPolicy::Maglev { table_size }
        }
        // Istio's PassthroughCluster says CLUSTER_PROVIDED with ORIGINAL_DST.
        Ok(L::ClusterProvided) if discovery == Discovery::OriginalDst => LbPolicy::RoundRobin,
        Ok(other) => return Err(unsupported(p, &format!("lbPolicy: {}", other.as_str_name()))),
        Err(_) => return err("lbPolicy", format!("unknown policy {}", c.lb_policy)),
    };
    let connect_timeout = match &c.connect_timeout {
        Some(d) => crate::route::convert_duration("connectTimeout", d)?,
        None => Duration::from_secs(5),
    };
    let mut limits = Limits::default();
    if let Some(cb) = &c.circuit_breakers {
        refuse!("circuitBreakers", cb, per_host_thresholds => "perHostThresholds");
        // DEFAULT priority (0) is the one Istio sets; HIGH is for priority routing, unused here.
        if let Some(t) = cb.thresholds.iter().find(|t| t.priority == 0) {
            refuse!("circuitBreakers.thresholds", t, retry_budget => "retryBudget");
            let v =
                |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| x.as_ref().map_or(d, |n| n.value);
            limits.max_connections = v(&t.max_connections, limits.max_connections);
            limits.max_pending_requests = v(&t.max_pending_requests, limits.max_pending_requests);
            limits.max_requests = v(&t.max_requests, limits.max_requests);
            limits.max_retries = v(&t.max_retries, limits.max_retries);
        }
    }
    let mut upstream_protocol = if c.http2_protocol_options.is_some() {
        UpstreamProtocol::Http2
    } else {
        UpstreamProtocol::Http1
    };
    if let Some(n) = c.max_requests_per_connection.as_ref() {
        limits.max_requests_per_connection = n.value;
    }
    if let Some(o) = c.common_http_protocol_options.as_ref() {
        if let Some(n) = o.max_requests_per_connection.as_ref() {
            limits.max_requests_per_connection = n.value;
        }
    }
    let mut names: Vec<_> = c.typed_extension_protocol_options.keys().collect();
    names.sort();
    for name in names {
        let any = &c.typed_extension_protocol_options[name];
        let tp = format!("typedExtensionProtocolOptions[{name:?}]");
        if name != HTTP_PROTOCOL_OPTIONS && name != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
            return err(&tp, "protocol options not supported by nodeway");
        }
        if any.type_url != HTTP_PROTOCOL_OPTIONS_TYPE {
            return err(
                &tp,
                format!("expected {HTTP_PROTOCOL_OPTIONS_TYPE}, got {}", any.type_url),
            );
        }
        let o = HttpProtocolOptions::decode(any.value.as_slice()).map_err(|e| ConvertError {
            path: tp.clone(),
            reason: format!("undecodable HttpProtocolOptions: {e}"),
        })?;
        if !o.http_filters.is_empty() {
            return Err(unsupported(&tp, "httpFilters"));
        }
        if let Some(n) = o
            .common_http_protocol_options
            .as_ref()
            .and_then(|c| c.max_requests_per_connection.as_ref())
        {
            limits.max_requests_per_connection = n.value;
        }
        upstream_protocol = match &o.upstream_protocol_options {
            None => upstream_protocol,
            Some(hpo::UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match &e.protocol_config {
                Some(hpo::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)) => UpstreamProtocol::Http2,
                Some(hpo::explicit_http_config::ProtocolConfig::HttpProtocolOptions(_)) | None => {
                    UpstreamProtocol::Http1
                }
                Some(hpo::explicit_http_config::ProtocolConfig::Http3ProtocolOptions(_)) => {
                    return Err(unsupported(&tp, "explicitHttpConfig.http3ProtocolOptions"))
                }
            },
            Some(hpo::UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => UpstreamProtocol::Downstream,
            // ALPN between HTTP/1.1 and HTTP/2 needs TLS to the upstream, which nodeway replaces by
            // HBONE; the downstream's protocol is the closest.
            Some(hpo::UpstreamProtocolOptions::AutoConfig(_)) => UpstreamProtocol::Downstream,
        };
    }
    let outlier_detection = match &c.outlier_detection {
        None => None,
        Some(od) => Some(outlier(od)?),
    };
    let load_assignment = match &c.load_assignment {
        Some(cla) => Some(load_assignment(cla).map_err(|e| ConvertError {
            path: format!("loadAssignment.{}", e.path),
            reason: e.reason,
        })?),
        None => None,
    };
    Ok(Cluster {
        name: c.name.clone(),
        discovery,
        lb_policy,
        connect_timeout,
        limits,
        outlier_detection,
        load_assignment,
        upstream_protocol,
        istio_config: crate::route::istio_config(c.metadata.as_ref()),
    })
}

fn outlier(od: &cv3::OutlierDetection) -> Result<OutlierDetection, ConvertError> {
    let p = "outlierDetection";
    refuse!(p, od,
        enforcing_success_rate => "enforcingSuccessRate",
        split_external_local_origin_errors => "splitExternalLocalOriginErrors",
        enforcing_failure_percentage => "enforcingFailurePercentage",
        failure_percentage_threshold => "failurePercentageThreshold",
        monitors => "monitors",
    );
    let u = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| x.as_ref().map_or(d, |n| n.value);
    let d = |name: &str, x: &Option<envoy_types::pb::google::protobuf::Duration>, dflt: Duration| match x {
        Some(v) => crate::route::convert_duration(&format!("{p}.{name}"), v),
        None => Ok(dflt),
    };
    let base = d("baseEjectionTime", &od.base_ejection_time, Duration::from_secs(30))?;
    Ok(OutlierDetection {
        consecutive_5xx: u(&od.consecutive_5xx, 5),
        consecutive_gateway_failure: u(&od.consecutive_gateway_failure, 5),
        interval: d("interval", &od.interval, Duration::from_secs(10))?,
        base_ejection_time: base,
        max_ejection_time: d("maxEjectionTime", &od.max_ejection_time, Duration::from_secs(300))?.max(base),
        max_ejection_percent: u(&od.max_ejection_percent, 10).min(100),
        enforcing_consecutive_5xx: u(&od.enforcing_consecutive_5xx, 100).min(100),
        enforcing_consecutive_gateway_failure: u(&od.enforcing_consecutive_gateway_failure, 0).min(100),
    })
}

pub fn load_assignment(cla: &ev3::ClusterLoadAssignment) -> Result<LoadAssignment, ConvertError> {
    if !cla.named_endpoints.is_empty() {
        return Err(unsupported("", "namedEndpoints"));
    }
    let mut endpoints = Vec::new();
    for (i, lle) in cla.endpoints.iter().enumerate() {
        let lp = format!("endpoints[{i}]");
        for (j, le) in lle.lb_endpoints.iter().enumerate() {
            let ep = format!("{lp}.lbEndpoints[{j}]");
            let address = match &le.host_identifier {
                Some(ev3::lb_endpoint::HostIdentifier::Endpoint(e)) => {
                    socket_address(&format!("{ep}.endpoint.address"), e.address.as_ref())?
                }
                Some(ev3::lb_endpoint::HostIdentifier::EndpointName(_)) => {
                    return Err(unsupported(&ep, "endpointName"))
                }
                None => return err(&format!("{ep}.endpoint"), "required"),
            };
            let health = match core::HealthStatus::try_from(le.health_status) {
                Ok(core::HealthStatus::Unknown | core::HealthStatus::Healthy) => Health::Healthy,
                Ok(core::HealthStatus::Degraded) => Health::Degraded,
                Ok(_) => Health::Unhealthy,
                Err(_) => {
                    return err(
                        &format!("{ep}.healthStatus"),
                        format!("unknown status {}", le.health_status),
                    )
                }
            };
            endpoints.push(Endpoint {
                address,
                weight: le.load_balancing_weight.as_ref().map_or(1, |w| w.value.max(1)),
                priority: lle.priority,
                health,
            });
        }
    }
    Ok(LoadAssignment {
        cluster_name: cla.cluster_name.clone(),
        endpoints,
    })
}

fn socket_address(p: &str, a: Option<&core::Address>) -> Result<std::net::SocketAddr, ConvertError> {
    let Some(core::address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return err(
            p,
            "a socketAddress is required (pipes and internal addresses are not supported)",
        );
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| ConvertError {
        path: format!("{p}.socketAddress.address"),
        reason: format!(
            "{:?} is not an IP address (DNS endpoints are not supported)",
            sa.address
        ),
    })?;
    let port = match &sa.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(v)) => u16::try_from(*v).map_err(|_| ConvertError {
            path: format!("{p}.socketAddress.portValue"),
            reason: format!("{v} is not a port"),
        })?,
        Some(core::socket_address::PortSpecifier::NamedPort(_)) => {
            return Err(unsupported(&format!("{p}.socketAddress"), "namedPort"))
        }
        None => return err(&format!("{p}.socketAddress.portValue"), "required"),
    };
    Ok(std::net::SocketAddr::new(ip, port))
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2;
    while i * i <= n {
        if n.is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}
