//! Writes the generated part of the committed corpus: xDS resources (protobuf, from the config
//! corpus's protobuf-JSON and from istiod-shaped Address/Authorization messages), certificates
//! with SPIFFE IDs (DER and PEM), and random seeds for the targets that build structured inputs.
//! Not run by default (the corpus is committed); after changing the sources:
//! `cargo test -p nodeway-fuzz --test seeds -- --ignored`.
#![allow(clippy::unwrap_used)] // a generator run by hand: any failure is a message enough

use std::{fs, path::Path};

use envoy_types::pb::envoy::config::{
    cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener, route::v3::RouteConfiguration,
};
use nodeway_proxy::{
    envoy_json::from_json,
    proto::istio::{security as spb, workload as wpb},
    xds::{sidecar::LISTENER_TYPE, store::TYPES},
};
use prost::Message;

fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// The xds target's input: the index of the type URL, then the resource.
fn xds_seed(type_url: &str, msg: &impl Message) -> Vec<u8> {
    let i = TYPES
        .iter()
        .copied()
        .chain([LISTENER_TYPE])
        .position(|t| t == type_url)
        .expect("a known type");
    let mut v = vec![i as u8];
    v.extend(msg.encode_to_vec());
    v
}

fn write(dir: &str, name: &str, data: &[u8]) {
    let d = corpus().join(dir);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join(name), data).unwrap();
}

#[test]
#[ignore = "regenerates committed files"]
fn generate() {
    xds();
    identity();
    let mut rng = fastrand::Rng::with_seed(15);
    for target in ["route", "authz", "sniff", "authority"] {
        for i in 0..12 {
            let len = [16, 48, 128, 512][i % 4];
            let data: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(len).collect();
            write(target, &format!("random-{i:02}"), &data);
        }
    }
    for (i, s) in [
        &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GE",
    ]
    .iter()
    .enumerate()
    {
        // `Input { chunks, reads, data }`: two empty lists (a zero length each), then the data.
        let mut v = vec![0u8, 0];
        v.extend_from_slice(s);
        write("sniff", &format!("stream-{i}"), &v);
    }
}

fn xds() {
    for file in ["l7.yaml", "listeners.json"] {
        let text = fs::read_to_string(corpus().join("config").join(file)).unwrap();
        let doc: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        let items = |key: &str| doc.get(key).and_then(|v| v.as_array()).cloned().unwrap_or_default();
        for (i, v) in items("routes").iter().enumerate() {
            let m: RouteConfiguration = from_json(v).unwrap();
            write("xds", &format!("route-{file}-{i}"), &xds_seed(TYPES[4], &m));
        }
        for (i, v) in items("clusters").iter().enumerate() {
            let m: Cluster = from_json(v).unwrap();
            write("xds", &format!("cluster-{file}-{i}"), &xds_seed(TYPES[2], &m));
        }
        for (i, v) in items("endpoints").iter().enumerate() {
            let m: ClusterLoadAssignment = from_json(v).unwrap();
            write("xds", &format!("endpoints-{file}-{i}"), &xds_seed(TYPES[3], &m));
        }
        for (i, v) in items("listeners").iter().enumerate() {
            let m: Listener = from_json(v).unwrap();
            write("xds", &format!("listener-{file}-{i}"), &xds_seed(LISTENER_TYPE, &m));
        }
    }
    let workload = wpb::Address {
        r#type: Some(wpb::address::Type::Workload(wpb::Workload {
            uid: "c1//Pod/demo/client-1".into(),
            name: "client-1".into(),
            namespace: "demo".into(),
            addresses: vec![
                vec![198, 18, 1, 2],
                [0x20, 1, 0xd, 0xb8].into_iter().chain([0; 11]).chain([1]).collect(),
            ],
            tunnel_protocol: wpb::TunnelProtocol::Hbone as i32,
            canonical_name: "client".into(),
            node: "node-a".into(),
            authorization_policies: vec!["demo/p".into()],
            services: [(
                "demo/api.demo.svc.cluster.local".to_string(),
                wpb::PortList {
                    ports: vec![wpb::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]
            .into(),
            ..Default::default()
        })),
    };
    write("xds", "address-workload", &xds_seed(TYPES[0], &workload));
    let service = wpb::Address {
        r#type: Some(wpb::address::Type::Service(wpb::Service {
            name: "api".into(),
            namespace: "demo".into(),
            hostname: "api.demo.svc.cluster.local".into(),
            addresses: vec![wpb::NetworkAddress {
                network: String::new(),
                address: vec![198, 19, 0, 1],
                length: None,
            }],
            ports: vec![wpb::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
            ..Default::default()
        })),
    };
    write("xds", "address-service", &xds_seed(TYPES[0], &service));
    let authorization = spb::Authorization {
        name: "p".into(),
        namespace: "demo".into(),
        scope: spb::Scope::Namespace as i32,
        action: spb::Action::Deny as i32,
        rules: vec![spb::Rule {
            clauses: vec![spb::Clause {
                matches: vec![spb::Match {
                    namespaces: vec![spb::StringMatch {
                        match_type: Some(spb::string_match::MatchType::Prefix("team-".into())),
                    }],
                    source_ips: vec![spb::Address {
                        address: vec![198, 18, 0, 0],
                        length: 16,
                    }],
                    destination_ports: vec![8080],
                    service_accounts: vec![spb::ServiceAccountMatch {
                        namespace: "demo".into(),
                        service_account: "robot".into(),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    write("xds", "authorization", &xds_seed(TYPES[1], &authorization));
}

fn identity() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/demo/sa/client".try_into().unwrap(),
    )];
    let cert = params.self_signed(&key).unwrap();
    let mut der = vec![1u8];
    der.extend_from_slice(cert.der());
    write("identity", "cert-der", &der);
    let mut pem = vec![2u8];
    pem.extend_from_slice(cert.pem().as_bytes());
    pem.extend_from_slice(cert.pem().as_bytes());
    write("identity", "cert-pem-bundle", &pem);
    let other = rcgen::CertificateParams::new(vec!["example.com".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let mut der = vec![1u8];
    der.extend_from_slice(other.der());
    write("identity", "cert-no-spiffe", &der);
}
