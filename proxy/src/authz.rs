//! Authorization on inbound connections, with Istio's semantics (as ztunnel applies them at L4).
//!
//! The policies that apply to a workload are the global ones, those of its namespace, and the
//! selector-scoped ones it lists. A matching DENY wins; then, if any ALLOW applies, one of them must
//! match; with no ALLOW policy the connection is allowed. AUDIT policies only log. Dry-run policies
//! are evaluated and logged, never enforced. The model reads from istiod's
//! `istio.security.Authorization` and from the local file (the same fields in camelCase).
use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{identity::Identity, proto::istio::security as pb, workload::Workload};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    #[default]
    Global,
    Namespace,
    WorkloadSelector,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "GLOBAL",
            Scope::Namespace => "NAMESPACE",
            Scope::WorkloadSelector => "WORKLOAD_SELECTOR",
        }
    }
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Logs matching connections, decides nothing (local file only: istiod sends no AUDIT to
    /// node proxies).
    Audit,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default)]
    pub action: Action,
    /// OR-ed. No rule: the policy matches nothing (an ALLOW without rules denies all).
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// AND-ed; no clause matches everything.
    #[serde(default)]
    pub clauses: Vec<Clause>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Clause {
    /// OR-ed; a match that sets nothing matches nothing.
    #[serde(default)]
    pub matches: Vec<Match>,
}

/// Values of one field are OR-ed, the fields set are AND-ed, `not*` fields must match none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// `from.source.serviceAccounts`: the peer's namespace and service account, exactly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Istio's principal form, without `spiffe://`: `cluster.local/ns/demo/sa/client`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
    /// HTTP fields (a local-file extension: istiod's ztunnel `Authorization` has none). A policy
    /// with any of them makes the pod's inbound connections parsed as HTTP and checked per request
    /// (a denial is `403 RBAC: access denied`, as Envoy's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<StringMatch>,
    /// Matched against the path without its query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<StringMatch>,
    /// Matched against the Host / `:authority`, port removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<StringMatch>,
    /// Request headers, as Istio's `when: [{key: "request.headers[name]", values, notValues}]`:
    /// every condition must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderCondition>,
}

/// A service account by namespace and name; only an authenticated peer (mTLS) matches one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

impl ServiceAccountMatch {
    fn matches(&self, peer: Option<&Identity>) -> bool {
        peer.is_some_and(|i| i.namespace == self.namespace && i.service_account == self.service_account)
    }
}

/// One header condition: the header's value (several are joined with `,`, as Envoy's header
/// matcher sees them) must match one of `values` (when given) and none of `notValues`. An absent
/// header matches no value, so it fails `values` and passes `notValues`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, try_from = "HeaderConditionFields")]
pub struct HeaderCondition {
    #[serde(serialize_with = "serialize_header_name")]
    pub name: http::HeaderName,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<StringMatch>,
}

fn serialize_header_name<S: serde::Serializer>(n: &http::HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(n.as_str())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HeaderConditionFields {
    name: String,
    #[serde(default)]
    values: Vec<StringMatch>,
    #[serde(default)]
    not_values: Vec<StringMatch>,
}

impl TryFrom<HeaderConditionFields> for HeaderCondition {
    type Error = AuthzError;
    fn try_from(f: HeaderConditionFields) -> Result<Self, Self::Error> {
        let name = http::HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| AuthzError(format!("header condition: {:?} is not a header name", f.name)))?;
        if f.values.is_empty() && f.not_values.is_empty() {
            return Err(AuthzError(format!(
                "header condition on {name}: needs values or notValues"
            )));
        }
        Ok(HeaderCondition {
            name,
            values: f.values,
            not_values: f.not_values,
        })
    }
}

impl HeaderCondition {
    fn holds(&self, headers: &http::HeaderMap) -> bool {
        let mut all = headers.get_all(&self.name).iter().filter_map(|v| v.to_str().ok());
        let value = match (all.next(), all.next()) {
            (None, _) => None,
            (Some(one), None) => Some(std::borrow::Cow::Borrowed(one)),
            (Some(a), Some(b)) => {
                let mut v = format!("{a},{b}");
                for more in all {
                    v.push(',');
                    v.push_str(more);
                }
                Some(std::borrow::Cow::Owned(v))
            }
        };
        let matches = |m: &StringMatch| value.as_deref().is_some_and(|v| m.matches(v));
        (self.values.is_empty() || self.values.iter().any(matches)) && !self.not_values.iter().any(matches)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StringMatchFields", into = "StringMatchFields")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value (`{presence: {}}`).
    Presence(Empty),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// The protobuf-JSON shape, `{exact: x}`, `{prefix: x}`, `{suffix: x}` or `{presence: {}}`.
#[derive(Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StringMatchFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    presence: Option<Empty>,
}

impl TryFrom<StringMatchFields> for StringMatch {
    type Error = AuthzError;
    fn try_from(f: StringMatchFields) -> Result<Self, Self::Error> {
        match (f.exact, f.prefix, f.suffix, f.presence) {
            (Some(x), None, None, None) => Ok(StringMatch::Exact(x)),
            (None, Some(x), None, None) => Ok(StringMatch::Prefix(x)),
            (None, None, Some(x), None) => Ok(StringMatch::Suffix(x)),
            (None, None, None, Some(e)) => Ok(StringMatch::Presence(e)),
            _ => Err(AuthzError(
                "a string match needs exactly one of exact, prefix, suffix, presence".into(),
            )),
        }
    }
}

impl From<StringMatch> for StringMatchFields {
    fn from(m: StringMatch) -> Self {
        let mut f = StringMatchFields::default();
        match m {
            StringMatch::Exact(x) => f.exact = Some(x),
            StringMatch::Prefix(x) => f.prefix = Some(x),
            StringMatch::Suffix(x) => f.suffix = Some(x),
            StringMatch::Presence(e) => f.presence = Some(e),
        }
        f
    }
}

impl StringMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(s) => v.starts_with(s.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Presence(_) => !v.is_empty(),
        }
    }
}

/// An address block, written `198.18.0.0/16` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, AuthzError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(AuthzError(format!("{addr}/{len}: prefix longer than {max}")));
        }
        Ok(Cidr { addr, len })
    }

    /// Addresses compare canonically (an IPv4-mapped IPv6 address is the IPv4 address), so an
    /// IPv4-mapped block of at least /96 is the IPv4 block it maps: `::ffff:198.18.0.0/112` is
    /// `198.18.0.0/16`. A mapped block shorter than /96 is an IPv6 block (no IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, width, len) = self.canonical();
        let (addr, w2) = match ip.to_canonical() {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        if width != w2 {
            return false;
        }
        let shift = u32::from(width - len);
        let mask = if shift >= 128 { 0 } else { u128::MAX << shift };
        (net & mask) == (addr & mask)
    }

    /// (network bits, address width, prefix length ≤ width).
    fn canonical(&self) -> (u128, u8, u8) {
        match self.addr {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32, self.len),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if self.len >= 96 => (u128::from(u32::from(v4)), 32, self.len - 96),
                _ => (u128::from(v6), 128, self.len),
            },
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = AuthzError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| AuthzError(format!("{s:?} is not an address block: {why}"));
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad("bad address"))?;
        let len = match len {
            Some(l) => l.parse().map_err(|_| bad("bad prefix length"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthzError(pub String);

/// What the check sees of a connection.
#[derive(Clone, Debug)]
pub struct Connection {
    pub source: SocketAddr,
    /// The peer's mTLS identity; `None` for plaintext.
    pub source_identity: Option<Identity>,
    pub destination: SocketAddr,
    /// The request, when the connection is checked per HTTP request.
    pub request: Option<RequestAttrs>,
}

/// What HTTP authorization looks at.
#[derive(Clone, Debug, Default)]
pub struct RequestAttrs {
    pub method: String,
    /// Without the query.
    pub path: String,
    /// Without the port.
    pub host: String,
    pub headers: http::HeaderMap,
}

impl Match {
    fn has_http(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.headers.is_empty())
    }

    fn is_empty(&self) -> bool {
        !self.has_http()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }

    /// `fail_closed`: a connection checked without a request (it is not HTTP) matches the HTTP
    /// fields, as Istio drops HTTP-only fields from DENY rules for TCP (deny more, never less),
    /// while ALLOW rules with them match no TCP connection.
    fn matches(&self, c: &Connection, peer: &Peer<'_>, fail_closed: bool) -> bool {
        fn field<T>(yes: &[T], no: &[T], f: impl Fn(&T) -> bool) -> bool {
            (yes.is_empty() || yes.iter().any(&f)) && !no.iter().any(&f)
        }
        let (src, dst, port) = (c.source.ip(), c.destination.ip(), c.destination.port());
        // A plaintext peer has no principal and no namespace: no value matches them, not even
        // `prefix: ""` (Envoy's `authenticated` matcher is false without TLS).
        let of = |v: Option<&str>, m: &StringMatch| v.is_some_and(|v| m.matches(v));
        field(&self.namespaces, &self.not_namespaces, |m| of(peer.namespace, m))
            && field(&self.service_accounts, &self.not_service_accounts, |m| {
                m.matches(c.source_identity.as_ref())
            })
            && field(&self.principals, &self.not_principals, |m| {
                of(peer.principal.as_deref(), m)
            })
            && field(&self.source_ips, &self.not_source_ips, |b| b.contains(src))
            && field(&self.destination_ips, &self.not_destination_ips, |b| b.contains(dst))
            && field(&self.destination_ports, &self.not_destination_ports, |p| *p == port)
            && (!self.has_http()
                || (fail_closed && c.request.is_none())
                || c.request.as_ref().is_some_and(|r| {
                    field(&self.methods, &self.not_methods, |m| m.matches(&r.method))
                        && field(&self.paths, &self.not_paths, |m| m.matches(&r.path))
                        && field(&self.hosts, &self.not_hosts, |m| m.matches(&r.host))
                        && self.headers.iter().all(|h| h.holds(&r.headers))
                }))
    }
}

impl Policy {
    /// Whether deciding needs the HTTP request (some match has HTTP fields).
    pub fn has_http(&self) -> bool {
        self.rules
            .iter()
            .flat_map(|r| &r.clauses)
            .flat_map(|c| &c.matches)
            .any(Match::has_http)
    }

    /// `namespace/name`, the xDS resource name and how logs name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn matches(&self, c: &Connection) -> bool {
        self.matches_peer(c, &Peer::of(c))
    }

    /// [`Policy::matches`] with the peer's principal and namespace worked out once per connection.
    fn matches_peer(&self, c: &Connection, peer: &Peer<'_>) -> bool {
        self.rules.iter().any(|rule| {
            rule.clauses.iter().all(|clause| {
                clause
                    .matches
                    .iter()
                    .any(|m| !m.is_empty() && m.matches(c, peer, self.action == Action::Deny))
            })
        })
    }
}

/// Istio matches principals and namespaces of the authenticated peer only; plaintext has none.
struct Peer<'a> {
    /// `cluster.local/ns/demo/sa/client`
    principal: Option<String>,
    namespace: Option<&'a str>,
}

impl<'a> Peer<'a> {
    fn of(c: &'a Connection) -> Self {
        let id = c.source_identity.as_ref();
        Peer {
            principal: id.map(|i| format!("{}/ns/{}/sa/{}", i.trust_domain, i.namespace, i.service_account)),
            namespace: id.map(|i| i.namespace.as_str()),
        }
    }
}

/// The verdict on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied by this DENY policy (`namespace/name`).
    DeniedBy(String),
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        *self == Verdict::Allow
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow => f.write_str("allowed"),
            Verdict::DeniedBy(p) => write!(f, "denied by DENY policy {p}"),
            Verdict::NoAllowMatched => f.write_str("denied: no ALLOW policy matched"),
        }
    }
}

/// Every policy, indexed by scope. Built whole on each change and swapped in, so a check sees one
/// version.
#[derive(Debug, Default)]
pub struct PolicyStore {
    by_key: HashMap<String, Arc<Policy>>,
    global: Vec<Arc<Policy>>,
    by_namespace: HashMap<String, Vec<Arc<Policy>>>,
}

impl PolicyStore {
    /// Later entries with the same `namespace/name` replace earlier ones.
    pub fn new(policies: impl IntoIterator<Item = Policy>) -> Self {
        let mut by_key: HashMap<String, Arc<Policy>> = HashMap::new();
        for p in policies {
            by_key.insert(p.key(), Arc::new(p));
        }
        let mut store = PolicyStore::default();
        let mut keys: Vec<&String> = by_key.keys().collect();
        keys.sort();
        for k in keys {
            let p = &by_key[k];
            match p.scope {
                Scope::Global => store.global.push(p.clone()),
                Scope::Namespace => store
                    .by_namespace
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
                Scope::WorkloadSelector => {}
            }
        }
        store.by_key = by_key;
        store
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Policy>> {
        self.by_key.get(key)
    }

    /// Every policy, sorted by key (for `/policies`).
    pub fn all(&self) -> Vec<&Policy> {
        let mut v: Vec<&Policy> = self.by_key.values().map(|p| &**p).collect();
        v.sort_by_key(|p| p.key());
        v
    }

    /// The policies that apply to `w`: global, its namespace's, and the selector-scoped ones it lists.
    pub fn applicable<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Arc<Policy>> + 'a {
        let selected = w
            .authorization_policies
            .iter()
            .filter_map(|k| self.by_key.get(k))
            .filter(|p| p.scope == Scope::WorkloadSelector);
        self.global
            .iter()
            .chain(self.by_namespace.get(&w.namespace).into_iter().flatten())
            .chain(selected)
    }

    /// Whether `w`'s inbound connections must be checked per HTTP request.
    pub fn needs_http(&self, w: &Workload) -> bool {
        self.applicable(w)
            .any(|p| !p.dry_run && p.action != Action::Audit && p.has_http())
    }

    /// Decides on `c` to workload `w`. `log` hears of AUDIT and dry-run matches.
    pub fn check(&self, w: &Workload, c: &Connection, mut log: impl FnMut(&Policy, &str)) -> Verdict {
        let mut allow_policies = false;
        let mut allowed = false;
        let mut denied = None;
        let peer = Peer::of(c);
        for p in self.applicable(w) {
            let hit = p.matches_peer(c, &peer);
            if p.dry_run {
                if hit {
                    log(p, "dry-run policy matched (not enforced)");
                }
                continue;
            }
            match p.action {
                Action::Audit if hit => log(p, "audit policy matched"),
                Action::Audit => {}
                Action::Deny if hit && denied.is_none() => denied = Some(p.key()),
                Action::Deny => {}
                Action::Allow => {
                    allow_policies = true;
                    allowed |= hit;
                }
            }
        }
        match denied {
            Some(p) => Verdict::DeniedBy(p),
            None if !allow_policies || allowed => Verdict::Allow,
            None => Verdict::NoAllowMatched,
        }
    }
}

pub(crate) fn ip_from_bytes(b: &[u8]) -> Result<IpAddr, AuthzError> {
    match b.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(b).map_err(|_| AuthzError("bad IPv4".into()))?,
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(b).map_err(|_| AuthzError("bad IPv6".into()))?,
        )),
        n => Err(AuthzError(format!("an address of {n} bytes (want 4 or 16)"))),
    }
}

impl TryFrom<pb::Authorization> for Policy {
    type Error = AuthzError;

    /// Refuses what it cannot enforce exactly, naming the field: a policy half understood would
    /// allow or deny the wrong connections.
    fn try_from(a: pb::Authorization) -> Result<Self, Self::Error> {
        let at = |what: String| AuthzError(format!("authorization {}/{}: {what}", a.namespace, a.name));
        if a.name.is_empty() {
            return Err(at("name is empty".into()));
        }
        let scope = match pb::Scope::try_from(a.scope) {
            Ok(pb::Scope::Global) => Scope::Global,
            Ok(pb::Scope::Namespace) => Scope::Namespace,
            Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => return Err(at(format!("unknown scope {}", a.scope))),
        };
        let action = match pb::Action::try_from(a.action) {
            Ok(pb::Action::Allow) => Action::Allow,
            Ok(pb::Action::Deny) => Action::Deny,
            Err(_) => return Err(at(format!("unknown action {}", a.action))),
        };
        let strings = |v: &[pb::StringMatch], field: &str| -> Result<Vec<StringMatch>, AuthzError> {
            v.iter()
                .map(|s| {
                    use pb::string_match::MatchType;
                    match &s.match_type {
                        Some(MatchType::Exact(x)) => Ok(StringMatch::Exact(x.clone())),
                        Some(MatchType::Prefix(x)) => Ok(StringMatch::Prefix(x.clone())),
                        Some(MatchType::Suffix(x)) => Ok(StringMatch::Suffix(x.clone())),
                        Some(MatchType::Presence(_)) => Ok(StringMatch::Presence(Empty {})),
                        None => Err(at(format!("{field}: a string match with no match type"))),
                    }
                })
                .collect()
        };
        let cidrs = |v: &[pb::Address], field: &str| -> Result<Vec<Cidr>, AuthzError> {
            v.iter()
                .map(|x| {
                    let ip = ip_from_bytes(&x.address).map_err(|e| at(format!("{field}: {e}")))?;
                    let len = u8::try_from(x.length).map_err(|_| at(format!("{field}: prefix length {}", x.length)))?;
                    Cidr::new(ip, len).map_err(|e| at(format!("{field}: {e}")))
                })
                .collect()
        };
        let accounts = |v: &[pb::ServiceAccountMatch], field: &str| -> Result<Vec<ServiceAccountMatch>, AuthzError> {
            v.iter()
                .map(|m| {
                    if m.namespace.is_empty() || m.service_account.is_empty() {
                        return Err(at(format!(
                            "{field}: a service account match needs a namespace and a name"
                        )));
                    }
                    Ok(ServiceAccountMatch {
                        namespace: m.namespace.clone(),
                        service_account: m.service_account.clone(),
                    })
                })
                .collect()
        };
        let ports = |v: &[u32], field: &str| -> Result<Vec<u16>, AuthzError> {
            v.iter()
                .map(|p| u16::try_from(*p).map_err(|_| at(format!("{field}: port {p} out of range"))))
                .collect()
        };
        let mut rules = Vec::with_capacity(a.rules.len());
        for r in &a.rules {
            let mut clauses = Vec::with_capacity(r.clauses.len());
            for c in &r.clauses {
                let mut matches = Vec::with_capacity(c.matches.len());
                for m in &c.matches {
                    matches.push(Match {
                        namespaces: strings(&m.namespaces, "namespaces")?,
                        not_namespaces: strings(&m.not_namespaces, "notNamespaces")?,
                        service_accounts: accounts(&m.service_accounts, "serviceAccounts")?,
                        not_service_accounts: accounts(&m.not_service_accounts, "notServiceAccounts")?,
                        principals: strings(&m.principals, "principals")?,
                        not_principals: strings(&m.not_principals, "notPrincipals")?,
                        source_ips: cidrs(&m.source_ips, "sourceIps")?,
                        not_source_ips: cidrs(&m.not_source_ips, "notSourceIps")?,
                        destination_ips: cidrs(&m.destination_ips, "destinationIps")?,
                        not_destination_ips: cidrs(&m.not_destination_ips, "notDestinationIps")?,
                        destination_ports: ports(&m.destination_ports, "destinationPorts")?,
                        not_destination_ports: ports(&m.not_destination_ports, "notDestinationPorts")?,
                        // The wire format (ztunnel's) carries no HTTP fields.
                        ..Match::default()
                    });
                }
                clauses.push(Clause { matches });
            }
            rules.push(Rule { clauses });
        }
        Ok(Policy {
            name: a.name,
            namespace: a.namespace,
            scope,
            action,
            rules,
            dry_run: a.dry_run,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// istiod's shape of `from: [{source: {serviceAccounts: [...]}}]`: one rule, one clause, one
    /// match per account (or one with `not_service_accounts`).
    fn by_service_account(action: pb::Action, yes: &[(&str, &str)], no: &[(&str, &str)]) -> Policy {
        let sa = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(ns, sa)| pb::ServiceAccountMatch {
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
                .collect::<Vec<_>>()
        };
        let a = pb::Authorization {
            name: "by-sa".into(),
            namespace: "demo".into(),
            scope: pb::Scope::Namespace as i32,
            action: action as i32,
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        service_accounts: sa(yes),
                        not_service_accounts: sa(no),
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        // Through the wire, as istiod sends it.
        let bytes = prost::Message::encode_to_vec(&a);
        let decoded = <pb::Authorization as prost::Message>::decode(bytes.as_slice()).unwrap();
        Policy::try_from(decoded).unwrap()
    }

    #[test]
    fn a_deny_by_service_account_refuses_that_account_only() {
        let s = PolicyStore::new([by_service_account(pb::Action::Deny, &[("other", "robot")], &[])]);
        let w = workload("demo", &[]);
        let robot = conn("198.18.0.9:4000", Some(OTHER), "198.18.0.3:8080");
        assert_eq!(s.check(&w, &robot, |_, _| {}), Verdict::DeniedBy("demo/by-sa".into()));
        let human = conn(
            "198.18.0.9:4000",
            Some("spiffe://cluster.local/ns/other/sa/human"),
            "198.18.0.3:8080",
        );
        assert!(s.check(&w, &human, |_, _| {}).allowed());
        // Same account name in another namespace is another account.
        let elsewhere = conn(
            "198.18.0.9:4000",
            Some("spiffe://cluster.local/ns/third/sa/robot"),
            "198.18.0.3:8080",
        );
        assert!(s.check(&w, &elsewhere, |_, _| {}).allowed());
        // No identity, no account: a plaintext peer does not match (and is not denied by it).
        assert!(s
            .check(&w, &conn("198.18.0.9:4000", None, "198.18.0.3:8080"), |_, _| {})
            .allowed());
    }

    #[test]
    fn an_allow_by_service_account_keeps_its_condition() {
        let s = PolicyStore::new([by_service_account(pb::Action::Allow, &[("other", "robot")], &[])]);
        let w = workload("demo", &[]);
        assert!(s
            .check(&w, &conn("198.18.0.9:4000", Some(OTHER), "198.18.0.3:8080"), |_, _| {})
            .allowed());
        let human = conn(
            "198.18.0.9:4000",
            Some("spiffe://cluster.local/ns/other/sa/human"),
            "198.18.0.3:8080",
        );
        assert_eq!(s.check(&w, &human, |_, _| {}), Verdict::NoAllowMatched);
        assert_eq!(
            s.check(&w, &conn("198.18.0.9:4000", None, "198.18.0.3:8080"), |_, _| {}),
            Verdict::NoAllowMatched
        );
        // notServiceAccounts: everyone authenticated but robot.
        let s = PolicyStore::new([by_service_account(pb::Action::Allow, &[], &[("other", "robot")])]);
        assert!(s.check(&w, &human, |_, _| {}).allowed());
        assert_eq!(
            s.check(&w, &conn("198.18.0.9:4000", Some(OTHER), "198.18.0.3:8080"), |_, _| {}),
            Verdict::NoAllowMatched
        );
    }

    fn conn(src: &str, id: Option<&str>, dst: &str) -> Connection {
        Connection {
            request: None,
            source: src.parse().unwrap(),
            source_identity: id.map(|i| i.parse().unwrap()),
            destination: dst.parse().unwrap(),
        }
    }

    fn workload(ns: &str, selected: &[&str]) -> Workload {
        Workload {
            name: "server".into(),
            namespace: ns.into(),
            authorization_policies: selected.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn policy(yaml: &str) -> Policy {
        serde_yaml::from_str(yaml).unwrap()
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/robot";

    #[test]
    fn no_policy_allows_and_empty_allow_denies() {
        let w = workload("demo", &[]);
        let c = conn("198.18.0.2:4000", Some(CLIENT), "198.18.0.3:8080");
        assert_eq!(PolicyStore::default().check(&w, &c, |_, _| {}), Verdict::Allow);
        // An ALLOW policy with no rules matches nothing: everything is denied.
        let s = PolicyStore::new([policy("{name: allow-nothing, namespace: demo, scope: NAMESPACE}")]);
        assert_eq!(s.check(&w, &c, |_, _| {}), Verdict::NoAllowMatched);
        // `rules: [{}]` (a rule with no clause) allows all.
        let s = PolicyStore::new([policy(
            "{name: allow-all, namespace: demo, scope: NAMESPACE, rules: [{}]}",
        )]);
        assert_eq!(s.check(&w, &c, |_, _| {}), Verdict::Allow);
    }

    #[test]
    fn deny_is_checked_first_and_wins() {
        let s = PolicyStore::new([
            policy("{name: allow-all, namespace: demo, scope: NAMESPACE, rules: [{}]}"),
            policy(
                "{name: no-robots, namespace: istio-system, action: DENY,
                  rules: [{clauses: [{matches: [{namespaces: [{exact: other}]}]}]}]}",
            ),
        ]);
        let w = workload("demo", &[]);
        let robot = conn("198.18.0.9:4000", Some(OTHER), "198.18.0.3:8080");
        assert_eq!(
            s.check(&w, &robot, |_, _| {}),
            Verdict::DeniedBy("istio-system/no-robots".into())
        );
        let client = conn("198.18.0.2:4000", Some(CLIENT), "198.18.0.3:8080");
        assert_eq!(s.check(&w, &client, |_, _| {}), Verdict::Allow);
    }

    #[test]
    fn scopes_select_the_policies_that_apply() {
        let deny_all = |name: &str, ns: &str, scope: &str| {
            policy(&format!(
                "{{name: {name}, namespace: {ns}, scope: {scope}, action: DENY, rules: [{{}}]}}"
            ))
        };
        let s = PolicyStore::new([
            deny_all("ns-wide", "prod", "NAMESPACE"),
            deny_all("only-db", "demo", "WORKLOAD_SELECTOR"),
        ]);
        let c = conn("198.18.0.2:4000", Some(CLIENT), "198.18.0.3:8080");
        assert!(
            s.check(&workload("demo", &[]), &c, |_, _| {}).allowed(),
            "other namespace"
        );
        assert!(
            !s.check(&workload("prod", &[]), &c, |_, _| {}).allowed(),
            "its namespace"
        );
        assert!(
            !s.check(&workload("demo", &["demo/only-db"]), &c, |_, _| {}).allowed(),
            "selected"
        );
        assert!(
            s.check(&workload("demo", &["demo/missing"]), &c, |_, _| {}).allowed(),
            "a reference to an unknown policy selects nothing"
        );
        let g = PolicyStore::new([deny_all("mesh", "istio-system", "GLOBAL")]);
        assert!(!g.check(&workload("anything", &[]), &c, |_, _| {}).allowed());
    }

    #[test]
    fn every_match_kind() {
        let allow = |m: &str| {
            PolicyStore::new([policy(&format!(
                "{{name: p, namespace: demo, scope: NAMESPACE, rules: [{{clauses: [{{matches: [{m}]}}]}}]}}"
            ))])
        };
        let w = workload("demo", &[]);
        let client = conn("198.18.0.2:4000", Some(CLIENT), "198.18.0.3:8080");
        let robot = conn("198.18.1.9:4000", Some(OTHER), "198.18.0.3:9090");
        let plain = conn("198.18.0.2:4000", None, "198.18.0.3:8080");
        let cases: &[(&str, bool, bool, bool)] = &[
            // match, client allowed, robot allowed, plaintext allowed
            (
                "{principals: [{exact: cluster.local/ns/demo/sa/client}]}",
                true,
                false,
                false,
            ),
            ("{principals: [{prefix: cluster.local/ns/other/}]}", false, true, false),
            ("{principals: [{suffix: /sa/client}]}", true, false, false),
            ("{principals: [{presence: {}}]}", true, true, false),
            (
                "{notPrincipals: [{exact: cluster.local/ns/demo/sa/client}]}",
                false,
                true,
                true,
            ),
            ("{namespaces: [{exact: demo}]}", true, false, false),
            ("{notNamespaces: [{exact: demo}]}", false, true, true),
            ("{sourceIps: [198.18.0.0/24]}", true, false, true),
            ("{notSourceIps: [198.18.0.2]}", false, true, false),
            ("{destinationPorts: [8080]}", true, false, true),
            ("{notDestinationPorts: [8080]}", false, true, false),
            ("{destinationIps: [198.18.0.3/32]}", true, true, true),
            ("{notDestinationIps: [198.18.0.0/16]}", false, false, false),
            // Fields AND-ed, values OR-ed.
            (
                "{namespaces: [{exact: demo}, {exact: other}], destinationPorts: [9090]}",
                false,
                true,
                false,
            ),
        ];
        for (m, c_ok, r_ok, p_ok) in cases {
            let s = allow(m);
            assert_eq!(s.check(&w, &client, |_, _| {}).allowed(), *c_ok, "client, {m}");
            assert_eq!(s.check(&w, &robot, |_, _| {}).allowed(), *r_ok, "robot, {m}");
            assert_eq!(s.check(&w, &plain, |_, _| {}).allowed(), *p_ok, "plaintext, {m}");
        }
        // An empty match matches nothing; clauses are AND-ed.
        assert!(!allow("{}").check(&w, &client, |_, _| {}).allowed());
        let two_clauses = PolicyStore::new([policy(
            "{name: p, namespace: demo, scope: NAMESPACE, rules: [{clauses: [
                {matches: [{namespaces: [{exact: demo}]}]}, {matches: [{destinationPorts: [9090]}]}]}]}",
        )]);
        assert!(!two_clauses.check(&w, &client, |_, _| {}).allowed());
    }

    #[test]
    fn audit_and_dry_run_only_log() {
        let s = PolicyStore::new([
            policy("{name: watch, namespace: demo, scope: NAMESPACE, action: AUDIT, rules: [{}]}"),
            policy("{name: trial, namespace: demo, scope: NAMESPACE, action: DENY, dryRun: true, rules: [{}]}"),
        ]);
        let mut heard = Vec::new();
        let c = conn("198.18.0.2:4000", Some(CLIENT), "198.18.0.3:8080");
        let v = s.check(&workload("demo", &[]), &c, |p, what| {
            heard.push(format!("{} {what}", p.key()))
        });
        assert_eq!(v, Verdict::Allow);
        assert_eq!(heard.len(), 2, "{heard:?}");
    }

    #[test]
    fn cidrs_contain_and_reject_junk() {
        let c: Cidr = "198.18.0.0/15".parse().unwrap();
        assert!(c.contains("198.19.255.1".parse().unwrap()));
        assert!(c.contains("::ffff:198.18.0.1".parse().unwrap()));
        assert!(!c.contains("198.20.0.1".parse().unwrap()));
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("198.18.0.1".parse().unwrap()));
        assert!("fd00::/8".parse::<Cidr>().unwrap().contains("fd12::1".parse().unwrap()));
        for bad in ["198.18.0.0/33", "nope/8", "198.18.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    /// Found by the `authz` fuzz target: `32 - len` on an IPv4-mapped block overflowed (a panic
    /// in debug builds; in release the mask wrapped to 0 and the block matched every IPv4
    /// address, so an ALLOW from `::ffff:198.18.0.1` allowed any IPv4 source).
    #[test]
    fn ipv4_mapped_blocks_are_the_ipv4_blocks_they_map() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let one: Cidr = "::ffff:198.18.0.1".parse().unwrap();
        assert!(one.contains(ip("198.18.0.1")) && one.contains(ip("::ffff:198.18.0.1")));
        assert!(!one.contains(ip("198.18.0.2")));
        let block: Cidr = "::ffff:198.18.0.0/112".parse().unwrap();
        assert!(block.contains(ip("198.18.200.1")) && !block.contains(ip("198.19.0.1")));
        let all_v4: Cidr = "::ffff:0.0.0.0/96".parse().unwrap();
        assert!(all_v4.contains(ip("203.0.113.9")) && !all_v4.contains(ip("2001:db8::1")));
        // Shorter than /96 it is an IPv6 block, which holds no IPv4 address.
        let v6: Cidr = "::ffff:0.0.0.0/80".parse().unwrap();
        assert!(!v6.contains(ip("198.18.0.1")) && v6.contains(ip("::1")));

        let s = PolicyStore::new([policy(
            "{name: from-one, namespace: demo, scope: NAMESPACE, rules: [{clauses: [{matches: [{sourceIps: ['::ffff:198.18.0.1']}]}]}]}",
        )]);
        let w = workload("demo", &[]);
        assert!(s
            .check(&w, &conn("198.18.0.1:4000", None, "198.18.0.3:8080"), |_, _| {})
            .allowed());
        assert_eq!(
            s.check(&w, &conn("198.18.0.2:4000", None, "198.18.0.3:8080"), |_, _| {}),
            Verdict::NoAllowMatched
        );
    }

    /// Found writing the `authz` fuzz target's reference model: a plaintext peer's principal and
    /// namespace were the empty string, so `principals: [{prefix: ""}]` ("any principal")
    /// allowed plaintext peers.
    #[test]
    fn a_plaintext_peer_matches_no_principal_or_namespace_value() {
        let w = workload("demo", &[]);
        let plain = conn("198.18.0.9:4000", None, "198.18.0.3:8080");
        let mtls = conn("198.18.0.9:4000", Some(CLIENT), "198.18.0.3:8080");
        for m in [
            "principals: [{prefix: ''}]",
            "principals: [{exact: ''}]",
            "namespaces: [{suffix: ''}]",
        ] {
            let s = PolicyStore::new([policy(&format!(
                "{{name: any-peer, namespace: demo, scope: NAMESPACE, rules: [{{clauses: [{{matches: [{{{m}}}]}}]}}]}}"
            ))]);
            assert_eq!(s.check(&w, &plain, |_, _| {}), Verdict::NoAllowMatched, "{m}");
        }
        let s = PolicyStore::new([policy(
            "{name: any-peer, namespace: demo, scope: NAMESPACE, rules: [{clauses: [{matches: [{principals: [{prefix: ''}]}]}]}]}",
        )]);
        assert!(s.check(&w, &mtls, |_, _| {}).allowed());
        // Nor does a plaintext peer escape a `notPrincipals`/`notNamespaces` DENY's exception.
        let s = PolicyStore::new([policy(
            "{name: deny-others, namespace: demo, scope: NAMESPACE, action: DENY, rules: [{clauses: [{matches: [{notNamespaces: [{exact: ''}]}]}]}]}",
        )]);
        assert_eq!(
            s.check(&w, &plain, |_, _| {}),
            Verdict::DeniedBy("demo/deny-others".into())
        );
    }

    #[test]
    fn from_istiod_resources_and_refusals_name_the_field() {
        use pb::string_match::MatchType;
        let a = pb::Authorization {
            name: "p".into(),
            namespace: "demo".into(),
            scope: pb::Scope::Namespace as i32,
            action: pb::Action::Deny as i32,
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        principals: vec![pb::StringMatch {
                            match_type: Some(MatchType::Exact("cluster.local/ns/other/sa/robot".into())),
                        }],
                        source_ips: vec![pb::Address {
                            address: vec![198, 18, 0, 0],
                            length: 16,
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: false,
            extensions: Vec::new(),
        };
        let p = Policy::try_from(a.clone()).unwrap();
        assert_eq!(p.action, Action::Deny);
        assert_eq!(
            p.rules[0].clauses[0].matches[0].source_ips[0].to_string(),
            "198.18.0.0/16"
        );
        let s = PolicyStore::new([p]);
        let robot = conn("198.18.1.9:4000", Some(OTHER), "198.18.0.3:8080");
        assert!(!s.check(&workload("demo", &[]), &robot, |_, _| {}).allowed());

        let mut bad = a.clone();
        bad.rules[0].clauses[0].matches[0].source_ips[0].address = vec![1, 2, 3];
        let e = Policy::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("demo/p") && e.contains("sourceIps"), "{e}");
        let mut bad = a;
        bad.rules[0].clauses[0].matches[0].destination_ports = vec![70_000];
        let e = Policy::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("destinationPorts") && e.contains("70000"), "{e}");
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Connection {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        Connection {
            request: Some(RequestAttrs {
                method: method.into(),
                path: path.into(),
                host: "web.demo.svc.cluster.local".into(),
                headers: h,
            }),
            ..conn("198.18.0.2:4000", Some(CLIENT), "198.18.0.3:8080")
        }
    }

    #[test]
    fn http_fields_and_header_conditions() {
        let s = PolicyStore::new([
            policy(
                "{name: reads, namespace: demo, scope: NAMESPACE, rules: [{clauses: [{matches: [
                  {methods: [{exact: GET}], paths: [{prefix: /api/}], hosts: [{suffix: .svc.cluster.local}],
                   headers: [{name: X-Version, values: [{exact: v1}, {prefix: v2}], notValues: [{exact: v2-beta}]}]}]}]}]}",
            ),
            policy(
                "{name: no-debug, namespace: demo, scope: NAMESPACE, action: DENY, rules: [{clauses: [{matches: [
                  {headers: [{name: x-debug, values: [{presence: {}}]}]}]}]}]}",
            ),
        ]);
        let w = workload("demo", &[]);
        assert!(s.needs_http(&w));
        let check = |c: &Connection| s.check(&w, c, |_, _| {});
        assert_eq!(check(&request("GET", "/api/1", &[("x-version", "v1")])), Verdict::Allow);
        assert_eq!(
            check(&request("GET", "/api/1", &[("x-version", "v2-rc")])),
            Verdict::Allow
        );
        assert_eq!(
            check(&request("GET", "/api/1", &[("x-version", "v2-beta")])),
            Verdict::NoAllowMatched
        );
        assert_eq!(
            check(&request("GET", "/api/1", &[])),
            Verdict::NoAllowMatched,
            "absent header"
        );
        assert_eq!(
            check(&request("POST", "/api/1", &[("x-version", "v1")])),
            Verdict::NoAllowMatched
        );
        assert_eq!(
            check(&request("GET", "/admin", &[("x-version", "v1")])),
            Verdict::NoAllowMatched
        );
        // Two values of one header are matched as Envoy joins them.
        assert_eq!(
            check(&request("GET", "/api/1", &[("x-version", "v1"), ("x-version", "v3")])),
            Verdict::NoAllowMatched
        );
        assert_eq!(
            check(&request("GET", "/api/1", &[("x-version", "v1"), ("x-debug", "1")])),
            Verdict::DeniedBy("demo/no-debug".into())
        );
        // Without a request (the connection is not HTTP): ALLOW rules with HTTP fields match
        // nothing, DENY rules match on their other fields (here: everything).
        let tcp = conn("198.18.0.2:4000", Some(CLIENT), "198.18.0.3:8080");
        assert_eq!(check(&tcp), Verdict::DeniedBy("demo/no-debug".into()));
    }

    #[test]
    fn header_conditions_are_checked_when_read() {
        let bad = |yaml: &str| serde_yaml::from_str::<Policy>(yaml).unwrap_err().to_string();
        let e = bad("{name: p, namespace: demo, rules: [{clauses: [{matches: [{headers: [{name: \"bad name\", values: [{exact: x}]}]}]}]}]}");
        assert!(e.contains("\"bad name\" is not a header name"), "{e}");
        let e = bad("{name: p, namespace: demo, rules: [{clauses: [{matches: [{headers: [{name: x}]}]}]}]}");
        assert!(e.contains("header condition on x: needs values or notValues"), "{e}");
    }
}
