//! `nodeway inspect captured|connections|certs|policies|workloads|services|routes|clusters|endpoints|xds`: prints the admin API's view, like
//! `istioctl ztunnel-config`. A tiny blocking HTTP/1.1 client is enough for a node-local,
//! one-shot GET and keeps the CLI free of an HTTP client stack.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};

/// What to inspect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Captured pods, their netns, eBPF programs and kernel statistics.
    Captured,
    /// Live proxied connections with byte counts.
    Connections,
    /// Workload certificates held by the node (identity, serial, validity, issuer).
    Certs,
    /// Authorization policies in force.
    Policies,
    /// Workloads of the mesh (from the config file or xDS).
    Workloads,
    /// Services of the mesh (from xDS).
    Services,
    /// HTTP route tables (like `istioctl proxy-config routes`).
    Routes,
    /// Upstream clusters (like `istioctl proxy-config clusters`).
    Clusters,
    /// Every cluster's endpoints (like `istioctl proxy-config endpoints`).
    Endpoints,
    /// The control-plane connection: last ACK/NACK per type and its error.
    Xds,
}

impl Target {
    fn path(self) -> &'static str {
        match self {
            Target::Captured => "/captured",
            Target::Connections => "/connections",
            Target::Certs => "/certs",
            Target::Policies => "/policies",
            Target::Workloads => "/workloads",
            Target::Services => "/services",
            Target::Routes => "/routes",
            Target::Clusters => "/clusters",
            Target::Endpoints => "/endpoints",
            Target::Xds => "/xds",
        }
    }
}

/// How to print it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// What to show.
    #[arg(value_enum)]
    pub what: Target,
    /// Address of the agent's admin API.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds memory if something other than the admin API answers.
const MAX_RESPONSE: u64 = 64 << 20;

/// Fetches and prints the requested view.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let target = match args.output {
        Output::Table => format!("{}?format=table", args.what.path()),
        Output::Json => args.what.path().to_string(),
    };
    // The API already pretty-prints JSON in its documented field order; print it untouched.
    let out = fetch(&args.admin, &target)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    if !out.ends_with('\n') {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    Ok(())
}

/// GETs `target` (path and query) from `admin` and returns the body of a 2xx answer.
pub fn fetch(admin: &str, target: &str) -> anyhow::Result<String> {
    let unreachable = || format!("cannot reach the nodeway admin API at {admin} (is the agent running? see --admin)");
    let addrs: Vec<SocketAddr> = admin
        .to_socket_addrs()
        .with_context(|| format!("invalid admin address {admin:?} (want HOST:PORT)"))?
        .collect();
    let mut stream = connect_any(&addrs).with_context(unreachable)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {admin}\r\nUser-Agent: nodeway-inspect\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).with_context(unreachable)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer of the admin API at {admin}"))?;
    let (status, body) = parse_response(&raw).with_context(|| format!("bad answer from the admin API at {admin}"))?;
    if !(200..300).contains(&status) {
        bail!("admin API at {admin} answered {status} for {target}: {}", body.trim());
    }
    Ok(body)
}

fn connect_any(addrs: &[SocketAddr]) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "address resolved to nothing");
    for addr in addrs {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Splits a complete HTTP/1.1 response into status and body, undoing chunked encoding.
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).context("headers are not UTF-8")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 response: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_line = std::str::from_utf8(&data[..eol]).context("bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).with_context(|| format!("bad chunk size {size_hex:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).context("truncated chunk")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).context("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::net::TcpListener;
    use std::thread;

    /// Serves one canned response and returns the request it saw.
    fn one_shot(response: &'static str) -> (String, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let handle = thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(response.as_bytes()).expect("write");
            String::from_utf8_lossy(&req).into_owned()
        });
        (addr, handle)
    }

    #[test]
    fn fetches_table_with_content_length() {
        let (addr, h) = one_shot("HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nA  B\n\n");
        let body = fetch(&addr, "/captured?format=table").expect("fetch");
        assert_eq!(body, "A  B\n\n");
        let req = h.join().expect("server");
        assert!(req.starts_with("GET /captured?format=table HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Connection: close\r\n"));
        assert!(req.contains(&format!("Host: {addr}\r\n")));
    }

    #[test]
    fn fetches_chunked() {
        let (addr, h) = one_shot(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n",
        );
        assert_eq!(fetch(&addr, "/connections").expect("fetch"), "hello, world");
        h.join().expect("server");
    }

    #[test]
    fn non_2xx_is_an_error_with_the_body() {
        let (addr, h) = one_shot("HTTP/1.1 404 Not Found\r\n\r\nno such endpoint: /x\n");
        let err = fetch(&addr, "/x").expect_err("404");
        let msg = format!("{err:#}");
        assert!(msg.contains("404") && msg.contains("no such endpoint"), "{msg}");
        h.join().expect("server");
    }

    #[test]
    fn unreachable_names_the_address() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let err = fetch(&addr, "/captured").expect_err("refused");
        let msg = format!("{err:#}");
        assert!(msg.contains(&addr) && msg.contains("is the agent running"), "{msg}");
        let err = fetch("not an address", "/captured").expect_err("invalid");
        assert!(format!("{err:#}").contains("not an address"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_response(b"hello").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nab").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        inspect: InspectArgs,
    }

    #[test]
    fn parses_arguments() {
        let cli = Cli::try_parse_from(["nodeway", "captured"]).expect("parse");
        assert_eq!(cli.inspect.what, Target::Captured);
        assert_eq!(cli.inspect.admin, "127.0.0.1:15000");
        assert_eq!(cli.inspect.output, Output::Table);
        let cli =
            Cli::try_parse_from(["nodeway", "connections", "--admin", "127.0.0.1:9", "-o", "json"]).expect("parse");
        assert_eq!(cli.inspect.what, Target::Connections);
        assert_eq!(cli.inspect.admin, "127.0.0.1:9");
        assert_eq!(cli.inspect.output, Output::Json);
        assert!(Cli::try_parse_from(["nodeway", "pods"]).is_err());
    }
}
