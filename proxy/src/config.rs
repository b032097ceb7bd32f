//! The data plane's tunables, in one place, built once from the command line.
use std::time::Duration;

use crate::hbone::HboneConfig;
pub use crate::transport::h2::Http2Guards;

/// What `nodeway run` sets for the data path. `Default` is what the flags default to.
#[derive(Clone, Debug)]
pub struct Config {
    /// TCP connect timeout for every connection the proxy opens from a pod (to apps, peers'
    /// HBONE ports, upstream endpoints without a cluster `connectTimeout`).
    pub connect_timeout: Duration,
    /// HTTP/2 windows, frame size, streams per connection and timeouts of HBONE.
    pub hbone: HboneConfig,
    /// One JSON line per HTTP request on stdout (Istio's `accessLogFile: /dev/stdout`).
    pub access_log: bool,
    /// Access log lines waiting for the writer thread at most; past that a line is dropped and
    /// counted (`nodeway_access_log_dropped_total`), so a blocked stdout never stalls requests.
    /// nodeway's (Envoy buffers its file access logs too, 64 KiB, flushed every second).
    pub access_log_queue: usize,
    /// Largest request body buffered so that it can be retried or mirrored; a bigger one is
    /// sent once, without retries or mirrors (Envoy does the same past its buffer limit).
    pub retry_buffer_limit: usize,
    /// Bytes of request bodies buffered for retries and mirrors on the whole node at once; a
    /// body that finds the budget spent is sent once, without retries or mirrors (as past
    /// `retry_buffer_limit`), counted in `nodeway_buffer_budget_exhausted_total`. 64 MiB,
    /// nodeway's (Envoy bounds buffers per connection, `per_connection_buffer_limit_bytes`
    /// 1 MiB, and leaves the total to the overload manager, off by default).
    pub buffer_budget: usize,
    /// How long a request body may take to arrive whole to be buffered for retries and mirrors;
    /// a stream (gRPC streaming, a slow upload) is sent as it comes, without retries.
    pub retry_buffer_wait: Duration,
    /// Every HTTP server connection (outbound L7 listeners, inbound HTTP, HBONE): a request's
    /// headers must arrive whole within this, and the first request within this of the
    /// connection's start (HBONE: of the TLS handshake's end), else the connection is closed.
    /// 30 s, hyper's default; Envoy's `request_headers_timeout` is off by default, which a
    /// proxy shared by every pod of a node cannot afford (slowloris). hyper runs this timer
    /// from the end of one HTTP/1.1 response to the next request's headers too, so a kept-alive
    /// HTTP/1.1 connection with nothing to send is closed after it as well.
    pub header_read_timeout: Duration,
    /// An HTTP connection (outbound L7, inbound HTTP) with no request in flight for this long is
    /// closed (gracefully: HTTP/2 GOAWAY). 1 h, Envoy's
    /// `common_http_protocol_options.idle_timeout` default.
    pub http_idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per downstream HTTP connection (h2c, gRPC); more are refused
    /// with `REFUSED_STREAM`. Envoy's default is 2^31-1; nodeway bounds it.
    pub http_max_concurrent_streams: u32,
    /// Connections one pod may have open at once, per direction (outbound; inbound plaintext
    /// and HBONE tunnels together); more are refused (outbound: reset; HBONE: 503), counted
    /// with reason `connection_limit`. nodeway's bound (neither Envoy nor ztunnel sets one by
    /// default): one pod cannot take every socket of the node.
    pub max_connections_per_pod: usize,
    /// Header-list size and reset-stream bounds of every HTTP/2 server (HBONE, h2c L7
    /// listeners, inbound h2c): see [`Http2Guards`].
    pub http2_guards: Http2Guards,
    /// An upstream HTTP connection (pooled HTTP/1.1 or HTTP/2 to a cluster's endpoint; on the
    /// inbound side, to the app) unused for this long is closed. 60 s, nodeway's (Envoy's cluster
    /// `common_http_protocol_options.idle_timeout` defaults to 1 h; a node proxy pools for
    /// every pod, so it keeps fewer idle sockets).
    pub upstream_idle_timeout: Duration,
    /// How HBONE to a pod of this node travels.
    pub same_node: SameNodePath,
}

/// How a connection between two captured pods of one node travels when the plan says HBONE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SameNodePath {
    /// Handed to the destination's inbound pipeline inside the process: authorized once, with
    /// the source pod's identity, recorded as mutual TLS; no encryption of bytes that never
    /// leave the node ([`crate::transport::local`]).
    #[default]
    InProcess,
    /// Through the TCP stack to the destination's HBONE socket, with TLS, as between nodes.
    Hbone,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            connect_timeout: Duration::from_secs(10),
            hbone: HboneConfig::default(),
            access_log: true,
            access_log_queue: 8192,
            retry_buffer_limit: 1 << 20,
            buffer_budget: 64 << 20,
            retry_buffer_wait: Duration::from_millis(100),
            header_read_timeout: Duration::from_secs(30),
            http_idle_timeout: Duration::from_secs(3600),
            http_max_concurrent_streams: 1024,
            max_connections_per_pod: 16384,
            http2_guards: Http2Guards::default(),
            upstream_idle_timeout: Duration::from_secs(60),
            same_node: SameNodePath::InProcess,
        }
    }
}
