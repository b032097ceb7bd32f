//! Envoy's retry state for one request: which outcomes `retry_on` retries, how many retries the
//! policy allows (`URX` once they are used up), the cluster's retry budget (its `max_retries`
//! breaker: `UO` when open), and the back-off between attempts.
use std::{sync::Arc, time::Duration};

use http::Response;

use super::flags::ResponseFlag;
use crate::{
    route::RetryPolicy,
    upstream::{Body, ClusterState, RetryGuard, UpstreamError},
};

/// What to do after an attempt.
pub enum Decision {
    /// Try again after `backoff`; the guard holds a retry slot of the cluster until the next
    /// attempt is done.
    Retry { backoff: Duration, slot: RetryGuard },
    /// Keep this result; `flag` says why it was not retried although `retry_on` matched.
    Done { flag: Option<ResponseFlag> },
}

/// The retry state of one request.
pub struct RetryState<'a> {
    policy: Option<&'a RetryPolicy>,
    /// Retries still allowed by the policy.
    remaining: u32,
    /// Attempts made so far.
    attempts: u32,
}

impl<'a> RetryState<'a> {
    pub fn new(policy: Option<&'a RetryPolicy>) -> Self {
        RetryState {
            policy,
            remaining: policy.map_or(0, |p| p.num_retries),
            attempts: 0,
        }
    }

    pub fn policy(&self) -> Option<&'a RetryPolicy> {
        self.policy
    }

    /// Counts an attempt starting; returns its number (1 for the first).
    pub fn start_attempt(&mut self) -> u32 {
        self.attempts += 1;
        self.attempts
    }

    /// Envoy's `shouldRetry`: not retried when `retry_on` does not match or the body cannot be
    /// sent again; the retry limit (URX) first, then the cluster's retry breaker (UO).
    pub fn decide(
        &mut self,
        result: &Result<Response<Body>, UpstreamError>,
        replayable: bool,
        cluster: &Arc<ClusterState>,
    ) -> Decision {
        let Some(policy) = self.policy else {
            return Decision::Done { flag: None };
        };
        if !replayable || !retriable(policy, result) {
            return Decision::Done { flag: None };
        }
        if self.remaining == 0 {
            return Decision::Done {
                flag: Some(ResponseFlag::UpstreamRetryLimitExceeded),
            };
        }
        self.remaining -= 1;
        match cluster.admit_retry() {
            Ok(slot) => Decision::Retry {
                backoff: backoff(policy.backoff_base, policy.backoff_max, self.attempts),
                slot,
            },
            Err(_) => Decision::Done {
                flag: Some(ResponseFlag::UpstreamOverflow),
            },
        }
    }
}

const OVERLOADED: &str = "x-envoy-overloaded";
const RATE_LIMITED: &str = "x-envoy-ratelimited";

/// Envoy's `retry_on` conditions for one attempt's result.
pub fn retriable(rp: &RetryPolicy, r: &Result<Response<Body>, UpstreamError>) -> bool {
    let on = &rp.retry_on;
    match r {
        // Envoy never retries what an overloaded or rate-limiting Envoy upstream answered.
        Ok(resp) if resp.headers().contains_key(OVERLOADED) || resp.headers().contains_key(RATE_LIMITED) => false,
        Ok(resp) => {
            let s = resp.status().as_u16();
            let by_status = (on.five_xx && s >= 500)
                || (on.gateway_error && (502..=504).contains(&s))
                || (on.retriable_4xx && s == 409)
                || (on.retriable_status_codes && rp.retriable_status_codes.contains(&s));
            by_status || retriable_grpc(rp, resp)
        }
        Err(UpstreamError::PerTryTimeout) => on.five_xx || on.gateway_error || on.reset,
        Err(UpstreamError::ConnectFailure(_)) => on.connect_failure || on.five_xx || on.gateway_error || on.reset,
        // The cluster's own circuit breaker: retrying would only add load to it (Envoy's
        // `wouldRetryFromReset` never retries an overflow).
        Err(UpstreamError::Overflow) => false,
        Err(UpstreamError::RefusedStream) => on.five_xx || on.reset || on.refused_stream,
        Err(UpstreamError::Reset(_)) | Err(UpstreamError::Protocol(_)) => on.five_xx || on.reset,
    }
}

/// The `grpc-status` conditions, on a trailers-only response's headers.
fn retriable_grpc(rp: &RetryPolicy, resp: &Response<Body>) -> bool {
    let on = &rp.retry_on;
    let grpc = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    match grpc {
        Some(1) => on.grpc_cancelled,
        Some(4) => on.grpc_deadline_exceeded,
        Some(8) => on.grpc_resource_exhausted,
        Some(13) => on.grpc_internal,
        Some(14) => on.grpc_unavailable,
        _ => false,
    }
}

/// Full jitter over an exponentially growing window, as Envoy's back-off.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let window = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(max);
    let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(fastrand::u64(0..ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        http::testing::{cluster_state, response},
        route::RetryOn,
    };

    fn policy(on: RetryOn, num_retries: u32) -> RetryPolicy {
        RetryPolicy {
            retry_on: on,
            num_retries,
            per_try_timeout: None,
            avoid_previous_hosts: false,
            host_selection_max_attempts: 1,
            retriable_status_codes: vec![418],
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
        }
    }

    #[test]
    fn backoff_stays_in_window() {
        for attempt in 1..10 {
            let d = backoff(Duration::from_millis(25), Duration::from_millis(250), attempt);
            assert!(d < Duration::from_millis(250), "{d:?}");
        }
    }

    #[test]
    fn retry_on_conditions_match_variants() {
        let five_xx = policy(
            RetryOn {
                five_xx: true,
                ..Default::default()
            },
            1,
        );
        assert!(retriable(&five_xx, &Ok(response(503, &[]))));
        assert!(!retriable(&five_xx, &Ok(response(404, &[]))));
        assert!(retriable(&five_xx, &Err(UpstreamError::Reset("eof".into()))));
        assert!(retriable(&five_xx, &Err(UpstreamError::PerTryTimeout)));
        // A circuit breaker's overflow, ours or an upstream Envoy's, is never retried.
        assert!(!retriable(&five_xx, &Err(UpstreamError::Overflow)));
        assert!(!retriable(
            &five_xx,
            &Ok(response(503, &[("x-envoy-overloaded", "true")]))
        ));
        assert!(!retriable(
            &five_xx,
            &Ok(response(429, &[("x-envoy-ratelimited", "true")]))
        ));
        let refused = policy(
            RetryOn {
                refused_stream: true,
                ..Default::default()
            },
            1,
        );
        assert!(retriable(&refused, &Err(UpstreamError::RefusedStream)));
        assert!(
            !retriable(&refused, &Err(UpstreamError::Reset("refused".into()))),
            "text is not looked at"
        );
        let connect = policy(
            RetryOn {
                connect_failure: true,
                ..Default::default()
            },
            1,
        );
        assert!(retriable(&connect, &Err(UpstreamError::ConnectFailure("x".into()))));
        assert!(!retriable(&connect, &Ok(response(503, &[]))));
        let codes = policy(
            RetryOn {
                retriable_status_codes: true,
                grpc_unavailable: true,
                ..Default::default()
            },
            1,
        );
        assert!(retriable(&codes, &Ok(response(418, &[]))));
        assert!(retriable(&codes, &Ok(response(200, &[("grpc-status", "14")]))));
        assert!(!retriable(&codes, &Ok(response(200, &[("grpc-status", "13")]))));
    }

    #[test]
    fn limit_exceeded_then_budget_overflow() {
        let cs = cluster_state("outbound|80||budget", 1);
        let p = policy(
            RetryOn {
                five_xx: true,
                ..Default::default()
            },
            1,
        );
        let failed = Ok(response(503, &[]));
        let mut state = RetryState::new(Some(&p));
        state.start_attempt();
        let Decision::Retry { slot, .. } = state.decide(&failed, true, &cs) else {
            panic!("first failure is retried");
        };
        state.start_attempt();
        assert!(
            matches!(
                state.decide(&failed, true, &cs),
                Decision::Done {
                    flag: Some(ResponseFlag::UpstreamRetryLimitExceeded)
                }
            ),
            "the one retry is used up: URX"
        );
        // Another request while the first one's retry holds the cluster's only retry slot.
        let mut other = RetryState::new(Some(&p));
        other.start_attempt();
        assert!(matches!(
            other.decide(&failed, true, &cs),
            Decision::Done {
                flag: Some(ResponseFlag::UpstreamOverflow)
            }
        ));
        drop(slot);
        assert_eq!(cs.counters().upstream_rq_retry, 1);
        assert_eq!(cs.counters().upstream_rq_retry_overflow, 1);
        // Success, a streamed body, or no policy: done, no flag.
        let mut s = RetryState::new(Some(&p));
        assert!(matches!(
            s.decide(&Ok(response(200, &[])), true, &cs),
            Decision::Done { flag: None }
        ));
        assert!(matches!(s.decide(&failed, false, &cs), Decision::Done { flag: None }));
        assert!(matches!(
            RetryState::new(None).decide(&failed, true, &cs),
            Decision::Done { flag: None }
        ));
    }
}
