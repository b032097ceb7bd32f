//! Authority and host helpers: `route::strip_port`, `split_authority`, the mirrors'
//! `shadow_host`, and the virtual host an authority selects (Envoy's domain precedence, checked
//! against a reference ranking).
use arbitrary::{Arbitrary, Unstructured};
use nodeway_proxy::{
    fuzzing::{shadow_host, split_authority},
    route::{strip_port, HeaderMutations, RouteTable, VirtualHost},
};

use crate::Target;

pub const TARGET: Target = Target {
    name: "authority",
    about: "authority helpers (strip_port, split_authority, shadow_host) and virtual host selection",
    run,
    dict: &[
        b":",
        b"[",
        b"]",
        b"::1",
        b"*",
        b"*.",
        b".svc.cluster.local",
        b":80",
        b":9080",
        b":65536",
        b"reviews",
        b"\xc3\x89",
        b"K",
        b"\xe2\x84\xaa",
    ],
    max_len: 512,
};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    authority: &'a str,
    hosts: Vec<Vec<&'a str>>,
}

fn run(bytes: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(bytes)) else {
        return;
    };
    let a = input.authority;
    let host = strip_port(a);
    assert!(a.starts_with(host), "strip_port({a:?}) = {host:?} is not a prefix");
    let (h, port) = split_authority(a);
    assert_eq!(h, host);
    if let Some(p) = port {
        let digits = &a[host.len() + 1..];
        assert_eq!(digits.parse::<u16>().ok(), Some(p), "port of {a:?}");
        assert!(shadow_host(a).ends_with(&format!("-shadow:{p}")));
    }
    if a.parse::<http::uri::Authority>().is_ok() {
        let rest = &a[host.len()..];
        assert!(
            rest.is_empty() || (rest.starts_with(':') && rest[1..].bytes().all(|b| b.is_ascii_digit())),
            "strip_port({a:?}) leaves {rest:?}, not a port"
        );
    }
    virtual_host(a, input.hosts);
}

fn virtual_host(authority: &str, hosts: Vec<Vec<&str>>) {
    let table = RouteTable {
        name: "fuzz".into(),
        virtual_hosts: hosts
            .iter()
            .take(8)
            .enumerate()
            .map(|(i, domains)| VirtualHost {
                name: i.to_string(),
                domains: domains.iter().take(8).map(|d| d.to_string()).collect(),
                routes: Vec::new(),
                headers: HeaderMutations::default(),
                retry_policy: None,
                include_request_attempt_count: false,
                include_attempt_count_in_response: false,
            })
            .collect(),
        headers: HeaderMutations::default(),
    };
    let got = table.virtual_host(authority).map(|vh| vh.name.clone());
    let want = reference(&table, authority).map(|i| i.to_string());
    assert_eq!(got, want, "virtual host for {authority:?} among {hosts:?}");
}

/// Envoy's order: exact, then the longest `*suffix`, then the longest `prefix*`, then `*`; the
/// first virtual host wins a tie. Hosts compare case-insensitively, ports ignored.
fn reference(table: &RouteTable, authority: &str) -> Option<usize> {
    let host = strip_port(authority).to_ascii_lowercase();
    let mut best: Option<((u8, usize), usize)> = None;
    for (i, vh) in table.virtual_hosts.iter().enumerate() {
        for d in &vh.domains {
            let d = strip_port(d).to_ascii_lowercase();
            let rank = if d == "*" {
                Some((0, 0))
            } else if let Some(s) = d.strip_prefix('*') {
                (host.len() > s.len() && host.as_bytes().ends_with(s.as_bytes())).then_some((2, s.len()))
            } else if let Some(p) = d.strip_suffix('*') {
                (host.len() > p.len() && host.as_bytes().starts_with(p.as_bytes())).then_some((1, p.len()))
            } else {
                (d == host).then_some((3, d.len()))
            };
            if let Some(r) = rank {
                if best.is_none_or(|(b, _)| r > b) {
                    best = Some((r, i));
                }
            }
        }
    }
    best.map(|(_, i)| i)
}
