//! Is the client speaking HTTP? A port with a route table is expected to, but Istio users also
//! send other protocols to such ports by mistake; a short peek decides, as Envoy's
//! `http_inspector` does, and anything else stays L4.
use std::time::Duration;

use tokio::net::TcpStream;

/// How long to wait for the client's first bytes. Client-first protocols (HTTP) send at once; a
/// server-first protocol would otherwise wait for the proxy forever.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];
/// The HTTP/2 connection preface (h2c with prior knowledge, gRPC).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http,
    Other,
    /// Nothing arrived in time (or the client closed).
    Nothing,
}

pub async fn sniff(stream: &TcpStream) -> Sniffed {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Sniffed::Nothing,
            Ok(Ok(n)) => n,
        };
        match classify(&buf[..n]) {
            Some(s) => return s,
            // A prefix of a method or the preface: wait for more (peek returns what is queued).
            None if n < buf.len() => {
                if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(2)))
                    .await
                    .is_err()
                {
                    return Sniffed::Nothing;
                }
            }
            None => return Sniffed::Other,
        }
    }
}

/// `Some` once the bytes decide it; `None` while they could still become an HTTP request.
pub fn classify(b: &[u8]) -> Option<Sniffed> {
    let could_be = |pat: &[u8]| {
        let n = b.len().min(pat.len());
        b[..n] == pat[..n]
    };
    if METHODS.iter().any(|m| b.starts_with(m)) || b.starts_with(H2_PREFACE) {
        return Some(Sniffed::Http);
    }
    if METHODS.iter().any(|m| could_be(m)) || could_be(H2_PREFACE) {
        return None;
    }
    Some(Sniffed::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_preface_are_http() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Sniffed::Http));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Sniffed::Http));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Sniffed::Other), "TLS");
        assert_eq!(classify(b"hello world"), Some(Sniffed::Other));
        assert_eq!(classify(b"GETX"), Some(Sniffed::Other));
    }
}
