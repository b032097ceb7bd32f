//! `Listener` → [`Listener`]. Only Istio's outbound listeners are compiled (`virtualOutbound`,
//! inbound listeners and internal listeners such as `connect_originate` are not outbound
//! routing and are skipped). What only feeds Envoy's own plumbing is ignored: listener filters
//! that detect protocols (nodeway sniffs itself), access logs, stats prefixes, timeouts of
//! listener filters, metadata, `bindToPort`, Istio's metadata-exchange, stats and ALPN filters,
//! the HTTP connection manager's own settings. What would change behaviour and is not
//! implemented is refused by field path, as for routes and clusters.
// `useProxyProto` is deprecated, and refused when set.
#![allow(deprecated)]

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::{
    config::{
        core::v3::{self as core, address, socket_address, TrafficDirection},
        listener::v3 as lv3,
    },
    extensions::filters::network::{
        http_connection_manager::v3::{http_connection_manager::RouteSpecifier, HttpConnectionManager},
        tcp_proxy::v3::{tcp_proxy::ClusterSpecifier, TcpProxy},
    },
};
use prost::Message;

use super::{Chain, ChainAction, ChainMatch, Listener, OutboundPorts, TcpRoute, WeightedCluster};
use crate::{
    authz::Cidr,
    route::convert::{err, refuse, unsupported},
    route::ConvertError,
};

const HCM: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const TCP_PROXY_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
/// Network filters before the terminal one that only exchange peer metadata or count stats.
const IGNORED_NETWORK_FILTERS: &[&str] = &["istio.metadata_exchange", "istio.stats"];
/// Listener filters that detect the protocol or the original destination: nodeway does both.
const IGNORED_LISTENER_FILTERS: &[&str] = &[
    "envoy.filters.listener.http_inspector",
    "envoy.filters.listener.tls_inspector",
    "envoy.filters.listener.original_dst",
];
/// HTTP filters of Istio's outbound connection manager: metadata exchange, stats and ALPN are
/// Envoy plumbing; fault and CORS take their config per route (the route converter applies
/// faults and refuses CORS policies); the router is nodeway's router.
const KNOWN_HTTP_FILTERS: &[&str] = &[
    "istio.metadata_exchange",
    "istio.stats",
    "istio.alpn",
    "envoy.filters.http.grpc_stats",
    "envoy.filters.http.fault",
    "envoy.filters.http.cors",
    "envoy.filters.http.router",
];
/// The application protocols Envoy's HTTP inspector reports for plaintext HTTP.
const SNIFFED_HTTP: &[&str] = &["http/1.0", "http/1.1", "h2c"];

/// Why a listener was refused: which one and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("listeners[{index}] ({name:?}): {error}")]
pub struct ListenerError {
    pub index: usize,
    pub name: String,
    pub error: ConvertError,
}

/// Compiles `listeners` into the outbound table; the first refusal names its listener.
pub fn outbound_ports<'a>(
    listeners: impl IntoIterator<Item = &'a lv3::Listener>,
) -> Result<OutboundPorts, ListenerError> {
    let mut out = OutboundPorts::default();
    for (index, l) in listeners.into_iter().enumerate() {
        let fail = |error| ListenerError {
            index,
            name: l.name.clone(),
            error,
        };
        let Some(compiled) = listener(l).map_err(fail)? else {
            continue;
        };
        out.insert(compiled).map_err(|reason| {
            fail(ConvertError {
                path: "address".into(),
                reason,
            })
        })?;
    }
    Ok(out)
}

/// One listener; `Ok(None)`: not an outbound listener (see the module docs).
pub fn listener(l: &lv3::Listener) -> Result<Option<Listener>, ConvertError> {
    let internal = matches!(
        l.listener_specifier,
        Some(lv3::listener::ListenerSpecifier::InternalListener(_))
    );
    let catch_all = l.use_original_dst.as_ref().is_some_and(|b| b.value);
    if internal || catch_all || l.traffic_direction == TrafficDirection::Inbound as i32 {
        return Ok(None);
    }
    if l.name.is_empty() {
        return err("name", "a Listener needs a name");
    }
    let p = "";
    refuse!(p, l,
        filter_chain_matcher => "filterChainMatcher",
        fcds_config => "fcdsConfig",
        api_listener => "apiListener",
        udp_listener_config => "udpListenerConfig",
    );
    for (i, f) in l.listener_filters.iter().enumerate() {
        if !IGNORED_LISTENER_FILTERS.contains(&f.name.as_str()) {
            return err(
                &format!("listenerFilters[{i}]"),
                format!("listener filter {:?} not supported by nodeway", f.name),
            );
        }
    }
    let mut addresses = vec![socket_address("address", l.address.as_ref())?];
    for (i, a) in l.additional_addresses.iter().enumerate() {
        addresses.push(socket_address(
            &format!("additionalAddresses[{i}].address"),
            a.address.as_ref(),
        )?);
    }
    let mut chains = Vec::with_capacity(l.filter_chains.len());
    for (i, fc) in l.filter_chains.iter().enumerate() {
        chains.push(chain(&format!("filterChains[{i}]"), fc)?);
    }
    let default_chain = match &l.default_filter_chain {
        Some(fc) => Some(chain("defaultFilterChain", fc)?),
        None => None,
    };
    Ok(Some(Listener {
        name: l.name.clone(),
        addresses,
        chains,
        default_chain,
    }))
}

fn socket_address(p: &str, a: Option<&core::Address>) -> Result<SocketAddr, ConvertError> {
    let Some(core::Address {
        address: Some(address::Address::SocketAddress(sa)),
    }) = a
    else {
        return err(p, "an outbound listener needs a socket address");
    };
    if sa.protocol != socket_address::Protocol::Tcp as i32 {
        return Err(unsupported(p, "protocol"));
    }
    let ip: IpAddr = sa.address.parse().map_err(|_| ConvertError {
        path: format!("{p}.address"),
        reason: format!("{:?} is not an IP address", sa.address),
    })?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(v)) => u16::try_from(v).map_err(|_| ConvertError {
            path: format!("{p}.portValue"),
            reason: format!("{v} is not a port"),
        })?,
        Some(socket_address::PortSpecifier::NamedPort(_)) => return Err(unsupported(p, "namedPort")),
        None => return err(&format!("{p}.portValue"), "an outbound listener needs a port"),
    };
    Ok(SocketAddr::new(ip, port))
}

fn chain(p: &str, fc: &lv3::FilterChain) -> Result<Chain, ConvertError> {
    refuse!(p, fc,
        transport_socket => "transportSocket",
        use_proxy_proto => "useProxyProto",
    );
    let matcher = match &fc.filter_chain_match {
        Some(m) => chain_match(&format!("{p}.filterChainMatch"), m)?,
        None => ChainMatch::default(),
    };
    let action = action(p, &fc.filters)?;
    if !matcher.application_protocols.is_empty() && !matches!(action, ChainAction::Http { .. }) {
        return err(
            &format!("{p}.filterChainMatch.applicationProtocols"),
            "only a chain with an HTTP connection manager may match on application protocols",
        );
    }
    Ok(Chain {
        name: fc.name.clone(),
        matcher,
        action,
    })
}

fn chain_match(p: &str, m: &lv3::FilterChainMatch) -> Result<ChainMatch, ConvertError> {
    refuse!(p, m,
        address_suffix => "addressSuffix",
        suffix_len => "suffixLen",
        direct_source_prefix_ranges => "directSourcePrefixRanges",
        source_type => "sourceType",
        source_prefix_ranges => "sourcePrefixRanges",
        source_ports => "sourcePorts",
        server_names => "serverNames",
    );
    let raw_buffer = match m.transport_protocol.as_str() {
        "" => false,
        "raw_buffer" => true,
        other => {
            return err(
                &format!("{p}.transportProtocol"),
                format!("{other:?} not supported by nodeway (no TLS inspection: every connection is raw_buffer)"),
            )
        }
    };
    let apps = &m.application_protocols;
    let sniffed_http = apps.iter().all(|a| SNIFFED_HTTP.contains(&a.as_str()))
        && ["http/1.1", "h2c"].iter().all(|want| apps.iter().any(|a| a == want));
    if !apps.is_empty() && !sniffed_http {
        return err(
            &format!("{p}.applicationProtocols"),
            format!("{apps:?}: only the sniffed-HTTP set (http/1.1 and h2c) is supported by nodeway"),
        );
    }
    let destination_port = match &m.destination_port {
        Some(v) => Some(u16::try_from(v.value).map_err(|_| ConvertError {
            path: format!("{p}.destinationPort"),
            reason: format!("{} is not a port", v.value),
        })?),
        None => None,
    };
    let mut prefix_ranges = Vec::with_capacity(m.prefix_ranges.len());
    for (i, r) in m.prefix_ranges.iter().enumerate() {
        prefix_ranges.push(cidr(&format!("{p}.prefixRanges[{i}]"), r)?);
    }
    Ok(ChainMatch {
        destination_port,
        prefix_ranges,
        raw_buffer,
        application_protocols: apps.clone(),
    })
}

fn cidr(p: &str, r: &core::CidrRange) -> Result<Cidr, ConvertError> {
    let addr: IpAddr = r.address_prefix.parse().map_err(|_| ConvertError {
        path: format!("{p}.addressPrefix"),
        reason: format!("{:?} is not an IP address", r.address_prefix),
    })?;
    let full = if addr.is_ipv4() { 32 } else { 128 };
    let len = r.prefix_len.as_ref().map_or(full, |l| l.value);
    let len = u8::try_from(len)
        .ok()
        .filter(|l| u32::from(*l) <= full)
        .ok_or_else(|| ConvertError {
            path: format!("{p}.prefixLen"),
            reason: format!("{len} is longer than the address"),
        })?;
    Ok(Cidr { addr, len })
}

/// The chain's terminal filter (last): an HTTP connection manager or `tcp_proxy`; the filters
/// before it must be ones that only observe.
fn action(p: &str, filters: &[lv3::Filter]) -> Result<ChainAction, ConvertError> {
    let Some((last, before)) = filters.split_last() else {
        return err(&format!("{p}.filters"), "a filter chain needs a terminal filter");
    };
    for (i, f) in before.iter().enumerate() {
        if !IGNORED_NETWORK_FILTERS.contains(&f.name.as_str()) {
            return err(
                &format!("{p}.filters[{i}]"),
                format!("network filter {:?} not supported by nodeway", f.name),
            );
        }
    }
    let at = format!("{p}.filters[{}]", before.len());
    let any = match &last.config_type {
        Some(lv3::filter::ConfigType::TypedConfig(any)) => any,
        Some(lv3::filter::ConfigType::ConfigDiscovery(_)) => return Err(unsupported(&at, "configDiscovery")),
        None => return err(&format!("{at}.typedConfig"), "the terminal filter needs its config"),
    };
    let decode_failed = |e: prost::DecodeError| ConvertError {
        path: format!("{at}.typedConfig"),
        reason: e.to_string(),
    };
    match (last.name.as_str(), any.type_url.as_str()) {
        (HCM, HCM_TYPE) => http(
            &format!("{at}.typedConfig"),
            &HttpConnectionManager::decode(&*any.value).map_err(decode_failed)?,
        ),
        (TCP_PROXY, TCP_PROXY_TYPE) => tcp(
            &format!("{at}.typedConfig"),
            &TcpProxy::decode(&*any.value).map_err(decode_failed)?,
        ),
        (name, _) => err(
            &at,
            format!("terminal filter {name:?} not supported by nodeway (only {HCM} and {TCP_PROXY})"),
        ),
    }
}

fn http(p: &str, hcm: &HttpConnectionManager) -> Result<ChainAction, ConvertError> {
    for (i, f) in hcm.http_filters.iter().enumerate() {
        if !KNOWN_HTTP_FILTERS.contains(&f.name.as_str()) && !f.disabled {
            return err(
                &format!("{p}.httpFilters[{i}]"),
                format!("HTTP filter {:?} not supported by nodeway", f.name),
            );
        }
    }
    match &hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) if !rds.route_config_name.is_empty() => Ok(ChainAction::Http {
            route_config: rds.route_config_name.clone(),
        }),
        Some(RouteSpecifier::Rds(_)) => err(&format!("{p}.rds.routeConfigName"), "empty"),
        Some(RouteSpecifier::RouteConfig(_)) => err(
            &format!("{p}.routeConfig"),
            "an inline route table is not supported by nodeway: name it in rds and give it in routes",
        ),
        Some(RouteSpecifier::ScopedRoutes(_)) => Err(unsupported(p, "scopedRoutes")),
        None => err(&format!("{p}.rds"), "an HTTP connection manager needs its routes (rds)"),
    }
}

fn tcp(p: &str, t: &TcpProxy) -> Result<ChainAction, ConvertError> {
    refuse!(p, t,
        on_demand => "onDemand",
        metadata_match => "metadataMatch",
        hash_policy => "hashPolicy",
        tunneling_config => "tunnelingConfig",
        max_downstream_connection_duration => "maxDownstreamConnectionDuration",
        proxy_protocol_tlvs => "proxyProtocolTlvs",
        upstream_connect_mode => "upstreamConnectMode",
        max_early_data_bytes => "maxEarlyDataBytes",
    );
    if t.max_connect_attempts.as_ref().is_some_and(|n| n.value > 1) {
        return err(
            &format!("{p}.maxConnectAttempts"),
            "more than one connect attempt is not supported by nodeway",
        );
    }
    let clusters = match &t.cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) if !name.is_empty() => vec![WeightedCluster {
            name: name.clone(),
            weight: 1,
        }],
        Some(ClusterSpecifier::WeightedClusters(w)) => weighted(&format!("{p}.weightedClusters"), w)?,
        _ => return err(&format!("{p}.cluster"), "tcp_proxy needs cluster or weightedClusters"),
    };
    Ok(ChainAction::Tcp(TcpRoute { clusters }))
}

fn weighted(
    p: &str,
    w: &envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::WeightedCluster,
) -> Result<Vec<WeightedCluster>, ConvertError> {
    let mut out = Vec::with_capacity(w.clusters.len());
    for (i, c) in w.clusters.iter().enumerate() {
        let at = format!("{p}.clusters[{i}]");
        refuse!(&at, c, metadata_match => "metadataMatch");
        if c.name.is_empty() {
            return err(&format!("{at}.name"), "empty");
        }
        out.push(WeightedCluster {
            name: c.name.clone(),
            weight: c.weight,
        });
    }
    if out.iter().all(|c| c.weight == 0) {
        return err(&format!("{p}.clusters"), "the weights must not all be 0");
    }
    Ok(out)
}
