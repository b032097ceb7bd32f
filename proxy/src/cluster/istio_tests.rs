//! Clusters as istiod generates them for a sidecar (the shapes of `istioctl proxy-config
//! clusters -o json`): each Istio-specific part is accepted with its meaning, or refused by name
//! when it would change behaviour and nodeway does not implement it.
use serde_json::{json, Value};

use super::{dns::DnsMode, *};
use crate::envoy_json::from_json;

fn convert(v: Value) -> Result<Cluster, ConvertError> {
    let c: envoy_types::pb::envoy::config::cluster::v3::Cluster = from_json(&v).expect("protobuf-JSON");
    cluster(&c)
}

fn sds(name: &str) -> Value {
    json!({"name": name, "sdsConfig": {"apiConfigSource": {"apiType": "GRPC", "transportApiVersion": "V3",
        "grpcServices": [{"envoyGrpc": {"clusterName": "sds-grpc"}}], "setNodeOnFirstMessageOnly": true},
        "initialFetchTimeout": "0s", "resourceApiVersion": "V3"}})
}

/// Istio's mTLS socket (`tlsMode: istio`), with its SDS secrets `default` and `ROOTCA`.
fn istio_mtls(sni: &str) -> Value {
    json!({"name": "envoy.transport_sockets.tls", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "commonTlsContext": {
            "tlsParams": {"tlsMinimumProtocolVersion": "TLSv1_2", "tlsMaximumProtocolVersion": "TLSv1_3"},
            "alpnProtocols": ["istio-peer-exchange", "istio"],
            "tlsCertificateSdsSecretConfigs": [sds("default")],
            "combinedValidationContext": {
                "defaultValidationContext": {"matchSubjectAltNames": [{"exact": "spiffe://cluster.local/ns/demo/sa/reviews"}]},
                "validationContextSdsSecretConfig": sds("ROOTCA")
            }
        },
        "sni": sni
    }})
}

/// An outbound subset cluster of a DestinationRule with `connectionPool` and
/// `outlierDetection`, as istiod sends it.
fn subset_cluster() -> Value {
    let name = "outbound|8080|v1|reviews.demo.svc.cluster.local";
    json!({
        "name": name,
        "type": "EDS",
        "edsClusterConfig": {"edsConfig": {"ads": {}, "initialFetchTimeout": "0s", "resourceApiVersion": "V3"}, "serviceName": name},
        "connectTimeout": "10s",
        "lbPolicy": "LEAST_REQUEST",
        "circuitBreakers": {"thresholds": [{"maxConnections": 1, "maxPendingRequests": 1,
            "maxRequests": 4294967295u32, "maxRetries": 4294967295u32, "trackRemaining": true}]},
        "outlierDetection": {"consecutive5xx": 3, "interval": "5s", "baseEjectionTime": "30s",
            "maxEjectionPercent": 100, "enforcingConsecutive5xx": 100, "enforcingSuccessRate": 0,
            "consecutiveGatewayFailure": 0, "enforcingConsecutiveGatewayFailure": 0},
        "commonLbConfig": {},
        "typedExtensionProtocolOptions": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "commonHttpProtocolOptions": {"maxRequestsPerConnection": 1},
            "useDownstreamProtocolConfig": {"httpProtocolOptions": {}, "http2ProtocolOptions": {}}}},
        "metadata": {"filterMetadata": {"istio": {
            "config": "/apis/networking.istio.io/v1/namespaces/demo/destination-rule/reviews",
            "services": [{"host": "reviews.demo.svc.cluster.local", "name": "reviews", "namespace": "demo"}],
            "subset": "v1"}}},
        "filters": [{"name": "istio.metadata_exchange", "typedConfig": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "typeUrl": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
            "value": {"protocol": "istio-peer-exchange", "enable_discovery": true}}}],
        "transportSocketMatches": [
            {"name": "hbone", "match": {"tunnel": "http"}, "transportSocket": {
                "name": "envoy.transport_sockets.internal_upstream", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
                "passthroughMetadata": [{"kind": {"host": {}}, "name": "tunnel"}, {"kind": {"host": {}}, "name": "istio"}],
                "transportSocket": {"name": "envoy.transport_sockets.raw_buffer", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}}},
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
             "transportSocket": istio_mtls("outbound_.8080_.v1_.reviews.demo.svc.cluster.local")},
            {"name": "tlsMode-disabled", "match": {}, "transportSocket": {"name": "envoy.transport_sockets.raw_buffer",
             "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}
        ]
    })
}

#[test]
fn istio_subset_cluster_is_accepted_with_its_policy() {
    let c = convert(subset_cluster()).expect("accepted");
    assert_eq!(c.eds_name(), Some("outbound|8080|v1|reviews.demo.svc.cluster.local"));
    assert_eq!(c.limits.max_connections, 1);
    assert_eq!(c.limits.max_pending_requests, 1);
    assert_eq!(c.limits.max_requests_per_connection, 1);
    let od = c.outlier_detection.expect("outlier detection");
    assert_eq!(od.consecutive_5xx, 3);
    assert_eq!(od.enforcing_consecutive_5xx, 100);
    assert_eq!(od.enforcing_consecutive_gateway_failure, 0);
    assert_eq!(od.interval, Duration::from_secs(5));
    assert_eq!(od.max_ejection_percent, 100);
    assert_eq!(c.istio_config.as_deref(), Some("reviews.demo"));
}

#[test]
fn success_rate_and_failure_percentage_detectors_are_refused_unless_off() {
    for (field, json_name) in [
        ("enforcingSuccessRate", "outlierDetection.enforcingSuccessRate"),
        (
            "enforcingFailurePercentage",
            "outlierDetection.enforcingFailurePercentage",
        ),
    ] {
        let mut v = subset_cluster();
        v["outlierDetection"][field] = json!(50);
        let e = convert(v).expect_err("not implemented");
        assert_eq!(e.path, json_name);
        assert!(e.reason.contains("not implemented"), "{e}");
    }
    let mut v = subset_cluster();
    // A threshold with its detector off changes nothing.
    v["outlierDetection"]["failurePercentageThreshold"] = json!(85);
    v["outlierDetection"]["enforcingFailurePercentage"] = json!(0);
    convert(v).expect("detector off");
}

#[test]
fn other_upstream_filters_and_tls_origination_are_refused_by_name() {
    let mut v = subset_cluster();
    v["filters"][0]["name"] = json!("envoy.filters.network.rbac");
    let e = convert(v).expect_err("unknown filter");
    assert_eq!(e.path, "filters[0]");
    let mut v = subset_cluster();
    // A DestinationRule `tls: SIMPLE` to an external host: TLS with the system's roots.
    v["transportSocket"] = json!({"name": "envoy.transport_sockets.tls", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "commonTlsContext": {"validationContext": {"trustedCa": {"filename": "/etc/ssl/certs/ca-certificates.crt"}}},
        "sni": "api.example.com"}});
    let e = convert(v).expect_err("origination");
    assert_eq!(e.path, "transportSocket");
    // An explicit ISTIO_MUTUAL socket is Istio's mTLS, which HBONE replaces.
    let mut v = subset_cluster();
    v["transportSocket"] = istio_mtls("outbound_.8080_.v1_.reviews.demo.svc.cluster.local");
    convert(v).expect("ISTIO_MUTUAL");
}

#[test]
fn passthrough_blackhole_and_inbound_passthrough() {
    let passthrough = convert(json!({
        "name": "PassthroughCluster", "type": "ORIGINAL_DST", "connectTimeout": "10s",
        "lbPolicy": "CLUSTER_PROVIDED",
        "circuitBreakers": {"thresholds": [{"maxConnections": 4294967295u32, "maxPendingRequests": 4294967295u32,
            "maxRequests": 4294967295u32, "maxRetries": 4294967295u32, "trackRemaining": true}]},
        "typedExtensionProtocolOptions": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "commonHttpProtocolOptions": {"idleTimeout": "3600s"},
            "useDownstreamProtocolConfig": {"httpProtocolOptions": {}, "http2ProtocolOptions": {}}}},
        "filters": [{"name": "istio.metadata_exchange", "typedConfig": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "typeUrl": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
            "value": {"protocol": "istio-peer-exchange"}}}]
    }))
    .expect("ALLOW_ANY");
    assert_eq!(passthrough.discovery, Discovery::OriginalDst);

    let blackhole =
        convert(json!({"name": "BlackHoleCluster", "type": "STATIC", "connectTimeout": "10s"})).expect("REGISTRY_ONLY");
    let endpoints = blackhole.load_assignment.as_ref().map_or(0, |a| a.endpoints.len());
    assert_eq!(
        (&blackhole.discovery, endpoints),
        (&Discovery::Static, 0),
        "nothing to connect to: refused"
    );

    let inbound = json!({
        "name": "InboundPassthroughCluster", "type": "ORIGINAL_DST", "connectTimeout": "10s",
        "lbPolicy": "CLUSTER_PROVIDED",
        "upstreamBindConfig": {"sourceAddress": {"address": "127.0.0.6", "portValue": 0}},
        "typedExtensionProtocolOptions": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "useDownstreamProtocolConfig": {"httpProtocolOptions": {}, "http2ProtocolOptions": {}}}}
    });
    assert_eq!(
        convert(inbound.clone()).expect("inbound passthrough").discovery,
        Discovery::OriginalDst
    );
    let mut inbound_port = inbound.clone();
    inbound_port["name"] = json!("inbound|9080||");
    inbound_port["type"] = json!("STATIC");
    inbound_port["lbPolicy"] = json!("ROUND_ROBIN");
    convert(inbound_port).expect("Istio's inbound clusters bind to 127.0.0.6 too");
    let mut other = inbound;
    other["upstreamBindConfig"]["sourceAddress"]["address"] = json!("198.18.0.9");
    assert_eq!(
        convert(other).expect_err("a real source address").path,
        "upstreamBindConfig"
    );
}

/// A `ServiceEntry` with `resolution: DNS` (STRICT_DNS) and one with a single endpoint and
/// `DNS_ROUND_ROBIN` (LOGICAL_DNS).
fn dns_cluster(kind: &str, hosts: &[&str]) -> Value {
    let eps: Vec<Value> = hosts
        .iter()
        .map(|h| {
            json!({"endpoint": {"address": {"socketAddress": {"address": h, "portValue": 443}}},
            "metadata": {"filterMetadata": {"istio": {"workload": ";;;;"}}},
            "loadBalancingWeight": 1})
        })
        .collect();
    json!({
        "name": "outbound|443||api.example.com", "type": kind, "connectTimeout": "10s",
        "lbPolicy": "LEAST_REQUEST", "dnsRefreshRate": "60s", "respectDnsTtl": true,
        "dnsLookupFamily": "V4_ONLY", "dnsJitter": "0.100s",
        "typedDnsResolverConfig": {"name": "envoy.network.dns_resolver.cares", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "udpMaxQueries": 100}},
        "loadAssignment": {"clusterName": "outbound|443||api.example.com",
            "endpoints": [{"locality": {}, "lbEndpoints": eps, "loadBalancingWeight": 1}]},
        "metadata": {"filterMetadata": {"istio": {"services": [{"host": "api.example.com", "name": "api.example.com", "namespace": "demo"}]}}}
    })
}

#[test]
fn dns_clusters_resolve_their_hosts() {
    let c = convert(dns_cluster("STRICT_DNS", &["api.example.com", "api2.example.com"])).expect("STRICT_DNS");
    let Discovery::Dns(d) = &c.discovery else {
        panic!("{:?}", c.discovery)
    };
    assert_eq!(d.mode, DnsMode::Strict);
    assert_eq!(d.refresh_rate, Duration::from_secs(60));
    let hosts: Vec<(&str, u16)> = d.targets.iter().map(|t| (t.host.as_str(), t.port)).collect();
    assert_eq!(hosts, [("api.example.com", 443), ("api2.example.com", 443)]);
    assert!(c.load_assignment.is_none(), "hosts are targets, not endpoints");

    let c = convert(dns_cluster("LOGICAL_DNS", &["api.example.com"])).expect("LOGICAL_DNS");
    assert!(matches!(&c.discovery, Discovery::Dns(d) if d.mode == DnsMode::Logical));
    let e = convert(dns_cluster("LOGICAL_DNS", &["a.example.com", "b.example.com"])).expect_err("two hosts");
    assert_eq!(e.path, "loadAssignment");
    let mut own = dns_cluster("STRICT_DNS", &["api.example.com"]);
    own["typedDnsResolverConfig"]["typedConfig"]["resolvers"] =
        json!([{"socketAddress": {"address": "198.18.0.53", "portValue": 53}}]);
    assert_eq!(
        convert(own).expect_err("own resolvers").path,
        "typedDnsResolverConfig.resolvers"
    );
}

#[test]
fn endpoint_metadata_is_accepted() {
    let cla: envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment = from_json(&json!({
        "clusterName": "outbound|8080|v1|reviews.demo.svc.cluster.local",
        "endpoints": [{"locality": {}, "lbEndpoints": [{
            "endpoint": {"address": {"socketAddress": {"address": "198.18.1.10", "portValue": 8080}}},
            "healthStatus": "HEALTHY",
            "metadata": {"filterMetadata": {
                "envoy.transport_socket_match": {"tlsMode": "istio"},
                "istio": {"workload": "reviews-v1;demo;reviews;v1;Kubernetes"}}},
            "loadBalancingWeight": 1}], "loadBalancingWeight": 1}]
    }))
    .expect("protobuf-JSON");
    let a = load_assignment(&cla).expect("accepted");
    assert_eq!(a.endpoints[0].address.to_string(), "198.18.1.10:8080");
}
