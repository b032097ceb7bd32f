//! When an HTTP server connection has been useless for too long: no first request within the
//! header-read timeout (a slowloris, a peer that never sends the HTTP/2 preface), or no request
//! in flight for the idle timeout (Envoy's `idle_timeout`). hyper's own HTTP/1 header timeout
//! covers later requests on a kept-alive connection; this covers the rest, for HTTP/1 and
//! HTTP/2 alike.
use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::time::Instant;

/// The limits a connection is watched against.
#[derive(Clone, Copy, Debug)]
pub struct IdleLimits {
    /// The first request must have arrived (headers whole) by then.
    pub first_request: Duration,
    /// With no request in flight for this long the connection is closed; `None`: never (HBONE,
    /// whose tunnels outlive their CONNECT, is closed by its client when idle).
    pub idle: Option<Duration>,
}

/// Why a watched connection should end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// No request arrived in time: close without ceremony.
    NoRequest,
    /// No request in flight for the idle timeout: close gracefully (HTTP/2 GOAWAY).
    Idle,
}

/// Requests seen on one connection and how many are in flight.
#[derive(Debug)]
pub struct Activity {
    seen: AtomicBool,
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            seen: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.seen.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the connection expires if nothing changes; `None` while a request is in flight.
    fn deadline(&self, limits: IdleLimits) -> Option<(Instant, Expired)> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        if !self.seen.load(Ordering::Relaxed) {
            let first = self.idle_since() + limits.first_request;
            return Some(match limits.idle {
                Some(idle) if self.idle_since() + idle < first => (self.idle_since() + idle, Expired::Idle),
                _ => (first, Expired::NoRequest),
            });
        }
        limits.idle.map(|idle| (self.idle_since() + idle, Expired::Idle))
    }

    /// Resolves once the connection has expired under `limits`.
    pub async fn expired(&self, limits: IdleLimits) -> Expired {
        loop {
            let now = Instant::now();
            match self.deadline(limits) {
                Some((at, why)) if at <= now => return why,
                Some((at, _)) => tokio::time::sleep_until(at).await,
                // Re-checked after a while: a request that ends restarts the idle clock.
                None => tokio::time::sleep(limits.idle.unwrap_or(limits.first_request)).await,
            }
        }
    }
}

/// A request in flight; the connection's idle clock starts again when the last one ends.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: IdleLimits = IdleLimits {
        first_request: Duration::from_millis(50),
        idle: Some(Duration::from_millis(100)),
    };

    #[tokio::test]
    async fn no_request_expires_at_the_first_request_deadline() {
        let a = Activity::new();
        assert_eq!(a.expired(LIMITS).await, Expired::NoRequest);
    }

    #[tokio::test]
    async fn a_request_in_flight_holds_off_the_idle_timeout() {
        let a = Activity::new();
        let guard = a.start();
        let expired = tokio::spawn({
            let a = a.clone();
            async move { a.expired(LIMITS).await }
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!expired.is_finished(), "a request is in flight");
        drop(guard);
        assert_eq!(expired.await.expect("task"), Expired::Idle);
    }

    #[tokio::test]
    async fn without_an_idle_timeout_a_used_connection_never_expires() {
        let a = Activity::new();
        drop(a.start());
        let limits = IdleLimits { idle: None, ..LIMITS };
        let r = tokio::time::timeout(Duration::from_millis(400), a.expired(limits)).await;
        assert!(r.is_err());
    }
}
