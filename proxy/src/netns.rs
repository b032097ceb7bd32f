//! Network namespaces of captured pods: the proxy opens its sockets inside them.
//!
//! A socket belongs to the namespace it was created in, whichever thread uses it later. So
//! [`Netns::run`] switches the calling thread into the pod's namespace just long enough to create
//! sockets, then switches back (the way ztunnel's in-pod mode does).
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("reading the cookie of network namespace {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
}

/// An open handle on a network namespace, with its kernel cookie (what the eBPF maps key on).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    cookie: u64,
}

impl Netns {
    /// Opens a namespace by `ip netns` name (`/run/netns/NAME`) or by path.
    pub fn open(spec: &str) -> Result<Self, NetnsError> {
        let path = if spec.contains('/') {
            PathBuf::from(spec)
        } else {
            Path::new("/run/netns").join(spec)
        };
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        let mut ns = Netns { file, path, cookie: 0 };
        ns.cookie = ns
            .run(|| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
                netns_cookie_of(&s)
            })
            .and_then(|r| {
                r.map_err(|source| NetnsError::Cookie {
                    path: ns.path.clone(),
                    source,
                })
            })?;
        Ok(ns)
    }

    /// The namespace the calling process runs in.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kernel cookie of the namespace (`SO_NETNS_COOKIE`, stable for its lifetime).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` with the calling thread inside this namespace, then moves the thread back.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> Result<R, NetnsError> {
        // The thread's own namespace, opened once per thread: this runs for every proxied
        // connection, and opening it each time was a visible share of the connection setup cost.
        thread_local! {
            static HOME: std::cell::OnceCell<File> = const { std::cell::OnceCell::new() };
        }
        HOME.with(|cell| {
            let home = match cell.get() {
                Some(home) => home,
                None => {
                    let path = Path::new("/proc/thread-self/ns/net");
                    let home = File::open(path).map_err(|source| NetnsError::Open {
                        path: path.into(),
                        source,
                    })?;
                    cell.get_or_init(|| home)
                }
            };
            setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                path: self.path.clone(),
                source,
            })?;
            let r = f();
            if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
                // A worker thread left in a pod's namespace would open later sockets in the wrong
                // place; there is no safe way to continue.
                eprintln!("nodeway: cannot return to the node network namespace: {e}");
                std::process::abort();
            }
            Ok(r)
        })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `SO_NETNS_COOKIE` of a socket (Linux 5.14+).
// The crate's only unsafe code: neither std, nix nor socket2 wraps this socket option.
#[allow(unsafe_code)]
pub fn netns_cookie_of(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `sock` is borrowed for the call, so its fd stays open; `cookie` and `len` are live
    // locals and `len` is `cookie`'s size, so the kernel writes at most those 8 bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
