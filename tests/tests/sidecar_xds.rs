//! What a real istiod generates for a sidecar, through nodeway's converter: a realistic mesh is
//! applied to the test bed's API server (two HTTP Services with subsets, a TCP Service, a
//! DestinationRule with `connectionPool` and `outlierDetection`, a VirtualService with a header
//! match and 20/80 weights, a `tcp:` VirtualService, a DNS ServiceEntry), then a delta ADS stream
//! is opened as the sidecar of one pod would (`nodeway_proxy::xds::sidecar`), and every listener,
//! cluster, route and assignment istiod sends must be accepted by nodeway, in protobuf form and as
//! the protobuf-JSON `istioctl proxy-config ... -o json` prints (the local config file's form).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use envoy_types::pb::envoy::{
    config::{cluster::v3 as cv3, endpoint::v3 as ev3, listener::v3 as lv3, route::v3 as rv3},
    extensions::filters::network::tcp_proxy::v3::{tcp_proxy::ClusterSpecifier, TcpProxy},
};
use nodeway_proxy::{
    cluster::{dns::DnsMode, Discovery},
    envoy_json::{from_json, to_json},
    listener::{outbound_ports, ChainAction, Selection},
    route::{Action, StringMatchKind, ValueMatch},
    xds::sidecar::{fetch, outbound_policy, OutboundPolicy, SidecarNode, Snapshot},
};
use nodeway_tests::{
    control_plane::{require_control_plane, Kube, Mesh},
    require_root,
};
use prost::Message;
use serde_json::{json, Value};

const NS: &str = "demo";
const REVIEWS: &str = "reviews.demo.svc.cluster.local";
const TCP_ECHO: &str = "tcp-echo.demo.svc.cluster.local";
const EXTERNAL: &str = "api.external.test";

/// A pod as the kubelet would report it running, with `labels`, at `ip` (API objects only:
/// nothing here carries traffic).
fn pod(kube: &Kube, name: &str, sa: &str, labels: Value, ip: &str, host_ip: std::net::Ipv4Addr) {
    kube.apply(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NS}}))
        .unwrap();
    kube.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"nodeName": "node-a", "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "app:test"}]}
    }))
    .unwrap();
    kube.set_pod_running(NS, name, &[ip.parse().unwrap()], host_ip).unwrap();
}

/// A Service selecting `app: <name>` and its EndpointSlice (no controller manager runs in the
/// test bed, so the slice is written as the endpoint-slice controller would).
fn service(kube: &Kube, name: &str, port: (&str, u16), pods: &[(&str, &str)]) {
    kube.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"app": name}, "ports": [{"name": port.0, "port": port.1, "targetPort": port.1}]}
    }))
    .unwrap();
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(pod, ip)| {
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "node-a", "targetRef": {"kind": "Pod", "name": pod, "namespace": NS}})
        })
        .collect();
    kube.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": NS,
                     "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "nodeway-tests"}},
        "addressType": "IPv4",
        "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap();
}

fn istio(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

fn apply_mesh(m: &Mesh) {
    let kube = m.cp.kube();
    kube.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
        .unwrap();
    let host = m.host_ip();
    let app = |app: &str, version: &str| json!({"app": app, "version": version});
    pod(
        kube,
        "productpage-1",
        "productpage",
        app("productpage", "v1"),
        "198.18.77.10",
        host,
    );
    pod(
        kube,
        "reviews-v1",
        "reviews",
        app("reviews", "v1"),
        "198.18.77.11",
        host,
    );
    pod(
        kube,
        "reviews-v2",
        "reviews",
        app("reviews", "v2"),
        "198.18.77.12",
        host,
    );
    pod(
        kube,
        "tcp-echo-v1",
        "tcp-echo",
        app("tcp-echo", "v1"),
        "198.18.77.21",
        host,
    );
    pod(
        kube,
        "tcp-echo-v2",
        "tcp-echo",
        app("tcp-echo", "v2"),
        "198.18.77.22",
        host,
    );
    service(
        kube,
        "productpage",
        ("http", 9080),
        &[("productpage-1", "198.18.77.10")],
    );
    service(
        kube,
        "reviews",
        ("http", 9080),
        &[("reviews-v1", "198.18.77.11"), ("reviews-v2", "198.18.77.12")],
    );
    service(
        kube,
        "tcp-echo",
        ("tcp", 9000),
        &[("tcp-echo-v1", "198.18.77.21"), ("tcp-echo-v2", "198.18.77.22")],
    );
    let subsets = json!([{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]);
    kube.apply(istio("DestinationRule", "reviews", json!({
        "host": "reviews",
        "trafficPolicy": {
            "connectionPool": {"tcp": {"maxConnections": 1},
                               "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}},
            "outlierDetection": {"consecutive5xxErrors": 7, "interval": "5s", "baseEjectionTime": "15s", "maxEjectionPercent": 100}
        },
        "subsets": subsets
    })))
    .unwrap();
    kube.apply(istio(
        "VirtualService",
        "reviews",
        json!({
            "hosts": ["reviews"],
            "http": [
                {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 20},
                           {"destination": {"host": "reviews", "subset": "v2"}, "weight": 80}]}
            ]
        }),
    ))
    .unwrap();
    kube.apply(istio(
        "DestinationRule",
        "tcp-echo",
        json!({"host": "tcp-echo", "subsets": subsets}),
    ))
    .unwrap();
    kube.apply(istio("VirtualService", "tcp-echo", json!({
        "hosts": ["tcp-echo"],
        "tcp": [{"match": [{"port": 9000}],
                 "route": [{"destination": {"host": "tcp-echo", "port": {"number": 9000}, "subset": "v1"}, "weight": 80},
                           {"destination": {"host": "tcp-echo", "port": {"number": 9000}, "subset": "v2"}, "weight": 20}]}]
    })))
    .unwrap();
    kube.apply(istio(
        "ServiceEntry",
        "external",
        json!({
            "hosts": [EXTERNAL], "location": "MESH_EXTERNAL", "resolution": "DNS",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]
        }),
    ))
    .unwrap();
}

fn sidecar_of_productpage() -> SidecarNode {
    SidecarNode {
        ip: "198.18.77.10".into(),
        pod_name: "productpage-1".into(),
        namespace: NS.into(),
        service_account: "productpage".into(),
        // The test bed's istiod runs with CLUSTER_ID=Kubernetes.
        cluster_id: "Kubernetes".into(),
        istio_version: "1.28.0".into(),
        labels: [("app", "productpage"), ("version", "v1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The first whole config istiod sends the sidecar, over plaintext xDS (`:15010`, which istiod
/// serves without authentication, as to an in-cluster sidecar agent's local port).
fn snapshot(m: &Mesh) -> Snapshot {
    let address = format!("http://{}:15010", m.cp.ip);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(address.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        fetch(channel, &address, &sidecar_of_productpage(), Duration::from_secs(30))
            .await
            .unwrap()
    })
}

/// Has istiod's config caught up with everything applied?
fn complete(s: &Snapshot) -> bool {
    let route_has_match = s.routes.get("9080").is_some_and(|r| format!("{r:?}").contains("jason"));
    let subsets = s.clusters.contains_key(&format!("outbound|9080|v2|{REVIEWS}"))
        && s.clusters.contains_key(&format!("outbound|9000|v2|{TCP_ECHO}"));
    let external = s.clusters.contains_key(&format!("outbound|80||{EXTERNAL}"));
    let endpoints = s
        .endpoints
        .get(&format!("outbound|9080|v1|{REVIEWS}"))
        .is_some_and(|a| !a.endpoints.is_empty());
    route_has_match && subsets && external && endpoints
}

/// `msg` printed as protobuf-JSON and read back: what pasting `istioctl proxy-config` output
/// into the config file does.
/// Compared as JSON: the bytes inside an `Any` may differ in map order and still be the same.
fn through_json<M: Message + prost::Name + Default>(msg: &M) -> Result<M, String> {
    let j = to_json(msg).map_err(|e| e.to_string())?;
    let back: M = from_json(&j).map_err(|e| e.to_string())?;
    let again = to_json(&back).map_err(|e| e.to_string())?;
    if again != j {
        return Err(format!("changed through JSON: {j}\n  became {again}"));
    }
    Ok(back)
}

/// Every resource through the converter, in both forms; the refusals, by resource.
fn refusals(s: &Snapshot) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut check = |what: String, r: Result<(), String>| {
        if let Err(e) = r {
            out.insert(what, e);
        }
    };
    for (n, c) in &s.clusters {
        check(
            format!("cluster {n}"),
            nodeway_proxy::cluster::cluster(c).map(drop).map_err(|e| e.to_string()),
        );
        check(format!("cluster {n} (JSON)"), through_json::<cv3::Cluster>(c).map(drop));
    }
    for (n, r) in &s.routes {
        check(
            format!("route {n}"),
            nodeway_proxy::route::route_configuration(r)
                .map(drop)
                .map_err(|e| e.to_string()),
        );
        check(
            format!("route {n} (JSON)"),
            through_json::<rv3::RouteConfiguration>(r).map(drop),
        );
    }
    for (n, a) in &s.endpoints {
        check(
            format!("endpoints {n}"),
            nodeway_proxy::cluster::load_assignment(a)
                .map(drop)
                .map_err(|e| e.to_string()),
        );
        check(
            format!("endpoints {n} (JSON)"),
            through_json::<ev3::ClusterLoadAssignment>(a).map(drop),
        );
    }
    // Listeners are compiled into the outbound table (HTTP ports, TCP routes); printing them
    // must work for `istioctl proxy-config listeners -o json` to be pasted.
    for (n, l) in &s.listeners {
        check(
            format!("listener {n}"),
            nodeway_proxy::listener::listener(l)
                .map(drop)
                .map_err(|e| e.to_string()),
        );
        check(
            format!("listener {n} (JSON)"),
            through_json::<lv3::Listener>(l).map(drop),
        );
    }
    out
}

/// The `tcp_proxy` weighted clusters of the listener for `port`, as (cluster, weight).
fn tcp_weights(s: &Snapshot, port: u32) -> Vec<(String, u32)> {
    let suffix = format!("_{port}");
    s.listeners
        .iter()
        .filter(|(n, _)| n.ends_with(&suffix))
        .flat_map(|(_, l)| l.filter_chains.iter().chain(l.default_filter_chain.iter()))
        .flat_map(|fc| fc.filters.iter())
        .filter_map(|f| match &f.config_type {
            Some(lv3::filter::ConfigType::TypedConfig(any)) if any.type_url.ends_with("tcp_proxy.v3.TcpProxy") => {
                TcpProxy::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .filter_map(|t| match t.cluster_specifier {
            Some(ClusterSpecifier::WeightedClusters(w)) => Some(w.clusters),
            _ => None,
        })
        .flatten()
        .map(|c| (c.name, c.weight))
        .collect()
}

#[test]
fn a_real_sidecar_config_from_istiod_is_accepted_with_its_meaning() {
    if !require_root() || !require_control_plane() {
        return;
    }
    let m = Mesh::new("sidecar-xds").unwrap();
    apply_mesh(&m);
    let mut snap = snapshot(&m);
    // istiod debounces config events: bounded re-fetches until it has seen everything applied.
    for _ in 0..30 {
        if complete(&snap) {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        snap = snapshot(&m);
    }
    assert!(
        complete(&snap),
        "istiod never sent the whole mesh: clusters {:?}, routes {:?}\n{}",
        snap.clusters.keys().collect::<Vec<_>>(),
        snap.routes.keys().collect::<Vec<_>>(),
        m.cp.istiod_log()
    );
    let refused = refusals(&snap);
    assert!(refused.is_empty(), "refused: {refused:#?}");
    // The whole config as the local file takes it (`istioctl proxy-config ... -o json` pasted).
    let json_of = |v: Vec<Value>| v;
    let clusters = json_of(snap.clusters.values().map(|c| to_json(c).unwrap()).collect());
    let routes = json_of(snap.routes.values().map(|r| to_json(r).unwrap()).collect());
    let endpoints = json_of(snap.endpoints.values().map(|e| to_json(e).unwrap()).collect());
    let listeners = json_of(snap.listeners.values().map(|l| to_json(l).unwrap()).collect());
    nodeway_proxy::l7::L7Config::check_listeners(&listeners).unwrap();
    let file = nodeway_proxy::l7::L7Config::from_json(&routes, &clusters, &endpoints).unwrap();
    assert_eq!(file.clusters.len(), snap.clusters.len());
    assert_eq!(file.routes.len(), snap.routes.len());

    // The converted model says what the YAML said.
    let cluster = |n: &str| nodeway_proxy::cluster::cluster(&snap.clusters[n]).unwrap();
    for subset in ["v1", "v2"] {
        let c = cluster(&format!("outbound|9080|{subset}|{REVIEWS}"));
        assert_eq!(c.limits.max_connections, 1);
        assert_eq!(c.limits.max_pending_requests, 1);
        assert_eq!(c.limits.max_requests_per_connection, 1);
        let od = c.outlier_detection.expect("outlier detection");
        assert_eq!(od.consecutive_5xx, 7);
        assert_eq!(od.interval, Duration::from_secs(5));
        assert_eq!(od.base_ejection_time, Duration::from_secs(15));
        assert_eq!(od.max_ejection_percent, 100);
        assert_eq!(od.enforcing_consecutive_5xx, 100);
        assert_eq!(c.istio_config.as_deref(), Some("reviews.demo"));
    }
    let v1 = nodeway_proxy::cluster::load_assignment(&snap.endpoints[&format!("outbound|9080|v1|{REVIEWS}")]).unwrap();
    let addrs: Vec<String> = v1.endpoints.iter().map(|e| e.address.to_string()).collect();
    assert_eq!(addrs, ["198.18.77.11:9080"], "subset v1 is the v1 pod only");

    let table = nodeway_proxy::route::route_configuration(&snap.routes["9080"]).unwrap();
    let vh = table
        .virtual_hosts
        .iter()
        .find(|v| {
            v.domains
                .iter()
                .any(|d| d == &format!("{REVIEWS}:9080") || d == REVIEWS)
        })
        .expect("reviews' virtual host");
    let header = &vh.routes[0].matcher.headers[0];
    assert_eq!(header.name, "end-user");
    assert!(
        matches!(&header.matcher, ValueMatch::String(s) if matches!(&s.kind, StringMatchKind::Exact(v) if v == "jason"))
    );
    let weights = |i: usize| match &vh.routes[i].action {
        Action::Route(r) => r
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.weight))
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let to_v2: Vec<String> = weights(0).into_iter().map(|(name, _)| name).collect();
    assert_eq!(to_v2, [format!("outbound|9080|v2|{REVIEWS}")], "jason goes to v2 only");
    assert_eq!(
        weights(1),
        [
            (format!("outbound|9080|v1|{REVIEWS}"), 20),
            (format!("outbound|9080|v2|{REVIEWS}"), 80)
        ]
    );

    // The DNS ServiceEntry: a STRICT_DNS cluster naming the host, resolved by nodeway.
    let ext = cluster(&format!("outbound|80||{EXTERNAL}"));
    let Discovery::Dns(d) = &ext.discovery else {
        panic!("{:?}", ext.discovery)
    };
    assert_eq!(d.mode, DnsMode::Strict);
    assert_eq!(d.targets[0].host, EXTERNAL);
    assert_eq!(d.targets[0].port, 80);

    // Outbound traffic policy ALLOW_ANY (the default): unmatched destinations take the
    // passthrough cluster (the original destination); BlackHoleCluster refuses.
    assert_eq!(outbound_policy(&snap.listeners), Some(OutboundPolicy::AllowAny));
    assert_eq!(cluster("PassthroughCluster").discovery, Discovery::OriginalDst);
    let blackhole = cluster("BlackHoleCluster");
    assert!(nodeway_proxy::l7::L7Config::default().endpoints(&blackhole).is_empty());

    // The `tcp:` VirtualService: weights 80/20 on the TCP listener.
    let want = [
        (format!("outbound|9000|v1|{TCP_ECHO}"), 80),
        (format!("outbound|9000|v2|{TCP_ECHO}"), 20),
    ];
    assert_eq!(tcp_weights(&snap, 9000), want);

    // Compiled into the outbound table: the service's VIP on 9000 is that TCP route whatever
    // the bytes; 9080 is HTTP by route table "9080" (other bytes to PassthroughCluster); a
    // port without a listener is left to the mesh's own L4 decision.
    let table = outbound_ports(snap.listeners.values()).unwrap();
    let tcp_listener = table
        .listeners
        .values()
        .find(|l| l.name.ends_with("_9000"))
        .expect("tcp-echo's listener");
    let vip = tcp_listener.addresses[0];
    let Some(Selection::Always(ChainAction::Tcp(route))) = table.listener(vip).map(|l| l.select(vip)) else {
        panic!("{vip} is no TCP route: {tcp_listener:?}")
    };
    let got: Vec<(String, u32)> = route.clusters.iter().map(|c| (c.name.clone(), c.weight)).collect();
    assert_eq!(got, want);
    let reviews = SocketAddr::new(vip.ip(), 9080);
    assert!(
        matches!(
            table.listener(reviews).map(|l| l.select(reviews)),
            Some(Selection::Sniff { http: "9080", other: Some(ChainAction::Tcp(t)) })
                if t.clusters[0].name == "PassthroughCluster"
        ),
        "{:?}",
        table.listener(reviews)
    );
    assert!(table.listener(SocketAddr::new(vip.ip(), 9001)).is_none());
}
