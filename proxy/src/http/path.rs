//! Request path normalization on the destination side, before HTTP authorization: Istio's
//! `pathNormalization` (its default `BASE`, which is Envoy's `normalize_path`: RFC 3986
//! normalization plus `\` → `/`) with `merge_slashes`, Istio's `MERGE_SLASHES`, which Istio
//! recommends against CVE-2021-31920. The normalized path is what authorization matches and
//! what the app receives, so the two cannot disagree.
//!
//! - `%HH` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded, once (no double
//!   decoding); other escapes stay as sent, `%2F` and `%5C` included (Envoy's default
//!   `path_with_escaped_slashes_action`, `KEEP_UNCHANGED`, as Istio's `BASE`/`MERGE_SLASHES`).
//! - `\` becomes `/`; `.` and `..` segments are resolved (`..` at the root stays at the root,
//!   as Envoy's canonicalizer does); runs of `/` become one.
//! - `%00` is refused with a 400, as Istio documents. A malformed escape (`%zz`, a trailing
//!   `%`) is refused too, stricter than Envoy, whose canonicalizer passes it through: no app
//!   can then decode it into a path the policy did not see.
//! - Case is kept (Istio does not lowercase) and the query is passed through untouched.
//!
//! [`authz_path`] is what policies match: the normalized path without its query and without
//! `;` segment parameters (Tomcat and Spring route `/admin;x=y` as `/admin`).

/// Why a request path is refused (a 400 local reply, as Envoy's `path_normalization_failed`
/// reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("a percent-encoding in the path is malformed")]
    InvalidPercentEncoding,
    #[error("the path contains an encoded NUL (%00)")]
    EncodedNul,
    /// Not expected (normalizing only removes or decodes characters): refused, never forwarded
    /// unnormalized.
    #[error("the normalized path is not a valid URI")]
    Unrepresentable,
}

/// The normalized `path?query` of a request's `path?query`. A path that is not origin-form
/// (`*`, or empty) is returned as it is.
pub fn normalize(path_and_query: &str) -> Result<String, PathError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    if !path.starts_with('/') {
        return Ok(path_and_query.to_string());
    }
    let decoded = decode_unreserved(path)?.replace('\\', "/");
    let mut out = resolve_segments(&decoded);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// The path authorization matches: `normalized` (an output of [`normalize`]) without its query
/// and with each segment's `;` parameters removed (dot segments are resolved again, so
/// `/public/..;/admin` is `/admin`).
pub fn authz_path(normalized: &str) -> String {
    let path = normalized.split_once('?').map_or(normalized, |(p, _)| p);
    if !path.starts_with('/') || !path.contains(';') {
        return path.to_string();
    }
    let stripped: Vec<&str> = path
        .split('/')
        .map(|seg| seg.split_once(';').map_or(seg, |(s, _)| s))
        .collect();
    resolve_segments(&stripped.join("/"))
}

/// Decodes `%HH` escapes of unreserved characters; keeps the others as sent.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    if !path.contains('%') {
        return Ok(path.to_string());
    }
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let escape = rest.get(i..i + 3).ok_or(PathError::InvalidPercentEncoding)?;
        // Checked first: `from_str_radix` alone would take a sign (`%+1`).
        if !escape[1..].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PathError::InvalidPercentEncoding);
        }
        let byte = u8::from_str_radix(&escape[1..], 16).map_err(|_| PathError::InvalidPercentEncoding)?;
        match byte {
            0 => return Err(PathError::EncodedNul),
            b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => out.push(char::from(b)),
            _ => out.push_str(escape),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// RFC 3986 `remove_dot_segments` with empty segments merged; `path` starts with `/`. A path
/// ending in `/`, `/.` or `/..` keeps its trailing slash.
fn resolve_segments(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            "" | "." => trailing_slash = last,
            ".." => {
                out.pop();
                trailing_slash = last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut joined = String::with_capacity(path.len());
    for seg in &out {
        joined.push('/');
        joined.push_str(seg);
    }
    if joined.is_empty() || trailing_slash {
        joined.push('/');
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (sent, normalized): what the app receives.
    const CORPUS: &[(&str, &str)] = &[
        ("/", "/"),
        ("/admin", "/admin"),
        ("/admin/", "/admin/"),
        ("/%61dmin", "/admin"),
        ("/%61%64%6D%69%6e", "/admin"),
        ("/ADMIN", "/ADMIN"),
        ("/%41dmin", "/Admin"),
        ("//admin", "/admin"),
        ("///admin//x///", "/admin/x/"),
        ("/public/../admin", "/admin"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/%2E./admin", "/admin"),
        ("/./admin", "/admin"),
        ("/admin/.", "/admin/"),
        ("/admin/x/..", "/admin/"),
        ("/../admin", "/admin"),
        ("/../../..", "/"),
        ("/a/b/c/../../d", "/a/d"),
        ("/a/.../b", "/a/.../b"),
        ("/a/..b/c", "/a/..b/c"),
        ("\\admin", "\\admin"),
        ("/public\\..\\admin", "/admin"),
        ("/admin%2Fx", "/admin%2Fx"),
        ("/admin%2fx", "/admin%2fx"),
        ("/public%2F..%2Fadmin", "/public%2F..%2Fadmin"),
        ("/a%5Cb", "/a%5Cb"),
        ("/%252e%252e/admin", "/%252e%252e/admin"),
        ("/a%20b", "/a%20b"),
        ("/a%7e%5f%2d", "/a~_-"),
        ("/admin;x=y", "/admin;x=y"),
        ("/admin?x=1", "/admin?x=1"),
        ("//admin?next=/../x//y", "/admin?next=/../x//y"),
        ("/caf\u{e9}/../menu", "/menu"),
        ("/\u{1F600}/%61", "/\u{1F600}/a"),
        ("*", "*"),
    ];

    #[test]
    fn corpus_normalizes_as_istio_merge_slashes() {
        for (sent, want) in CORPUS {
            assert_eq!(normalize(sent).as_deref(), Ok(*want), "{sent}");
            // Normalizing twice changes nothing.
            assert_eq!(normalize(want).as_deref(), Ok(*want), "{want} again");
        }
    }

    #[test]
    fn malformed_escapes_and_nul_are_refused() {
        for sent in ["/a%", "/a%4", "/a%zz", "/a%4g", "/%+1x", "/%é1", "/a%-1"] {
            assert_eq!(normalize(sent), Err(PathError::InvalidPercentEncoding), "{sent}");
        }
        assert_eq!(normalize("/admin%00"), Err(PathError::EncodedNul));
        // In the query nothing is decoded, so nothing is refused.
        assert_eq!(normalize("/a?x=%zz").as_deref(), Ok("/a?x=%zz"));
    }

    #[test]
    fn authorization_sees_the_path_without_query_or_segment_parameters() {
        for (normalized, want) in [
            ("/admin", "/admin"),
            ("/admin?x=1", "/admin"),
            ("/admin;x=y", "/admin"),
            ("/admin;x=y/secret;v=1", "/admin/secret"),
            ("/;x/admin", "/admin"),
            ("/public/..;/admin", "/admin"),
            ("/public;x/", "/public/"),
            ("*", "*"),
        ] {
            assert_eq!(authz_path(normalized), want, "{normalized}");
        }
    }
}
