//! Running code inside a pod's network namespace: a thread that joins it with setns(2).
//! Sockets created there stay in that namespace whichever thread uses them later.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Runs `f` on a new thread that has joined the network namespace at `netns`
/// (`/run/netns/NAME` or `/proc/PID/ns/net`) and returns its result.
pub fn run_in<T, F>(netns: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns = File::open(netns).with_context(|| format!("cannot open network namespace {}", netns.display()))?;
    let name = netns.display().to_string();
    let handle = std::thread::Builder::new()
        .name(format!("netns {name}"))
        .spawn(move || -> Result<T> {
            setns(&ns, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {name} (needs CAP_SYS_ADMIN)"))?;
            drop(ns);
            f()
        })
        .context("cannot spawn a thread")?;
    handle
        .join()
        .map_err(|_| anyhow!("thread in {} panicked", netns.display()))?
}
