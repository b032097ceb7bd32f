//! End to end: outbound listeners from the local config file (`listeners:`, the protobuf-JSON
//! `istioctl proxy-config listeners -o json` prints) decide what a destination is. A `tcp_proxy`
//! with `weighted_clusters` 80/20 (what istiod makes of a `tcp:` VirtualService) splits L4
//! connections between two subsets, each reached at its EDS endpoints, with `istio_tcp_*`
//! naming the service and the subset's workload; an HTTP connection manager makes its port
//! HTTP (its RDS route table serves it), and a port with no listener is not HTTP even when a
//! route table is named after it.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fs, net::SocketAddr};

use nodeway_tests::{
    config_yaml,
    http::{HttpBackend, HttpRequest},
    metric_value, require_root, Node, Pod, PodEntry, TestBed,
};

const HOST: &str = "echo.demo.svc.cluster.local";
const VIP: &str = "198.19.8.1";
const TCP_PORT: u16 = 9000;
/// An HTTP port whose route table is not named after it.
const HTTP_PORT: u16 = 8080;
/// A port with a route table named after it but no listener.
const UNLISTENED_PORT: u16 = 7070;
/// Connections through the TCP route.
const CONNECTIONS: usize = 200;

fn cluster_name(port: u16, subset: &str) -> String {
    format!("outbound|{port}|{subset}|{HOST}")
}

/// An EDS cluster and its assignment: `pod`'s address on `port`.
fn cluster(port: u16, subset: &str, pod: &Pod) -> (String, String) {
    let name = cluster_name(port, subset);
    (
        format!("- {{name: \"{name}\", type: EDS, edsClusterConfig: {{serviceName: \"{name}\"}}, connectTimeout: 1s}}\n"),
        format!(
            "- {{clusterName: \"{name}\", endpoints: [{{lbEndpoints: [{{endpoint: {{address: {{socketAddress: {{address: \"{}\", portValue: {port}}}}}}}}}]}}]}}\n",
            pod.ip
        ),
    )
}

/// The listeners as istiod sends them: `<vip>_9000` with the weighted `tcp_proxy`, and
/// `0.0.0.0_8080` sniffed (HTTP to route table `echo-http`, other bytes to PassthroughCluster).
fn listeners() -> String {
    let tcp_proxy = "envoy.filters.network.tcp_proxy";
    let tcp_type = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    let hcm_type =
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    format!(
        r#"listeners:
- name: {VIP}_{TCP_PORT}
  address: {{socketAddress: {{address: {VIP}, portValue: {TCP_PORT}}}}}
  bindToPort: false
  trafficDirection: OUTBOUND
  filterChains:
  - filters:
    - name: {tcp_proxy}
      typedConfig:
        "@type": {tcp_type}
        statPrefix: echo.demo
        weightedClusters:
          clusters:
          - {{name: "{v1}", weight: 80}}
          - {{name: "{v2}", weight: 20}}
- name: 0.0.0.0_{HTTP_PORT}
  address: {{socketAddress: {{address: 0.0.0.0, portValue: {HTTP_PORT}}}}}
  bindToPort: false
  trafficDirection: OUTBOUND
  listenerFilters: [{{name: envoy.filters.listener.http_inspector, typedConfig: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}}}}]
  filterChains:
  - filterChainMatch: {{applicationProtocols: [http/1.1, h2c], transportProtocol: raw_buffer}}
    filters:
    - name: envoy.filters.network.http_connection_manager
      typedConfig:
        "@type": {hcm_type}
        statPrefix: outbound_0.0.0.0_{HTTP_PORT}
        rds: {{configSource: {{ads: {{}}}}, routeConfigName: echo-http}}
        httpFilters: [{{name: envoy.filters.http.router, typedConfig: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  defaultFilterChain:
    name: PassthroughFilterChain
    filters:
    - name: {tcp_proxy}
      typedConfig: {{"@type": {tcp_type}, statPrefix: PassthroughCluster, cluster: PassthroughCluster}}
"#,
        v1 = cluster_name(TCP_PORT, "v1"),
        v2 = cluster_name(TCP_PORT, "v2"),
    )
}

/// Route tables: `echo-http` (the HTTP listener's) to the v1 pod's HTTP server, and one named
/// after the unlistened port that would answer 404 if that port were HTTP.
fn routes() -> String {
    format!(
        r#"routes:
- name: echo-http
  virtualHosts:
  - {{name: echo, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: "{http}"}}}}]}}
- name: "{UNLISTENED_PORT}"
  virtualHosts: []
"#,
        http = cluster_name(HTTP_PORT, "v1"),
    )
}

struct Mesh {
    _bed: TestBed,
    node: Node,
    client: Pod,
    v1: Pod,
    v2: Pod,
}

fn mesh(name: &str) -> Mesh {
    let mut bed = TestBed::new(name).unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let v1 = bed.add_pod("echo-v1", "demo").unwrap();
    let v2 = bed.add_pod("echo-v2", "demo").unwrap();
    let entry = |p, labels| PodEntry {
        labels,
        ..PodEntry::from(p)
    };
    let pods = config_yaml(
        "node-a",
        &["demo"],
        &[
            (&client).into(),
            entry(&v1, &[("version", "v1")]),
            entry(&v2, &[("version", "v2")]),
        ],
    );
    let service = format!(
        "services:\n- {{name: echo, namespace: demo, hostname: {HOST}, addresses: [{{address: {VIP}}}], ports: [{{servicePort: {TCP_PORT}, targetPort: {TCP_PORT}}}, {{servicePort: {HTTP_PORT}, targetPort: {HTTP_PORT}}}]}}\n"
    );
    let parts = [
        cluster(TCP_PORT, "v1", &v1),
        cluster(TCP_PORT, "v2", &v2),
        cluster(HTTP_PORT, "v1", &v1),
    ];
    let clusters: String = parts.iter().map(|(c, _)| c.as_str()).collect();
    let endpoints: String = parts.iter().map(|(_, e)| e.as_str()).collect();
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        format!(
            "{pods}{service}{}{}clusters:\n{clusters}endpoints:\n{endpoints}",
            listeners(),
            routes()
        ),
    )
    .unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    Mesh {
        _bed: bed,
        node,
        client,
        v1,
        v2,
    }
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

#[test]
fn a_weighted_tcp_route_splits_connections_80_20_and_names_the_service() {
    if !require_root() {
        return;
    }
    let m = mesh("tcproute");
    let (e1, e2) = (m.v1.echo_server(TCP_PORT).unwrap(), m.v2.echo_server(TCP_PORT).unwrap());
    for i in 0..CONNECTIONS {
        let payload = format!("connection {i}\n");
        let back = m.client.exchange(vip(TCP_PORT), payload.as_bytes()).unwrap();
        assert_eq!(
            back.as_deref().ok(),
            Some(payload.as_bytes()),
            "connection {i}: {back:?}"
        );
    }
    let (n1, n2) = (e1.accepted(), e2.accepted());
    eprintln!("weighted 80/20 over {CONNECTIONS} connections: v1 {n1}, v2 {n2}");
    assert_eq!(n1 + n2, CONNECTIONS as u64, "every connection reached one subset");
    // Binomial(200, 0.8): mean 160, σ = √(200·0.8·0.2) ≈ 5.66; ±5σ ≈ ±28.3.
    assert!(
        (132..=188).contains(&n1),
        "v1 got {n1} of {CONNECTIONS} (want 160 ± 28)"
    );

    let metrics = m.node.metrics();
    let opened = |extra: &[(&str, &str)]| {
        let mut labels = vec![("reporter", "source"), ("destination_service", HOST)];
        labels.extend_from_slice(extra);
        metric_value(&metrics, "istio_tcp_connections_opened_total", &labels)
    };
    assert_eq!(opened(&[]), CONNECTIONS as f64, "{metrics}");
    assert_eq!(
        opened(&[
            ("destination_service_name", "echo"),
            ("destination_service_namespace", "demo")
        ]),
        CONNECTIONS as f64
    );
    assert_eq!(
        opened(&[("destination_workload", "echo-v1"), ("destination_version", "v1")]),
        n1 as f64,
        "{metrics}"
    );
    assert_eq!(
        opened(&[("destination_workload", "echo-v2"), ("destination_version", "v2")]),
        n2 as f64,
        "{metrics}"
    );
    assert_eq!(
        opened(&[("connection_security_policy", "mutual_tls")]),
        CONNECTIONS as f64,
        "the subsets' pods are mesh workloads: HBONE"
    );
}

#[test]
fn a_port_is_http_when_its_listener_says_so() {
    if !require_root() {
        return;
    }
    let m = mesh("lsnhttp");
    let _web = HttpBackend::start(&m.v1, HTTP_PORT, "echo-v1").unwrap();
    let _echo = m.v2.echo_server(UNLISTENED_PORT).unwrap();
    // 8080: the listener's HTTP connection manager, route table `echo-http`.
    let r = m
        .client
        .http_request(
            vip(HTTP_PORT),
            HttpRequest::get("/hello").authority(format!("{HOST}:{HTTP_PORT}")),
        )
        .unwrap();
    assert_eq!((r.status, r.backend()), (200, Some("echo-v1")), "{}", r.text());
    let requests = metric_value(
        &m.node.metrics(),
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("destination_service", HOST),
            ("response_code", "200"),
        ],
    );
    assert_eq!(requests, 1.0);
    // 7070 has a route table named after it but no listener: plain L4 to the pod (the
    // request comes back from the echo server as sent; routed, it would be a 404 NR).
    let request = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
    let back = m
        .client
        .exchange(m.v2.addr(UNLISTENED_PORT), request.as_bytes())
        .unwrap();
    assert_eq!(back.as_deref().ok(), Some(request.as_bytes()), "{back:?}");
}
