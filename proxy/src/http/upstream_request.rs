//! Envoy's upstream request: one attempt of a routed request on one endpoint, within the
//! route's per-try timeout, reported to outlier detection.
use std::{net::SocketAddr, time::Duration};

use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};

use crate::upstream::{Body, ClusterState, Connect, Outcome, UpstreamError};

/// The request as it goes upstream, for every attempt and mirror: rewritten, header changes
/// applied, hop-by-hop headers dropped.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The upstream HTTP version.
    pub version: Version,
}

impl Head {
    /// The request of attempt number `attempt` (sent as `x-envoy-attempt-count` if asked).
    pub fn request(&self, body: Body, attempt: Option<u32>) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        if let Some(n) = attempt {
            r.headers_mut().insert("x-envoy-attempt-count", HeaderValue::from(n));
        }
        r
    }
}

/// Where one attempt goes.
pub struct UpstreamRequest<'a> {
    pub cluster: &'a ClusterState,
    pub via: &'a dyn Connect,
    pub endpoint: SocketAddr,
    pub per_try_timeout: Option<Duration>,
}

impl UpstreamRequest<'_> {
    /// Sends `req` and waits for the response head (at most the per-try timeout: then
    /// [`UpstreamError::PerTryTimeout`]); the outcome goes to the cluster's outlier detection.
    pub async fn send(&self, version: Version, req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let sent = self.cluster.send(self.via, self.endpoint, version, req);
        let result = match self.per_try_timeout {
            Some(t) => tokio::time::timeout(t, sent)
                .await
                .unwrap_or(Err(UpstreamError::PerTryTimeout)),
            None => sent.await,
        };
        self.cluster.report(self.endpoint, Outcome::of(&result));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{
        body::empty,
        testing::{cluster_state, Backends},
    };

    fn head(version: Version) -> Head {
        Head {
            method: Method::GET,
            uri: "http://web:80/x?delay_ms=300".parse().expect("uri"),
            headers: HeaderMap::new(),
            version,
        }
    }

    #[tokio::test]
    async fn one_attempt_reaches_the_endpoint_with_the_attempt_count() {
        let backends = Backends::new();
        let ep = backends.http("a");
        let cs = cluster_state("outbound|80||web", 3);
        let h = Head {
            uri: "http://web:80/hello".parse().expect("uri"),
            ..head(Version::HTTP_11)
        };
        let u = UpstreamRequest {
            cluster: &cs,
            via: &backends,
            endpoint: ep,
            per_try_timeout: None,
        };
        let resp = u.send(h.version, h.request(empty(), Some(2))).await.expect("response");
        assert_eq!(resp.status(), 200);
        let seen = backends.received("a");
        assert_eq!(seen[0].path, "/hello");
        assert_eq!(seen[0].header("x-envoy-attempt-count"), Some("2"));
        assert_eq!(seen[0].header("host"), Some("web:80"));
    }

    #[tokio::test]
    async fn per_try_timeout_is_its_own_error_and_an_outlier_timeout() {
        let backends = Backends::new();
        let ep = backends.http("slow");
        let cs = cluster_state("outbound|80||web", 3);
        let h = head(Version::HTTP_2);
        let u = UpstreamRequest {
            cluster: &cs,
            via: &backends,
            endpoint: ep,
            per_try_timeout: Some(Duration::from_millis(20)),
        };
        let r = u.send(h.version, h.request(empty(), None)).await;
        assert!(matches!(r, Err(UpstreamError::PerTryTimeout)), "{r:?}");
        let status = cs.counters();
        assert_eq!(status.upstream_rq_total, 1);
    }

    #[tokio::test]
    async fn refused_streams_and_connect_failures_are_typed() {
        let backends = Backends::new();
        let refusing = backends.refuse_h2("refuser");
        let cs = cluster_state("outbound|80||web", 3);
        let h = Head {
            uri: "http://web:80/".parse().expect("uri"),
            ..head(Version::HTTP_2)
        };
        let u = UpstreamRequest {
            cluster: &cs,
            via: &backends,
            endpoint: refusing,
            per_try_timeout: None,
        };
        let r = u.send(h.version, h.request(empty(), None)).await;
        assert!(matches!(r, Err(UpstreamError::RefusedStream)), "{r:?}");
        let nowhere = UpstreamRequest {
            endpoint: "198.18.0.99:80".parse().expect("addr"),
            ..u
        };
        let r = nowhere.send(h.version, h.request(empty(), None)).await;
        assert!(matches!(r, Err(UpstreamError::ConnectFailure(_))), "{r:?}");
        assert_eq!(cs.counters().upstream_cx_connect_fail, 1);
    }
}
