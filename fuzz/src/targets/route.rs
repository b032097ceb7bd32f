//! HTTP route matching (`route`): path, header and query parameter matchers with Envoy's
//! semantics, checked against a reference written from Envoy's docs (byte-wise, so a matcher
//! can never slice inside a UTF-8 character); then the matched route's rewrites and redirect
//! and the hop-by-hop header strip run on the same request.
use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderMap, HeaderName, HeaderValue};
use nodeway_proxy::{
    fuzzing::{redirect_location, rewrite_path, strip_hop_by_hop},
    route::{
        Action, HeaderMatcher, HeaderMutations, PathMatch, QueryMatcher, Redirect, RedirectPath, RegexRewrite,
        RequestView, Route, RouteAction, RouteMatch, StringMatch, StringMatchKind, ValueMatch,
    },
};

use crate::Target;

pub const TARGET: Target = Target {
    name: "route",
    about: "route/header/query matching against a reference; rewrites, redirects, hop-by-hop strip",
    run,
    dict: &[
        b"/",
        b"/api",
        b"?",
        b"&",
        b"=",
        b":path",
        b":method",
        b":authority",
        b"host",
        b"content-type",
        b"application/grpc",
        b"connection",
        b"upgrade",
        b"te",
        b"trailers",
        b"\xc3\xa9",
        b"\xe2\x82\xac",
        b"\xf0\x9f\x98\x80",
        b"K",
        b"k",
        b"\xe2\x84\xaa",
        b".*",
        b"(a|b)+",
        b"\\1",
        b"$1",
    ],
    max_len: 2048,
};

/// Header names the generated requests and matchers share, so that they meet.
const NAMES: &[&str] = &[
    ":method",
    ":path",
    ":authority",
    ":scheme",
    "host",
    "x-user",
    "content-type",
    "connection",
    "upgrade",
    "keep-alive",
    "te",
    "x-a",
];

#[derive(Debug, Arbitrary)]
enum Kind<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Suffix(&'a str),
    Contains(&'a str),
    Regex(&'a str),
}

#[derive(Debug, Arbitrary)]
struct Str<'a> {
    kind: Kind<'a>,
    ignore_case: bool,
}

#[derive(Debug, Arbitrary)]
enum Value<'a> {
    Present(bool),
    String(Str<'a>),
    Range(i64, i64),
}

#[derive(Debug, Arbitrary)]
enum Path<'a> {
    Any,
    Prefix(&'a str),
    Exact(&'a str),
    Regex(&'a str),
    Separated(&'a str),
}

#[derive(Debug, Arbitrary)]
struct Header<'a> {
    name: u8,
    value: Value<'a>,
    invert: bool,
    missing_as_empty: bool,
}

#[derive(Debug, Arbitrary)]
struct Query<'a> {
    name: &'a str,
    value: Option<Value<'a>>,
}

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    path_match: Path<'a>,
    case_sensitive: bool,
    grpc: bool,
    headers: Vec<Header<'a>>,
    queries: Vec<Query<'a>>,
    method: &'a str,
    path: &'a str,
    authority: &'a str,
    request_headers: Vec<(u8, &'a [u8])>,
    prefix_rewrite: Option<&'a str>,
    regex_rewrite: Option<(&'a str, &'a str)>,
    redirect_host: Option<&'a str>,
    redirect_port: Option<u16>,
    strip_query: bool,
}

fn run(bytes: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(bytes)) else {
        return;
    };
    let Some(matcher) = route_match(&input) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for (n, v) in input.request_headers.iter().take(16) {
        let name = NAMES[usize::from(*n) % NAMES.len()];
        if let (Ok(name), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(v)) {
            headers.append(name, v);
        }
    }
    let req = RequestView {
        method: input.method,
        path: input.path,
        authority: input.authority,
        scheme: "http",
        headers: &headers,
    };
    let got = matcher.matches(&req);
    let want = reference_route(&matcher, &req);
    assert_eq!(got, want, "route match {matcher:?} on {req:?}");
    if got {
        after_match(&input, matcher, &req);
    }
    let keep_upgrade = input.strip_query;
    strip_hop_by_hop(&mut headers, keep_upgrade);
    for n in ["keep-alive", "transfer-encoding", "proxy-connection", "http2-settings"] {
        assert!(!headers.contains_key(n), "{n} survives the hop-by-hop strip");
    }
    if !keep_upgrade {
        assert!(!headers.contains_key("connection") && !headers.contains_key("upgrade"));
    }
}

fn string_match(s: &Str<'_>) -> Option<StringMatch> {
    let kind = match s.kind {
        Kind::Exact(x) => StringMatchKind::Exact(x.into()),
        Kind::Prefix(x) => StringMatchKind::Prefix(x.into()),
        Kind::Suffix(x) => StringMatchKind::Suffix(x.into()),
        Kind::Contains(x) => StringMatchKind::Contains(x.into()),
        Kind::Regex(x) => StringMatchKind::Regex(anchored(x)?),
    };
    Some(StringMatch {
        kind,
        ignore_case: s.ignore_case,
    })
}

/// As the converter compiles matcher regexes; long patterns are skipped (compile time only).
fn anchored(re: &str) -> Option<regex::Regex> {
    (re.len() <= 32)
        .then(|| regex::Regex::new(&format!("^(?:{re})$")).ok())
        .flatten()
}

fn value_match(v: &Value<'_>) -> Option<ValueMatch> {
    Some(match v {
        Value::Present(p) => ValueMatch::Present(*p),
        Value::String(s) => ValueMatch::String(string_match(s)?),
        Value::Range(start, end) => ValueMatch::Range {
            start: *start,
            end: *end,
        },
    })
}

fn route_match(input: &Input<'_>) -> Option<RouteMatch> {
    let path = match input.path_match {
        Path::Any => PathMatch::Any,
        Path::Prefix(p) => PathMatch::Prefix(p.into()),
        Path::Exact(p) => PathMatch::Exact(p.into()),
        Path::Regex(p) => PathMatch::Regex(anchored(p)?),
        Path::Separated(p) => PathMatch::SeparatedPrefix(p.into()),
    };
    let mut headers = Vec::new();
    for h in input.headers.iter().take(4) {
        headers.push(HeaderMatcher {
            name: NAMES[usize::from(h.name) % NAMES.len()].into(),
            matcher: value_match(&h.value)?,
            invert: h.invert,
            treat_missing_as_empty: h.missing_as_empty,
        });
    }
    let mut query_parameters = Vec::new();
    for q in input.queries.iter().take(4) {
        query_parameters.push(QueryMatcher {
            name: q.name.into(),
            matcher: match &q.value {
                None => None,
                Some(v) => Some(value_match(v)?),
            },
        });
    }
    Some(RouteMatch {
        path,
        case_sensitive: input.case_sensitive,
        headers,
        query_parameters,
        grpc: input.grpc,
    })
}

/// Byte-wise, ASCII case folding only (Envoy's `ignore_case`).
fn fold(s: &str, ignore_case: bool) -> Vec<u8> {
    if ignore_case {
        s.bytes().map(|b| b.to_ascii_lowercase()).collect()
    } else {
        s.as_bytes().to_vec()
    }
}

fn reference_string(m: &StringMatch, v: &str) -> bool {
    let ic = m.ignore_case;
    if let StringMatchKind::Regex(re) = &m.kind {
        // `ignore_case` does not apply to regexes (Envoy: use `(?i)`).
        return re.is_match(v);
    }
    let v = fold(v, ic);
    match &m.kind {
        StringMatchKind::Exact(s) => v == fold(s, ic),
        StringMatchKind::Prefix(s) => v.starts_with(&fold(s, ic)),
        StringMatchKind::Suffix(s) => v.ends_with(&fold(s, ic)),
        StringMatchKind::Contains(s) => {
            let s = fold(s, ic);
            s.is_empty() || v.windows(s.len()).any(|w| w == s.as_slice())
        }
        StringMatchKind::Regex(_) => unreachable!("handled above"),
    }
}

fn reference_value(m: &ValueMatch, v: Option<&str>) -> bool {
    match (m, v) {
        (ValueMatch::Present(want), v) => v.is_some() == *want,
        (_, None) => false,
        (ValueMatch::String(s), Some(v)) => reference_string(s, v),
        (ValueMatch::Range { start, end }, Some(v)) => v.parse::<i64>().is_ok_and(|n| *start <= n && n < *end),
    }
}

fn reference_route(m: &RouteMatch, req: &RequestView<'_>) -> bool {
    let path_only = req.path.split('?').next().unwrap_or_default();
    let cs = m.case_sensitive;
    let path = match &m.path {
        PathMatch::Any => true,
        PathMatch::Prefix(p) => fold(req.path, !cs).starts_with(&fold(p, !cs)),
        PathMatch::Exact(p) => fold(path_only, !cs) == fold(p, !cs),
        PathMatch::Regex(re) => re.is_match(path_only),
        PathMatch::SeparatedPrefix(p) => {
            let (path, p) = (fold(path_only, !cs), fold(p, !cs));
            path.starts_with(&p) && (path.len() == p.len() || path[p.len()] == b'/')
        }
    };
    let grpc = !m.grpc
        || req
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
    let headers = m.headers.iter().all(|h| {
        let value: Option<String> = match h.name.as_str() {
            ":method" => Some(req.method.into()),
            ":path" => Some(req.path.into()),
            ":authority" | "host" => Some(req.authority.into()),
            ":scheme" => Some(req.scheme.into()),
            n => {
                let all: Vec<&str> = req.headers.get_all(n).iter().filter_map(|v| v.to_str().ok()).collect();
                (!all.is_empty()).then(|| all.join(","))
            }
        };
        let value = value.or_else(|| h.treat_missing_as_empty.then(String::new));
        match (&h.matcher, value.as_deref()) {
            (ValueMatch::Present(_), v) => reference_value(&h.matcher, v) != h.invert,
            (_, None) => false,
            (m, v) => reference_value(m, v) != h.invert,
        }
    });
    let query = req.path.split_once('?').map(|(_, q)| q);
    let queries = m.query_parameters.iter().all(|qm| {
        let v = query.and_then(|q| {
            q.split('&')
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .find(|(k, _)| *k == qm.name)
                .map(|(_, v)| v)
        });
        match &qm.matcher {
            None => v.is_some(),
            Some(m) => reference_value(m, v),
        }
    });
    path && grpc && headers && queries
}

/// The matched route's path rewrite and redirect `Location`: never panic, keep the query.
fn after_match(input: &Input<'_>, matcher: RouteMatch, req: &RequestView<'_>) {
    let regex_rewrite = input.regex_rewrite.and_then(|(p, s)| {
        Some(RegexRewrite {
            pattern: (p.len() <= 32).then(|| regex::Regex::new(p).ok()).flatten()?,
            substitution: s.into(),
        })
    });
    let ra = RouteAction {
        clusters: Vec::new(),
        total_weight: 1,
        prefix_rewrite: input.prefix_rewrite.map(Into::into),
        regex_rewrite,
        host_rewrite: None,
        timeout: None,
        retry_policy: None,
        mirrors: Vec::new(),
        hash_policy: Vec::new(),
        upgrades: Vec::new(),
    };
    let redirect = Redirect {
        scheme: None,
        host: input.redirect_host.map(Into::into),
        port: input.redirect_port,
        path: input.prefix_rewrite.map(|p| RedirectPath::Prefix(p.into())),
        status: 301,
        strip_query: input.strip_query,
    };
    let route = Route {
        name: String::new(),
        matcher,
        action: Action::Redirect(redirect),
        headers: HeaderMutations::default(),
        fault: None,
        istio_config: None,
    };
    let rewritten = rewrite_path(&route, &ra, req.path);
    if ra.prefix_rewrite.is_some() || ra.regex_rewrite.is_some() {
        if let Some((_, q)) = req.path.split_once('?') {
            assert!(
                rewritten.ends_with(&format!("?{q}")),
                "the rewrite of {:?} lost its query",
                req.path
            );
        }
    } else {
        assert_eq!(rewritten, req.path);
    }
    if let Action::Redirect(r) = &route.action {
        let location = redirect_location(r, &route, req.path, req.authority);
        assert!(location.starts_with("http://"), "{location:?}");
    }
}
