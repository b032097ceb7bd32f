//! Header changes: the route table's mutations (request and response, most specific level
//! first), and the one place that drops hop-by-hop headers, for every hop nodeway makes.
use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::route::{AppendAction, HeaderAdd, HeaderMutations, Route, RouteTable, VirtualHost, WeightedCluster};

/// The header changes that apply to a request, from the most specific level to the least
/// (weighted cluster, route, virtual host, route table).
pub struct Levels<'a>(Vec<&'a HeaderMutations>);

impl<'a> Levels<'a> {
    pub fn new(
        wc: Option<&'a WeightedCluster>,
        route: &'a Route,
        vhost: &'a VirtualHost,
        table: &'a RouteTable,
    ) -> Self {
        Self::of(wc.map(|w| &w.headers), &route.headers, &vhost.headers, &table.headers)
    }

    fn of(
        wc: Option<&'a HeaderMutations>,
        route: &'a HeaderMutations,
        vhost: &'a HeaderMutations,
        table: &'a HeaderMutations,
    ) -> Self {
        let mut v = Vec::with_capacity(4);
        v.extend(wc);
        v.extend([route, vhost, table]);
        Levels(v)
    }

    /// Applies the request changes; with OVERWRITE a less specific level (applied later) wins,
    /// as in Envoy by default.
    pub fn request(&self, h: &mut HeaderMap) {
        for m in &self.0 {
            apply(h, &m.request_remove, &m.request_add);
        }
    }

    pub fn response(&self, h: &mut HeaderMap) {
        for m in &self.0 {
            apply(h, &m.response_remove, &m.response_add);
        }
    }
}

fn apply(h: &mut HeaderMap, remove: &[String], add: &[HeaderAdd]) {
    for name in remove {
        h.remove(name.as_str());
    }
    for a in add {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(a.name.as_bytes()),
            HeaderValue::from_str(&a.value),
        ) else {
            continue;
        };
        match a.action {
            AppendAction::AppendIfExistsOrAdd => {
                h.append(name, value);
            }
            AppendAction::AddIfAbsent => {
                h.entry(name).or_insert(value);
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                h.insert(name, value);
            }
            AppendAction::OverwriteIfExists => {
                if h.contains_key(&name) {
                    h.insert(name, value);
                }
            }
        }
    }
}

/// The `Upgrade` a request asks for, if any.
pub fn upgrade(h: &HeaderMap) -> Option<&str> {
    h.get(header::UPGRADE).and_then(|v| v.to_str().ok())
}

/// Drops connection-level headers (RFC 9110 §7.6.1), requests and responses alike, on every
/// hop: `Connection` and what it lists, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`,
/// `HTTP2-Settings` (h2c's upgrade), `TE` other than `trailers`. With `keep_upgrade` (an upgrade the route allows is being passed
/// through) `Connection` and `Upgrade` stay.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in ["keep-alive", "proxy-connection", "transfer-encoding", "http2-settings"] {
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// Gives the request an `x-request-id` (a random UUIDv4) unless it has one.
pub fn ensure_request_id(h: &mut HeaderMap) {
    if h.contains_key("x-request-id") {
        return;
    }
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        0x8000 | fastrand::u16(..0x4000),
        fastrand::u64(..1 << 48)
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-request-id", v);
    }
}

pub fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// A header value from text nodeway built (an authority); never fails.
pub fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{AppendAction, HeaderAdd};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).expect("name"), value(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_and_listed_ones_with_them() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["x-kept"]);
        let mut h = headers(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    }

    #[test]
    fn an_allowed_upgrade_keeps_connection_and_upgrade() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("keep-alive", "1")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(upgrade(&h), Some("websocket"));
        assert!(h.contains_key("connection"));
        assert!(!h.contains_key("keep-alive"));
    }

    fn add(name: &str, v: &str, action: AppendAction) -> HeaderAdd {
        HeaderAdd {
            name: name.into(),
            value: v.into(),
            action,
        }
    }

    #[test]
    fn mutations_apply_most_specific_first() {
        let mut route = HeaderMutations::default();
        route
            .request_add
            .push(add("x-level", "route", AppendAction::OverwriteIfExistsOrAdd));
        route
            .request_add
            .push(add("x-once", "route", AppendAction::AddIfAbsent));
        route.request_remove.push("x-drop".into());
        let mut vhost = HeaderMutations::default();
        vhost
            .request_add
            .push(add("x-level", "vhost", AppendAction::OverwriteIfExistsOrAdd));
        vhost
            .request_add
            .push(add("x-once", "vhost", AppendAction::AddIfAbsent));
        vhost
            .response_add
            .push(add("x-resp", "vhost", AppendAction::AppendIfExistsOrAdd));
        let table = HeaderMutations::default();
        let levels = Levels::of(None, &route, &vhost, &table);
        let mut h = headers(&[("x-drop", "1")]);
        levels.request(&mut h);
        assert_eq!(
            h.get("x-level").map(|v| v.as_bytes()),
            Some(&b"vhost"[..]),
            "less specific overwrites"
        );
        assert_eq!(
            h.get("x-once").map(|v| v.as_bytes()),
            Some(&b"route"[..]),
            "most specific adds first"
        );
        assert!(!h.contains_key("x-drop"));
        let mut r = headers(&[("x-resp", "upstream")]);
        levels.response(&mut r);
        assert_eq!(r.get_all("x-resp").iter().count(), 2);
    }
}
