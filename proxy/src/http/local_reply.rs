//! Every reply nodeway makes itself instead of an upstream's, in one place: Envoy's status
//! codes, bodies and response flags, and for gRPC requests Envoy's trailers-only form (HTTP 200,
//! `grpc-status` mapped from the HTTP status as gRPC's HTTP mapping says, `grpc-message`).
use http::{header, HeaderValue, Response, StatusCode};

use super::{
    body::{empty, full},
    flags::ResponseFlag,
};
use crate::upstream::{Body, UpstreamError};

/// A reply of nodeway's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReply {
    /// No virtual host or route matched: 404 `NR`, empty body.
    NoRoute,
    /// The route's cluster is not configured: 503 `NC`, empty body.
    NoCluster,
    /// A circuit breaker is open: 503 `UO`.
    Overflow,
    /// The cluster has no endpoint to pick: 503 `UH`.
    NoHealthyUpstream,
    /// The route (or the last try's) timeout passed: 504 `UT`.
    Timeout,
    /// No connection could be made: 503 `UF`.
    ConnectFailure,
    /// The connection or stream broke before a response head: 503 `UC`.
    ConnectionTermination,
    /// The fault filter aborted with this HTTP status: `FI`.
    FaultAbort(u16),
    /// The fault filter aborted with this gRPC status: `FI` (always a gRPC reply).
    GrpcFaultAbort(u32),
    /// Two Host headers: 400 `DPE`.
    MultipleHosts,
    /// A rewrite made an invalid URI: 400.
    BadRewrite,
    /// The request path is refused by normalization (`%00`, a malformed escape): 400 `DPE`,
    /// empty body, as Envoy's `path_normalization_failed` reply.
    BadPath,
    /// HTTP authorization denied the request: 403 `RBAC`.
    RbacDenied,
    /// `Host` and `:authority` (or an absolute URI's authority) name different hosts: 400 `DPE`.
    AuthorityMismatch,
    /// An `Upgrade` the port does not allow: 403, empty body, no flag (Envoy's
    /// `upgrade_failed`).
    UpgradeRefused,
}

impl LocalReply {
    /// The reply for a failed upstream attempt.
    pub fn for_error(e: &UpstreamError) -> LocalReply {
        match e {
            UpstreamError::PerTryTimeout => LocalReply::Timeout,
            UpstreamError::Overflow => LocalReply::Overflow,
            UpstreamError::ConnectFailure(_) => LocalReply::ConnectFailure,
            UpstreamError::RefusedStream | UpstreamError::Reset(_) | UpstreamError::Protocol(_) => {
                LocalReply::ConnectionTermination
            }
        }
    }

    pub fn status(self) -> StatusCode {
        let code = match self {
            LocalReply::NoRoute => 404,
            LocalReply::Timeout => 504,
            LocalReply::FaultAbort(s) => s,
            LocalReply::GrpcFaultAbort(_) => 200,
            LocalReply::MultipleHosts
            | LocalReply::BadRewrite
            | LocalReply::BadPath
            | LocalReply::AuthorityMismatch => 400,
            LocalReply::RbacDenied | LocalReply::UpgradeRefused => 403,
            _ => 503,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
    }

    pub fn body(self) -> &'static str {
        match self {
            LocalReply::NoRoute | LocalReply::NoCluster | LocalReply::BadPath | LocalReply::UpgradeRefused => "",
            LocalReply::Overflow => "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            LocalReply::NoHealthyUpstream => "no healthy upstream",
            LocalReply::Timeout => "upstream request timeout",
            LocalReply::ConnectFailure => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            }
            LocalReply::ConnectionTermination => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
            }
            LocalReply::FaultAbort(_) | LocalReply::GrpcFaultAbort(_) => "fault filter abort",
            LocalReply::MultipleHosts => "multiple Host headers",
            LocalReply::AuthorityMismatch => "Host and :authority differ",
            LocalReply::BadRewrite => "bad rewritten path",
            LocalReply::RbacDenied => "RBAC: access denied",
        }
    }

    pub fn flag(self) -> Option<ResponseFlag> {
        Some(match self {
            LocalReply::NoRoute => ResponseFlag::NoRouteFound,
            LocalReply::NoCluster => ResponseFlag::NoClusterFound,
            LocalReply::Overflow => ResponseFlag::UpstreamOverflow,
            LocalReply::NoHealthyUpstream => ResponseFlag::NoHealthyUpstream,
            LocalReply::Timeout => ResponseFlag::UpstreamRequestTimeout,
            LocalReply::ConnectFailure => ResponseFlag::UpstreamConnectionFailure,
            LocalReply::ConnectionTermination => ResponseFlag::UpstreamConnectionTermination,
            LocalReply::FaultAbort(_) | LocalReply::GrpcFaultAbort(_) => ResponseFlag::FaultInjected,
            LocalReply::MultipleHosts | LocalReply::BadPath | LocalReply::AuthorityMismatch => {
                ResponseFlag::DownstreamProtocolError
            }
            LocalReply::RbacDenied => ResponseFlag::RbacAccessDenied,
            LocalReply::BadRewrite | LocalReply::UpgradeRefused => return None,
        })
    }

    /// The response, and the gRPC status it carries if it is a gRPC reply.
    pub fn render(self, grpc: bool) -> (Response<Body>, Option<u32>) {
        let grpc_status = match self {
            LocalReply::GrpcFaultAbort(code) => Some(code),
            _ if grpc => Some(grpc_status_for(self.status())),
            _ => None,
        };
        let (mut resp, grpc_status) = self.render_body(grpc_status);
        if self == LocalReply::Overflow {
            // Envoy marks a reply of its own circuit breakers so no other Envoy retries it.
            resp.headers_mut()
                .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
        }
        (resp, grpc_status)
    }

    fn render_body(self, grpc_status: Option<u32>) -> (Response<Body>, Option<u32>) {
        if let Some(code) = grpc_status {
            let mut resp = Response::new(empty());
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static(self.body()));
            return (resp, Some(code));
        }
        let body = self.body();
        let mut resp = Response::new(if body.is_empty() {
            empty()
        } else {
            full(bytes::Bytes::from_static(body.as_bytes()))
        });
        *resp.status_mut() = self.status();
        if !body.is_empty() {
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        (resp, None)
    }
}

/// gRPC's mapping of an HTTP status for intermediaries (Envoy's `httpToGrpcStatus`).
fn grpc_status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn text(resp: Response<Body>) -> String {
        let b = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    #[tokio::test]
    async fn http_replies_have_envoys_status_body_and_flag() {
        let cases = [
            (LocalReply::NoRoute, 404, "", "NR"),
            (LocalReply::NoCluster, 503, "", "NC"),
            (LocalReply::Timeout, 504, "upstream request timeout", "UT"),
            (
                LocalReply::Overflow,
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                "UO",
            ),
            (LocalReply::NoHealthyUpstream, 503, "no healthy upstream", "UH"),
            (LocalReply::FaultAbort(418), 418, "fault filter abort", "FI"),
            (LocalReply::RbacDenied, 403, "RBAC: access denied", "RBAC"),
            (LocalReply::MultipleHosts, 400, "multiple Host headers", "DPE"),
            (LocalReply::BadPath, 400, "", "DPE"),
        ];
        for (reply, status, body, flag) in cases {
            let (resp, grpc) = reply.render(false);
            assert_eq!(resp.status().as_u16(), status, "{reply:?}");
            assert_eq!(grpc, None);
            let overloaded = resp.headers().get("x-envoy-overloaded").map(|v| v.as_bytes());
            assert_eq!(
                overloaded,
                (reply == LocalReply::Overflow).then_some(&b"true"[..]),
                "{reply:?}"
            );
            let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
            assert_eq!(ct.is_some(), !body.is_empty(), "{reply:?}");
            assert_eq!(text(resp).await, body, "{reply:?}");
            assert_eq!(reply.flag().map(ResponseFlag::short), Some(flag));
        }
        assert_eq!(LocalReply::BadRewrite.flag(), None);
    }

    #[test]
    fn upstream_failures_map_to_uf_uc_uo_ut() {
        let r = |e| LocalReply::for_error(&e);
        assert_eq!(
            r(UpstreamError::ConnectFailure("refused".into())),
            LocalReply::ConnectFailure
        );
        assert_eq!(r(UpstreamError::Reset("eof".into())), LocalReply::ConnectionTermination);
        assert_eq!(r(UpstreamError::RefusedStream), LocalReply::ConnectionTermination);
        assert_eq!(r(UpstreamError::Overflow), LocalReply::Overflow);
        assert_eq!(r(UpstreamError::PerTryTimeout), LocalReply::Timeout);
    }

    #[tokio::test]
    async fn grpc_requests_get_trailers_only_replies() {
        for (reply, code) in [
            (LocalReply::NoRoute, 12),
            (LocalReply::Timeout, 14),
            (LocalReply::Overflow, 14),
            (LocalReply::RbacDenied, 7),
            (LocalReply::GrpcFaultAbort(8), 8),
        ] {
            let (resp, grpc) = reply.render(true);
            assert_eq!(resp.status(), StatusCode::OK);
            let overloaded = resp.headers().get("x-envoy-overloaded").map(|v| v.as_bytes());
            assert_eq!(
                overloaded,
                (reply == LocalReply::Overflow).then_some(&b"true"[..]),
                "{reply:?}"
            );
            assert_eq!(grpc, Some(code), "{reply:?}");
            let h = resp.headers();
            assert_eq!(
                h.get("grpc-status").map(|v| v.as_bytes()),
                Some(code.to_string().as_bytes())
            );
            assert_eq!(
                h.get("grpc-message").map(|v| v.as_bytes()),
                Some(reply.body().as_bytes())
            );
            assert_eq!(
                h.get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
                Some(&b"application/grpc"[..])
            );
            assert_eq!(text(resp).await, "");
        }
        // A gRPC fault is a gRPC reply even to a plain request.
        assert_eq!(LocalReply::GrpcFaultAbort(14).render(false).1, Some(14));
    }
}
