//! The local config file (YAML, or JSON, which YAML reads too): the parts the proxy crate
//! compiles, as the agent's `Config::parse` hands them over: `policies:` into the authorization
//! model, `routes:`/`clusters:`/`endpoints:` (Envoy protobuf-JSON) into the L7 model,
//! `listeners:` checked. Each is accepted or refused with a reason; what is accepted prints
//! back (`/config_dump`, `/policies`) and a policy reads back from what it prints.
use nodeway_proxy::{authz::Policy, l7::L7Config};
use serde::Deserialize;

use crate::Target;

pub const TARGET: Target = Target {
    name: "config",
    about: "the config file (YAML/JSON): policies and Envoy protobuf-JSON resources compiled",
    run,
    dict: &[
        b"policies:\n- ",
        b"routes:\n- ",
        b"clusters:\n- ",
        b"endpoints:\n- ",
        b"listeners:\n- ",
        b"name: ",
        b"namespace: ",
        b"action: DENY",
        b"scope: WORKLOAD_SELECTOR",
        b"rules:",
        b"clauses:",
        b"matches:",
        b"sourceIps: [",
        b"::ffff:198.18.0.1/120",
        b"198.18.0.0/16",
        b"{exact: ",
        b"{prefix: ",
        b"{presence: {}}",
        b"virtualHosts:",
        b"domains: [\"*\"]",
        b"match: {prefix: /}",
        b"route: {cluster: c, timeout: ",
        b"9223372036854775807s",
        b"315576000001s",
        b"0.000000001s",
        b"connectTimeout: ",
        b"\"@type\": ",
        b"type.googleapis.com/",
        b"&a ",
        b"*a",
        b"!!binary ",
        b"<<: ",
        b"{",
        b"}",
        b"[",
        b"]",
        b"\n  ",
        b"- ",
    ],
    max_len: 4096,
};

/// The proxy's part of the agent's file format (the agent's own fields are skipped: the agent
/// is a binary crate, its `Config` is not reachable from here).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    #[serde(default)]
    policies: Vec<Policy>,
    #[serde(default)]
    routes: Vec<serde_json::Value>,
    #[serde(default)]
    clusters: Vec<serde_json::Value>,
    #[serde(default)]
    endpoints: Vec<serde_json::Value>,
    #[serde(default)]
    listeners: Vec<serde_json::Value>,
}

fn run(data: &[u8]) {
    let text = super::text(data);
    let file: File = match serde_yaml::from_str(&text) {
        Ok(f) => f,
        Err(_) => match serde_json::from_str(&text) {
            Ok(f) => f,
            Err(_) => return,
        },
    };
    for p in &file.policies {
        let printed = serde_json::to_string(p).expect("a policy prints");
        let back: Policy =
            serde_json::from_str(&printed).unwrap_or_else(|e| panic!("{printed} does not read back: {e}"));
        assert_eq!(&back, p, "a policy changes through what /policies prints: {printed}");
    }
    let _ = nodeway_proxy::authz::PolicyStore::new(file.policies.iter().cloned());
    let _ = L7Config::check_listeners(&file.listeners);
    if let Ok(l7) = L7Config::from_json(&file.routes, &file.clusters, &file.endpoints) {
        let json = l7.to_json();
        super::xds::check_model_durations(&json);
    }
}
