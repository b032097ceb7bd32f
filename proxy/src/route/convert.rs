//! `RouteConfiguration` → [`RouteTable`]. The supported subset is what Istio generates for
//! VirtualServices; any field that would change behaviour and that nodeway does not implement is
//! refused by name (the resource is NACKed), never silently ignored. Fields that only carry
//! metadata or tracing decoration (`metadata`, `decorator`, `tracing`, `name`) are accepted.
// Istio still sends deprecated fields (`exact_match`, `http2_protocol_options`, ...).
#![allow(deprecated)]

use std::{sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::{core::v3 as core, route::v3 as rv3},
        extensions::filters::{common::fault::v3 as common_fault, http::fault::v3::HttpFault},
        r#type::{matcher::v3 as mv3, v3::FractionalPercent},
    },
    google::protobuf::Any,
};
use prost::Message;

use super::*;

/// What makes a route resource unacceptable: where (a protobuf-JSON-style field path) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConvertError {
    pub path: String,
    pub reason: String,
}

pub(crate) fn err<T>(path: &str, reason: impl Into<String>) -> Result<T, ConvertError> {
    Err(ConvertError {
        path: path.to_string(),
        reason: reason.into(),
    })
}

pub(crate) fn unsupported(path: &str, field: &str) -> ConvertError {
    ConvertError {
        path: if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        },
        reason: "not supported by nodeway".to_string(),
    }
}

pub(crate) fn is_set<T: Default + PartialEq>(v: &T) -> bool {
    *v != T::default()
}

/// Refuses each listed field of `$msg` that is set (non-default), naming it by its JSON name.
macro_rules! refuse {
    ($path:expr, $msg:expr, $($field:ident => $json:literal),+ $(,)?) => {
        $(
            if $crate::route::convert::is_set(&$msg.$field) {
                return Err($crate::route::convert::unsupported($path, $json));
            }
        )+
    };
}
pub(crate) use refuse;

/// The fault filter's type, as Istio puts it in `typed_per_filter_config`.
const FAULT_FILTER: &str = "envoy.filters.http.fault";
const HTTP_FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
/// Envoy's route timeout when none is given.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

pub fn route_configuration(rc: &rv3::RouteConfiguration) -> Result<RouteTable, ConvertError> {
    if rc.name.is_empty() {
        return err("name", "a RouteConfiguration needs a name");
    }
    let p = "";
    refuse!(p, rc,
        vhds => "vhds",
        cluster_specifier_plugins => "clusterSpecifierPlugins",
        request_mirror_policies => "requestMirrorPolicies",
        vhost_header => "vhostHeader",
        typed_per_filter_config => "typedPerFilterConfig",
        most_specific_header_mutations_wins => "mostSpecificHeaderMutationsWins",
    );
    let mut virtual_hosts = Vec::with_capacity(rc.virtual_hosts.len());
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        virtual_hosts.push(virtual_host(&format!("virtualHosts[{i}]"), vh)?);
    }
    unique_domains(&rc.name, &virtual_hosts)?;
    Ok(RouteTable {
        name: rc.name.clone(),
        virtual_hosts,
        headers: mutations(
            p,
            &rc.request_headers_to_add,
            &rc.request_headers_to_remove,
            &rc.response_headers_to_add,
            &rc.response_headers_to_remove,
        )?,
    })
}

/// Envoy's `RouteMatcher` refuses a table in which a domain (exact, `*.suffix`, `prefix*`, or
/// the catch-all `*`, compared lowercased) belongs to two virtual hosts: which one serves it
/// would be arbitrary. Two VirtualServices for one host make istiod send exactly that.
fn unique_domains(table: &str, vhosts: &[VirtualHost]) -> Result<(), ConvertError> {
    let mut seen = std::collections::HashSet::new();
    for (i, vh) in vhosts.iter().enumerate() {
        for (j, d) in vh.domains.iter().enumerate() {
            if seen.insert(d.as_str()) {
                continue;
            }
            let why = if d == "*" {
                format!("Only a single wildcard domain is permitted in route {table}")
            } else {
                format!("Only unique values for domains are permitted. Duplicate entry of domain {d} in route {table}")
            };
            return err(&format!("virtualHosts[{i}].domains[{j}]"), why);
        }
    }
    Ok(())
}

fn virtual_host(p: &str, vh: &rv3::VirtualHost) -> Result<VirtualHost, ConvertError> {
    refuse!(p, vh,
        matcher => "matcher",
        require_tls => "requireTls",
        virtual_clusters => "virtualClusters",
        rate_limits => "rateLimits",
        cors => "cors",
        retry_policy_typed_config => "retryPolicyTypedConfig",
        hedge_policy => "hedgePolicy",
        request_mirror_policies => "requestMirrorPolicies",
    );
    typed_filters(p, &vh.typed_per_filter_config, false)?;
    if vh.domains.is_empty() {
        return err(&format!("{p}.domains"), "a virtual host needs at least one domain");
    }
    let mut routes = Vec::with_capacity(vh.routes.len());
    for (i, r) in vh.routes.iter().enumerate() {
        routes.push(route(&format!("{p}.routes[{i}]"), r)?);
    }
    let retry_policy = match &vh.retry_policy {
        Some(rp) => Some(Arc::new(retry_policy(&format!("{p}.retryPolicy"), rp)?)),
        None => None,
    };
    Ok(VirtualHost {
        name: vh.name.clone(),
        domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        routes,
        headers: mutations(
            p,
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
        )?,
        retry_policy,
        include_request_attempt_count: vh.include_request_attempt_count,
        include_attempt_count_in_response: vh.include_attempt_count_in_response,
    })
}

fn route(p: &str, r: &rv3::Route) -> Result<Route, ConvertError> {
    let matcher = route_match(&format!("{p}.match"), r.r#match.as_ref())?;
    let action = match &r.action {
        Some(rv3::route::Action::Route(ra)) => Action::Route(route_action(&format!("{p}.route"), ra)?),
        Some(rv3::route::Action::Redirect(ra)) => Action::Redirect(redirect(&format!("{p}.redirect"), ra)?),
        Some(rv3::route::Action::DirectResponse(d)) => {
            Action::DirectResponse(direct_response(&format!("{p}.directResponse"), d)?)
        }
        Some(rv3::route::Action::FilterAction(_)) => return Err(unsupported(p, "filterAction")),
        Some(rv3::route::Action::NonForwardingAction(_)) => return Err(unsupported(p, "nonForwardingAction")),
        None => return err(p, "a route needs an action (route, redirect or directResponse)"),
    };
    Ok(Route {
        istio_config: istio_config(r.metadata.as_ref()),
        name: r.name.clone(),
        matcher,
        action,
        headers: mutations(
            p,
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        )?,
        fault: typed_filters(p, &r.typed_per_filter_config, true)?,
    })
}

/// Route-level filter config: the fault filter is understood; any other filter override is
/// refused, since its behaviour would be missing.
fn typed_filters(
    p: &str,
    filters: &std::collections::HashMap<String, Any>,
    fault_allowed: bool,
) -> Result<Option<Fault>, ConvertError> {
    let mut out = None;
    let mut names: Vec<_> = filters.keys().collect();
    names.sort();
    for name in names {
        let any = &filters[name];
        let fp = format!("{p}.typedPerFilterConfig[{name:?}]");
        if name == FAULT_FILTER && fault_allowed {
            if any.type_url != HTTP_FAULT_TYPE {
                return err(&fp, format!("expected {HTTP_FAULT_TYPE}, got {}", any.type_url));
            }
            let f = HttpFault::decode(any.value.as_slice()).map_err(|e| ConvertError {
                path: fp.clone(),
                reason: format!("undecodable HTTPFault: {e}"),
            })?;
            out = Some(fault(&fp, &f)?);
        } else {
            return Err(ConvertError {
                path: fp,
                reason: "filter config override not supported by nodeway".to_string(),
            });
        }
    }
    Ok(out)
}

fn fault(p: &str, f: &HttpFault) -> Result<Fault, ConvertError> {
    refuse!(p, f,
        upstream_cluster => "upstreamCluster",
        downstream_nodes => "downstreamNodes",
        max_active_faults => "maxActiveFaults",
        response_rate_limit => "responseRateLimit",
    );
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let dp = format!("{p}.delay");
            match &d.fault_delay_secifier {
                Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(fd)) => Some(FaultDelay {
                    delay: duration(&format!("{dp}.fixedDelay"), fd)?,
                    per_million: percent(d.percentage.as_ref()),
                }),
                Some(common_fault::fault_delay::FaultDelaySecifier::HeaderDelay(_)) => {
                    return Err(unsupported(&dp, "headerDelay"))
                }
                None => return err(&dp, "a delay needs fixedDelay"),
            }
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType;
            let ap = format!("{p}.abort");
            let kind = match &a.error_type {
                Some(ErrorType::HttpStatus(s)) => AbortKind::Http(status(&format!("{ap}.httpStatus"), *s)?),
                Some(ErrorType::GrpcStatus(s)) => AbortKind::Grpc(*s),
                Some(ErrorType::HeaderAbort(_)) => return Err(unsupported(&ap, "headerAbort")),
                None => return err(&ap, "an abort needs httpStatus or grpcStatus"),
            };
            Some(FaultAbort {
                kind,
                per_million: percent(a.percentage.as_ref()),
            })
        }
    };
    let headers = f
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_matcher(&format!("{p}.headers[{i}]"), h))
        .collect::<Result<_, _>>()?;
    Ok(Fault { delay, abort, headers })
}

/// A FractionalPercent in millionths; unset means 100% (Envoy's fault filter default).
fn percent(fp: Option<&FractionalPercent>) -> u32 {
    fp.map_or(1_000_000, fraction)
}

fn fraction(fp: &FractionalPercent) -> u32 {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    let scale = match DenominatorType::try_from(fp.denominator) {
        Ok(DenominatorType::Hundred) | Err(_) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) => 1,
    };
    fp.numerator.saturating_mul(scale).min(1_000_000)
}

fn route_match(p: &str, m: Option<&rv3::RouteMatch>) -> Result<RouteMatch, ConvertError> {
    let Some(m) = m else {
        return err(p, "a route needs a match");
    };
    refuse!(p, m,
        runtime_fraction => "runtimeFraction",
        cookies => "cookies",
        tls_context => "tlsContext",
        dynamic_metadata => "dynamicMetadata",
        filter_state => "filterState",
    );
    use rv3::route_match::PathSpecifier;
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(s)) => PathMatch::Prefix(s.clone()),
        Some(PathSpecifier::Path(s)) => PathMatch::Exact(s.clone()),
        Some(PathSpecifier::SafeRegex(r)) => PathMatch::Regex(anchored(&format!("{p}.safeRegex"), r)?),
        Some(PathSpecifier::PathSeparatedPrefix(s)) => {
            if s.ends_with('/') || s.contains(['?', '#']) {
                return err(
                    &format!("{p}.pathSeparatedPrefix"),
                    "must not end with '/' or contain '?' or '#'",
                );
            }
            PathMatch::SeparatedPrefix(s.clone())
        }
        Some(PathSpecifier::ConnectMatcher(_)) => return Err(unsupported(p, "connectMatcher")),
        Some(PathSpecifier::PathMatchPolicy(_)) => return Err(unsupported(p, "pathMatchPolicy")),
        None => return err(p, "a route match needs prefix, path, safeRegex or pathSeparatedPrefix"),
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_matcher(&format!("{p}.headers[{i}]"), h))
        .collect::<Result<_, _>>()?;
    let query_parameters = m
        .query_parameters
        .iter()
        .enumerate()
        .map(|(i, q)| query_matcher(&format!("{p}.queryParameters[{i}]"), q))
        .collect::<Result<_, _>>()?;
    Ok(RouteMatch {
        path,
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
        headers,
        query_parameters,
        grpc: m.grpc.is_some(),
    })
}

fn header_matcher(p: &str, h: &rv3::HeaderMatcher) -> Result<HeaderMatcher, ConvertError> {
    use rv3::header_matcher::HeaderMatchSpecifier as S;
    if h.name.is_empty() {
        return err(&format!("{p}.name"), "a header matcher needs a name");
    }
    let exact = |s: &String| {
        ValueMatch::String(StringMatch {
            kind: StringMatchKind::Exact(s.clone()),
            ignore_case: false,
        })
    };
    let with = |kind| {
        ValueMatch::String(StringMatch {
            kind,
            ignore_case: false,
        })
    };
    let matcher = match &h.header_match_specifier {
        Some(S::ExactMatch(s)) => exact(s),
        Some(S::SafeRegexMatch(r)) => with(StringMatchKind::Regex(anchored(&format!("{p}.safeRegexMatch"), r)?)),
        Some(S::RangeMatch(r)) => ValueMatch::Range {
            start: r.start,
            end: r.end,
        },
        Some(S::PresentMatch(b)) => ValueMatch::Present(*b),
        Some(S::PrefixMatch(s)) => with(StringMatchKind::Prefix(s.clone())),
        Some(S::SuffixMatch(s)) => with(StringMatchKind::Suffix(s.clone())),
        Some(S::ContainsMatch(s)) => with(StringMatchKind::Contains(s.clone())),
        Some(S::StringMatch(sm)) => ValueMatch::String(string_match(&format!("{p}.stringMatch"), sm)?),
        // No specifier: the header must be present (Envoy's behaviour for an empty matcher).
        None => ValueMatch::Present(true),
    };
    Ok(HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        matcher,
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn query_matcher(p: &str, q: &rv3::QueryParameterMatcher) -> Result<QueryMatcher, ConvertError> {
    use rv3::query_parameter_matcher::QueryParameterMatchSpecifier as S;
    if q.name.is_empty() {
        return err(&format!("{p}.name"), "a query parameter matcher needs a name");
    }
    let matcher = match &q.query_parameter_match_specifier {
        Some(S::StringMatch(sm)) => Some(ValueMatch::String(string_match(&format!("{p}.stringMatch"), sm)?)),
        Some(S::PresentMatch(b)) => Some(ValueMatch::Present(*b)),
        None => None,
    };
    Ok(QueryMatcher {
        name: q.name.clone(),
        matcher,
    })
}

pub(crate) fn string_match(p: &str, sm: &mv3::StringMatcher) -> Result<StringMatch, ConvertError> {
    use mv3::string_matcher::MatchPattern as M;
    let kind = match &sm.match_pattern {
        Some(M::Exact(s)) => StringMatchKind::Exact(s.clone()),
        Some(M::Prefix(s)) => StringMatchKind::Prefix(s.clone()),
        Some(M::Suffix(s)) => StringMatchKind::Suffix(s.clone()),
        Some(M::Contains(s)) => StringMatchKind::Contains(s.clone()),
        Some(M::SafeRegex(r)) => StringMatchKind::Regex(anchored(&format!("{p}.safeRegex"), r)?),
        Some(M::Custom(_)) => return Err(unsupported(p, "custom")),
        None => return err(p, "a string matcher needs exact, prefix, suffix, contains or safeRegex"),
    };
    Ok(StringMatch {
        kind,
        ignore_case: sm.ignore_case,
    })
}

/// Matcher regexes must match the whole input (RE2 `FullMatch`).
fn anchored(p: &str, r: &mv3::RegexMatcher) -> Result<regex::Regex, ConvertError> {
    regex::Regex::new(&format!("^(?:{})$", r.regex)).map_err(|e| ConvertError {
        path: format!("{p}.regex"),
        reason: format!("invalid regex {:?}: {e}", r.regex),
    })
}

fn regex_rewrite(p: &str, r: &mv3::RegexMatchAndSubstitute) -> Result<RegexRewrite, ConvertError> {
    let Some(pattern) = &r.pattern else {
        return err(&format!("{p}.pattern"), "a regex rewrite needs a pattern");
    };
    let re = regex::Regex::new(&pattern.regex).map_err(|e| ConvertError {
        path: format!("{p}.pattern.regex"),
        reason: format!("invalid regex {:?}: {e}", pattern.regex),
    })?;
    Ok(RegexRewrite {
        pattern: re,
        substitution: re2_substitution(&r.substitution),
    })
}

/// RE2's `\1` back-references → the regex crate's `${1}`; a literal `$` is escaped.
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn route_action(p: &str, ra: &rv3::RouteAction) -> Result<RouteAction, ConvertError> {
    refuse_unsupported_action(p, ra)?;
    let clusters = action_clusters(p, ra)?;
    let total_weight = clusters.iter().map(|c| c.weight).sum::<u32>();
    if total_weight == 0 {
        return err(&format!("{p}.weightedClusters"), "the weights add up to 0");
    }
    let host_rewrite = host_rewrite(p, ra)?;
    let timeout = route_timeout(p, ra)?;
    let retry_policy = match &ra.retry_policy {
        Some(rp) => Some(Arc::new(retry_policy(&format!("{p}.retryPolicy"), rp)?)),
        None => None,
    };
    let (mirrors, hash_policy, upgrades) = (mirrors(p, ra)?, hash_policies(p, ra)?, upgrades(p, ra)?);
    Ok(RouteAction {
        clusters,
        total_weight,
        prefix_rewrite: (!ra.prefix_rewrite.is_empty()).then(|| ra.prefix_rewrite.clone()),
        regex_rewrite: match &ra.regex_rewrite {
            Some(r) => Some(regex_rewrite(&format!("{p}.regexRewrite"), r)?),
            None => None,
        },
        host_rewrite,
        timeout,
        retry_policy,
        mirrors,
        hash_policy,
        upgrades,
    })
}

/// Route-action fields nodeway does not implement: refused by name rather than ignored.
fn refuse_unsupported_action(p: &str, ra: &rv3::RouteAction) -> Result<(), ConvertError> {
    refuse!(p, ra,
        metadata_match => "metadataMatch",
        path_rewrite_policy => "pathRewritePolicy",
        path_rewrite => "pathRewrite",
        append_x_forwarded_host => "appendXForwardedHost",
        early_data_policy => "earlyDataPolicy",
        retry_policy_typed_config => "retryPolicyTypedConfig",
        rate_limits => "rateLimits",
        cors => "cors",
        internal_redirect_policy => "internalRedirectPolicy",
        internal_redirect_action => "internalRedirectAction",
        max_internal_redirects => "maxInternalRedirects",
        hedge_policy => "hedgePolicy",
    );
    // Istio sets maxStreamDuration {maxStreamDuration: 0s, grpcTimeoutHeaderMax: 0s} on every
    // route: zero (disabled) is accepted; a real limit is not implemented.
    if let Some(msd) = &ra.max_stream_duration {
        let nonzero = |d: &Option<envoy_types::pb::google::protobuf::Duration>| {
            d.as_ref().is_some_and(|d| d.seconds != 0 || d.nanos != 0)
        };
        if nonzero(&msd.max_stream_duration) || nonzero(&msd.grpc_timeout_header_max) {
            return Err(unsupported(p, "maxStreamDuration"));
        }
    }
    Ok(())
}

/// The upstream cluster, or the weighted set.
fn action_clusters(p: &str, ra: &rv3::RouteAction) -> Result<Vec<WeightedCluster>, ConvertError> {
    use rv3::route_action::ClusterSpecifier as C;
    match &ra.cluster_specifier {
        Some(C::Cluster(name)) if !name.is_empty() => Ok(vec![WeightedCluster {
            name: name.clone(),
            weight: 1,
            headers: HeaderMutations::default(),
            host_rewrite: None,
        }]),
        Some(C::Cluster(_)) => err(&format!("{p}.cluster"), "empty cluster name"),
        Some(C::WeightedClusters(wc)) => weighted_clusters(&format!("{p}.weightedClusters"), wc),
        Some(C::ClusterHeader(_)) => Err(unsupported(p, "clusterHeader")),
        Some(C::ClusterSpecifierPlugin(_)) => Err(unsupported(p, "clusterSpecifierPlugin")),
        Some(C::InlineClusterSpecifierPlugin(_)) => Err(unsupported(p, "inlineClusterSpecifierPlugin")),
        None => err(p, "a route action needs cluster or weightedClusters"),
    }
}

/// A literal host rewrite; `autoHostRewrite: false` is no rewrite.
fn host_rewrite(p: &str, ra: &rv3::RouteAction) -> Result<Option<String>, ConvertError> {
    use rv3::route_action::HostRewriteSpecifier as H;
    match &ra.host_rewrite_specifier {
        None => Ok(None),
        Some(H::HostRewriteLiteral(h)) => Ok(Some(h.clone())),
        Some(H::AutoHostRewrite(b)) if !b.value => Ok(None),
        Some(H::AutoHostRewrite(_)) => Err(unsupported(p, "autoHostRewrite")),
        Some(H::HostRewriteHeader(_)) => Err(unsupported(p, "hostRewriteHeader")),
        Some(H::HostRewritePathRegex(_)) => Err(unsupported(p, "hostRewritePathRegex")),
        Some(H::HostRewrite(_)) => Err(unsupported(p, "hostRewrite")),
    }
}

/// Envoy's default when unset; an explicit zero disables the timeout.
fn route_timeout(p: &str, ra: &rv3::RouteAction) -> Result<Option<std::time::Duration>, ConvertError> {
    Ok(match &ra.timeout {
        None => Some(DEFAULT_ROUTE_TIMEOUT),
        Some(d) => {
            let d = duration(&format!("{p}.timeout"), d)?;
            (!d.is_zero()).then_some(d)
        }
    })
}

fn mirrors(p: &str, ra: &rv3::RouteAction) -> Result<Vec<Mirror>, ConvertError> {
    let mut mirrors = Vec::new();
    for (i, m) in ra.request_mirror_policies.iter().enumerate() {
        let mp = format!("{p}.requestMirrorPolicies[{i}]");
        refuse!(&mp, m, cluster_header => "clusterHeader");
        if m.cluster.is_empty() {
            return err(&format!("{mp}.cluster"), "a mirror needs a cluster");
        }
        mirrors.push(Mirror {
            cluster: m.cluster.clone(),
            fraction_per_million: m
                .runtime_fraction
                .as_ref()
                .and_then(|r| r.default_value.as_ref())
                .map_or(1_000_000, fraction),
            shadow_host_suffix: !m.disable_shadow_host_suffix_append,
        });
    }
    Ok(mirrors)
}

fn hash_policies(p: &str, ra: &rv3::RouteAction) -> Result<Vec<HashPolicy>, ConvertError> {
    ra.hash_policy
        .iter()
        .enumerate()
        .map(|(i, h)| hash_policy(&format!("{p}.hashPolicy[{i}]"), h))
        .collect()
}

fn hash_policy(hp: &str, h: &rv3::route_action::HashPolicy) -> Result<HashPolicy, ConvertError> {
    use rv3::route_action::hash_policy::PolicySpecifier as P;
    let terminal = h.terminal;
    match &h.policy_specifier {
        Some(P::Header(hd)) => {
            if hd.regex_rewrite.is_some() {
                return Err(unsupported(&format!("{hp}.header"), "regexRewrite"));
            }
            Ok(HashPolicy::Header {
                name: hd.header_name.to_ascii_lowercase(),
                terminal,
            })
        }
        Some(P::QueryParameter(q)) => Ok(HashPolicy::QueryParameter {
            name: q.name.clone(),
            terminal,
        }),
        Some(P::ConnectionProperties(c)) if c.source_ip => Ok(HashPolicy::SourceIp { terminal }),
        Some(P::ConnectionProperties(_)) => err(hp, "connectionProperties without sourceIp"),
        Some(P::Cookie(_)) => Err(unsupported(hp, "cookie")),
        Some(P::FilterState(_)) => Err(unsupported(hp, "filterState")),
        None => err(hp, "a hash policy needs a specifier"),
    }
}

/// Enabled upgrade types, lower-cased.
fn upgrades(p: &str, ra: &rv3::RouteAction) -> Result<Vec<String>, ConvertError> {
    let mut upgrades = Vec::new();
    for (i, u) in ra.upgrade_configs.iter().enumerate() {
        if u.connect_config.is_some() {
            return Err(unsupported(&format!("{p}.upgradeConfigs[{i}]"), "connectConfig"));
        }
        if u.enabled.as_ref().is_none_or(|b| b.value) {
            upgrades.push(u.upgrade_type.to_ascii_lowercase());
        }
    }
    Ok(upgrades)
}

fn weighted_clusters(p: &str, wc: &rv3::WeightedCluster) -> Result<Vec<WeightedCluster>, ConvertError> {
    refuse!(p, wc, runtime_key_prefix => "runtimeKeyPrefix", random_value_specifier => "headerName");
    if wc.clusters.is_empty() {
        return err(&format!("{p}.clusters"), "no clusters");
    }
    let mut out = Vec::with_capacity(wc.clusters.len());
    for (i, c) in wc.clusters.iter().enumerate() {
        let cp = format!("{p}.clusters[{i}]");
        refuse!(&cp, c,
            cluster_header => "clusterHeader",
            metadata_match => "metadataMatch",
            typed_per_filter_config => "typedPerFilterConfig",
        );
        if c.name.is_empty() {
            return err(&format!("{cp}.name"), "a weighted cluster needs a name");
        }
        use rv3::weighted_cluster::cluster_weight::HostRewriteSpecifier as H;
        let host_rewrite = c
            .host_rewrite_specifier
            .as_ref()
            .map(|H::HostRewriteLiteral(h)| h.clone());
        out.push(WeightedCluster {
            name: c.name.clone(),
            weight: c.weight.as_ref().map_or(0, |w| w.value),
            headers: mutations(
                &cp,
                &c.request_headers_to_add,
                &c.request_headers_to_remove,
                &c.response_headers_to_add,
                &c.response_headers_to_remove,
            )?,
            host_rewrite,
        });
    }
    Ok(out)
}

fn retry_policy(p: &str, rp: &rv3::RetryPolicy) -> Result<RetryPolicy, ConvertError> {
    refuse!(p, rp,
        per_try_idle_timeout => "perTryIdleTimeout",
        retry_priority => "retryPriority",
        retry_options_predicates => "retryOptionsPredicates",
        rate_limited_retry_back_off => "rateLimitedRetryBackOff",
        retriable_headers => "retriableHeaders",
        retriable_request_headers => "retriableRequestHeaders",
    );
    let mut retry_on = RetryOn::default();
    for cond in rp.retry_on.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match cond {
            "5xx" => retry_on.five_xx = true,
            "gateway-error" => retry_on.gateway_error = true,
            "reset" | "reset-before-request" => retry_on.reset = true,
            "connect-failure" => retry_on.connect_failure = true,
            "refused-stream" => retry_on.refused_stream = true,
            "retriable-status-codes" => retry_on.retriable_status_codes = true,
            "retriable-4xx" => retry_on.retriable_4xx = true,
            "cancelled" => retry_on.grpc_cancelled = true,
            "deadline-exceeded" => retry_on.grpc_deadline_exceeded = true,
            "resource-exhausted" => retry_on.grpc_resource_exhausted = true,
            "unavailable" => retry_on.grpc_unavailable = true,
            "internal" => retry_on.grpc_internal = true,
            other => {
                return err(
                    &format!("{p}.retryOn"),
                    format!("retry condition {other:?} not supported by nodeway"),
                )
            }
        }
    }
    let mut avoid_previous_hosts = false;
    for (i, pred) in rp.retry_host_predicate.iter().enumerate() {
        if pred.name == PREVIOUS_HOSTS {
            avoid_previous_hosts = true;
        } else {
            return err(
                &format!("{p}.retryHostPredicate[{i}].name"),
                format!("retry host predicate {:?} not supported by nodeway", pred.name),
            );
        }
    }
    let (backoff_base, backoff_max) = match &rp.retry_back_off {
        None => (Duration::from_millis(25), Duration::from_millis(250)),
        Some(b) => {
            let base = match &b.base_interval {
                Some(d) => duration(&format!("{p}.retryBackOff.baseInterval"), d)?,
                None => return err(&format!("{p}.retryBackOff.baseInterval"), "required"),
            };
            let max = match &b.max_interval {
                Some(d) => duration(&format!("{p}.retryBackOff.maxInterval"), d)?,
                None => base * 10,
            };
            (base, max.max(base))
        }
    };
    let mut retriable_status_codes = Vec::with_capacity(rp.retriable_status_codes.len());
    for (i, s) in rp.retriable_status_codes.iter().enumerate() {
        retriable_status_codes.push(status(&format!("{p}.retriableStatusCodes[{i}]"), *s)?);
    }
    Ok(RetryPolicy {
        retry_on,
        num_retries: rp.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout: match &rp.per_try_timeout {
            Some(d) => Some(duration(&format!("{p}.perTryTimeout"), d)?).filter(|d| !d.is_zero()),
            None => None,
        },
        avoid_previous_hosts,
        host_selection_max_attempts: u32::try_from(rp.host_selection_retry_max_attempts.max(1)).unwrap_or(u32::MAX),
        retriable_status_codes,
        backoff_base,
        backoff_max,
    })
}

fn redirect(p: &str, ra: &rv3::RedirectAction) -> Result<Redirect, ConvertError> {
    use rv3::redirect_action::{PathRewriteSpecifier as P, RedirectResponseCode as C, SchemeRewriteSpecifier as S};
    let scheme = match &ra.scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::HttpsRedirect(false)) | None => None,
        Some(S::SchemeRedirect(s)) => Some(s.to_ascii_lowercase()),
    };
    let path = match &ra.path_rewrite_specifier {
        None => None,
        Some(P::PathRedirect(s)) => Some(RedirectPath::Path(s.clone())),
        Some(P::PrefixRewrite(s)) => Some(RedirectPath::Prefix(s.clone())),
        Some(P::RegexRewrite(r)) => Some(RedirectPath::Regex(regex_rewrite(&format!("{p}.regexRewrite"), r)?)),
        Some(P::PathRewrite(_)) => return Err(unsupported(p, "pathRewrite")),
    };
    let status = match C::try_from(ra.response_code) {
        Ok(C::MovedPermanently) => 301,
        Ok(C::Found) => 302,
        Ok(C::SeeOther) => 303,
        Ok(C::TemporaryRedirect) => 307,
        Ok(C::PermanentRedirect) => 308,
        Err(_) => {
            return err(
                &format!("{p}.responseCode"),
                format!("unknown code {}", ra.response_code),
            )
        }
    };
    let port = if ra.port_redirect == 0 {
        None
    } else {
        Some(u16::try_from(ra.port_redirect).map_err(|_| ConvertError {
            path: format!("{p}.portRedirect"),
            reason: format!("{} is not a port", ra.port_redirect),
        })?)
    };
    Ok(Redirect {
        scheme,
        host: (!ra.host_redirect.is_empty()).then(|| ra.host_redirect.clone()),
        port,
        path,
        status,
        strip_query: ra.strip_query,
    })
}

fn direct_response(p: &str, d: &rv3::DirectResponseAction) -> Result<DirectResponse, ConvertError> {
    refuse!(p, d, body_format => "bodyFormat");
    let status = status(&format!("{p}.status"), d.status)?;
    let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        None => None,
        Some(core::data_source::Specifier::InlineString(s)) => Some(s.clone()),
        Some(core::data_source::Specifier::InlineBytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(_) => return Err(unsupported(&format!("{p}.body"), "filename/environmentVariable")),
    };
    Ok(DirectResponse { status, body })
}

fn mutations(
    p: &str,
    req_add: &[core::HeaderValueOption],
    req_remove: &[String],
    resp_add: &[core::HeaderValueOption],
    resp_remove: &[String],
) -> Result<HeaderMutations, ConvertError> {
    let adds = |field: &str, v: &[core::HeaderValueOption]| -> Result<Vec<HeaderAdd>, ConvertError> {
        v.iter()
            .enumerate()
            .map(|(i, h)| header_add(&format!("{p}.{field}[{i}]"), h))
            .collect()
    };
    let removes = |field: &str, v: &[String]| -> Result<Vec<String>, ConvertError> {
        v.iter()
            .enumerate()
            .map(|(i, h)| match h.to_ascii_lowercase() {
                h if !modifiable(&h) => err(
                    &format!("{p}.{field}[{i}]"),
                    ":-prefixed or host headers may not be removed",
                ),
                h => Ok(h),
            })
            .collect()
    };
    Ok(HeaderMutations {
        request_add: adds("requestHeadersToAdd", req_add)?,
        request_remove: removes("requestHeadersToRemove", req_remove)?,
        response_add: adds("responseHeadersToAdd", resp_add)?,
        response_remove: removes("responseHeadersToRemove", resp_remove)?,
    })
}

/// Envoy's `isModifiableHeader`: pseudo-headers and `host` are the router's own (a host
/// rewrite is `hostRewriteLiteral`, not a header mutation).
fn modifiable(lowercase: &str) -> bool {
    !lowercase.is_empty() && !lowercase.starts_with(':') && lowercase != "host"
}

fn header_add(p: &str, h: &core::HeaderValueOption) -> Result<HeaderAdd, ConvertError> {
    use core::header_value_option::HeaderAppendAction as A;
    let Some(hv) = &h.header else {
        return err(&format!("{p}.header"), "required");
    };
    let name = hv.key.to_ascii_lowercase();
    if !modifiable(&name) {
        return err(
            &format!("{p}.header.key"),
            ":-prefixed or host headers may not be modified",
        );
    }
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return err(
            &format!("{p}.header.key"),
            format!("{:?} is not a valid header name", hv.key),
        );
    }
    let value = if hv.raw_value.is_empty() {
        hv.value.clone()
    } else {
        String::from_utf8_lossy(&hv.raw_value).into_owned()
    };
    if http::HeaderValue::from_str(&value).is_err() {
        return err(
            &format!("{p}.header.value"),
            format!("{value:?} is not a valid header value"),
        );
    }
    // The deprecated `append` (BoolValue) wins when given, as in Envoy.
    let action = match (&h.append, A::try_from(h.append_action)) {
        (Some(b), _) if b.value => AppendAction::AppendIfExistsOrAdd,
        (Some(_), _) => AppendAction::OverwriteIfExistsOrAdd,
        (None, Ok(A::AppendIfExistsOrAdd)) => AppendAction::AppendIfExistsOrAdd,
        (None, Ok(A::AddIfAbsent)) => AppendAction::AddIfAbsent,
        (None, Ok(A::OverwriteIfExistsOrAdd)) => AppendAction::OverwriteIfExistsOrAdd,
        (None, Ok(A::OverwriteIfExists)) => AppendAction::OverwriteIfExists,
        (None, Err(_)) => {
            return err(
                &format!("{p}.appendAction"),
                format!("unknown action {}", h.append_action),
            )
        }
    };
    Ok(HeaderAdd { name, value, action })
}

/// protobuf's (and Envoy's) largest `Duration`, 10 000 years: beyond it a timeout would
/// overflow `Instant` arithmetic on the data path (a panic per request).
pub(crate) const MAX_DURATION_SECS: i64 = 315_576_000_000;

pub(crate) fn duration(p: &str, d: &envoy_types::pb::google::protobuf::Duration) -> Result<Duration, ConvertError> {
    if d.seconds < 0 || d.nanos < 0 {
        return err(p, "negative duration");
    }
    if d.seconds > MAX_DURATION_SECS || d.nanos > 999_999_999 {
        return err(
            p,
            format!(
                "{}s {}ns is out of range (at most {MAX_DURATION_SECS}s)",
                d.seconds, d.nanos
            ),
        );
    }
    Ok(Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs()))
}

fn status(p: &str, s: u32) -> Result<u16, ConvertError> {
    match u16::try_from(s) {
        Ok(s) if (100..=599).contains(&s) => Ok(s),
        _ => err(p, format!("{s} is not an HTTP status code")),
    }
}

/// Istio's `metadata.filterMetadata.istio.config`
/// (`/apis/networking.istio.io/v1alpha3/namespaces/<ns>/virtual-service/<name>`) as `name.ns`.
pub(crate) fn istio_config(m: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let config = m?.filter_metadata.get("istio")?.fields.get("config")?;
    let Some(Kind::StringValue(path)) = &config.kind else {
        return None;
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.iter().position(|p| *p == "namespaces") {
        Some(i) if parts.len() >= i + 4 => Some(format!("{}.{}", parts[i + 3], parts[i + 1])),
        _ => Some(path.clone()),
    }
}
