//! xDS resources (`xds`): arbitrary bytes as the `Any` value of every type URL the proxy accepts,
//! through the functions the clients use: `Store::apply` (ztunnel-style delta ADS: Address,
//! Authorization, Cluster, ClusterLoadAssignment, RouteConfiguration: decode, convert, index)
//! and the sidecar stream's `Snapshot::apply` (those plus Listener). A resource is applied or
//! rejected with a reason, never a panic; what is applied prints in `/config_dump` and holds no
//! duration Envoy would refuse (longer than protobuf's 10 000 years, which `Instant` arithmetic
//! on the data path could not take).
use envoy_types::pb::{
    envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource},
    google::protobuf::Any,
};
use nodeway_proxy::xds::{
    sidecar::{self, Snapshot},
    store::{Store, TYPES},
};

use crate::Target;

pub const TARGET: Target = Target {
    name: "xds",
    about: "xDS decode + convert for every type URL (store and sidecar snapshot): Ok or a reason",
    run,
    dict: &[
        b"type.googleapis.com/",
        b"envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        b"envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
        b"\x10\xff\xff\xff\xff\x07",
        b"\xff\xff\xff\xff\x0f",
        b"\x80\x80\x80\x80\x10",
    ],
    max_len: 8192,
};

/// Envoy's (protobuf's) largest `Duration`: 10 000 years.
pub const MAX_DURATION_SECS: u64 = 315_576_000_000;

/// The first byte picks the type URL (the five of the store, then the sidecar's Listener), the
/// rest is the resource.
fn run(data: &[u8]) {
    let Some((&kind, value)) = data.split_first() else {
        return;
    };
    let types: Vec<&str> = TYPES.iter().copied().chain([sidecar::LISTENER_TYPE]).collect();
    let type_url = types[usize::from(kind) % types.len()];
    let resource = Resource {
        name: "fuzz".into(),
        version: "1".into(),
        resource: Some(Any {
            type_url: type_url.into(),
            value: value.to_vec(),
        }),
        ..Default::default()
    };
    if type_url != sidecar::LISTENER_TYPE {
        store(type_url, &resource);
    }
    let mut snapshot = Snapshot::default();
    let response = DeltaDiscoveryResponse {
        type_url: type_url.into(),
        resources: vec![resource],
        ..Default::default()
    };
    if snapshot.apply(&response).is_ok() {
        let _ = snapshot.wanted();
        let _ = snapshot.missing();
        let _ = sidecar::outbound_policy(&snapshot.listeners);
        if let Ok(table) = nodeway_proxy::listener::outbound_ports(snapshot.listeners.values()) {
            for l in table.listeners.values() {
                for a in &l.addresses {
                    let _ = l.select(*a);
                }
            }
        }
    }
}

fn store(type_url: &str, resource: &Resource) {
    let mut store = Store::default();
    let rejected = store.apply(type_url, std::slice::from_ref(resource), &[]);
    let applied = store.len(type_url);
    assert_eq!(
        applied + rejected.len(),
        1,
        "one resource is applied or rejected: {rejected:?}"
    );
    let dump = store.dump();
    check_model_durations(&store.l7().to_json());
    let _ = store.policies();
    let _ = store.workloads();
    let _ = store.services();
    if applied == 1 {
        assert!(
            dump.to_string().contains("\"fuzz\""),
            "an applied resource is in the dump"
        );
        // The same response again changes nothing; its removal empties the store.
        let again = store.apply(type_url, std::slice::from_ref(resource), &[]);
        assert!(again.is_empty(), "applied once, rejected the second time: {again:?}");
        let removed = store.apply(type_url, &[], &["fuzz".to_string()]);
        assert!(removed.is_empty() && store.len(type_url) == 0);
    }
}

/// Every duration of a compiled L7 model (`L7Config::to_json`) is one Envoy would accept.
pub fn check_model_durations(model: &serde_json::Value) {
    check_durations(model, "l7");
}

/// Every `{secs, nanos}` (a serialized `Duration`) in `v` is at most Envoy's maximum.
fn check_durations(v: &serde_json::Value, at: &str) {
    match v {
        serde_json::Value::Object(m) => {
            if let (Some(secs), Some(_)) = (m.get("secs").and_then(|s| s.as_u64()), m.get("nanos")) {
                assert!(
                    secs <= MAX_DURATION_SECS,
                    "{at}: a duration of {secs} s was accepted (Envoy's maximum is {MAX_DURATION_SECS} s)"
                );
            }
            for (k, v) in m {
                check_durations(v, &format!("{at}.{k}"));
            }
        }
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| check_durations(v, &format!("{at}[{i}]"))),
        _ => {}
    }
}
