use envoy_types::pb::envoy::config::listener::v3 as lv3;
use serde_json::{json, Value};

use super::*;
use crate::envoy_json::from_json;

/// The listeners a real istiod (1.28, `tests/tests/sidecar_xds.rs`'s mesh) sent the sidecar of
/// `productpage`: HTTP ports 80 and 9080 (sniffed, `PassthroughCluster` otherwise), the
/// kubernetes service's 443 and `tcp-echo`'s 9000 as TCP (80/20 by a `tcp:` VirtualService),
/// `virtualOutbound`, `virtualInbound` and `connect_originate`.
fn istiod_listeners() -> Vec<lv3::Listener> {
    let text = include_str!("testdata/istiod-sidecar-listeners.json");
    let items: Vec<Value> = serde_json::from_str(text).expect("JSON");
    items.iter().map(|v| from_json(v).expect("a Listener")).collect()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn tcp(clusters: &[(&str, u32)]) -> ChainAction {
    ChainAction::Tcp(TcpRoute {
        clusters: clusters
            .iter()
            .map(|(name, weight)| WeightedCluster {
                name: name.to_string(),
                weight: *weight,
            })
            .collect(),
    })
}

fn select<'a>(t: &'a OutboundPorts, dst: &str) -> Option<Selection<'a>> {
    t.listener(addr(dst)).map(|l| l.select(addr(dst)))
}

#[test]
fn istiods_outbound_listeners_say_which_ports_are_http_and_which_tcp_routes() {
    let t = outbound_ports(&istiod_listeners()).expect("a real sidecar's listeners are accepted");
    let names: Vec<&str> = t.listeners.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["0.0.0.0_80", "0.0.0.0_9080", "198.19.240.1_443", "198.19.245.154_9000"],
        "virtualOutbound, virtualInbound and connect_originate are not outbound routing"
    );
    // The `tcp:` VirtualService: 80/20 to the subsets, whatever the bytes.
    let weighted = tcp(&[
        ("outbound|9000|v1|tcp-echo.demo.svc.cluster.local", 80),
        ("outbound|9000|v2|tcp-echo.demo.svc.cluster.local", 20),
    ]);
    assert_eq!(select(&t, "198.19.245.154:9000"), Some(Selection::Always(&weighted)));
    // A declared HTTP port: HTTP to route table "9080", other bytes to PassthroughCluster, on
    // any address (the listener is 0.0.0.0's).
    let passthrough = tcp(&[("PassthroughCluster", 1)]);
    for dst in ["198.19.1.2:9080", "198.18.77.11:9080"] {
        assert_eq!(
            select(&t, dst),
            Some(Selection::Sniff {
                http: "9080",
                other: Some(&passthrough)
            })
        );
    }
    assert_eq!(
        select(&t, "198.19.240.1:443"),
        Some(Selection::Always(&tcp(&[(
            "outbound|443||kubernetes.default.svc.cluster.local",
            1
        )])))
    );
    // No listener: the catch-all decides (the mesh's own L4 decision).
    assert_eq!(select(&t, "198.19.245.154:9001"), None);
    assert_eq!(select(&t, "198.19.245.155:9000"), None);
    assert_eq!(select(&t, "[fd00::1]:9080"), None, "no [::] listener");
}

fn listener(chains: Value, default: Option<Value>) -> lv3::Listener {
    let mut l = json!({
        "name": "0.0.0.0_8000",
        "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 8000}},
        "additionalAddresses": [{"address": {"socketAddress": {"address": "::", "portValue": 8000}}}],
        "trafficDirection": "OUTBOUND",
        "bindToPort": false,
        "filterChains": chains
    });
    if let Some(d) = default {
        l["defaultFilterChain"] = d;
    }
    from_json(&l).expect("a Listener")
}

fn tcp_chain(name: &str, cluster: &str, matcher: Value) -> Value {
    json!({"name": name, "filterChainMatch": matcher, "filters": [
        {"name": "istio.metadata_exchange", "typedConfig": {"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "typeUrl": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange", "value": {"protocol": "istio-peer-exchange"}}},
        {"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "statPrefix": cluster, "cluster": cluster}}]})
}

fn http_chain(route: &str, matcher: Value) -> Value {
    json!({"filterChainMatch": matcher, "filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "statPrefix": "outbound", "rds": {"configSource": {"ads": {}}, "routeConfigName": route},
        "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]})
}

fn chain_name(l: &Listener, dst: &str, alpn: Option<&str>) -> Option<String> {
    l.chain(addr(dst), alpn).map(|c| c.name.clone())
}

#[test]
fn filter_chains_match_as_in_envoy_most_specific_first_without_backtracking() {
    // Headless services sharing a port: chains by the destination's address, the longest
    // prefix first; a port-specific chain beats them all; nothing matching: the default.
    let l = listener(
        json!([
            tcp_chain(
                "wide",
                "outbound|8000||wide",
                json!({"prefixRanges": [{"addressPrefix": "198.18.0.0", "prefixLen": 16}]})
            ),
            tcp_chain(
                "narrow",
                "outbound|8000||narrow",
                json!({"prefixRanges": [{"addressPrefix": "198.18.5.0", "prefixLen": 24}]})
            ),
            tcp_chain(
                "one",
                "outbound|8000||one",
                json!({"prefixRanges": [{"addressPrefix": "198.18.5.7"}]})
            ),
            http_chain(
                "8000",
                json!({"prefixRanges": [{"addressPrefix": "198.18.9.0", "prefixLen": 24}], "applicationProtocols": ["http/1.1", "h2c"]})
            ),
            tcp_chain(
                "v6",
                "outbound|8000||v6",
                json!({"prefixRanges": [{"addressPrefix": "fd00::", "prefixLen": 8}]})
            ),
        ]),
        Some(tcp_chain("PassthroughFilterChain", "PassthroughCluster", json!({}))),
    );
    let l = super::listener(&l).expect("accepted").expect("outbound");
    assert_eq!(l.addresses, [addr("0.0.0.0:8000"), addr("[::]:8000")]);
    assert_eq!(chain_name(&l, "198.18.5.7:8000", None).as_deref(), Some("one"));
    assert_eq!(chain_name(&l, "198.18.5.8:8000", None).as_deref(), Some("narrow"));
    assert_eq!(chain_name(&l, "198.18.6.1:8000", None).as_deref(), Some("wide"));
    assert_eq!(chain_name(&l, "[fd00::5]:8000", None).as_deref(), Some("v6"));
    assert_eq!(
        chain_name(&l, "10.0.0.1:8000", None).as_deref(),
        Some("PassthroughFilterChain")
    );
    // 198.18.9.0/24 only has the HTTP chain: non-HTTP bytes do not fall back to the /16 one
    // (Envoy narrows per criterion and never backtracks), they take the default chain.
    let http = l.chain(addr("198.18.9.1:8000"), Some("h2c")).map(|c| c.action.clone());
    assert_eq!(
        http,
        Some(ChainAction::Http {
            route_config: "8000".into()
        })
    );
    assert_eq!(
        chain_name(&l, "198.18.9.1:8000", None).as_deref(),
        Some("PassthroughFilterChain")
    );

    // Destination port beats address; no default chain and nothing matching: no chain.
    let l = listener(
        json!([
            tcp_chain("port", "outbound|8000||port", json!({"destinationPort": 8000})),
            tcp_chain(
                "other-port",
                "outbound|8001||x",
                json!({"destinationPort": 8001, "prefixRanges": [{"addressPrefix": "198.18.5.7"}]})
            ),
            tcp_chain(
                "addr",
                "outbound|8000||addr",
                json!({"prefixRanges": [{"addressPrefix": "198.18.5.7"}]})
            ),
        ]),
        None,
    );
    let l = super::listener(&l).expect("accepted").expect("outbound");
    assert_eq!(chain_name(&l, "198.18.5.7:8000", None).as_deref(), Some("port"));
    assert_eq!(chain_name(&l, "198.18.5.7:8002", None).as_deref(), Some("addr"));
    assert_eq!(chain_name(&l, "198.18.5.8:8002", None), None);
    assert_eq!(l.select(addr("198.18.5.8:8002")), Selection::None);
}

#[test]
fn a_sniffed_port_without_a_tcp_chain_refuses_other_bytes() {
    let l = listener(
        json!([http_chain(
            "8000",
            json!({"applicationProtocols": ["http/1.1", "h2c"], "transportProtocol": "raw_buffer"})
        )]),
        None,
    );
    let l = super::listener(&l).expect("accepted").expect("outbound");
    assert_eq!(
        l.select(addr("198.19.0.1:8000")),
        Selection::Sniff {
            http: "8000",
            other: None
        }
    );
    // A chain without application protocols is HTTP whatever the bytes (a declared port).
    let l = listener(json!([http_chain("8000", json!({}))]), None);
    let l = super::listener(&l).expect("accepted").expect("outbound");
    assert_eq!(
        l.select(addr("198.19.0.1:8000")),
        Selection::Always(&ChainAction::Http {
            route_config: "8000".into()
        })
    );
}

#[test]
fn weighted_clusters_split_by_weight() {
    let t = TcpRoute {
        clusters: vec![
            WeightedCluster {
                name: "a".into(),
                weight: 80,
            },
            WeightedCluster {
                name: "b".into(),
                weight: 0,
            },
            WeightedCluster {
                name: "c".into(),
                weight: 20,
            },
        ],
    };
    let picks: Vec<&str> = (0..100).filter_map(|r| t.pick(r)).collect();
    assert_eq!(picks.iter().filter(|p| **p == "a").count(), 80);
    assert_eq!(picks.iter().filter(|p| **p == "c").count(), 20);
    assert_eq!(picks.len(), 100, "a 0 weight gets nothing");
}

/// The field path of the refusal of the 8000 listener with `edit` applied to its JSON.
fn refusal(edit: impl FnOnce(&mut Value)) -> String {
    let mut v = json!({
        "name": "0.0.0.0_8000",
        "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 8000}},
        "filterChains": [http_chain("8000", json!({"applicationProtocols": ["http/1.1", "h2c"], "transportProtocol": "raw_buffer"}))],
        "defaultFilterChain": tcp_chain("PassthroughFilterChain", "PassthroughCluster", json!({}))
    });
    edit(&mut v);
    let l: lv3::Listener = from_json(&v).expect("a Listener");
    let e = super::listener(&l).expect_err("refused");
    format!("{}: {}", e.path, e.reason)
}

type Edit = Box<dyn FnOnce(&mut Value)>;

#[test]
fn what_would_change_behaviour_is_refused_by_field() {
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|v| v["filterChains"][0]["filterChainMatch"]["transportProtocol"] = json!("tls")),
            "filterChains[0].filterChainMatch.transportProtocol",
        ),
        (
            Box::new(|v| v["filterChains"][0]["filterChainMatch"]["serverNames"] = json!(["api.example.com"])),
            "filterChains[0].filterChainMatch.serverNames",
        ),
        (
            Box::new(|v| v["filterChains"][0]["filterChainMatch"]["applicationProtocols"] = json!(["istio"])),
            "filterChains[0].filterChainMatch.applicationProtocols",
        ),
        (
            Box::new(|v| {
                v["defaultFilterChain"]["filterChainMatch"]["applicationProtocols"] = json!(["http/1.1", "h2c"])
            }),
            "defaultFilterChain.filterChainMatch.applicationProtocols",
        ),
        (
            Box::new(|v| v["filterChains"][0]["filterChainMatch"]["sourcePorts"] = json!([1234])),
            "filterChains[0].filterChainMatch.sourcePorts",
        ),
        (
            Box::new(|v| {
                v["filterChains"][0]["filters"][0]["typedConfig"]["httpFilters"]
                    .as_array_mut()
                    .expect("filters")
                    .insert(0, json!({"name": "envoy.filters.http.ext_authz"}))
            }),
            "filterChains[0].filters[0].typedConfig.httpFilters[0]",
        ),
        (
            Box::new(|v| {
                let c = &mut v["filterChains"][0]["filters"][0]["typedConfig"];
                c.as_object_mut().expect("hcm").remove("rds");
                c["routeConfig"] = json!({"name": "inline"});
            }),
            "filterChains[0].filters[0].typedConfig.routeConfig",
        ),
        (
            Box::new(|v| {
                v["defaultFilterChain"]["filters"][1]["typedConfig"]["hashPolicy"] = json!([{"sourceIp": {}}])
            }),
            "defaultFilterChain.filters[1].typedConfig.hashPolicy",
        ),
        (
            Box::new(|v| {
                let c = &mut v["defaultFilterChain"]["filters"][1]["typedConfig"];
                c.as_object_mut().expect("tcp").remove("cluster");
                c["weightedClusters"] = json!({"clusters": [{"name": "a", "weight": 1, "metadataMatch": {"filterMetadata": {"envoy.lb": {"v": "1"}}}}]});
            }),
            "defaultFilterChain.filters[1].typedConfig.weightedClusters.clusters[0].metadataMatch",
        ),
        (
            Box::new(|v| {
                v["defaultFilterChain"]["filters"][0]["name"] = json!("envoy.filters.network.rbac");
            }),
            "defaultFilterChain.filters[0]",
        ),
        (
            Box::new(|v| v["filterChains"][0]["transportSocket"] = json!({"name": "tls"})),
            "filterChains[0].transportSocket",
        ),
        (
            Box::new(|v| v["listenerFilters"] = json!([{"name": "envoy.filters.listener.proxy_protocol"}])),
            "listenerFilters[0]",
        ),
        (
            Box::new(|v| v["address"]["socketAddress"]["protocol"] = json!("UDP")),
            "address.protocol",
        ),
    ];
    for (edit, path) in cases {
        let e = refusal(edit);
        assert!(e.starts_with(&format!("{path}: ")), "{e} (want {path})");
    }
}
