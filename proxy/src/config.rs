//! The data plane's tunables, in one place, built once from the command line.
use std::time::Duration;

use crate::hbone::HboneConfig;

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
    /// Largest request body buffered so that it can be retried or mirrored; a bigger one is
    /// sent once, without retries or mirrors (Envoy does the same past its buffer limit).
    pub retry_buffer_limit: usize,
    /// How long a request body may take to arrive whole to be buffered for retries and mirrors;
    /// a stream (gRPC streaming, a slow upload) is sent as it comes, without retries.
    pub retry_buffer_wait: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            connect_timeout: Duration::from_secs(10),
            hbone: HboneConfig::default(),
            access_log: true,
            retry_buffer_limit: 1 << 20,
            retry_buffer_wait: Duration::from_millis(100),
        }
    }
}
