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
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use serde::Serialize;

use super::{
    access_log::AccessLogSink,
    flags::{ResponseFlag, ResponseFlags},
    headers::header_str,
    local_reply::LocalReply,
};
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
    pub response_flags: ResponseFlags,
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
    /// What the request itself says; the rest is filled in as it is served. Without an access
    /// log (`full` false) only what the metrics read is kept: the strings of a line nobody
    /// writes are a tenth of a routed request's CPU.
    pub fn for_request<B: Body>(
        req: &http::Request<B>,
        authority: &str,
        downstream_remote: std::net::SocketAddr,
        downstream_local: std::net::SocketAddr,
        full: bool,
    ) -> Self {
        let bytes_received = req.body().size_hint().exact().unwrap_or(0);
        if !full {
            return AccessLog::metrics_only(bytes_received);
        }
        let h = req.headers();
        AccessLog {
            start_time: start_time(SystemTime::now()),
            method: req.method().to_string(),
            path: req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string(),
            protocol: super::version_name(req.version()).to_string(),
            response_code: 0,
            response_flags: ResponseFlags::default(),
            bytes_received,
            bytes_sent: 0,
            duration: 0,
            upstream_service_time: None,
            x_forwarded_for: header_str(h, "x-forwarded-for"),
            user_agent: header_str(h, "user-agent"),
            request_id: header_str(h, "x-request-id").unwrap_or_default(),
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

impl AccessLog {
    fn metrics_only(bytes_received: u64) -> Self {
        AccessLog {
            start_time: String::new(),
            method: String::new(),
            path: String::new(),
            protocol: String::new(),
            response_code: 0,
            response_flags: ResponseFlags::default(),
            bytes_received,
            bytes_sent: 0,
            duration: 0,
            upstream_service_time: None,
            x_forwarded_for: None,
            user_agent: None,
            request_id: String::new(),
            authority: String::new(),
            upstream_host: None,
            upstream_cluster: None,
            route_name: None,
            downstream_remote_address: String::new(),
            downstream_local_address: String::new(),
            upstream_transport_failure_reason: None,
            grpc_status: None,
        }
    }
}

/// Where finished requests are reported: the proxy's metrics, and the access log if on.
#[derive(Clone)]
pub struct Reporter {
    pub metrics: Arc<Metrics>,
    /// One JSON line per request on stdout (Istio's `accessLogFile: /dev/stdout`).
    pub access_log: Option<AccessLogSink>,
}

/// One request as it is served: what ends up in its metrics and its access log line.
pub struct Exchange {
    pub log: AccessLog,
    pub labels: TcpLabels,
    pub grpc: bool,
    started: Instant,
    reporter: Reporter,
}

impl Exchange {
    pub fn new(log: AccessLog, labels: TcpLabels, grpc: bool, reporter: Reporter) -> Self {
        Exchange {
            log,
            labels,
            grpc,
            started: Instant::now(),
            reporter,
        }
    }

    /// Whether an access log line is written (else the log's strings are not worth filling).
    pub fn logging(&self) -> bool {
        self.reporter.access_log.is_some()
    }

    pub fn flag(&mut self, flag: ResponseFlag) {
        self.log.response_flags.insert(flag);
    }

    /// Answers with a reply of nodeway's own (see [`LocalReply`]).
    pub fn reply(mut self, reply: LocalReply) -> Response<BoxBody> {
        if let Some(f) = reply.flag() {
            self.flag(f);
        }
        let (resp, grpc_status) = reply.render(self.grpc);
        if let Some(code) = grpc_status {
            self.log.grpc_status = Some(code.to_string());
        }
        self.finish(resp)
    }

    /// Wraps the response body so the request is reported when it ends (or is dropped).
    pub fn finish(mut self, resp: Response<BoxBody>) -> Response<BoxBody> {
        self.log.response_code = resp.status().as_u16();
        if let Some(s) = header_str(resp.headers(), "grpc-status") {
            self.log.grpc_status = Some(s);
        }
        let report = Report {
            metrics: self.reporter.metrics,
            labels: self.labels,
            request_protocol: if self.grpc { "grpc" } else { "http" },
            log: self.log,
            started: self.started,
            access_log: self.reporter.access_log,
        };
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, Observed::new(body, report).boxed())
    }
}

/// A request being reported.
struct Report {
    metrics: Arc<Metrics>,
    labels: TcpLabels,
    request_protocol: &'static str,
    log: AccessLog,
    started: Instant,
    access_log: Option<AccessLogSink>,
}

impl Report {
    fn finish(mut self, response_bytes: u64, complete: bool) {
        if !complete && self.log.response_flags.is_empty() {
            // The client went away before the response ended: Envoy's DC.
            self.log
                .response_flags
                .insert(ResponseFlag::DownstreamConnectionTermination);
        }
        self.log.duration = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.log.bytes_sent = response_bytes;
        let labels = RequestLabels::from_tcp(
            &self.labels,
            self.request_protocol,
            self.log.response_code,
            self.log.grpc_status.as_deref(),
            &self.log.response_flags.to_string(),
        );
        self.metrics.record_request(
            &labels,
            self.started.elapsed().as_secs_f64() * 1000.0,
            self.log.bytes_received,
            response_bytes,
        );
        if let Some(sink) = &self.access_log {
            write_access_log(sink, &self.log);
        }
    }
}

/// One JSON line, as Istio's `accessLogEncoding: JSON` gives, queued for the writer thread.
fn write_access_log(sink: &AccessLogSink, log: &AccessLog) {
    if let Ok(mut line) = serde_json::to_vec(log) {
        line.push(b'\n');
        sink.send(line);
    }
}

/// RFC 3339, as Envoy's `%START_TIME%`.
pub fn start_time(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The response body on its way to the client: counts bytes, reports once at the end.
struct Observed {
    inner: BoxBody,
    bytes: u64,
    report: Option<Report>,
}

impl Observed {
    fn new(inner: BoxBody, report: Report) -> Self {
        Observed {
            inner,
            bytes: 0,
            report: Some(report),
        }
    }

    fn boxed(self) -> BoxBody {
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
                    if r.log.response_flags.is_empty() {
                        // The route timeout ran out mid-body (UT); else the upstream broke off.
                        let timeout = e.downcast_ref::<crate::upstream::RouteTimeout>().is_some();
                        r.log.response_flags.insert(if timeout {
                            ResponseFlag::UpstreamRequestTimeout
                        } else {
                            ResponseFlag::UpstreamProtocolError
                        });
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
