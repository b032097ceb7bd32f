#![allow(deprecated)]

use envoy_types::pb::{
    envoy::{
        config::route::v3 as rv3,
        r#type::matcher::v3::{string_matcher::MatchPattern, RegexMatcher, StringMatcher},
    },
    google::protobuf::{BoolValue, Duration as PbDuration, UInt32Value},
};
use http::HeaderMap;

use super::*;

fn prefix_route(prefix: &str, cluster: &str) -> rv3::Route {
    rv3::Route {
        r#match: Some(rv3::RouteMatch {
            path_specifier: Some(rv3::route_match::PathSpecifier::Prefix(prefix.into())),
            ..Default::default()
        }),
        action: Some(rv3::route::Action::Route(rv3::RouteAction {
            cluster_specifier: Some(rv3::route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn vhost(name: &str, domains: &[&str], routes: Vec<rv3::Route>) -> rv3::VirtualHost {
    rv3::VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes,
        ..Default::default()
    }
}

fn table(vhosts: Vec<rv3::VirtualHost>) -> RouteTable {
    route_configuration(&rv3::RouteConfiguration {
        name: "9080".into(),
        virtual_hosts: vhosts,
        ..Default::default()
    })
    .expect("valid route configuration")
}

fn req<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
    RequestView {
        method: "GET",
        path,
        authority: "reviews:9080",
        scheme: "http",
        headers,
    }
}

fn cluster_of(route: &Route) -> &str {
    match &route.action {
        Action::Route(ra) => &ra.clusters[0].name,
        other => panic!("not a route action: {other:?}"),
    }
}

#[test]
fn virtual_host_precedence_is_envoys_and_ports_are_ignored() {
    let t = table(vec![
        vhost("any", &["*"], vec![prefix_route("/", "any")]),
        vhost(
            "wild-suffix",
            &["*.svc.cluster.local"],
            vec![prefix_route("/", "suffix")],
        ),
        vhost(
            "longer-suffix",
            &["*.default.svc.cluster.local"],
            vec![prefix_route("/", "longer")],
        ),
        vhost("prefix", &["reviews.*"], vec![prefix_route("/", "prefix")]),
        vhost(
            "exact",
            &["reviews", "reviews:9080", "198.19.0.10"],
            vec![prefix_route("/", "exact")],
        ),
    ]);
    let name = |host: &str| t.virtual_host(host).map(|v| v.name.as_str());
    assert_eq!(name("reviews:9080"), Some("exact"));
    assert_eq!(name("REVIEWS"), Some("exact"));
    assert_eq!(name("198.19.0.10:9080"), Some("exact"));
    assert_eq!(name("reviews.default.svc.cluster.local:9080"), Some("longer-suffix"));
    assert_eq!(name("ratings.other.svc.cluster.local"), Some("wild-suffix"));
    assert_eq!(name("reviews.default"), Some("prefix"));
    assert_eq!(name("example.com"), Some("any"));
    let no_default = table(vec![vhost("exact", &["reviews"], vec![prefix_route("/", "exact")])]);
    assert!(no_default.virtual_host("ratings").is_none());
}

#[test]
fn strip_port_handles_ipv6() {
    assert_eq!(strip_port("a:80"), "a");
    assert_eq!(strip_port("[::1]:80"), "[::1]");
    assert_eq!(strip_port("::1"), "::1");
    assert_eq!(strip_port("a"), "a");
    // Found by the `authority` fuzz target: after `]` only a port is stripped, as after a name.
    assert_eq!(strip_port("[::1]:8x"), "[::1]:8x");
    assert_eq!(strip_port("[]:9*."), "[]:9*.");
    assert_eq!(strip_port("a:8x"), "a:8x");
}

#[test]
fn first_matching_route_wins_with_every_path_kind() {
    let mut exact = prefix_route("", "exact");
    exact.r#match.as_mut().expect("match").path_specifier =
        Some(rv3::route_match::PathSpecifier::Path("/v1/exact".into()));
    let mut regex = prefix_route("", "regex");
    regex.r#match.as_mut().expect("match").path_specifier =
        Some(rv3::route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: "/items/[0-9]+".into(),
            ..Default::default()
        }));
    let mut sep = prefix_route("", "sep");
    sep.r#match.as_mut().expect("match").path_specifier =
        Some(rv3::route_match::PathSpecifier::PathSeparatedPrefix("/api".into()));
    let mut insensitive = prefix_route("/CASE", "case");
    insensitive.r#match.as_mut().expect("match").case_sensitive = Some(BoolValue { value: false });
    let t = table(vec![vhost(
        "r",
        &["*"],
        vec![
            exact,
            regex,
            sep,
            insensitive,
            prefix_route("/v1", "v1"),
            prefix_route("/", "root"),
        ],
    )]);
    let vh = t.virtual_host("x").expect("vhost");
    let h = HeaderMap::new();
    let pick = |p: &str| cluster_of(vh.route(&req(p, &h)).expect("route")).to_string();
    assert_eq!(pick("/v1/exact"), "exact");
    assert_eq!(pick("/v1/exact?x=1"), "exact", "exact ignores the query");
    assert_eq!(pick("/v1/exactly"), "v1");
    assert_eq!(pick("/items/42"), "regex");
    assert_eq!(pick("/items/42x"), "root", "regex must match the whole path");
    assert_eq!(pick("/api"), "sep");
    assert_eq!(pick("/api/x"), "sep");
    assert_eq!(pick("/apix"), "root");
    assert_eq!(pick("/case/x"), "case");
    assert_eq!(pick("/other"), "root");
}

#[test]
fn header_query_and_method_matchers() {
    use rv3::header_matcher::HeaderMatchSpecifier as S;
    let hm = |name: &str, spec: S, invert: bool| rv3::HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(spec),
        invert_match: invert,
        ..Default::default()
    };
    let with_headers = |cluster: &str, headers: Vec<rv3::HeaderMatcher>| {
        let mut r = prefix_route("/", cluster);
        r.r#match.as_mut().expect("match").headers = headers;
        r
    };
    let mut by_query = prefix_route("/", "query");
    by_query.r#match.as_mut().expect("match").query_parameters = vec![rv3::QueryParameterMatcher {
        name: "debug".into(),
        query_parameter_match_specifier: Some(rv3::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(MatchPattern::Exact("on".into())),
                ..Default::default()
            },
        )),
    }];
    let t = table(vec![vhost(
        "r",
        &["*"],
        vec![
            with_headers(
                "jason",
                vec![hm(
                    "end-user",
                    S::StringMatch(StringMatcher {
                        match_pattern: Some(MatchPattern::Exact("jason".into())),
                        ignore_case: true,
                    }),
                    false,
                )],
            ),
            with_headers("post", vec![hm(":method", S::ExactMatch("POST".into()), false)]),
            with_headers("not-canary", vec![hm("x-canary", S::PresentMatch(true), true)]),
            by_query,
            prefix_route("/", "canary"),
        ],
    )]);
    let vh = t.virtual_host("x").expect("vhost");
    let pick = |method: &str, path: &str, headers: &[(&str, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        let r = RequestView {
            method,
            ..req(path, &h)
        };
        cluster_of(vh.route(&r).expect("route")).to_string()
    };
    assert_eq!(pick("GET", "/", &[("end-user", "Jason")]), "jason");
    assert_eq!(pick("POST", "/", &[("x-canary", "1")]), "post");
    assert_eq!(pick("GET", "/", &[]), "not-canary");
    assert_eq!(pick("GET", "/?debug=on", &[("x-canary", "1")]), "query");
    assert_eq!(pick("GET", "/?debug=off", &[("x-canary", "1")]), "canary");
}

#[test]
fn weighted_clusters_timeouts_and_retries_convert() {
    let mut r = prefix_route("/", "unused");
    r.action = Some(rv3::route::Action::Route(rv3::RouteAction {
        cluster_specifier: Some(rv3::route_action::ClusterSpecifier::WeightedClusters(
            rv3::WeightedCluster {
                clusters: vec![
                    rv3::weighted_cluster::ClusterWeight {
                        name: "outbound|9080|v1|reviews.default.svc.cluster.local".into(),
                        weight: Some(UInt32Value { value: 20 }),
                        ..Default::default()
                    },
                    rv3::weighted_cluster::ClusterWeight {
                        name: "outbound|9080|v2|reviews.default.svc.cluster.local".into(),
                        weight: Some(UInt32Value { value: 80 }),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        )),
        timeout: Some(PbDuration {
            seconds: 0,
            nanos: 500_000_000,
        }),
        retry_policy: Some(rv3::RetryPolicy {
            retry_on: "5xx,connect-failure,retriable-status-codes".into(),
            num_retries: Some(UInt32Value { value: 3 }),
            retriable_status_codes: vec![409],
            retry_host_predicate: vec![rv3::retry_policy::RetryHostPredicate {
                name: "envoy.retry_host_predicates.previous_hosts".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }));
    let t = table(vec![vhost("r", &["*"], vec![r])]);
    let Action::Route(ra) = &t.virtual_hosts[0].routes[0].action else {
        panic!("route action");
    };
    assert_eq!(ra.total_weight, 100);
    assert_eq!(ra.clusters[1].weight, 80);
    assert_eq!(ra.timeout, Some(std::time::Duration::from_millis(500)));
    let rp = ra.retry_policy.as_ref().expect("retry policy");
    assert!(rp.retry_on.five_xx && rp.retry_on.connect_failure && rp.retry_on.retriable_status_codes);
    assert_eq!(rp.num_retries, 3);
    assert_eq!(rp.retriable_status_codes, vec![409]);
    assert!(rp.avoid_previous_hosts);
}

/// Found by the `xds` fuzz target: a route timeout of i64::MAX seconds was accepted, and the
/// router's `Instant::now() + timeout` panicked on every request of that route.
#[test]
fn durations_beyond_protobufs_range_are_refused() {
    let with_timeout = |seconds: i64, nanos: i32| {
        let mut r = prefix_route("/", "c");
        if let Some(rv3::route::Action::Route(ra)) = r.action.as_mut() {
            ra.timeout = Some(PbDuration { seconds, nanos });
        }
        route_configuration(&rv3::RouteConfiguration {
            name: "9080".into(),
            virtual_hosts: vec![vhost("r", &["*"], vec![r])],
            ..Default::default()
        })
    };
    let max = with_timeout(315_576_000_000, 999_999_999).expect("10 000 years is the largest");
    let Action::Route(ra) = &max.virtual_hosts[0].routes[0].action else {
        panic!("route action");
    };
    let deadline = ra.timeout.and_then(|t| std::time::Instant::now().checked_add(t));
    assert!(deadline.is_some(), "an accepted timeout has a deadline");
    for (seconds, nanos) in [(315_576_000_001, 0), (i64::MAX, 0), (1, 1_000_000_000)] {
        let e = with_timeout(seconds, nanos).expect_err("out of range");
        assert_eq!(e.path, "virtualHosts[0].routes[0].route.timeout");
        assert!(e.to_string().contains("out of range"), "{e}");
    }
}

#[test]
fn unsupported_features_are_refused_by_name() {
    let mut r = prefix_route("/", "c");
    if let Some(rv3::route::Action::Route(ra)) = r.action.as_mut() {
        ra.hedge_policy = Some(rv3::HedgePolicy::default());
        ra.hedge_policy.as_mut().expect("hedge").hedge_on_per_try_timeout = true;
    }
    let e = route_configuration(&rv3::RouteConfiguration {
        name: "9080".into(),
        virtual_hosts: vec![vhost("r", &["*"], vec![r])],
        ..Default::default()
    })
    .expect_err("hedging is not supported");
    assert_eq!(e.path, "virtualHosts[0].routes[0].route.hedgePolicy");
    assert!(e.to_string().contains("not supported"), "{e}");

    let mut bad_retry = prefix_route("/", "c");
    if let Some(rv3::route::Action::Route(ra)) = bad_retry.action.as_mut() {
        ra.retry_policy = Some(rv3::RetryPolicy {
            retry_on: "5xx,envoy-ratelimited".into(),
            ..Default::default()
        });
    }
    let e = route_configuration(&rv3::RouteConfiguration {
        name: "9080".into(),
        virtual_hosts: vec![vhost("r", &["*"], vec![bad_retry])],
        ..Default::default()
    })
    .expect_err("unknown retry condition");
    assert!(e.to_string().contains("envoy-ratelimited"), "{e}");

    let mut bad_regex = prefix_route("", "c");
    bad_regex.r#match.as_mut().expect("match").path_specifier =
        Some(rv3::route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: "(unclosed".into(),
            ..Default::default()
        }));
    let e = route_configuration(&rv3::RouteConfiguration {
        name: "9080".into(),
        virtual_hosts: vec![vhost("r", &["*"], vec![bad_regex])],
        ..Default::default()
    })
    .expect_err("bad regex");
    assert_eq!(e.path, "virtualHosts[0].routes[0].match.safeRegex.regex");
}

/// What Envoy's route-config validation refuses (istiod sends a duplicate domain when two
/// VirtualServices claim one host; Envoy NACKs the table), nodeway refuses, with Envoy's words.
#[test]
fn envoys_route_configuration_refusals() {
    let refused = |vhosts: Vec<rv3::VirtualHost>| {
        route_configuration(&rv3::RouteConfiguration {
            name: "9080".into(),
            virtual_hosts: vhosts,
            ..Default::default()
        })
        .expect_err("Envoy refuses it")
    };
    let e = refused(vec![
        vhost("a", &["reviews", "reviews:9080"], vec![]),
        vhost("b", &["Reviews"], vec![]),
    ]);
    assert_eq!(e.path, "virtualHosts[1].domains[0]");
    assert_eq!(
        e.reason,
        "Only unique values for domains are permitted. Duplicate entry of domain reviews in route 9080"
    );
    let e = refused(vec![vhost("a", &["*"], vec![]), vhost("b", &["*"], vec![])]);
    assert_eq!(e.reason, "Only a single wildcard domain is permitted in route 9080");
    let e = refused(vec![vhost("a", &["*.demo", "*.demo"], vec![])]);
    assert_eq!(e.path, "virtualHosts[0].domains[1]");
    // A suffix, a prefix and an exact domain of the same text are different domains.
    table(vec![
        vhost("a", &["*.demo", "demo*", ".demo"], vec![]),
        vhost("b", &["*"], vec![]),
    ]);

    let header = |key: &str| envoy_types::pb::envoy::config::core::v3::HeaderValueOption {
        header: Some(envoy_types::pb::envoy::config::core::v3::HeaderValue {
            key: key.into(),
            value: "x".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    for key in ["host", "Host", ":authority"] {
        let mut vh = vhost("a", &["*"], vec![]);
        vh.request_headers_to_add = vec![header(key)];
        let e = refused(vec![vh]);
        assert_eq!(e.path, "virtualHosts[0].requestHeadersToAdd[0].header.key", "{key}");
        assert_eq!(e.reason, ":-prefixed or host headers may not be modified");
    }
    let mut vh = vhost("a", &["*"], vec![]);
    vh.response_headers_to_remove = vec![":status".into()];
    let e = refused(vec![vh]);
    assert_eq!(e.path, "virtualHosts[0].responseHeadersToRemove[0]");
    assert_eq!(e.reason, ":-prefixed or host headers may not be removed");
}

#[test]
fn re2_substitutions_become_regex_crate_syntax() {
    assert_eq!(convert_re2_for_test("/v2/\\1/x$"), "/v2/${1}/x$$");
}

fn convert_re2_for_test(s: &str) -> String {
    let rr = envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute {
        pattern: Some(RegexMatcher {
            regex: "^/v1/(.*)$".into(),
            ..Default::default()
        }),
        substitution: s.into(),
    };
    let mut r = prefix_route("/", "c");
    if let Some(rv3::route::Action::Route(ra)) = r.action.as_mut() {
        ra.regex_rewrite = Some(rr);
    }
    let t = table(vec![vhost("r", &["*"], vec![r])]);
    match &t.virtual_hosts[0].routes[0].action {
        Action::Route(ra) => ra.regex_rewrite.as_ref().expect("rewrite").substitution.clone(),
        _ => unreachable!(),
    }
}

/// Multi-byte UTF-8 in a path, query or header value never panics a matcher: a suffix, prefix
/// or exact match whose length falls inside a character is simply no match.
#[test]
fn string_matchers_take_utf8_input_without_panicking() {
    let m = |kind: StringMatchKind, ignore_case: bool| StringMatch { kind, ignore_case };
    // "é" is 2 bytes, "😀" 4: each pattern's length cuts one of them in the middle.
    for v in ["/café", "/caf\u{e9}?q=\u{1F600}", "\u{1F600}", "é", "/a\u{1F600}b", ""] {
        for ic in [false, true] {
            for pat in ["b", "é", "xé", "?q=x", "\u{1F600}b", "ab", "/caf", "/ca"] {
                let suffix = m(StringMatchKind::Suffix(pat.into()), ic).matches(v);
                assert_eq!(suffix, v.ends_with(pat), "suffix {pat:?} of {v:?}");
                let prefix = m(StringMatchKind::Prefix(pat.into()), ic).matches(v);
                assert_eq!(prefix, v.starts_with(pat), "prefix {pat:?} of {v:?}");
                assert_eq!(m(StringMatchKind::Exact(pat.into()), ic).matches(v), v == pat);
                assert_eq!(m(StringMatchKind::Contains(pat.into()), ic).matches(v), v.contains(pat));
            }
        }
    }
    assert!(
        !m(StringMatchKind::Suffix("É".into()), true).matches("/café"),
        "ASCII-only case folding, as Envoy"
    );
    assert!(m(StringMatchKind::Suffix("FÉ".into()), true).matches("/caFÉ"));
    // Through a route: a query-parameter suffix matcher and a path prefix on UTF-8 input.
    let mut by_query = prefix_route("/", "query");
    by_query.r#match.as_mut().expect("match").query_parameters = vec![rv3::QueryParameterMatcher {
        name: "q".into(),
        query_parameter_match_specifier: Some(rv3::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(MatchPattern::Suffix("b".into())),
                ignore_case: true,
            },
        )),
    }];
    let t = table(vec![vhost("r", &["*"], vec![by_query, prefix_route("/", "other")])]);
    let vh = t.virtual_host("x").expect("vhost");
    let h = HeaderMap::new();
    let pick = |path: &str| cluster_of(vh.route(&req(path, &h)).expect("route")).to_string();
    assert_eq!(pick("/?q=\u{1F600}"), "other");
    assert_eq!(pick("/?q=\u{e9}"), "other");
    assert_eq!(pick("/?q=\u{1F600}B"), "query");
}
