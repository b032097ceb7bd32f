//! What a route does to a request's URI: prefix and regex rewrites, redirects' `Location`, the
//! mirrors' `-shadow` authority.
use http::Uri;

use crate::route::{PathMatch, Redirect, RedirectPath, Route, RouteAction};

/// The path and query the request goes upstream with.
pub fn rewrite_path(route: &Route, ra: &RouteAction, path: &str) -> String {
    let (p, q) = split_query(path);
    let mut out = if let Some(pre) = &ra.prefix_rewrite {
        rewrite_prefix(&route.matcher.path, p, pre)
    } else if let Some(rr) = &ra.regex_rewrite {
        rr.pattern.replace_all(p, rr.substitution.as_str()).into_owned()
    } else {
        return path.to_string();
    };
    if out.is_empty() {
        out.push('/');
    }
    if let Some(q) = q {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// `prefix_rewrite`: the part of the path the route matched is replaced (a whole-path match
/// replaces all of it).
pub fn rewrite_prefix(m: &PathMatch, path: &str, replacement: &str) -> String {
    let matched = match m {
        PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.len().min(path.len()),
        PathMatch::Exact(_) | PathMatch::Regex(_) => path.len(),
        PathMatch::Any => 0,
    };
    // `get`: a prefix matched case-insensitively still ends on a char boundary, but input never
    // gets to panic here if it did not.
    format!("{replacement}{}", path.get(matched..).unwrap_or_default())
}

/// The `Location` of a redirect for a request to `authority` + `path`.
pub fn redirect_location(r: &Redirect, route: &Route, path: &str, authority: &str) -> String {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let (req_host, req_port) = split_authority(authority);
    let host = r.host.as_deref().unwrap_or(req_host);
    // Envoy keeps a non-default port unless the redirect changes scheme or sets one.
    let port = match (r.port, req_port) {
        (Some(p), _) => Some(p),
        (None, Some(p)) if r.scheme.is_none() && r.host.is_none() => Some(p),
        _ => None,
    }
    .filter(|p| !((scheme == "http" && *p == 80) || (scheme == "https" && *p == 443)));
    let (p_only, query) = split_query(path);
    let mut new_path = match &r.path {
        None => p_only.to_string(),
        Some(RedirectPath::Path(p)) => p.clone(),
        Some(RedirectPath::Prefix(pre)) => rewrite_prefix(&route.matcher.path, p_only, pre),
        Some(RedirectPath::Regex(rr)) => rr.pattern.replace_all(p_only, rr.substitution.as_str()).into_owned(),
    };
    let path_has_query = matches!(&r.path, Some(RedirectPath::Path(p)) if p.contains('?'));
    if let (Some(q), false, false) = (query, r.strip_query, path_has_query) {
        new_path.push('?');
        new_path.push_str(q);
    }
    match port {
        Some(p) => format!("{scheme}://{host}:{p}{new_path}"),
        None => format!("{scheme}://{host}{new_path}"),
    }
}

fn split_query(path: &str) -> (&str, Option<&str>) {
    match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    }
}

pub fn build_uri(authority: &str, path: &str) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
}

/// `reviews:9080` → `reviews-shadow:9080`, as Envoy's mirror does.
pub fn shadow_host(authority: &str) -> String {
    let (host, port) = split_authority(authority);
    match port {
        Some(p) => format!("{host}-shadow:{p}"),
        None => format!("{host}-shadow"),
    }
}

pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let host = crate::route::strip_port(authority);
    let port = authority[host.len()..].strip_prefix(':').and_then(|p| p.parse().ok());
    (host, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_and_authority_split() {
        assert_eq!(shadow_host("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow_host("reviews"), "reviews-shadow");
        assert_eq!(split_authority("a.b:80"), ("a.b", Some(80)));
    }

    #[test]
    fn prefix_rewrite_replaces_the_matched_part() {
        assert_eq!(
            rewrite_prefix(&PathMatch::Prefix("/api/".into()), "/api/v1/x", "/"),
            "/v1/x"
        );
        assert_eq!(
            rewrite_prefix(&PathMatch::Prefix("/old".into()), "/old/x", "/new"),
            "/new/x"
        );
        assert_eq!(rewrite_prefix(&PathMatch::Exact("/a".into()), "/a", "/b"), "/b");
    }
}
