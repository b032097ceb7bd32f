//! HTTP sniffing and put-back (`http::sniff`): the stream handed on after sniffing yields exactly
//! the bytes the client sent, however they were split into reads and however small the reads
//! of the consumer; the verdict is what the first bytes say, and `classify` never changes its
//! mind once it decided.
use std::{
    io,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
};

use arbitrary::{Arbitrary, Unstructured};
use nodeway_proxy::fuzzing::{classify, sniff_stream, Sniffed};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::Target;

pub const TARGET: Target = Target {
    name: "sniff",
    about: "HTTP sniffing: the put-back stream yields exactly the bytes read, verdict as a reference",
    run,
    dict: &[
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"TRACE ",
        b"CONNECT ",
        b"PRI * HTTP/2.0\r\n",
        b"\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01",
        b"GE",
        b"PRI",
    ],
    max_len: 8192,
};

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
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

#[derive(Debug, Arbitrary)]
struct Input {
    /// Sizes of the client's writes (the reads the sniffer sees), cycled.
    chunks: Vec<u8>,
    /// Sizes of the consumer's reads after sniffing, cycled.
    reads: Vec<u8>,
    data: Vec<u8>,
}

fn run(bytes: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(bytes)) else {
        return;
    };
    check_classify(&input.data);
    let rt = runtime();
    let (verdict, got) = rt.block_on(async {
        let client = Chunked {
            data: &input.data,
            at: 0,
            sizes: &input.chunks,
            n: 0,
        };
        let (verdict, mut stream) = sniff_stream(client).await;
        let mut got = Vec::with_capacity(input.data.len());
        let mut n = 0usize;
        loop {
            let size = input.reads.get(n % input.reads.len().max(1)).copied().unwrap_or(0);
            let mut buf = vec![0u8; usize::from(size).max(1)];
            n += 1;
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) => panic!("reading the put-back stream failed: {e}"),
            }
        }
        (verdict, got)
    });
    assert!(
        got == input.data,
        "the stream after sniffing does not yield the bytes the client sent"
    );
    let want = reference(&input.data);
    assert_eq!(verdict, want, "sniffing {:?}", crate::engine::escape(&input.data));
}

/// The verdict on a client that sends `data` and closes: HTTP if it starts with a method or the
/// preface, nothing if it sent only a prefix of one (or nothing), else another protocol.
fn reference(data: &[u8]) -> Sniffed {
    let starts = |p: &[u8]| data.len() >= p.len() && &data[..p.len()] == p;
    let prefix_of = |p: &[u8]| data.len() < p.len() && &p[..data.len()] == data;
    if METHODS.iter().any(|m| starts(m)) || starts(PREFACE) {
        Sniffed::Http
    } else if data.is_empty() || METHODS.iter().any(|m| prefix_of(m)) || prefix_of(PREFACE) {
        Sniffed::Nothing
    } else {
        Sniffed::Other
    }
}

/// Once `classify` decided on a prefix, every longer prefix gets the same answer.
fn check_classify(data: &[u8]) {
    let mut decided = None;
    for n in 0..=data.len().min(32) {
        let c = classify(&data[..n]);
        if let Some(d) = decided {
            assert_eq!(c, Some(d), "classify changed its mind at byte {n}");
        }
        decided = decided.or(c);
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

/// A client that sends `data` in writes of the given sizes, then closes.
struct Chunked<'a> {
    data: &'a [u8],
    at: usize,
    sizes: &'a [u8],
    n: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let size = this.sizes.get(this.n % this.sizes.len().max(1)).copied().unwrap_or(255);
        this.n += 1;
        let n = usize::from(size)
            .max(1)
            .min(this.data.len() - this.at)
            .min(buf.remaining());
        buf.put_slice(&this.data[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}
