//! The delta ADS client against an in-test control plane: ACK flow, NACK with the last good
//! config kept, removal, reconnect and resume, and a 1000-workload burst.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::config::{cluster::v3 as cv3, endpoint::v3 as ev3, route::v3 as rv3};
use nodeway_proxy::{
    metrics::Metrics,
    state::ProxyState,
    xds::{NodeInfo, XdsClient, XdsConfig},
};
use nodeway_tests::xds::{
    deny_from_namespace, envoy, initial_versions, service, workload, FakeXds, ADDRESS_TYPE, AUTHORIZATION_TYPE,
    CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE, XDS_SERVER_NAME,
};

const LIMIT: Duration = Duration::from_secs(10);

/// A client connected to `server`, running on its own runtime, and the proxy state it feeds.
/// Dropping it drops the runtime, which ends the client task.
struct Client {
    proxy: Arc<ProxyState>,
    xds: Arc<XdsClient>,
    _rt: tokio::runtime::Runtime,
}

impl Client {
    fn start(server: &FakeXds) -> Client {
        Client::start_with_token(server, None)
    }

    fn start_with_token(server: &FakeXds, token_file: Option<std::path::PathBuf>) -> Client {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // tonic's lazy channel spawns onto the current runtime.
        let _guard = rt.enter();
        let metrics = Arc::new(Metrics::new());
        let proxy = Arc::new(ProxyState::new());
        let xds_metrics = metrics.clone();
        let xds = XdsClient::new(
            XdsConfig {
                address: server.url(),
                root_cert: Some(server.root_cert.clone()),
                token_file,
                tls_server_name: Some(XDS_SERVER_NAME.to_string()),
                node: NodeInfo {
                    ip: "198.18.0.1".into(),
                    pod_name: "nodeway-x".into(),
                    pod_namespace: "istio-system".into(),
                    node_name: "node-a".into(),
                    cluster_id: "Kubernetes".into(),
                    ..Default::default()
                },
                backoff_initial: Duration::from_millis(50),
                backoff_max: Duration::from_millis(400),
            },
            proxy.clone(),
            xds_metrics,
        )
        .unwrap();
        rt.spawn(xds.clone().run());
        Client { proxy, xds, _rt: rt }
    }

    fn workload_names(&self) -> Vec<String> {
        self.proxy.workloads().all().map(|w| w.key()).collect()
    }
}

fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn subscribes_as_a_node_proxy_and_acks_each_response() {
    let dir = tempdir("ack");
    let server = FakeXds::start(&dir).unwrap();
    server.set(
        ADDRESS_TYPE,
        &[
            workload("demo", "client", &[198, 18, 1, 2], "node-a"),
            service("demo", "api", [198, 19, 0, 1], 8080),
        ],
        &[],
    );
    server.set(
        AUTHORIZATION_TYPE,
        &[deny_from_namespace("demo", "deny-other", "other", None)],
        &[],
    );
    let client = Client::start(&server);
    assert!(
        eventually(LIMIT, || client.proxy.policies().len() == 1
            && client.workload_names().len() == 1),
        "config from xDS: {}",
        client.xds.dump()
    );

    // Subscriptions: both types, wildcard, with a ztunnel-style node id and metadata.
    let reqs = server.requests();
    let subs: Vec<_> = reqs.iter().filter(|r| r.response_nonce.is_empty()).collect();
    let types: Vec<_> = subs.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(
        types,
        [
            ADDRESS_TYPE,
            AUTHORIZATION_TYPE,
            CLUSTER_TYPE,
            ENDPOINT_TYPE,
            ROUTE_TYPE
        ]
    );
    let node = subs[0].node.as_ref().expect("node on the subscription");
    assert_eq!(
        node.id,
        "ztunnel~198.18.0.1~nodeway-x.istio-system~istio-system.svc.cluster.local"
    );
    let meta = &node.metadata.as_ref().unwrap().fields;
    for key in ["NAME", "NAMESPACE", "NODE_NAME", "CLUSTER_ID", "INSTANCE_IPS"] {
        assert!(meta.contains_key(key), "metadata {key} in {meta:?}");
    }
    assert!(subs.iter().all(|r| r.resource_names_subscribe.is_empty()), "wildcard");

    // Every response is ACKed: same type, its nonce, no error.
    for sent in server.sent() {
        let reply = server.reply_to(&sent.nonce, LIMIT).expect("a reply to every response");
        assert_eq!(reply.type_url, sent.type_url);
        assert!(reply.error_detail.is_none(), "ACK, not NACK: {reply:?}");
    }
    let w = client.proxy.workloads();
    let c = w.by_ip(ip("198.18.1.2")).expect("the workload by IP");
    assert_eq!((c.namespace.as_str(), c.service_account.as_str()), ("demo", "default"));
    let s = client.proxy.services();
    assert_eq!(
        s.by_vip(ip("198.19.0.1")).unwrap().hostname,
        "api.demo.svc.cluster.local"
    );

    // An update is ACKed and applied; config_dump shows versions and the last ACK.
    let nonce = server.push(
        ADDRESS_TYPE,
        &[workload("demo", "server", &[198, 18, 1, 3], "node-a")],
        &[],
    );
    let reply = server.reply_to(&nonce, LIMIT).expect("ACK of the update");
    assert!(reply.error_detail.is_none());
    assert!(client.proxy.workloads().by_ip(ip("198.18.1.3")).is_some());
    let dump = client.xds.dump();
    assert_eq!(
        dump["types"][ADDRESS_TYPE]["lastAck"]["nonce"],
        nonce.as_str(),
        "{dump}"
    );
    assert_eq!(dump["types"][ADDRESS_TYPE]["resources"], 3, "{dump}");
    let res = dump["resources"][ADDRESS_TYPE].as_array().unwrap();
    assert!(
        res.iter()
            .all(|r| r["version"].as_str().is_some_and(|v| v.starts_with('v'))),
        "{dump}"
    );
    assert_eq!(dump["connected"], true);
}

#[test]
fn sends_the_bearer_token_read_anew_on_every_connect() {
    let dir = tempdir("token");
    let server = FakeXds::start(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "first\n").unwrap();
    let client = Client::start_with_token(&server, Some(token.clone()));
    assert!(eventually(LIMIT, || server.connects() == 1));
    std::fs::write(&token, "second").unwrap();
    server.disconnect_all();
    assert!(eventually(LIMIT, || server.connects() == 2), "{}", client.xds.dump());
    let h = server.stream_headers();
    assert_eq!(h[0].0.as_deref(), Some("Bearer first"));
    assert_eq!(h[1].0.as_deref(), Some("Bearer second"), "a rotated token is used");
    assert_eq!(h[0].1.as_deref(), Some("Kubernetes"), "ClusterID header");
}

#[test]
fn an_unreachable_control_plane_is_retried_with_backoff() {
    let dir = tempdir("backoff");
    let mut server = FakeXds::start(&dir).unwrap();
    // The client is pointed at a port nothing listens on (the server only lends its root).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    server.addr = SocketAddr::from(([127, 0, 0, 1], port));
    let client = Client::start(&server);
    std::thread::sleep(Duration::from_millis(1500));
    let dump = client.xds.dump();
    assert_eq!(dump["connected"], false, "{dump}");
    assert!(
        dump["lastError"]
            .as_str()
            .is_some_and(|e| e.contains(&port.to_string())),
        "{dump}"
    );
    // 50 ms doubling to 400 ms, with jitter: a handful of attempts in 1.5 s, not a busy loop.
    let attempts = dump["attempts"].as_u64().unwrap();
    assert!((3..=15).contains(&attempts), "attempts: {attempts}");
}

#[test]
fn nacks_only_the_malformed_resources_naming_each_and_applies_the_rest() {
    let dir = tempdir("nack");
    let server = FakeXds::start(&dir).unwrap();
    server.set(
        ADDRESS_TYPE,
        &[
            workload("demo", "good", &[198, 18, 1, 2], "node-a"),
            workload("demo", "changing", &[198, 18, 1, 3], "node-a"),
        ],
        &[],
    );
    let client = Client::start(&server);
    assert!(eventually(LIMIT, || client.workload_names() == ["demo/changing", "demo/good"]));

    // One push: a new good workload, a new bad one (a 3-byte address) and a bad update of a
    // known one. istiod never resends a resource it pushed: as ztunnel, the good one applies,
    // each bad one is named in the NACK, and the known one keeps its last good value.
    let bad = workload("demo", "bad", &[198, 18, 1], "node-a");
    let bad_update = workload("demo", "changing", &[198, 18, 1, 3, 0], "node-a");
    let nonce = server.push(
        ADDRESS_TYPE,
        &[
            workload("demo", "new", &[198, 18, 1, 9], "node-a"),
            bad.clone(),
            bad_update.clone(),
        ],
        &[],
    );
    let reply = server.reply_to(&nonce, LIMIT).expect("a reply");
    let err = reply.error_detail.expect("a NACK");
    assert!(err.message.contains(&bad.0), "names the resource: {}", err.message);
    assert!(
        err.message.contains(&bad_update.0),
        "names the resource: {}",
        err.message
    );
    assert!(
        err.message.contains("3 bytes") && err.message.contains("5 bytes"),
        "says why: {}",
        err.message
    );
    assert!(err.message.contains("rejected 2 resource(s)"), "{}", err.message);
    assert_eq!(
        client.workload_names(),
        ["demo/changing", "demo/good", "demo/new"],
        "the good resource applied"
    );
    assert_eq!(
        client
            .proxy
            .workloads()
            .by_ip(ip("198.18.1.3"))
            .map(|w| w.name.clone())
            .as_deref(),
        Some("changing"),
        "the bad update kept the last good value"
    );
    assert_eq!(client.proxy.workloads().by_ip(ip("198.18.1.9")).unwrap().name, "new");

    // An authorization with port 70000 next to a good one: only it is NACKed.
    let mut policy = deny_from_namespace("demo", "bad-port", "other", Some(70000));
    let nonce = server.push(
        AUTHORIZATION_TYPE,
        &[policy.clone(), deny_from_namespace("demo", "fine", "other", Some(7000))],
        &[],
    );
    let err = server.reply_to(&nonce, LIMIT).unwrap().error_detail.expect("a NACK");
    assert!(
        err.message.contains("demo/bad-port") && err.message.contains("70000") && !err.message.contains("demo/fine"),
        "{}",
        err.message
    );
    assert_eq!(
        client
            .proxy
            .policies()
            .all()
            .iter()
            .map(|p| p.key())
            .collect::<Vec<_>>(),
        ["demo/fine"]
    );
    let dump = client.xds.dump();
    let nack = &dump["types"][AUTHORIZATION_TYPE]["lastNack"];
    assert!(nack["error"].as_str().unwrap().contains("70000"), "{dump}");

    // The fixed resource is accepted.
    policy = deny_from_namespace("demo", "bad-port", "other", Some(7000));
    let nonce = server.push(AUTHORIZATION_TYPE, &[policy], &[]);
    assert!(server.reply_to(&nonce, LIMIT).unwrap().error_detail.is_none());
    assert_eq!(client.proxy.policies().len(), 2);
}

#[test]
fn a_rejected_resource_is_not_claimed_on_resumption() {
    let dir = tempdir("nack-resume");
    let server = FakeXds::start(&dir).unwrap();
    let client = Client::start(&server);
    assert!(eventually(LIMIT, || client.proxy.synced()));
    let nonce = server.push(
        ADDRESS_TYPE,
        &[
            workload("demo", "ok", &[198, 18, 1, 2], "node-a"),
            workload("demo", "bad", &[198, 18, 1], "node-a"),
        ],
        &[],
    );
    assert!(server.reply_to(&nonce, LIMIT).unwrap().error_detail.is_some());
    // After a reconnect the client claims the good one only, so the server sends the bad one
    // again (and a fixed version of it can arrive).
    server.disconnect_all();
    assert!(eventually(LIMIT, || initial_versions(&server.requests(), ADDRESS_TYPE)
        .len()
        >= 2));
    let resumed = initial_versions(&server.requests(), ADDRESS_TYPE).pop().unwrap();
    assert!(resumed.contains_key("Kubernetes//Pod/demo/ok"), "{resumed:?}");
    assert!(!resumed.contains_key("Kubernetes//Pod/demo/bad"), "{resumed:?}");
}

#[test]
fn synced_only_once_addresses_and_authorizations_arrived_and_kept_through_an_outage() {
    let dir = tempdir("synced");
    let server = FakeXds::start(&dir).unwrap();
    server.set(ADDRESS_TYPE, &[workload("demo", "a", &[198, 18, 1, 2], "node-a")], &[]);
    server.set(
        AUTHORIZATION_TYPE,
        &[deny_from_namespace("demo", "deny", "other", None)],
        &[],
    );
    let client = Client::start(&server);
    assert!(eventually(LIMIT, || client.proxy.synced()), "{}", client.xds.dump());
    assert_eq!(client.workload_names(), ["demo/a"]);
    assert_eq!(client.proxy.policies().len(), 1);
    // The control plane goes away: the last config stays, and so does the sync.
    let connects = server.connects();
    server.disconnect_all();
    assert!(eventually(LIMIT, || server.connects() > connects));
    assert!(client.proxy.synced());
    assert_eq!(client.workload_names(), ["demo/a"]);
    assert_eq!(client.proxy.policies().len(), 1);
}

#[test]
fn not_synced_until_both_types_arrived() {
    let dir = tempdir("unsynced");
    let server = FakeXds::start(&dir).unwrap();
    let client = Client::start(&server);
    // istiod answers every subscription, an empty one too: an empty mesh is a sync.
    assert!(eventually(LIMIT, || client.proxy.synced()), "{}", client.xds.dump());
    // A client that has heard nothing (its server is unreachable) awaits both types.
    let mut unreachable = server.url();
    unreachable.replace_range(unreachable.rfind(':').unwrap() + 1.., "1");
    let proxy = Arc::new(ProxyState::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    {
        let _g = rt.enter();
        XdsClient::new(
            XdsConfig {
                address: unreachable,
                root_cert: Some(server.root_cert.clone()),
                token_file: None,
                tls_server_name: Some(XDS_SERVER_NAME.to_string()),
                node: NodeInfo::default(),
                backoff_initial: Duration::from_millis(50),
                backoff_max: Duration::from_millis(100),
            },
            proxy.clone(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
    }
    assert!(!proxy.synced());
    assert_eq!(proxy.awaiting(), [AUTHORIZATION_TYPE, ADDRESS_TYPE], "sorted");
}

#[test]
fn removed_resources_leave_the_model() {
    let dir = tempdir("remove");
    let server = FakeXds::start(&dir).unwrap();
    let a = workload("demo", "a", &[198, 18, 1, 2], "node-a");
    let b = workload("demo", "b", &[198, 18, 1, 3], "node-a");
    let p = deny_from_namespace("demo", "deny", "other", None);
    server.set(ADDRESS_TYPE, &[a.clone(), b], &[]);
    server.set(AUTHORIZATION_TYPE, std::slice::from_ref(&p), &[]);
    let client = Client::start(&server);
    assert!(eventually(LIMIT, || client.workload_names().len() == 2
        && client.proxy.policies().len() == 1));

    let nonce = server.push(ADDRESS_TYPE, &[], &[a.0.as_str()]);
    assert!(server.reply_to(&nonce, LIMIT).unwrap().error_detail.is_none());
    assert_eq!(client.workload_names(), ["demo/b"]);
    assert!(client.proxy.workloads().by_ip(ip("198.18.1.2")).is_none());
    let nonce = server.push(AUTHORIZATION_TYPE, &[], &[p.0.as_str()]);
    assert!(server.reply_to(&nonce, LIMIT).unwrap().error_detail.is_none());
    assert_eq!(client.proxy.policies().len(), 0);
}

#[test]
fn reconnects_and_resumes_from_known_versions() {
    let dir = tempdir("resume");
    let server = FakeXds::start(&dir).unwrap();
    let a = workload("demo", "a", &[198, 18, 1, 2], "node-a");
    let b = workload("demo", "b", &[198, 18, 1, 3], "node-a");
    let va = server.set(ADDRESS_TYPE, &[a.clone(), b.clone()], &[]);
    let client = Client::start(&server);
    assert!(eventually(LIMIT, || client.workload_names().len() == 2));

    // While the stream is down, b goes away and c arrives.
    server.disconnect_all();
    let c = workload("demo", "c", &[198, 18, 1, 4], "node-a");
    server.set(ADDRESS_TYPE, std::slice::from_ref(&c), &[b.0.as_str()]);
    assert!(
        eventually(LIMIT, || client.workload_names() == ["demo/a", "demo/c"]),
        "converged after reconnect: {:?} {}",
        client.workload_names(),
        client.xds.dump()
    );
    assert!(server.connects() >= 2);

    // The second subscription carried what the client held; only the change came back.
    let versions = initial_versions(&server.requests(), ADDRESS_TYPE);
    assert!(versions[0].is_empty(), "first subscription: nothing known");
    let resumed = &versions[1];
    assert_eq!(resumed.get(&a.0), Some(&va));
    assert_eq!(resumed.get(&b.0), Some(&va));
    let after = server
        .sent()
        .into_iter()
        .filter(|r| r.type_url == ADDRESS_TYPE)
        .nth(1)
        .unwrap();
    let names: Vec<_> = after.resources.iter().map(|r| r.name.clone()).collect();
    assert_eq!(names, std::slice::from_ref(&c.0), "only what changed is resent");
    assert_eq!(after.removed_resources, std::slice::from_ref(&b.0));
}

#[test]
fn a_burst_of_1000_workloads_converges_quickly() {
    let dir = tempdir("burst");
    let server = FakeXds::start(&dir).unwrap();
    let client = Client::start(&server);
    assert!(eventually(LIMIT, || server.sent().len() >= 2), "subscribed");
    let start = Instant::now();
    for i in 0..1000u32 {
        let ip = [198, 18, 10 + (i / 250) as u8, (i % 250) as u8 + 1];
        server.push(ADDRESS_TYPE, &[workload("burst", &format!("w{i}"), &ip, "node-b")], &[]);
    }
    assert!(
        eventually(LIMIT, || client.proxy.workloads().len() == 1000),
        "1000 workloads within {LIMIT:?}: {}",
        client.proxy.workloads().len()
    );
    let took = start.elapsed();
    eprintln!("1000 single-workload pushes applied in {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(client.proxy.workloads().by_ip(ip("198.18.13.250")).is_some());
}

/// A fresh directory for the server's root, removed at the end of the test.
fn tempdir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("nodeway-xds-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

struct TempDir(std::path::PathBuf);
impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const REVIEWS_V1: &str = "outbound|9080|v1|reviews.default.svc.cluster.local";

fn reviews_route(route: serde_json::Value) -> (String, Vec<u8>) {
    envoy::<rv3::RouteConfiguration>(
        "9080",
        serde_json::json!({"name": "9080", "virtualHosts": [{
            "name": "reviews.default.svc.cluster.local:9080",
            "domains": ["reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local:9080", "reviews", "reviews:9080"],
            "routes": [{"match": {"prefix": "/"}, "route": route}]
        }]}),
    )
}

/// Routes, clusters and endpoints from the control plane reach the L7 model and the admin API;
/// an unsupported feature is NACKed by name and path with the old route kept; removal works.
#[test]
fn routes_clusters_and_endpoints_from_xds() {
    let dir = tempdir("l7");
    let server = FakeXds::start(&dir).unwrap();
    server.set(
        ROUTE_TYPE,
        &[reviews_route(serde_json::json!({"cluster": REVIEWS_V1}))],
        &[],
    );
    server.set(
        CLUSTER_TYPE,
        &[envoy::<cv3::Cluster>(
            REVIEWS_V1,
            serde_json::json!({"name": REVIEWS_V1, "type": "EDS",
                "edsClusterConfig": {"edsConfig": {"ads": {}, "resourceApiVersion": "V3"}, "serviceName": REVIEWS_V1},
                "connectTimeout": "10s", "lbPolicy": "LEAST_REQUEST"}),
        )],
        &[],
    );
    server.set(
        ENDPOINT_TYPE,
        &[envoy::<ev3::ClusterLoadAssignment>(
            REVIEWS_V1,
            serde_json::json!({"clusterName": REVIEWS_V1, "endpoints": [{"lbEndpoints": [
                {"endpoint": {"address": {"socketAddress": {"address": "198.18.3.7", "portValue": 9080}}}, "healthStatus": "HEALTHY"}
            ]}]}),
        )],
        &[],
    );
    let client = Client::start(&server);
    assert!(
        eventually(LIMIT, || {
            let l7 = client.proxy.l7();
            l7.routes.len() == 1 && l7.clusters.len() == 1 && l7.assignments.len() == 1
        }),
        "L7 config from xDS: {}",
        client.xds.dump()
    );
    let l7 = client.proxy.l7();
    let c = l7.cluster(REVIEWS_V1).unwrap();
    assert_eq!(l7.endpoints(c)[0].address, "198.18.3.7:9080".parse().unwrap());

    // What the admin API shows of it.
    let routes = nodeway_proxy::admin::routes_table(&l7);
    let row = routes.lines().nth(1).expect("a route row");
    assert!(
        row.starts_with("9080") && row.contains("reviews.default.svc.cluster.local, reviews") && row.contains("/*"),
        "{routes}"
    );
    let clusters = nodeway_proxy::admin::clusters_table(&l7);
    let cells: Vec<&str> = clusters.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "reviews.default.svc.cluster.local",
            "9080",
            "v1",
            "outbound",
            "EDS",
            "-"
        ],
        "{clusters}"
    );
    let rows = nodeway_proxy::admin::endpoint_rows(&l7, &|_, _| None);
    assert_eq!((rows[0].cluster.as_str(), rows[0].outlier_check), (REVIEWS_V1, "OK"));

    // config_dump: the resources in Envoy's JSON, with versions.
    let dump = client.xds.dump();
    let r = &dump["resources"][ROUTE_TYPE][0];
    assert_eq!(r["name"], "9080", "{dump}");
    assert!(r["version"].as_str().is_some_and(|v| v.starts_with('v')), "{dump}");
    assert_eq!(
        r["routeConfig"]["virtualHosts"][0]["routes"][0]["route"]["cluster"], REVIEWS_V1,
        "{dump}"
    );
    assert_eq!(
        dump["resources"][CLUSTER_TYPE][0]["cluster"]["lbPolicy"], "LEAST_REQUEST",
        "{dump}"
    );
    assert_eq!(
        dump["resources"][ENDPOINT_TYPE][0]["endpointConfig"]["clusterName"], REVIEWS_V1,
        "{dump}"
    );

    // An unsupported feature: NACKed naming the resource and the field, the old route stays.
    let nonce = server.push(
        ROUTE_TYPE,
        &[reviews_route(
            serde_json::json!({"cluster": "outbound|9080|v2|reviews.default.svc.cluster.local", "hedgePolicy": {"hedgeOnPerTryTimeout": true}}),
        )],
        &[],
    );
    let reply = server.reply_to(&nonce, LIMIT).expect("a reply to the bad route");
    let detail = reply.error_detail.expect("NACK");
    assert!(
        detail
            .message
            .contains("9080: virtualHosts[0].routes[0].route.hedgePolicy: not supported by nodeway"),
        "{detail:?}"
    );
    let l7 = client.proxy.l7();
    let table = l7.routes_for_port(9080).expect("the old route kept");
    match &table.virtual_hosts[0].routes[0].action {
        nodeway_proxy::route::Action::Route(ra) => assert_eq!(ra.clusters[0].name, REVIEWS_V1),
        other => panic!("not a route action: {other:?}"),
    }
    let dump = client.xds.dump();
    assert!(
        dump["types"][ROUTE_TYPE]["lastNack"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("hedgePolicy")),
        "{dump}"
    );

    // Removal of the route and the cluster; the endpoints stay until removed too.
    let nonce = server.push(ROUTE_TYPE, &[], &["9080"]);
    assert!(server.reply_to(&nonce, LIMIT).unwrap().error_detail.is_none());
    let nonce = server.push(CLUSTER_TYPE, &[], &[REVIEWS_V1]);
    assert!(server.reply_to(&nonce, LIMIT).unwrap().error_detail.is_none());
    assert!(
        eventually(LIMIT, || {
            let l7 = client.proxy.l7();
            l7.routes.is_empty() && l7.clusters.is_empty() && l7.assignments.len() == 1
        }),
        "{}",
        client.xds.dump()
    );
}
