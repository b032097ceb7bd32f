//! Authorization (`authz`): generated policies and connections, decided by the proxy's
//! `PolicyStore::check` and by a reference evaluator written here from Istio's documented
//! semantics; ALLOW/DENY (and which kind of denial) must agree. Policies also round-trip through
//! the local file's JSON form unchanged.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderMap, HeaderName, HeaderValue};
use nodeway_proxy::{
    authz::{
        Action, Cidr, Clause, Connection, Empty, HeaderCondition, Match, Policy, PolicyStore, RequestAttrs, Rule,
        Scope, ServiceAccountMatch, StringMatch, Verdict,
    },
    identity::Identity,
    workload::Workload,
};

use crate::Target;

pub const TARGET: Target = Target {
    name: "authz",
    about: "authorization decisions against an independent reference evaluator (ALLOW/DENY)",
    run,
    dict: &[],
    max_len: 2048,
};

const NAMESPACES: &[&str] = &["demo", "other", "de", ""];
const ACCOUNTS: &[&str] = &["client", "robot", ""];
const DOMAINS: &[&str] = &["cluster.local", "td"];
const WORDS: &[&str] = &[
    "",
    "demo",
    "de",
    "mo",
    "other",
    "cluster.local/ns/demo/sa/client",
    "cluster.local/ns/",
    "/sa/robot",
    "GET",
    "POST",
    "get",
    "/",
    "/admin",
    "/admin/x",
    "/public",
    "reviews",
    "reviews.demo.svc.cluster.local",
    ".svc.cluster.local",
    "alice",
    "alice,bob",
    "bob",
];
const HEADERS: &[&str] = &["x-user", "x-role"];

fn ip(i: u8) -> IpAddr {
    match i % 6 {
        0 => IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
        1 => IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
        2 => IpAddr::V4(Ipv4Addr::new(198, 19, 255, 1)),
        3 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        4 => IpAddr::V6(Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped()),
        _ => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0x100, 1)),
    }
}

fn pick<'a>(pool: &[&'a str], i: u8) -> &'a str {
    pool[usize::from(i) % pool.len()]
}

#[derive(Debug, Arbitrary)]
enum GenString {
    Exact(u8),
    Prefix(u8),
    Suffix(u8),
    Presence,
}

impl GenString {
    fn build(&self) -> StringMatch {
        match self {
            GenString::Exact(i) => StringMatch::Exact(pick(WORDS, *i).into()),
            GenString::Prefix(i) => StringMatch::Prefix(pick(WORDS, *i).into()),
            GenString::Suffix(i) => StringMatch::Suffix(pick(WORDS, *i).into()),
            GenString::Presence => StringMatch::Presence(Empty {}),
        }
    }
}

/// Which field of a `Match` a generated value goes to.
#[derive(Debug, Arbitrary)]
enum Field {
    Namespace(bool, GenString),
    Account(bool, u8, u8),
    Principal(bool, GenString),
    SourceIp(bool, u8, u8),
    DestinationIp(bool, u8, u8),
    Port(bool, u8),
    Method(bool, GenString),
    Path(bool, GenString),
    Host(bool, GenString),
    Header(u8, Vec<GenString>, Vec<GenString>),
}

#[derive(Debug, Arbitrary)]
struct GenPolicy {
    name: u8,
    namespace: u8,
    scope: u8,
    action: u8,
    dry_run: bool,
    /// rules → clauses → matches → fields
    rules: Vec<Vec<Vec<Vec<Field>>>>,
}

#[derive(Debug, Arbitrary)]
struct GenRequest {
    method: u8,
    path: u8,
    host: u8,
    headers: Vec<(u8, u8)>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    policies: Vec<GenPolicy>,
    workload_namespace: u8,
    selected: Vec<(u8, u8)>,
    source: u8,
    identity: Option<(u8, u8, u8)>,
    destination: u8,
    port: u8,
    request: Option<GenRequest>,
}

const PORTS: &[u16] = &[80, 8080, 9090];

fn port(i: u8) -> u16 {
    PORTS[usize::from(i) % PORTS.len()]
}

fn cidr(addr: u8, len: u8) -> Option<Cidr> {
    let addr = ip(addr);
    let max = if addr.is_ipv4() { 33 } else { 129 };
    Cidr::new(addr, len % max).ok()
}

fn build_match(fields: &[Field]) -> Match {
    let mut m = Match::default();
    for f in fields.iter().take(6) {
        match f {
            Field::Namespace(not, s) => [&mut m.namespaces, &mut m.not_namespaces][usize::from(*not)].push(s.build()),
            Field::Account(not, ns, sa) => [&mut m.service_accounts, &mut m.not_service_accounts][usize::from(*not)]
                .push(ServiceAccountMatch {
                    namespace: pick(NAMESPACES, *ns).into(),
                    service_account: pick(ACCOUNTS, *sa).into(),
                }),
            Field::Principal(not, s) => [&mut m.principals, &mut m.not_principals][usize::from(*not)].push(s.build()),
            Field::SourceIp(not, a, l) => {
                if let Some(c) = cidr(*a, *l) {
                    [&mut m.source_ips, &mut m.not_source_ips][usize::from(*not)].push(c)
                }
            }
            Field::DestinationIp(not, a, l) => {
                if let Some(c) = cidr(*a, *l) {
                    [&mut m.destination_ips, &mut m.not_destination_ips][usize::from(*not)].push(c)
                }
            }
            Field::Port(not, p) => {
                [&mut m.destination_ports, &mut m.not_destination_ports][usize::from(*not)].push(port(*p))
            }
            Field::Method(not, s) => [&mut m.methods, &mut m.not_methods][usize::from(*not)].push(s.build()),
            Field::Path(not, s) => [&mut m.paths, &mut m.not_paths][usize::from(*not)].push(s.build()),
            Field::Host(not, s) => [&mut m.hosts, &mut m.not_hosts][usize::from(*not)].push(s.build()),
            Field::Header(name, values, not_values) => {
                let values: Vec<StringMatch> = values.iter().take(2).map(GenString::build).collect();
                let not_values: Vec<StringMatch> = not_values.iter().take(2).map(GenString::build).collect();
                if !(values.is_empty() && not_values.is_empty()) {
                    m.headers.push(HeaderCondition {
                        name: HeaderName::from_static(pick(HEADERS, *name)),
                        values,
                        not_values,
                    });
                }
            }
        }
    }
    m
}

fn build_policy(g: &GenPolicy) -> Policy {
    Policy {
        name: format!("p{}", g.name % 4),
        namespace: pick(NAMESPACES, g.namespace).into(),
        scope: [Scope::Global, Scope::Namespace, Scope::WorkloadSelector][usize::from(g.scope % 3)],
        action: [Action::Allow, Action::Deny, Action::Audit][usize::from(g.action % 3)],
        dry_run: g.dry_run,
        rules: g
            .rules
            .iter()
            .take(3)
            .map(|clauses| Rule {
                clauses: clauses
                    .iter()
                    .take(3)
                    .map(|matches| Clause {
                        matches: matches.iter().take(3).map(|m| build_match(m)).collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn run(bytes: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(bytes)) else {
        return;
    };
    let policies: Vec<Policy> = input.policies.iter().take(6).map(build_policy).collect();
    for p in &policies {
        let json = serde_json::to_string(p).expect("a policy serializes");
        let back: Policy = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} does not parse back: {e}"));
        assert_eq!(&back, p, "a policy changes through its JSON form {json}");
    }
    let workload = Workload {
        name: "w".into(),
        namespace: pick(NAMESPACES, input.workload_namespace).into(),
        authorization_policies: input
            .selected
            .iter()
            .take(4)
            .map(|(n, ns)| format!("{}/p{}", pick(NAMESPACES, *ns), n % 4))
            .collect(),
        ..Workload::default()
    };
    let mut headers = HeaderMap::new();
    if let Some(r) = &input.request {
        for (n, v) in r.headers.iter().take(4) {
            if let Ok(v) = HeaderValue::from_str(pick(WORDS, *v)) {
                headers.append(HeaderName::from_static(pick(HEADERS, *n)), v);
            }
        }
    }
    let conn = Connection {
        source: SocketAddr::new(ip(input.source), 40000),
        source_identity: input
            .identity
            .map(|(td, ns, sa)| Identity::new(pick(DOMAINS, td), pick(NAMESPACES, ns), pick(ACCOUNTS, sa))),
        destination: SocketAddr::new(ip(input.destination), port(input.port)),
        request: input.request.as_ref().map(|r| RequestAttrs {
            method: pick(WORDS, r.method).into(),
            path: pick(WORDS, r.path).into(),
            host: pick(WORDS, r.host).into(),
            headers,
        }),
    };
    let store = PolicyStore::new(policies.clone());
    let got = store.check(&workload, &conn, |_, _| {});
    let want = reference::decide(&policies, &workload, &conn);
    let agree = matches!(
        (&got, want),
        (Verdict::Allow, reference::Decision::Allow)
            | (Verdict::DeniedBy(_), reference::Decision::Denied)
            | (Verdict::NoAllowMatched, reference::Decision::NoAllowMatched)
    );
    assert!(
        agree,
        "proxy: {got:?}, reference: {want:?}\nworkload namespace {:?}, selected {:?}\nconnection {conn:?}\npolicies {policies:#?}",
        workload.namespace, workload.authorization_policies
    );
    assert_eq!(
        store.needs_http(&workload),
        reference::needs_http(&policies, &workload),
        "needs_http"
    );
}

/// Istio's authorization semantics, written out without the proxy's code.
mod reference {
    use std::{collections::BTreeMap, net::IpAddr};

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Decision {
        Allow,
        Denied,
        NoAllowMatched,
    }

    /// Later policies with the same `namespace/name` replace earlier ones.
    fn applicable<'a>(policies: &'a [Policy], w: &Workload) -> Vec<&'a Policy> {
        let mut by_key: BTreeMap<String, &Policy> = BTreeMap::new();
        for p in policies {
            by_key.insert(format!("{}/{}", p.namespace, p.name), p);
        }
        by_key
            .into_iter()
            .filter(|(key, p)| match p.scope {
                Scope::Global => true,
                Scope::Namespace => p.namespace == w.namespace,
                Scope::WorkloadSelector => w.authorization_policies.contains(key),
            })
            .map(|(_, p)| p)
            .collect()
    }

    /// A DENY that matches denies; else with any ALLOW one must match; AUDIT and dry-run
    /// policies decide nothing.
    pub fn decide(policies: &[Policy], w: &Workload, c: &Connection) -> Decision {
        let enforced: Vec<&Policy> = applicable(policies, w)
            .into_iter()
            .filter(|p| !p.dry_run && p.action != Action::Audit)
            .collect();
        if enforced.iter().any(|p| p.action == Action::Deny && policy(p, c)) {
            return Decision::Denied;
        }
        let allows: Vec<&&Policy> = enforced.iter().filter(|p| p.action == Action::Allow).collect();
        if allows.is_empty() || allows.iter().any(|p| policy(p, c)) {
            Decision::Allow
        } else {
            Decision::NoAllowMatched
        }
    }

    pub fn needs_http(policies: &[Policy], w: &Workload) -> bool {
        applicable(policies, w)
            .into_iter()
            .filter(|p| !p.dry_run && p.action != Action::Audit)
            .flat_map(|p| &p.rules)
            .flat_map(|r| &r.clauses)
            .flat_map(|c| &c.matches)
            .any(has_http)
    }

    /// Rules are OR-ed, a rule's clauses AND-ed, a clause's matches OR-ed.
    fn policy(p: &Policy, c: &Connection) -> bool {
        p.rules.iter().any(|r| {
            r.clauses
                .iter()
                .all(|cl| cl.matches.iter().any(|m| one(m, c, p.action)))
        })
    }

    fn has_http(m: &Match) -> bool {
        !m.methods.is_empty()
            || !m.not_methods.is_empty()
            || !m.paths.is_empty()
            || !m.not_paths.is_empty()
            || !m.hosts.is_empty()
            || !m.not_hosts.is_empty()
            || !m.headers.is_empty()
    }

    fn string(m: &StringMatch, v: &str) -> bool {
        match m {
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(s) => v.len() >= s.len() && v.as_bytes()[..s.len()] == *s.as_bytes(),
            StringMatch::Suffix(s) => v.len() >= s.len() && v.as_bytes()[v.len() - s.len()..] == *s.as_bytes(),
            StringMatch::Presence(_) => !v.is_empty(),
        }
    }

    /// IPv4-mapped IPv6 is IPv4; a mapped block of at least /96 is the IPv4 block it maps.
    fn in_block(b: &Cidr, ip: IpAddr) -> bool {
        let canon = |ip: IpAddr| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (net, len) = match b.addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && b.len >= 96 => (canon(b.addr), b.len - 96),
            a => (a, b.len),
        };
        let bytes = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let (n, a) = (bytes(net), bytes(canon(ip)));
        if n.len() != a.len() {
            return false;
        }
        (0..usize::from(len)).all(|bit| (n[bit / 8] >> (7 - bit % 8)) & 1 == (a[bit / 8] >> (7 - bit % 8)) & 1)
    }

    /// Values of a field OR-ed, `not` values none; the fields set AND-ed; a match setting no
    /// field matches nothing. A DENY's HTTP fields match a connection checked without a request
    /// (deny more, never less); an ALLOW's match none.
    fn one(m: &Match, c: &Connection, action: Action) -> bool {
        fn field<T>(yes: &[T], no: &[T], f: impl Fn(&T) -> bool) -> bool {
            (yes.is_empty() || yes.iter().any(&f)) && !no.iter().any(&f)
        }
        let empty = *m == Match::default();
        if empty {
            return false;
        }
        let id = c.source_identity.as_ref();
        // Only an authenticated (mTLS) peer has a principal and a namespace: for a plaintext
        // one no value matches, not even `prefix: ""`.
        let principal = id.map(|i| format!("{}/ns/{}/sa/{}", i.trust_domain, i.namespace, i.service_account));
        let namespace = id.map(|i| i.namespace.clone());
        let of = |v: &Option<String>, s: &StringMatch| v.as_deref().is_some_and(|v| string(s, v));
        let l4 = field(&m.namespaces, &m.not_namespaces, |s| of(&namespace, s))
            && field(&m.service_accounts, &m.not_service_accounts, |a| {
                id.is_some_and(|i| i.namespace == a.namespace && i.service_account == a.service_account)
            })
            && field(&m.principals, &m.not_principals, |s| of(&principal, s))
            && field(&m.source_ips, &m.not_source_ips, |b| in_block(b, c.source.ip()))
            && field(&m.destination_ips, &m.not_destination_ips, |b| {
                in_block(b, c.destination.ip())
            })
            && field(&m.destination_ports, &m.not_destination_ports, |p| {
                *p == c.destination.port()
            });
        if !l4 {
            return false;
        }
        if !has_http(m) {
            return true;
        }
        let Some(r) = &c.request else {
            return action == Action::Deny;
        };
        let header_ok = |h: &HeaderCondition| {
            let values: Vec<&str> = r
                .headers
                .get_all(&h.name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let value = (!values.is_empty()).then(|| values.join(","));
            let hit = |s: &StringMatch| value.as_deref().is_some_and(|v| string(s, v));
            (h.values.is_empty() || h.values.iter().any(hit)) && !h.not_values.iter().any(hit)
        };
        field(&m.methods, &m.not_methods, |s| string(s, &r.method))
            && field(&m.paths, &m.not_paths, |s| string(s, &r.path))
            && field(&m.hosts, &m.not_hosts, |s| string(s, &r.host))
            && m.headers.iter().all(header_ok)
    }
}
