//! HTTP routing tables: Envoy's `RouteConfiguration` compiled into what the data path matches
//! against (regexes built, defaults filled in, unsupported features refused at config time).
//!
//! Semantics follow Envoy's router as Istio configures it: a virtual host is chosen by the request's
//! authority with its port stripped (Istio lists every domain with and without port), routes are
//! tried in order and the first match wins.
pub(crate) mod convert;
mod matching;

use std::{sync::Arc, time::Duration};

pub(crate) use convert::{duration as convert_duration, istio_config};
pub use convert::{route_configuration, ConvertError};
pub use matching::RequestView;
use serde::Serialize;

/// One `RouteConfiguration`. Istio names outbound ones after the port (`"9080"`), which is how
/// nodeway picks the table for a connection's destination port.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    pub headers: HeaderMutations,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    pub headers: HeaderMutations,
    /// Used by routes that have none of their own.
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// Send `x-envoy-attempt-count` upstream.
    pub include_request_attempt_count: bool,
    /// And on the response.
    pub include_attempt_count_in_response: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Istio puts the VirtualService's route name here; empty when unnamed.
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub action: Action,
    pub headers: HeaderMutations,
    pub fault: Option<Fault>,
    /// The Istio config this route came from (`metadata.filterMetadata.istio.config`), as
    /// `name.namespace`: the VirtualService `istioctl proxy-config routes` shows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub istio_config: Option<String>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Path matching is case sensitive unless set false.
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    pub query_parameters: Vec<QueryMatcher>,
    /// gRPC requests only (`content-type: application/grpc*`).
    pub grpc: bool,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    /// `prefix`, compared with the whole `:path` (query included), as Envoy does.
    Prefix(String),
    /// `path`: the path without its query equals this.
    Exact(String),
    /// `safe_regex`: the whole path without its query matches.
    Regex(#[serde(with = "regex_str")] regex::Regex),
    /// `path_separated_prefix`: the path without query is this, or starts with this and `/`.
    SeparatedPrefix(String),
    /// No path specifier (should not come from a valid config; matches everything).
    #[default]
    Any,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatcher {
    /// Lowercase; `:method`, `:path`, `:authority`, `:scheme` are the request's pseudo-headers.
    pub name: String,
    pub matcher: ValueMatch,
    pub invert: bool,
    pub treat_missing_as_empty: bool,
}

/// How a header or query parameter value is compared.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ValueMatch {
    Present(bool),
    String(StringMatch),
    /// `range_match`: the value parses as an integer in `[start, end)`.
    Range {
        start: i64,
        end: i64,
    },
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    pub kind: StringMatchKind,
    pub ignore_case: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatchKind {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(#[serde(with = "regex_str")] regex::Regex),
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryMatcher {
    pub name: String,
    /// `None`: the parameter must be present.
    pub matcher: Option<ValueMatch>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    Route(RouteAction),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteAction {
    pub clusters: Vec<WeightedCluster>,
    /// Sum of the weights (≥ 1).
    pub total_weight: u32,
    pub prefix_rewrite: Option<String>,
    /// `regex_rewrite`: pattern and substitution applied to the path (query kept).
    pub regex_rewrite: Option<RegexRewrite>,
    pub host_rewrite: Option<String>,
    /// `None`: no route timeout (Envoy's `0s`). Envoy's default when unset is 15 s.
    pub timeout: Option<Duration>,
    pub retry_policy: Option<Arc<RetryPolicy>>,
    pub mirrors: Vec<Mirror>,
    pub hash_policy: Vec<HashPolicy>,
    /// `Upgrade` values (`websocket`) passed through.
    pub upgrades: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegexRewrite {
    #[serde(with = "regex_str")]
    pub pattern: regex::Regex,
    /// In Envoy's syntax (`\1`), stored converted to the regex crate's (`${1}`).
    pub substitution: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedCluster {
    /// `outbound|9080|v1|reviews.default.svc.cluster.local`
    pub name: String,
    pub weight: u32,
    pub headers: HeaderMutations,
    pub host_rewrite: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// Retries after the first attempt.
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    /// `envoy.retry_host_predicates.previous_hosts`: a retry avoids hosts already tried.
    pub avoid_previous_hosts: bool,
    /// How many times host selection may be retried to satisfy the predicate.
    pub host_selection_max_attempts: u32,
    pub retriable_status_codes: Vec<u16>,
    /// Back-off between retries (Envoy: 25 ms base, max 10× base), with full jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// Envoy's `retry_on` conditions that apply to HTTP (gRPC ones too, on the grpc-status header).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub retriable_status_codes: bool,
    pub retriable_4xx: bool,
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_unavailable: bool,
    pub grpc_internal: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    pub cluster: String,
    /// Percentage of requests mirrored, in millionths (1_000_000 = all).
    pub fraction_per_million: u32,
    /// Envoy appends `-shadow` to the authority unless disabled.
    pub shadow_host_suffix: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashPolicy {
    Header { name: String, terminal: bool },
    QueryParameter { name: String, terminal: bool },
    SourceIp { terminal: bool },
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// `https_redirect` → `https`; `None` keeps the request's.
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<RedirectPath>,
    pub status: u16,
    pub strip_query: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RedirectPath {
    /// `path_redirect`: replaces the path (and query, if it has one).
    Path(String),
    /// `prefix_rewrite`: replaces the matched prefix.
    Prefix(String),
    Regex(RegexRewrite),
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectResponse {
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// Header changes at one level (route configuration, virtual host, route, weighted cluster).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMutations {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_add: Vec<HeaderAdd>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_remove: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub response_add: Vec<HeaderAdd>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub response_remove: Vec<String>,
}

impl HeaderMutations {
    pub fn is_empty(&self) -> bool {
        self.request_add.is_empty()
            && self.request_remove.is_empty()
            && self.response_add.is_empty()
            && self.response_remove.is_empty()
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderAdd {
    /// Lowercase.
    pub name: String,
    pub value: String,
    pub action: AppendAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

/// `envoy.filters.http.fault` on a route (Istio's VirtualService `fault`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
    /// The fault applies only to requests matching all of these.
    pub headers: Vec<HeaderMatcher>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub delay: Duration,
    pub per_million: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub kind: AbortKind,
    pub per_million: u32,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AbortKind {
    Http(u16),
    /// Answered as HTTP 200 with this `grpc-status`.
    Grpc(u32),
}

mod regex_str {
    pub fn serialize<S: serde::Serializer>(re: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(re.as_str())
    }
}

impl RouteTable {
    /// The virtual host for `authority` (port ignored, case-insensitive), with Envoy's precedence:
    /// exact domain, then the longest `*.suffix` / `*suffix` wildcard, then the longest `prefix*`,
    /// then `*`.
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let host = strip_port(authority).to_ascii_lowercase();
        let mut best: Option<(u8, usize, &VirtualHost)> = None;
        for vh in &self.virtual_hosts {
            for d in &vh.domains {
                let d = strip_port(d);
                let rank = if d == "*" {
                    Some((0, 0))
                } else if let Some(suffix) = d.strip_prefix('*') {
                    (host.len() > suffix.len() && ends_with_ignore_case(&host, suffix)).then_some((2, suffix.len()))
                } else if let Some(prefix) = d.strip_suffix('*') {
                    (host.len() > prefix.len() && starts_with_ignore_case(&host, prefix)).then_some((1, prefix.len()))
                } else {
                    d.eq_ignore_ascii_case(&host).then_some((3, d.len()))
                };
                if let Some((class, len)) = rank {
                    if best.is_none_or(|(c, l, _)| (class, len) > (c, l)) {
                        best = Some((class, len, vh));
                    }
                }
            }
        }
        best.map(|(_, _, vh)| vh)
    }
}

impl VirtualHost {
    /// The first route whose match accepts the request.
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(req))
    }
}

/// `host:port` → `host`; `[::1]:80` → `[::1]`; a bare IPv6 address stays whole, and so does
/// anything whose "port" is not digits.
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        let Some(end) = rest.find(']').map(|i| i + 2) else {
            return authority;
        };
        let port_ok = match authority[end..].strip_prefix(':') {
            Some(port) => port.bytes().all(|b| b.is_ascii_digit()),
            None => end == authority.len(),
        };
        return if port_ok { &authority[..end] } else { authority };
    }
    match authority.rfind(':') {
        Some(i) if authority[..i].contains(':') => authority,
        Some(i) if authority[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &authority[..i],
        _ => authority,
    }
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len() && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

#[cfg(test)]
mod tests;
