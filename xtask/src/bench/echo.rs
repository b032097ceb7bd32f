//! A small TCP echo server and the two client loads of `bench redirect`:
//! connection setups (connect, one small echo, close) and paced round-trips on one connection.
//! Every loop is bounded in count and in time, and stops early on Ctrl-C.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{interrupt, netns};

/// `" (N late sends)"` when the paced sender fell behind its schedule, else nothing.
pub fn late_note(late: u64) -> String {
    if late > 0 {
        format!(" ({late} late sends)")
    } else {
        String::new()
    }
}

/// A socket operation that takes longer than this is an error, never a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many connections are served at once; more are closed at once.
const MAX_LIVE_CONNECTIONS: usize = 256;

pub struct EchoServer {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `addr` inside the network namespace `netns` and echoes every byte back.
    pub fn start(netns: &Path, addr: SocketAddr) -> Result<Self> {
        let listener = netns::run_in(netns, move || {
            TcpListener::bind(addr).with_context(|| format!("echo server: bind {addr}"))
        })?;
        let addr = listener.local_addr().context("echo server: local address")?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let accept_thread = {
            let listener = Arc::clone(&listener);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("echo-accept".into())
                .spawn(move || accept_loop(&listener, &stop))
                .context("cannot spawn the echo server thread")?
        };
        Ok(Self {
            addr,
            listener,
            stop,
            accept_thread: Some(accept_thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept(2) (Linux).
        // SAFETY: the fd belongs to `self.listener`, alive for this call.
        unsafe { nix::libc::shutdown(self.listener.as_raw_fd(), nix::libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool) {
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((stream, _)) = accepted else {
            // Transient (e.g. ECONNABORTED): go on, but do not spin.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        if live.load(Ordering::SeqCst) >= MAX_LIVE_CONNECTIONS {
            continue; // dropped: closed
        }
        live.fetch_add(1, Ordering::SeqCst);
        let live = Arc::clone(&live);
        let spawned = std::thread::Builder::new().name("echo-conn".into()).spawn(move || {
            let _ = echo(stream);
            live.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            // The closure (and its `live` decrement) never ran.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // An idle connection is dropped after this; the latency load never idles that long.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn round_trip(stream: &mut TcpStream, msg: &[u8], reply: &mut [u8]) -> Result<()> {
    stream.write_all(msg).context("write")?;
    stream.read_exact(reply).context("read the echo")?;
    if reply != msg {
        bail!("the echo differs from what was sent");
    }
    Ok(())
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn message(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

#[derive(Debug, Clone, Copy)]
pub struct ConnectResult {
    pub completed: u64,
    pub elapsed: Duration,
}

impl ConnectResult {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// From inside `netns`: up to `count` times (and for at most `max_time`), connect to `addr`,
/// send `size` bytes, read the echo, close. Any failure ends the run with an error.
pub fn connect_rate(
    netns: &Path,
    addr: SocketAddr,
    count: u64,
    max_time: Duration,
    size: usize,
) -> Result<ConnectResult> {
    netns::run_in(netns, move || {
        let msg = message(size);
        let mut reply = vec![0u8; size];
        let start = Instant::now();
        let mut completed = 0;
        while completed < count && start.elapsed() < max_time {
            interrupt::check()?;
            let mut s = connect(addr)?;
            round_trip(&mut s, &msg, &mut reply).with_context(|| format!("connection {} to {addr}", completed + 1))?;
            let _ = s.shutdown(Shutdown::Both);
            completed += 1;
        }
        Ok(ConnectResult {
            completed,
            elapsed: start.elapsed(),
        })
    })
}

#[derive(Debug, Clone)]
pub struct LatencyResult {
    /// One per completed round-trip, send to full echo, sorted.
    pub samples: Vec<Duration>,
    /// Sends that left more than one interval after their slot (the load fell behind its rate).
    pub late: u64,
}

/// From inside `netns`: one connection to `addr`, then up to `count` round-trips of `size` bytes
/// paced at `rate` per second (for at most `max_time`). A few unpaced warm-up round-trips first.
pub fn latency(
    netns: &Path,
    addr: SocketAddr,
    count: u64,
    rate: u64,
    max_time: Duration,
    size: usize,
) -> Result<LatencyResult> {
    netns::run_in(netns, move || {
        let msg = message(size);
        let mut reply = vec![0u8; size];
        let mut s = connect(addr)?;
        for _ in 0..20 {
            round_trip(&mut s, &msg, &mut reply).context("warm-up")?;
        }
        let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
        let start = Instant::now();
        let mut samples = Vec::with_capacity(count.min(1_000_000) as usize);
        let mut late = 0;
        for i in 0..count {
            interrupt::check()?;
            let slot = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if now < slot {
                std::thread::sleep(slot - now);
            } else if now - slot > interval {
                late += 1;
            }
            if start.elapsed() >= max_time {
                break;
            }
            let sent = Instant::now();
            round_trip(&mut s, &msg, &mut reply).with_context(|| format!("round-trip {} to {addr}", i + 1))?;
            samples.push(sent.elapsed());
        }
        let _ = s.shutdown(Shutdown::Both);
        samples.sort_unstable();
        Ok(LatencyResult { samples, late })
    })
}

/// Nearest-rank percentile of sorted samples (`p` in 0..=100).
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&v, 50.0), Some(Duration::from_micros(50)));
        assert_eq!(percentile(&v, 99.0), Some(Duration::from_micros(99)));
        assert_eq!(percentile(&v, 100.0), Some(Duration::from_micros(100)));
        assert_eq!(percentile(&v, 0.0), Some(Duration::from_micros(1)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn echo_loads_on_loopback() -> Result<()> {
        // The test's own network namespace: loopback only, no privileges needed.
        let ns = Path::new("/proc/thread-self/ns/net");
        let server = EchoServer::start(ns, "127.0.0.1:0".parse()?);
        let server = match server {
            Ok(s) => s,
            // setns into our own namespace needs CAP_SYS_ADMIN; nothing else to check then.
            Err(e) if !nix::unistd::geteuid().is_root() => {
                eprintln!("skipped: {e:#}");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let conns = connect_rate(ns, server.addr(), 20, Duration::from_secs(5), 64)?;
        assert_eq!(conns.completed, 20);
        let lat = latency(ns, server.addr(), 50, 1000, Duration::from_secs(5), 64)?;
        assert_eq!(lat.samples.len(), 50);
        assert!(lat.samples.windows(2).all(|w| w[0] <= w[1]));
        drop(server);
        Ok(())
    }
}
