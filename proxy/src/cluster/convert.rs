//! `Cluster` / `ClusterLoadAssignment` → [`Cluster`] / [`LoadAssignment`]. Istio's cluster fields
//! that only matter to Envoy's own plumbing (transport sockets: nodeway does mTLS as HBONE
//! itself; metadata; stats; network filters like `istio.metadata_exchange`) are accepted and
//! ignored; behaviour nodeway does not implement is refused by name.
// Istio still sends deprecated fields (`exact_match`, `http2_protocol_options`, ...).
#![allow(deprecated)]

use std::{net::IpAddr, time::Duration};

use envoy_types::pb::envoy::{
    config::{cluster::v3 as cv3, core::v3 as core, endpoint::v3 as ev3},
    extensions::{
        transport_sockets::tls::v3::UpstreamTlsContext,
        upstreams::http::v3::{http_protocol_options as hpo, HttpProtocolOptions},
    },
};
use prost::Message;

use super::{
    dns::{DnsDiscovery, DnsMode, DnsTarget, Family},
    *,
};

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
        load_balancing_policy => "loadBalancingPolicy",
        lrs_server => "lrsServer",
        upstream_config => "upstreamConfig",
        connection_pool_per_downstream_connection => "connectionPoolPerDownstreamConnection",
        queuing_policies => "queuingPolicies",
    );
    if let Some(b) = &c.upstream_bind_config {
        istio_inbound_bind(b)?;
    }
    transport_sockets(c)?;
    network_filters(c)?;
    let discovery = discovery(c)?;
    let lb_policy = lb_policy(c, &discovery)?;
    let connect_timeout = match &c.connect_timeout {
        Some(d) => crate::route::convert_duration("connectTimeout", d)?,
        None => Duration::from_secs(5),
    };
    let mut limits = limits(c)?;
    let upstream_protocol = protocol(c, &mut limits)?;
    let outlier_detection = match &c.outlier_detection {
        None => None,
        Some(od) => Some(outlier(od)?),
    };
    let load_assignment = match &c.load_assignment {
        // A DNS cluster's assignment names hosts: its targets, resolved later.
        Some(_) if matches!(discovery, Discovery::Dns(_)) => None,
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

fn discovery(c: &cv3::Cluster) -> Result<Discovery, ConvertError> {
    use cv3::cluster::{ClusterDiscoveryType as T, DiscoveryType as D};
    Ok(match &c.cluster_discovery_type {
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
            Ok(D::StrictDns) => Discovery::Dns(dns_discovery(c, DnsMode::Strict)?),
            Ok(D::LogicalDns) => Discovery::Dns(dns_discovery(c, DnsMode::Logical)?),
            Err(_) => return err("type", format!("unknown discovery type {t}")),
        },
        Some(T::ClusterType(ct)) => {
            return err(
                "clusterType",
                format!("custom cluster type {:?} not supported by nodeway", ct.name),
            )
        }
    })
}

fn lb_policy(c: &cv3::Cluster, discovery: &Discovery) -> Result<LbPolicy, ConvertError> {
    use cv3::cluster::{LbConfig, LbPolicy as L};
    let p = "";
    Ok(match L::try_from(c.lb_policy) {
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
        Ok(L::ClusterProvided) if *discovery == Discovery::OriginalDst => LbPolicy::RoundRobin,
        Ok(other) => return Err(unsupported(p, &format!("lbPolicy: {}", other.as_str_name()))),
        Err(_) => return err("lbPolicy", format!("unknown policy {}", c.lb_policy)),
    })
}

/// Circuit-breaker thresholds of the DEFAULT priority.
fn limits(c: &cv3::Cluster) -> Result<Limits, ConvertError> {
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
    Ok(limits)
}

/// The upstream protocol, and the per-connection request limit the protocol options set.
fn protocol(c: &cv3::Cluster, limits: &mut Limits) -> Result<UpstreamProtocol, ConvertError> {
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
    Ok(upstream_protocol)
}

fn outlier(od: &cv3::OutlierDetection) -> Result<OutlierDetection, ConvertError> {
    let p = "outlierDetection";
    refuse!(p, od,
        split_external_local_origin_errors => "splitExternalLocalOriginErrors",
        monitors => "monitors",
    );
    // The success-rate and failure-percentage detectors are not implemented: enforcing 0 (what
    // Istio sends for success rate) turns them off in Envoy too, so only 0 is accepted. Unset
    // success rate stays off here (Envoy would run it at 100% with 5 hosts and 100 requests).
    for (field, v) in [
        ("enforcingSuccessRate", &od.enforcing_success_rate),
        ("enforcingFailurePercentage", &od.enforcing_failure_percentage),
    ] {
        if let Some(n) = v.as_ref().filter(|n| n.value != 0) {
            return err(
                &format!("{p}.{field}"),
                format!(
                    "{}: this detector is not implemented by nodeway (only 0, off, is accepted)",
                    n.value
                ),
            );
        }
    }
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

/// Istio's metadata exchange (peer labels over an ALPN-negotiated prefix), a TypedStruct; HBONE
/// carries the peer's identity, and nodeway's telemetry takes labels from the workloads.
const METADATA_EXCHANGE: &str = "istio.metadata_exchange";
const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const RAW_BUFFER_SOCKET: &str = "envoy.transport_sockets.raw_buffer";
const INTERNAL_UPSTREAM_SOCKET: &str = "envoy.transport_sockets.internal_upstream";
const CARES_RESOLVER: &str = "envoy.network.dns_resolver.cares";
const CARES_TYPE: &str = "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig";
const UPSTREAM_TLS_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// The SDS secret Istio's mTLS names for the workload's own certificate.
const ISTIO_WORKLOAD_SECRET: &str = "default";

/// Istio binds its inbound clusters (`inbound|<port>||`, `InboundPassthroughCluster`) to
/// 127.0.0.6 / ::6 only to escape the sidecar's own iptables rules; nodeway's delivery socket is
/// marked instead, so that bind has no meaning. Any other bind would change the source address:
/// refused.
fn istio_inbound_bind(b: &core::BindConfig) -> Result<(), ConvertError> {
    let istio = |a: &core::SocketAddress| matches!(a.address.as_str(), "127.0.0.6" | "::6");
    let addresses = b
        .source_address
        .iter()
        .chain(&b.additional_source_addresses)
        .chain(b.extra_source_addresses.iter().filter_map(|e| e.address.as_ref()));
    let mut any = false;
    for a in addresses {
        any = true;
        if !istio(a) {
            return err(
                "upstreamBindConfig",
                format!("binding to {} is not supported by nodeway (only Istio's 127.0.0.6 / ::6 inbound bind, which does not apply)", a.address),
            );
        }
    }
    if !any || b.freebind.is_some() || !b.socket_options.is_empty() {
        return Err(unsupported("", "upstreamBindConfig"));
    }
    Ok(())
}

/// Upstream network filters: only Istio's metadata exchange, which does not apply (see above).
fn network_filters(c: &cv3::Cluster) -> Result<(), ConvertError> {
    for (i, f) in c.filters.iter().enumerate() {
        if f.name != METADATA_EXCHANGE {
            return err(
                &format!("filters[{i}]"),
                format!("upstream network filter {:?} not supported by nodeway", f.name),
            );
        }
    }
    Ok(())
}

/// Istio's mTLS (`transportSocketMatches` on `tlsMode: istio`, or an `ISTIO_MUTUAL` transport
/// socket) is what HBONE replaces; plaintext is plaintext. TLS with other certificates (a
/// DestinationRule `SIMPLE`/`MUTUAL`: origination to an external host) is not implemented.
fn transport_sockets(c: &cv3::Cluster) -> Result<(), ConvertError> {
    if let Some(ts) = &c.transport_socket {
        transport_socket("transportSocket", ts)?;
    }
    for (i, m) in c.transport_socket_matches.iter().enumerate() {
        let Some(ts) = &m.transport_socket else { continue };
        // Istio's HBONE origination (endpoints with `tunnel` metadata go through the
        // `connect_originate` internal listener): nodeway speaks HBONE itself, decided from the
        // Address resources.
        let hbone = m.r#match.as_ref().is_some_and(|s| s.fields.contains_key("tunnel"));
        if hbone && ts.name == INTERNAL_UPSTREAM_SOCKET {
            continue;
        }
        transport_socket(&format!("transportSocketMatches[{i}].transportSocket"), ts)?;
    }
    Ok(())
}

fn transport_socket(p: &str, ts: &core::TransportSocket) -> Result<(), ConvertError> {
    use core::transport_socket::ConfigType;
    match ts.name.as_str() {
        RAW_BUFFER_SOCKET => Ok(()),
        TLS_SOCKET => {
            let Some(ConfigType::TypedConfig(any)) = &ts.config_type else {
                return err(p, "a TLS transport socket needs its UpstreamTlsContext");
            };
            if any.type_url != UPSTREAM_TLS_TYPE {
                return err(p, format!("expected {UPSTREAM_TLS_TYPE}, got {}", any.type_url));
            }
            let tls = UpstreamTlsContext::decode(any.value.as_slice()).map_err(|e| ConvertError {
                path: p.to_string(),
                reason: format!("undecodable UpstreamTlsContext: {e}"),
            })?;
            let istio = tls.common_tls_context.as_ref().is_some_and(|t| {
                t.tls_certificate_sds_secret_configs
                    .iter()
                    .any(|s| s.name == ISTIO_WORKLOAD_SECRET)
            });
            if istio {
                Ok(())
            } else {
                err(
                    p,
                    "TLS origination (a DestinationRule tls mode other than ISTIO_MUTUAL) is not supported by nodeway",
                )
            }
        }
        other => err(p, format!("transport socket {other:?} not supported by nodeway")),
    }
}

/// The hosts of a DNS cluster's load assignment, as Envoy validates them: `LOGICAL_DNS` takes
/// exactly one.
fn dns_discovery(c: &cv3::Cluster, mode: DnsMode) -> Result<DnsDiscovery, ConvertError> {
    use cv3::cluster::DnsLookupFamily as F;
    refuse!("", c,
        dns_resolvers => "dnsResolvers",
        dns_resolution_config => "dnsResolutionConfig",
        dns_failure_refresh_rate => "dnsFailureRefreshRate",
    );
    if let Some(r) = &c.typed_dns_resolver_config {
        system_resolver(r)?;
    }
    let family = match F::try_from(c.dns_lookup_family) {
        Ok(F::Auto) => Family::Auto,
        Ok(F::V4Only) => Family::V4Only,
        Ok(F::V6Only) => Family::V6Only,
        Ok(F::V4Preferred) => Family::V4Preferred,
        Ok(F::All) => Family::All,
        Err(_) => return err("dnsLookupFamily", format!("unknown family {}", c.dns_lookup_family)),
    };
    let refresh_rate = match &c.dns_refresh_rate {
        Some(d) => crate::route::convert_duration("dnsRefreshRate", d)?,
        None => super::dns::DEFAULT_REFRESH,
    };
    if refresh_rate < Duration::from_millis(1) {
        return err("dnsRefreshRate", "must be at least 1ms");
    }
    let mut targets = Vec::new();
    let cla = c.load_assignment.clone().unwrap_or_default();
    for (i, lle) in cla.endpoints.iter().enumerate() {
        for (j, le) in lle.lb_endpoints.iter().enumerate() {
            let ep = format!("loadAssignment.endpoints[{i}].lbEndpoints[{j}]");
            let Some(ev3::lb_endpoint::HostIdentifier::Endpoint(e)) = &le.host_identifier else {
                return err(&format!("{ep}.endpoint"), "required");
            };
            let (host, port) = host_port(&format!("{ep}.endpoint.address"), e.address.as_ref())?;
            targets.push(DnsTarget {
                host,
                port,
                weight: le.load_balancing_weight.as_ref().map_or(1, |w| w.value.max(1)),
                priority: lle.priority,
                health: health(&ep, le.health_status)?,
            });
        }
    }
    if mode == DnsMode::Logical && (cla.endpoints.len() != 1 || targets.len() != 1) {
        return err(
            "loadAssignment",
            "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
        );
    }
    Ok(DnsDiscovery {
        mode,
        refresh_rate,
        family,
        targets,
    })
}

/// Istio names c-ares with its tuning (`udpMaxQueries`, ...) and no resolver addresses: the
/// system's resolver configuration, which is what nodeway uses. Own resolver addresses would
/// change the answers: refused.
fn system_resolver(r: &core::TypedExtensionConfig) -> Result<(), ConvertError> {
    use envoy_types::pb::envoy::extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig;
    let p = "typedDnsResolverConfig";
    let Some(any) = r.typed_config.as_ref().filter(|_| r.name == CARES_RESOLVER) else {
        return err(p, format!("DNS resolver {:?} not supported by nodeway", r.name));
    };
    if any.type_url != CARES_TYPE {
        return err(p, format!("expected {CARES_TYPE}, got {}", any.type_url));
    }
    let cares = CaresDnsResolverConfig::decode(any.value.as_slice()).map_err(|e| ConvertError {
        path: p.to_string(),
        reason: format!("undecodable CaresDnsResolverConfig: {e}"),
    })?;
    if !cares.resolvers.is_empty() {
        return Err(unsupported(p, "resolvers"));
    }
    Ok(())
}

fn health(ep: &str, status: i32) -> Result<Health, ConvertError> {
    match core::HealthStatus::try_from(status) {
        Ok(core::HealthStatus::Unknown | core::HealthStatus::Healthy) => Ok(Health::Healthy),
        Ok(core::HealthStatus::Degraded) => Ok(Health::Degraded),
        Ok(_) => Ok(Health::Unhealthy),
        Err(_) => err(&format!("{ep}.healthStatus"), format!("unknown status {status}")),
    }
}

fn host_port(p: &str, a: Option<&core::Address>) -> Result<(String, u16), ConvertError> {
    let Some(core::address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return err(p, "a socketAddress is required");
    };
    if sa.address.is_empty() {
        return err(&format!("{p}.socketAddress.address"), "required");
    }
    match &sa.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(v)) => match u16::try_from(*v) {
            Ok(port) => Ok((sa.address.clone(), port)),
            Err(_) => err(&format!("{p}.socketAddress.portValue"), format!("{v} is not a port")),
        },
        Some(core::socket_address::PortSpecifier::NamedPort(_)) => {
            Err(unsupported(&format!("{p}.socketAddress"), "namedPort"))
        }
        None => err(&format!("{p}.socketAddress.portValue"), "required"),
    }
}

/// What `istioctl proxy-config endpoint -o json` prints for a cluster: Envoy's admin
/// `ClusterStatus` (`/clusters?format=json`), its `hostStatuses` being the endpoints as Envoy
/// last saw them. Read as the cluster's assignment (Istio names it after the cluster): address,
/// weight, priority and the EDS health status; runtime state (stats, outlier ejections, success
/// rates) is Envoy's and starts afresh here.
pub fn cluster_status(cs: &envoy_types::pb::envoy::admin::v3::ClusterStatus) -> Result<LoadAssignment, ConvertError> {
    let mut by_priority: std::collections::BTreeMap<u32, Vec<ev3::LbEndpoint>> = Default::default();
    for (i, h) in cs.host_statuses.iter().enumerate() {
        let address = socket_address(&format!("hostStatuses[{i}].address"), h.address.as_ref())?;
        by_priority.entry(h.priority).or_default().push(ev3::LbEndpoint {
            host_identifier: Some(ev3::lb_endpoint::HostIdentifier::Endpoint(ev3::Endpoint {
                address: Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                        address: address.ip().to_string(),
                        port_specifier: Some(core::socket_address::PortSpecifier::PortValue(address.port().into())),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            health_status: h.health_status.as_ref().map_or(0, |s| s.eds_health_status),
            load_balancing_weight: Some(envoy_types::pb::google::protobuf::UInt32Value { value: h.weight.max(1) }),
            ..Default::default()
        });
    }
    // An EDS cluster's assignment is named by its EDS service name (Istio: the same name).
    let name = if cs.eds_service_name.is_empty() {
        &cs.name
    } else {
        &cs.eds_service_name
    };
    let cla = ev3::ClusterLoadAssignment {
        cluster_name: name.clone(),
        endpoints: by_priority
            .into_iter()
            .map(|(priority, lb_endpoints)| ev3::LocalityLbEndpoints {
                priority,
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    load_assignment(&cla)
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
            // `metadata` (Istio: the pod's labels, `tlsMode`, workload name) only feeds Envoy's
            // subset LB and telemetry; nodeway takes both from the cluster name and workloads.
            let health = health(&ep, le.health_status)?;
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
