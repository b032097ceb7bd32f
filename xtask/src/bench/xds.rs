//! `bench xds`: the xDS state's apply time, update time and memory, and the authorization check
//! cost. The measuring program is `nodeway-tests`' `xds-bench` binary, built in release mode (the
//! figures of a debug build say nothing); it writes xds.md and xds.json. No root, no network.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use crate::workspace::Workspace;

#[derive(Args, Clone, Debug)]
pub struct Options {
    /// Services in the snapshot
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub services: u32,
    /// Workloads in the snapshot
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub workloads: u32,
    /// Authorization policies for the check-cost figure
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub policies: u32,
    /// Full-snapshot runs (the report shows medians)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: u32,
    /// Single-workload updates measured
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub updates: u32,
    /// Where xds.md and xds.json go (default: target/bench)
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

pub fn run(ws: &Workspace, opts: &Options, out: &Path) -> Result<()> {
    let out = out.display().to_string();
    let (s, w, p, r, u) = (
        opts.services.to_string(),
        opts.workloads.to_string(),
        opts.policies.to_string(),
        opts.runs.to_string(),
        opts.updates.to_string(),
    );
    ws.run_cargo([
        "run",
        "--quiet",
        "--release",
        "--package",
        "nodeway-tests",
        "--bin",
        "xds-bench",
        "--",
        "--services",
        &s,
        "--workloads",
        &w,
        "--policies",
        &p,
        "--runs",
        &r,
        "--updates",
        &u,
        "--out",
        &out,
    ])
}
