//! Request path normalization (`http::path`): never panics, idempotent, never above the root,
//! no dot segment or empty segment left, only unreserved escapes decoded, and what the proxy
//! forwards is still a valid request target.
use nodeway_proxy::fuzzing::{authz_path, normalize};

use crate::Target;

pub const TARGET: Target = Target {
    name: "path",
    about: "path normalization: idempotent, never above root, forwardable, never panics",
    run,
    dict: &[
        b"/",
        b"//",
        b"/./",
        b"/../",
        b"..",
        b".",
        b"%2e",
        b"%2E",
        b"%2f",
        b"%2F",
        b"%5c",
        b"%5C",
        b"%00",
        b"%61",
        b"%",
        b"%%",
        b"\\",
        b";",
        b";x=y",
        b"?",
        b"&",
        b"#",
        b"\xc3\xa9",
        b"\xf0\x9f\x98\x80",
        b"%252e",
    ],
    max_len: 512,
};

fn run(data: &[u8]) {
    let sent = super::text(data);
    let Ok(normalized) = normalize(&sent) else {
        return;
    };
    assert_eq!(
        normalize(&normalized).as_deref(),
        Ok(normalized.as_str()),
        "normalizing {sent:?} twice changes it"
    );
    let (path, query) = split(&normalized);
    if !sent.starts_with('/') {
        assert_eq!(normalized, *sent, "a path that is not origin-form is passed as sent");
        return;
    }
    assert_eq!(query, split(&sent).1, "the query of {sent:?} is passed untouched");
    check_resolved(path, &sent);
    assert!(!path.contains('\\'), "{sent:?} → {path:?}: a backslash is left");
    for (i, _) in path.match_indices('%') {
        let hex = path.get(i + 1..i + 3).expect("an escape keeps its two hex digits");
        let byte = u8::from_str_radix(hex, 16).expect("only well-formed escapes are kept");
        assert!(
            !(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)) && byte != 0,
            "{sent:?} → {path:?}: %{hex} should have been decoded or refused"
        );
    }
    // What the destination side forwards must still be a request target: it rebuilds the URI
    // from the normalized form of what hyper parsed (a fragment is gone by then).
    if let Ok(parsed) = sent.parse::<http::uri::PathAndQuery>() {
        if let Ok(n) = normalize(parsed.as_str()) {
            assert!(
                n.parse::<http::uri::PathAndQuery>().is_ok(),
                "{:?} is a valid path but its normalized form {n:?} is not",
                parsed.as_str()
            );
        }
    }
    let authz = authz_path(&normalized);
    check_resolved(&authz, &sent);
    assert!(
        !authz.contains('?'),
        "{sent:?}: the authorization path {authz:?} has a query"
    );
    assert!(
        !authz.contains(';'),
        "{sent:?}: the authorization path {authz:?} keeps a segment parameter"
    );
    if !path.contains(';') {
        assert_eq!(authz, path, "{sent:?}: authorization and the app see different paths");
    }
    assert_eq!(
        authz_path(&authz),
        authz,
        "authorization path of {sent:?} is not stable"
    );
}

fn split(s: &str) -> (&str, Option<&str>) {
    match s.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (s, None),
    }
}

/// Rooted, and no segment is empty, `.` or `..` (a trailing `/` is allowed).
fn check_resolved(path: &str, sent: &str) {
    assert!(path.starts_with('/'), "{sent:?} → {path:?}: not rooted");
    let inner = path.strip_suffix('/').unwrap_or(path);
    for seg in inner.split('/').skip(1) {
        assert!(
            !matches!(seg, "" | "." | ".."),
            "{sent:?} → {path:?}: segment {seg:?} left (above the root or unresolved)"
        );
    }
}
