//! Why an upstream attempt failed, as variants the router's retry and local-reply logic match on
//! (never on message text), and what outlier detection learns from an attempt.
use std::error::Error as StdError;

use super::Overflow;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting (TCP, HBONE or the HTTP handshake) failed or timed out: flag UF.
    #[error("upstream connect failure: {0}")]
    ConnectFailure(String),
    /// Pending-request or connection limit: flag UO.
    #[error("upstream overflow (pending requests)")]
    Overflow,
    /// The attempt's per-try timeout passed before a response head arrived: flag UT.
    #[error("upstream per-try timeout")]
    PerTryTimeout,
    /// HTTP/2 `REFUSED_STREAM`: the upstream did not process the request (`refused-stream`).
    #[error("upstream refused the stream")]
    RefusedStream,
    /// The connection or stream broke before a response head arrived: flag UC.
    #[error("upstream reset: {0}")]
    Reset(String),
    /// The upstream spoke broken HTTP, or the request could not be sent as given.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
}

impl From<Overflow> for UpstreamError {
    fn from(_: Overflow) -> Self {
        UpstreamError::Overflow
    }
}

impl UpstreamError {
    /// A failed send, by what hyper (and h2 beneath it) says happened.
    pub(crate) fn from_hyper(e: &hyper::Error) -> Self {
        if refused_stream(e) {
            UpstreamError::RefusedStream
        } else if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() || e.is_user() {
            UpstreamError::Protocol(e.to_string())
        } else {
            UpstreamError::Reset(e.to_string())
        }
    }

    /// What outlier detection counts for the endpoint.
    pub fn outcome(&self) -> Outcome {
        match self {
            UpstreamError::ConnectFailure(_) => Outcome::ConnectFailure,
            UpstreamError::Overflow => Outcome::Overflow,
            UpstreamError::PerTryTimeout => Outcome::Timeout,
            UpstreamError::RefusedStream | UpstreamError::Reset(_) | UpstreamError::Protocol(_) => Outcome::Reset,
        }
    }
}

/// Whether an h2 `REFUSED_STREAM` is somewhere in the error's sources.
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// What happened to one attempt, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    ConnectFailure,
    Reset,
    Timeout,
    /// The cluster's own circuit breaker refused the attempt: nothing was learnt about the
    /// endpoint, and ejecting it would only shrink an overloaded cluster further (Envoy skips
    /// outlier detection for an overflow too).
    Overflow,
}

impl Outcome {
    pub fn of<B>(result: &Result<http::Response<B>, UpstreamError>) -> Outcome {
        match result {
            Ok(resp) => Outcome::Status(resp.status().as_u16()),
            Err(e) => e.outcome(),
        }
    }
}
