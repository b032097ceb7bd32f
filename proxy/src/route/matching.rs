//! Does a request match a route? Envoy's rules for paths, headers and query parameters.
use http::HeaderMap;

use super::{HeaderMatcher, PathMatch, QueryMatcher, RouteMatch, StringMatch, StringMatchKind, ValueMatch};

/// What routing looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// `:path`, query included.
    pub path: &'a str,
    /// `:authority` / `Host`, as sent.
    pub authority: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
}

impl RequestView<'_> {
    /// The path without its query string.
    pub fn path_only(&self) -> &str {
        self.path.split_once('?').map_or(self.path, |(p, _)| p)
    }

    pub fn query(&self) -> Option<&str> {
        self.path.split_once('?').map(|(_, q)| q)
    }

    /// A header's value as Envoy matches it: pseudo-headers from the request line, several
    /// values joined with `,`.
    fn header(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match name {
            ":method" => Some(Cow::Borrowed(self.method)),
            ":path" => Some(Cow::Borrowed(self.path)),
            ":authority" | "host" => Some(Cow::Borrowed(self.authority)),
            ":scheme" => Some(Cow::Borrowed(self.scheme)),
            _ => {
                let mut values = self.headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
                let first = values.next()?;
                match values.next() {
                    None => Some(Cow::Borrowed(first)),
                    Some(second) => {
                        let mut joined = format!("{first},{second}");
                        for v in values {
                            joined.push(',');
                            joined.push_str(v);
                        }
                        Some(Cow::Owned(joined))
                    }
                }
            }
        }
    }

    fn is_grpc(&self) -> bool {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"))
    }
}

impl RouteMatch {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.path_matches(req)
            && (!self.grpc || req.is_grpc())
            && self.headers.iter().all(|h| h.matches(req))
            && self.query_parameters.iter().all(|q| q.matches(req))
    }

    fn path_matches(&self, req: &RequestView<'_>) -> bool {
        let cs = self.case_sensitive;
        match &self.path {
            PathMatch::Any => true,
            PathMatch::Prefix(p) => starts_with(req.path, p, cs),
            PathMatch::Exact(p) => eq(req.path_only(), p, cs),
            PathMatch::Regex(re) => full_match(re, req.path_only()),
            PathMatch::SeparatedPrefix(p) => {
                let path = req.path_only();
                starts_with(path, p, cs) && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
        }
    }
}

impl HeaderMatcher {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let value = req.header(&self.name);
        let value = match (&value, self.treat_missing_as_empty) {
            (None, true) => Some(""),
            (v, _) => v.as_deref(),
        };
        let hit = match (&self.matcher, value) {
            (ValueMatch::Present(want), v) => v.is_some() == *want,
            // A missing header never matches (the inversion below does not change that, as in Envoy).
            (_, None) => return false,
            (m, Some(v)) => m.matches_value(v),
        };
        hit != self.invert
    }
}

impl QueryMatcher {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        let value = req.query().and_then(|q| {
            q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == self.name).then_some(v)
            })
        });
        match (&self.matcher, value) {
            (None, v) => v.is_some(),
            (Some(ValueMatch::Present(want)), v) => v.is_some() == *want,
            (Some(_), None) => false,
            (Some(m), Some(v)) => m.matches_value(v),
        }
    }
}

impl ValueMatch {
    fn matches_value(&self, v: &str) -> bool {
        match self {
            ValueMatch::Present(want) => *want,
            ValueMatch::String(s) => s.matches(v),
            ValueMatch::Range { start, end } => v.parse::<i64>().is_ok_and(|n| n >= *start && n < *end),
        }
    }
}

impl StringMatch {
    pub fn matches(&self, v: &str) -> bool {
        let cs = !self.ignore_case;
        match &self.kind {
            StringMatchKind::Exact(s) => eq(v, s, cs),
            StringMatchKind::Prefix(s) => starts_with(v, s, cs),
            StringMatchKind::Suffix(s) => v
                .len()
                .checked_sub(s.len())
                .and_then(|start| v.get(start..))
                .is_some_and(|tail| eq(tail, s, cs)),
            StringMatchKind::Contains(s) => {
                if cs {
                    v.contains(s.as_str())
                } else {
                    v.to_ascii_lowercase().contains(&s.to_ascii_lowercase())
                }
            }
            StringMatchKind::Regex(re) => full_match(re, v),
        }
    }
}

/// RE2's `FullMatch`, which Envoy's `safe_regex` uses: matcher regexes are compiled anchored
/// (`^(?:...)$`), so a plain match is a full match.
fn full_match(re: &regex::Regex, v: &str) -> bool {
    re.is_match(v)
}

fn eq(a: &str, b: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        a == b
    } else {
        a.eq_ignore_ascii_case(b)
    }
}

fn starts_with(s: &str, prefix: &str, case_sensitive: bool) -> bool {
    s.get(..prefix.len())
        .is_some_and(|head| eq(head, prefix, case_sensitive))
}
