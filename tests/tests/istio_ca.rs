//! `--ca istio`: workload certificates from an Istio CA (here an in-test server speaking the same
//! gRPC service over TLS), then HBONE between two nodes with them.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fs, sync::Arc, time::Duration};

use nodeway_proxy::identity::{
    identity_of,
    istio_ca::{IstioCa, IstioCaConfig},
    manager::CertManager,
    CertificateProvider, Identity,
};
use nodeway_tests::{
    config_yaml, eventually, istio_ca::FakeIstioCa, metric_value, require_root, Node, PodEntry, TestBed,
};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("nodeway-istio-ca-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn client_config(ca: &FakeIstioCa, dir: &std::path::Path, ttl: Duration) -> IstioCaConfig {
    let token = dir.join("token");
    fs::write(&token, "node-token\n").unwrap();
    IstioCaConfig {
        address: ca.url(),
        root_cert: ca.root_cert.clone(),
        token_file: Some(token),
        cluster_id: "Kubernetes".into(),
        tls_server_name: None,
        ttl,
    }
}

#[tokio::test]
async fn issues_the_requested_identity_with_token_cluster_and_ttl() {
    let dir = temp_dir("issue");
    let ca = FakeIstioCa::start(&dir, "cluster.local").unwrap();
    ca.require_token("node-token");
    let client = IstioCa::new(client_config(&ca, &dir, Duration::from_secs(3600))).unwrap();
    let id = Identity::new("cluster.local", "demo", "api");
    let cert = client.fetch(&id).await.unwrap();

    assert_eq!(identity_of(&cert.chain[0]).unwrap(), id);
    assert_eq!(cert.chain.len(), 1, "the root is not sent to peers");
    assert!(cert.roots.contains(&client.roots()[0]));
    let life = cert
        .info
        .not_after_time
        .duration_since(cert.info.not_before_time)
        .unwrap();
    assert_eq!(
        life,
        Duration::from_secs(3610),
        "requested TTL (+10 s back-dating) honoured"
    );
    let seen = ca.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].impersonated_identity.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(seen[0].validity_duration, 3600);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer node-token"));
    assert_eq!(seen[0].cluster_id.as_deref(), Some("Kubernetes"));
    fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn refusals_and_wrong_certificates_are_errors_that_say_why() {
    let dir = temp_dir("refuse");
    let ca = FakeIstioCa::start(&dir, "cluster.local").unwrap();
    let client = IstioCa::new(client_config(&ca, &dir, Duration::from_secs(60))).unwrap();
    let id = Identity::new("cluster.local", "demo", "api");

    ca.require_token("another-token");
    let err = client.fetch(&id).await.err().unwrap().to_string();
    assert!(
        err.contains("refused the CSR for spiffe://cluster.local/ns/demo/sa/api"),
        "{err}"
    );
    assert!(err.contains("bearer token"), "{err}");

    ca.require_token("node-token");
    ca.substitute_identity(Some(Identity::new("cluster.local", "demo", "admin")));
    let err = client.fetch(&id).await.err().unwrap().to_string();
    assert!(err.contains("unusable certificate"), "{err}");
    assert!(err.contains("sa/admin"), "{err}");

    // A CA whose serving certificate does not chain to our root is not talked to.
    let other = temp_dir("refuse-other");
    let imposter = FakeIstioCa::start(&other, "cluster.local").unwrap();
    let mut cfg = client_config(&imposter, &dir, Duration::from_secs(60));
    cfg.root_cert = ca.root_cert.clone();
    let err = IstioCa::new(cfg).unwrap().fetch(&id).await.err().unwrap().to_string();
    assert!(err.contains("refused the CSR"), "{err}");
    assert!(
        imposter.requests().is_empty(),
        "no request reached a CA we do not trust"
    );

    // Bad configuration is named at start.
    let mut cfg = client_config(&ca, &dir, Duration::from_secs(60));
    cfg.root_cert = dir.join("missing.pem");
    let err = IstioCa::new(cfg).err().unwrap().to_string();
    assert!(err.contains("missing.pem"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
    fs::remove_dir_all(&other).unwrap();
}

#[tokio::test]
async fn retries_with_backoff_then_renews_at_half_life() {
    let dir = temp_dir("renew");
    let ca = FakeIstioCa::start(&dir, "cluster.local").unwrap();
    ca.fail_next(2);
    let client = IstioCa::new(client_config(&ca, &dir, Duration::from_secs(4))).unwrap();
    let certs = CertManager::new(Arc::new(client));
    let id = Identity::new("cluster.local", "demo", "api");
    certs.track(id.clone());
    let fetched = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(c) = certs.cached(&id) {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a certificate after the CA recovered");
    assert_eq!(ca.requests().len(), 3, "two refused, the third issued");
    // Valid from 10 s back to 4 s ahead: half-life is 3 s after issue... minus the back-dating,
    // so the renewal comes within a few seconds.
    let first = fetched.info.serial.clone();
    let renewed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if certs.cached(&id).is_some_and(|c| c.info.serial != first) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(renewed.is_ok(), "renewed before expiry");
    assert!(ca.requests().len() >= 4);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_nodes_talk_hbone_with_certificates_from_the_istio_ca() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("istioca").unwrap();
    let ca = FakeIstioCa::start(bed.dir(), "cluster.local").unwrap();
    let token = bed.dir().join("token");
    fs::write(&token, "node-token").unwrap();
    ca.require_token("node-token");
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let entry = |p, node, sa| PodEntry {
        node,
        service_account: sa,
        ..PodEntry::from(p)
    };
    let (ca_file, cb_file) = (bed.dir().join("a.yaml"), bed.dir().join("b.yaml"));
    let pods_a = [entry(&client, None, None), entry(&server, Some("node-b"), Some("api"))];
    let pods_b = [entry(&client, Some("node-a"), None), entry(&server, None, Some("api"))];
    fs::write(&ca_file, config_yaml("node-a", &["demo"], &pods_a)).unwrap();
    fs::write(&cb_file, config_yaml("node-b", &["demo"], &pods_b)).unwrap();
    let url = ca.url();
    let root = ca.root_cert.display().to_string();
    let token = token.display().to_string();
    let args = [
        "--ca",
        "istio",
        "--ca-address",
        &url,
        "--ca-root-cert",
        &root,
        "--ca-token-file",
        &token,
    ];
    let a = Node::start(&bed, "a", &ca_file, &args).unwrap();
    let b = Node::start(&bed, "b", &cb_file, &args).unwrap();

    // Certificates are fetched at capture, before any traffic.
    let client_id = "spiffe://cluster.local/ns/demo/sa/default";
    let server_id = "spiffe://cluster.local/ns/demo/sa/api";
    let asked = |id: &str| {
        ca.requests()
            .iter()
            .any(|r| r.impersonated_identity.as_deref() == Some(id))
    };
    assert!(eventually(Duration::from_secs(10), || asked(client_id) && asked(server_id)));
    assert!(
        eventually(Duration::from_secs(5), || b
            .json("/certs")
            .to_string()
            .contains(server_id)),
        "{}",
        b.log_text()
    );
    let certs = b.json("/certs");
    assert!(certs.to_string().contains("nodeway dev CA"), "issuer shown: {certs}");

    let _s = server.echo_server(8080).unwrap();
    let data = vec![7u8; 100_000];
    assert_eq!(client.exchange(server.addr(8080), &data).unwrap().unwrap(), data);
    let labels = [
        ("reporter", "destination"),
        ("source_principal", client_id),
        ("destination_principal", server_id),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(eventually(Duration::from_secs(5), || metric_value(
        &b.metrics(),
        "istio_tcp_connections_closed_total",
        &labels
    ) == 1.0));
    drop(a);
}
