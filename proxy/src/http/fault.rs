//! Envoy's fault filter, which sits before the router: a delay (flag `DI`) and an abort (`FI`)
//! for the requests its header conditions select, each with its percentage.
use crate::route::{AbortKind, Fault, RequestView};

use super::{flags::ResponseFlag, local_reply::LocalReply};

/// What the fault filter did to a request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Injected {
    pub delayed: bool,
    pub abort: Option<LocalReply>,
}

/// Applies `fault` to the request `view` describes: sleeps for a delay, says whether to abort.
pub async fn inject(fault: &Fault, view: &RequestView<'_>) -> Injected {
    let mut out = Injected::default();
    if !fault.headers.iter().all(|h| h.matches(view)) {
        return out;
    }
    if let Some(d) = fault.delay.as_ref().filter(|d| roll(d.per_million)) {
        tokio::time::sleep(d.delay).await;
        out.delayed = true;
    }
    out.abort = fault
        .abort
        .as_ref()
        .filter(|a| roll(a.per_million))
        .map(|a| match a.kind {
            AbortKind::Http(status) => LocalReply::FaultAbort(status),
            AbortKind::Grpc(code) => LocalReply::GrpcFaultAbort(code),
        });
    out
}

impl Injected {
    pub fn flag(&self) -> Option<ResponseFlag> {
        self.delayed.then_some(ResponseFlag::DelayInjected)
    }
}

/// True with probability `per_million` / 1,000,000.
pub fn roll(per_million: u32) -> bool {
    per_million >= 1_000_000 || fastrand::u32(0..1_000_000) < per_million
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderMap;

    use super::*;
    use crate::route::{FaultAbort, FaultDelay};

    fn view(h: &HeaderMap) -> RequestView<'_> {
        RequestView {
            method: "GET",
            path: "/",
            authority: "a",
            scheme: "http",
            headers: h,
        }
    }

    #[tokio::test]
    async fn delay_and_abort_at_full_percentage() {
        let fault = Fault {
            delay: Some(FaultDelay {
                delay: Duration::from_millis(1),
                per_million: 1_000_000,
            }),
            abort: Some(FaultAbort {
                kind: AbortKind::Http(418),
                per_million: 1_000_000,
            }),
            headers: vec![],
        };
        let h = HeaderMap::new();
        let got = inject(&fault, &view(&h)).await;
        assert_eq!(
            got,
            Injected {
                delayed: true,
                abort: Some(LocalReply::FaultAbort(418))
            }
        );
        assert_eq!(got.flag(), Some(ResponseFlag::DelayInjected));
    }

    #[tokio::test]
    async fn zero_percentage_never_fires() {
        let fault = Fault {
            delay: None,
            abort: Some(FaultAbort {
                kind: AbortKind::Grpc(14),
                per_million: 0,
            }),
            headers: vec![],
        };
        let h = HeaderMap::new();
        assert_eq!(inject(&fault, &view(&h)).await, Injected::default());
        assert!(!roll(0));
        assert!(roll(1_000_000));
    }
}
