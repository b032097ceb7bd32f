//! End to end with a control plane: a pod connecting to a Service VIP reaches a healthy endpoint
//! over HBONE (mutual TLS) on the endpoint's own target port, with `destination_service` in
//! Istio's TCP metrics; and before xDS has delivered workloads and policies, captured pods fail
//! closed and the node is not ready.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fs, net::SocketAddr, time::Duration};

use nodeway_proxy::proto::istio::workload as wpb;
use nodeway_tests::{
    config_yaml, eventually, metric_value, require_root,
    xds::{workload, FakeXds, ADDRESS_TYPE, AUTHORIZATION_TYPE, XDS_SERVER_NAME},
    Node, Pod, TestBed,
};
use prost::Message;

/// The port the service is dialled on, and the one its endpoints listen on.
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
const HOST: &str = "api.demo.svc.cluster.local";
const VIP: [u8; 4] = [198, 19, 0, 20];

/// The service `demo/api` at `VIP:80`, its target port named (0 on the wire, as istiod sends a
/// named `targetPort`): each endpoint says its own port.
fn api_service() -> (String, Vec<u8>) {
    let body = wpb::Address {
        r#type: Some(wpb::address::Type::Service(wpb::Service {
            name: "api".into(),
            namespace: "demo".into(),
            hostname: HOST.into(),
            addresses: vec![wpb::NetworkAddress {
                network: String::new(),
                address: VIP.to_vec(),
                length: None,
            }],
            ports: vec![wpb::Port {
                service_port: SERVICE_PORT.into(),
                target_port: 0,
                app_protocol: wpb::AppProtocol::Tcp as i32,
            }],
            ..Default::default()
        })),
    }
    .encode_to_vec();
    (format!("demo/{HOST}"), body)
}

/// The pod's workload resource as an endpoint of `demo/api` (80 → 8080), healthy or not.
fn api_endpoint(p: &Pod, healthy: bool) -> (String, Vec<u8>) {
    let (name, body) = workload(&p.namespace, &p.name, &p.ip.octets(), "node-a");
    let mut a = wpb::Address::decode(body.as_slice()).unwrap();
    if let Some(wpb::address::Type::Workload(w)) = a.r#type.as_mut() {
        w.status = if healthy {
            wpb::WorkloadStatus::Healthy
        } else {
            wpb::WorkloadStatus::Unhealthy
        } as i32;
        w.services.insert(
            format!("demo/{HOST}"),
            wpb::PortList {
                ports: vec![wpb::Port {
                    service_port: SERVICE_PORT.into(),
                    target_port: TARGET_PORT.into(),
                    ..Default::default()
                }],
            },
        );
    }
    (name, a.encode_to_vec())
}

fn xds_args(xds_url: &str, root: &str) -> Vec<String> {
    [
        "--xds-address",
        xds_url,
        "--xds-root-cert",
        root,
        "--xds-tls-server-name",
        XDS_SERVER_NAME,
        "--xds-backoff-ms",
        "100",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

#[test]
fn a_vip_reaches_a_healthy_endpoint_over_hbone_with_destination_service() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("svcvip").unwrap();
    let healthy = bed.add_pod("api-1", "demo").unwrap();
    let sick = bed.add_pod("api-2", "demo").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let cfg = bed.dir().join("n.yaml");
    fs::write(
        &cfg,
        config_yaml(
            "node-a",
            &["demo"],
            &[(&healthy).into(), (&sick).into(), (&client).into()],
        ),
    )
    .unwrap();

    let xds = FakeXds::start(bed.dir()).unwrap();
    let (client_name, client_body) = workload("demo", "client", &client.ip.octets(), "node-a");
    xds.set(
        ADDRESS_TYPE,
        &[
            api_service(),
            api_endpoint(&healthy, true),
            api_endpoint(&sick, false),
            (client_name, client_body),
        ],
        &[],
    );
    xds.set(AUTHORIZATION_TYPE, &[], &[]);
    let args = xds_args(&xds.url(), &xds.root_cert.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = Node::start(&bed, "a", &cfg, &args).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || node.json("/services")["services"][0]
            ["hostname"]
            == HOST),
        "service from xDS: {}",
        node.json("/config_dump")["xds"]
    );

    // Only the healthy endpoint listens, on the target port only (not the service port): every
    // connection to the VIP must be resolved to it, port mapped, never to the unhealthy one.
    let app = healthy.echo_server(TARGET_PORT).unwrap();
    let vip = SocketAddr::from((VIP, SERVICE_PORT));
    for i in 0..10 {
        let got = client.exchange(vip, b"to the service").unwrap();
        assert_eq!(
            got.ok().as_deref(),
            Some(&b"to the service"[..]),
            "connection {i} to the VIP\n{}",
            node.log_text()
        );
    }
    assert_eq!(app.accepted(), 10);

    let m = node.metrics();
    let source_side = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "api-1"),
        ("destination_service", HOST),
        ("destination_service_name", "api"),
        ("destination_service_namespace", "demo"),
        ("destination_principal", "spiffe://cluster.local/ns/demo/sa/default"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        metric_value(&m, "istio_tcp_connections_opened_total", &source_side),
        10.0,
        "{m}"
    );
    // Bytes are counted once the kernel took them, which the client can see first.
    let bytes = 10.0 * b"to the service".len() as f64;
    assert!(
        eventually(Duration::from_secs(5), || metric_value(
            &node.metrics(),
            "istio_tcp_sent_bytes_total",
            &source_side
        ) == bytes),
        "{}",
        node.metrics()
    );
    // The endpoint's side saw mTLS from the client's identity.
    let destination_side = [
        ("reporter", "destination"),
        ("destination_workload", "api-1"),
        ("source_principal", "spiffe://cluster.local/ns/demo/sa/default"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        metric_value(&m, "istio_tcp_connections_opened_total", &destination_side),
        10.0,
        "{m}"
    );

    // With no healthy endpoint left, the VIP is refused (not sent to the VIP as plain TCP).
    let nonce = xds.push(ADDRESS_TYPE, &[api_endpoint(&healthy, false)], &[]);
    assert!(xds
        .reply_to(&nonce, Duration::from_secs(10))
        .unwrap()
        .error_detail
        .is_none());
    assert!(client.exchange(vip, b"x").unwrap().ok().as_deref() != Some(&b"x"[..]));
    assert_eq!(
        metric_value(
            &node.metrics(),
            "nodeway_outbound_failed_total",
            &[("pod", "demo/client"), ("reason", "no_healthy_endpoint")]
        ),
        1.0,
        "{}",
        node.metrics()
    );
}

#[test]
fn before_the_first_xds_response_captured_pods_fail_closed_and_the_node_is_not_ready() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("unsynced").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let outsider = bed.add_pod("outsider", "web").unwrap();
    let cfg = bed.dir().join("n.yaml");
    fs::write(
        &cfg,
        config_yaml(
            "node-a",
            &["demo"],
            &[(&server).into(), (&client).into(), (&outsider).into()],
        ),
    )
    .unwrap();
    // A control plane that is not there (a port nothing listens on; its root exists).
    let xds = FakeXds::start(bed.dir()).unwrap();
    let mut url = xds.url();
    url.replace_range(url.rfind(':').unwrap() + 1.., "1");
    let args = xds_args(&url, &xds.root_cert.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = Node::spawn(&bed, "a", &cfg, &args).unwrap();
    let _app = server.echo_server(8080).unwrap();
    let to = server.addr(8080);
    let refused = || {
        metric_value(
            &node.metrics(),
            "nodeway_outbound_failed_total",
            &[("pod", "demo/client"), ("reason", "config_not_synced")],
        )
    };
    // Once the pods are captured, their connections are refused, not let through.
    assert!(
        eventually(Duration::from_secs(20), || {
            let _ = client.exchange(to, b"x");
            refused() >= 1.0
        }),
        "{}\n{}",
        node.metrics(),
        node.log_text()
    );
    assert!(client.exchange(to, b"x").unwrap().ok().as_deref() != Some(&b"x"[..]));
    // Plaintext from outside the mesh to the captured server: refused on its inbound side too
    // (with no policies known, an empty policy set would have let it in).
    assert!(outsider.exchange(to, b"x").unwrap().ok().as_deref() != Some(&b"x"[..]));
    assert_eq!(
        metric_value(
            &node.metrics(),
            "nodeway_inbound_refused_total",
            &[("pod", "demo/server"), ("reason", "config_not_synced")]
        ),
        1.0,
        "{}",
        node.metrics()
    );
    let ready = nodeway_tests::http_get(node.admin, "/healthz/ready").unwrap();
    assert_eq!(ready, (503, "not ready\n".to_string()));
    assert!(
        node.log_text().contains("config_not_synced"),
        "the refusal is logged with its reason"
    );
}
