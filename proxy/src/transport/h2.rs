//! The HTTP/2 guards every HTTP/2 server of nodeway applies (HBONE, h2c L7 listeners, inbound
//! h2c): bounds on what a peer can make the server hold or do for frames that never become a
//! request.

/// Limits against HTTP/2 abuse, the same on every HTTP/2 server (set from
/// `Config::http2_guards`).
///
/// - A header block (HEADERS and its CONTINUATIONs, decoded) larger than `max_header_list_size`
///   is refused; a peer that keeps sending CONTINUATION frames past what that size allows
///   (CVE-2024-27316 style) gets GOAWAY `ENHANCE_YOUR_CALM`. Envoy's `max_request_headers_kb`
///   is 60 KiB; nodeway (and its HBONE before these guards) uses 16 KiB, h2's default.
/// - Streams a peer opened and reset before the server accepted them (rapid reset,
///   CVE-2023-44487) may pile up to `max_pending_accept_reset_streams`; past that the
///   connection gets GOAWAY `ENHANCE_YOUR_CALM`. 20, h2's default.
/// - Streams the server itself had to reset because of the peer's protocol errors, per
///   connection, at most `max_local_error_reset_streams`; past that GOAWAY `ENHANCE_YOUR_CALM`.
///   1024, hyper's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Http2Guards {
    pub max_header_list_size: u32,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
}

impl Default for Http2Guards {
    fn default() -> Self {
        Http2Guards {
            max_header_list_size: 16 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
        }
    }
}
