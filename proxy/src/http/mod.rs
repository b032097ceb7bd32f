//! HTTP, as Envoy's HTTP connection manager and router do it for a sidecar.
//!
//! Outbound ([`router`]): a captured pod's HTTP/1.1, h2c or gRPC connection to a port that has a
//! route table is served request by request with Envoy's router semantics (the
//! `RouteConfiguration` named after the port, as an Istio sidecar's outbound listener uses it),
//! in Envoy's parts: route match and dispatch ([`router`]), the fault filter ([`fault`]), header
//! changes and hop-by-hop headers ([`headers`]), rewrites and redirects ([`rewrite`]), one
//! attempt ([`upstream_request`]), retries ([`retry`]), mirrors ([`shadow`]), and the replies
//! nodeway makes itself ([`local_reply`]). Upstream connections, load balancing, circuit
//! breakers and outlier detection are [`crate::upstream`]'s.
//!
//! Inbound ([`inbound`]): requests to a pod's HTTP ports are authorized one by one, delivered to
//! the app through the same upstream send path, and reported by the destination.
//!
//! Every request ends in Istio's request metrics and an access log line ([`observe`]) with
//! Envoy's response flags ([`flags`]). [`context`] is the only module that knows about pods.
pub mod access_log;
pub mod body;
pub mod fault;
pub mod flags;
pub mod headers;
pub mod inbound;
pub mod local_reply;
pub mod observe;
pub mod path;
pub mod retry;
pub mod rewrite;
pub mod router;
pub mod server;
pub mod shadow;
pub mod sniff;
#[cfg(test)]
pub(crate) mod testing;
pub mod upstream_request;

use http::{Request, Version};

/// The request's authority: the URI's (HTTP/2, absolute form), else the Host header.
pub fn authority_of<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| headers::header_str(req.headers(), "host"))
        .unwrap_or_default()
}

/// As Envoy's `%PROTOCOL%` prints it.
pub fn version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/?",
    }
}
