//! What every request leaves behind: Istio's request metrics and an access log line with Envoy's
//! field names, both written when the response body has ended (or the client went away), so that
//! durations and byte counts cover the whole exchange.
use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use serde::Serialize;

use crate::{
    metrics::{Metrics, RequestLabels, TcpLabels},
    upstream::Body as BoxBody,
};

/// Everything known about a request by the time its response starts.
#[derive(Debug, Clone, Serialize)]
pub struct AccessLog {
    pub start_time: String,
    pub method: String,
    pub path: String,
    pub protocol: String,
    pub response_code: u16,
    pub response_flags: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: u64,
    pub upstream_service_time: Option<u64>,
    pub x_forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: String,
    pub authority: String,
    pub upstream_host: Option<String>,
    pub upstream_cluster: Option<String>,
    pub route_name: Option<String>,
    pub downstream_remote_address: String,
    pub downstream_local_address: String,
    pub upstream_transport_failure_reason: Option<String>,
    #[serde(skip)]
    pub grpc_status: Option<String>,
}

impl AccessLog {
    /// What the request itself says; the rest is filled in as it is served.
    pub fn for_request<B: Body>(
        req: &http::Request<B>,
        authority: &str,
        downstream_remote: std::net::SocketAddr,
        downstream_local: std::net::SocketAddr,
    ) -> Self {
        let h = req.headers();
        AccessLog {
            start_time: start_time(SystemTime::now()),
            method: req.method().to_string(),
            path: req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string(),
            protocol: super::version_name(req.version()).to_string(),
            response_code: 0,
            response_flags: "-".to_string(),
            bytes_received: req.body().size_hint().exact().unwrap_or(0),
            bytes_sent: 0,
            duration: 0,
            upstream_service_time: None,
            x_forwarded_for: super::header_str(h, "x-forwarded-for"),
            user_agent: super::header_str(h, "user-agent"),
            request_id: super::header_str(h, "x-request-id").unwrap_or_default(),
            authority: authority.to_string(),
            upstream_host: None,
            upstream_cluster: None,
            route_name: None,
            downstream_remote_address: downstream_remote.to_string(),
            downstream_local_address: downstream_local.to_string(),
            upstream_transport_failure_reason: None,
            grpc_status: None,
        }
    }
}

/// Where a finished request is reported.
pub struct Report {
    pub metrics: Arc<Metrics>,
    pub labels: TcpLabels,
    pub request_protocol: &'static str,
    pub log: AccessLog,
    pub started: Instant,
    pub access_log: bool,
}

impl Report {
    fn finish(mut self, response_bytes: u64, complete: bool) {
        if !complete && self.log.response_flags == "-" {
            // The client went away before the response ended: Envoy's DC.
            self.log.response_flags = "DC".to_string();
        }
        self.log.duration = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.log.bytes_sent = response_bytes;
        let labels = RequestLabels::from_tcp(
            &self.labels,
            self.request_protocol,
            self.log.response_code,
            self.log.grpc_status.as_deref(),
            &self.log.response_flags,
        );
        self.metrics.record_request(
            &labels,
            self.started.elapsed().as_secs_f64() * 1000.0,
            self.log.bytes_received,
            response_bytes,
        );
        if self.access_log {
            write_access_log(&self.log);
        }
    }
}

/// One JSON line on stdout, as Istio's `accessLogEncoding: JSON` gives.
fn write_access_log(log: &AccessLog) {
    use std::io::Write;
    if let Ok(mut line) = serde_json::to_vec(log) {
        line.push(b'\n');
        let _ = std::io::stdout().lock().write_all(&line);
    }
}

/// RFC 3339, as Envoy's `%START_TIME%`.
pub fn start_time(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The response body on its way to the client: counts bytes, reports once at the end.
pub struct Observed {
    inner: BoxBody,
    bytes: u64,
    report: Option<Report>,
}

impl Observed {
    pub fn new(inner: BoxBody, report: Report) -> Self {
        Observed {
            inner,
            bytes: 0,
            report: Some(report),
        }
    }

    pub fn boxed(self) -> BoxBody {
        BodyExt::boxed(self)
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if let (Some(t), Some(r)) = (frame.trailers_ref(), this.report.as_mut()) {
                    if let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok()) {
                        r.log.grpc_status = Some(s.to_string());
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(r) = this.report.take() {
                    r.finish(this.bytes, true);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(mut r) = this.report.take() {
                    if r.log.response_flags == "-" {
                        // The route timeout ran out mid-body (UT); else the upstream broke off.
                        let timeout = e.downcast_ref::<crate::upstream::RouteTimeout>().is_some();
                        r.log.response_flags = if timeout { "UT" } else { "UPE" }.to_string();
                    }
                    r.finish(this.bytes, true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(r) = self.report.take() {
            let complete = self.inner.is_end_stream();
            r.finish(self.bytes, complete);
        }
    }
}
