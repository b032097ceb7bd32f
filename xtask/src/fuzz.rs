//! `cargo xtask fuzz`: runs the fuzz targets of `fuzz/` (the `nodeway-fuzz` engine, stable
//! toolchain), each in its own process for a set time; and the short smoke `cargo xtask test`
//! runs. A crash fails with the target's name and the input (saved under
//! `target/fuzz/<target>/`); a process killed by a signal (stack overflow, out of memory) is
//! reported with the input it was running, which the engine keeps in `target/fuzz/<target>/current`.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{command, workspace::Workspace};

/// Seconds per target in the CI smoke (`cargo xtask test`).
pub const SMOKE_SECS: u64 = 15;
/// The smoke's mutator seed: fixed, so that CI runs the same inputs each time.
pub const SMOKE_SEED: u64 = 15;

#[derive(clap::Args)]
pub struct Options {
    /// Seconds of mutation per target
    #[arg(long, default_value_t = 60)]
    pub time: u64,
    /// Mutator seed (default: from the clock; printed by each run)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Build the targets optimized (more inputs per second; compiles the dependencies once more)
    #[arg(long)]
    pub release: bool,
    /// Run the files given after TARGET through it instead of fuzzing (`--replay route crash-1`)
    #[arg(long)]
    pub replay: bool,
    /// Targets to run (default: every one); with --replay: TARGET FILE...
    pub targets: Vec<String>,
}

/// Builds `nodeway-fuzz` and returns its path. With the workspace's features (`--workspace`),
/// so the dependencies `cargo build --workspace` built are reused as they are: after it (as in
/// `cargo xtask test`) nothing is compiled again.
fn build(ws: &Workspace, release: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "--workspace", "--bin", "nodeway-fuzz"];
    if release {
        args.push("--release");
    }
    ws.run_cargo(args)?;
    let bin = ws
        .target_dir()
        .join(if release { "release" } else { "debug" })
        .join("nodeway-fuzz");
    if !bin.is_file() {
        bail!("cargo build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Every target's name, as `nodeway-fuzz list` prints them.
fn all_targets(bin: &Path) -> Result<Vec<String>> {
    let out = command::output_if_ok(Command::new(bin).arg("list"))
        .with_context(|| format!("`{} list` failed", bin.display()))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

pub fn run(ws: &Workspace, opts: &Options) -> Result<()> {
    let bin = build(ws, opts.release)?;
    if opts.replay {
        let Some((target, files)) = opts.targets.split_first() else {
            bail!("--replay needs TARGET FILE...");
        };
        return command::run(Command::new(&bin).arg("replay").arg(target).args(files));
    }
    let targets = if opts.targets.is_empty() {
        all_targets(&bin)?
    } else {
        opts.targets.clone()
    };
    let seed = opts.seed.unwrap_or_else(clock_seed);
    fuzz_each(ws, &bin, &targets, opts.time, seed)
}

/// The CI smoke: every target for [`SMOKE_SECS`], with the binary `cargo build --workspace
/// --all-targets` (the suite's first step) made: built again with other targets selected, some
/// dependencies would get other features and compile once more.
pub fn smoke(ws: &Workspace) -> Result<()> {
    let bin = ws.target_dir().join("debug").join("nodeway-fuzz");
    if !bin.is_file() {
        bail!(
            "{} is missing: `cargo build --workspace --all-targets` builds it",
            bin.display()
        );
    }
    let targets = all_targets(&bin)?;
    let started = std::time::Instant::now();
    fuzz_each(ws, &bin, &targets, SMOKE_SECS, SMOKE_SEED)?;
    println!(
        "fuzz smoke: {} targets, {SMOKE_SECS} s each, none crashed ({:.0?})",
        targets.len(),
        started.elapsed()
    );
    Ok(())
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// One process per target, so that an abort is the target's alone; every target runs even
/// when one crashes.
fn fuzz_each(ws: &Workspace, bin: &Path, targets: &[String], secs: u64, seed: u64) -> Result<()> {
    let artifacts = ws.target_dir().join("fuzz");
    let mut crashed = Vec::new();
    for t in targets {
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--time")
            .arg(secs.to_string())
            .arg("--seed")
            .arg(seed.to_string())
            .arg("--artifacts")
            .arg(&artifacts)
            .arg(t);
        println!("==> {}", command::display(&cmd));
        let status = cmd
            .status()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        if status.success() {
            continue;
        }
        if status.code().is_none() {
            // Killed by a signal: the engine could not report; the input is in `current`.
            let current = artifacts.join(t).join("current");
            let input = read_current(&current).unwrap_or_default();
            println!(
                "fuzz target `{t}` died ({status}) on an input of {} bytes: {}\nkept in {} (8-byte length, then the input)",
                input.len(),
                escape(&input),
                current.display()
            );
        }
        crashed.push(t.clone());
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz: {} of {} targets crashed: {} (inputs above, and under {})",
            crashed.len(),
            targets.len(),
            crashed.join(", "),
            artifacts.display()
        );
    }
    Ok(())
}

/// The input a dead engine was running: an 8-byte little-endian length, then the bytes.
fn read_current(path: &Path) -> Option<Vec<u8>> {
    let data = std::fs::read(path).ok()?;
    let len = usize::try_from(u64::from_le_bytes(data.get(..8)?.try_into().ok()?)).ok()?;
    data.get(8..8 + len).map(<[u8]>::to_vec)
}

/// Printable ASCII as is, the rest `\xHH`, in a Rust byte string.
fn escape(input: &[u8]) -> String {
    let body: String = input
        .iter()
        .map(|&b| match b {
            b'"' | b'\\' => format!("\\{}", char::from(b)),
            0x20..=0x7e => char::from(b).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect();
    format!("b\"{body}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_input_is_read_back() {
        let dir = std::env::temp_dir().join(format!("xtask-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("current");
        let mut data = 3u64.to_le_bytes().to_vec();
        data.extend_from_slice(b"abcSTALE");
        std::fs::write(&f, data).unwrap();
        assert_eq!(read_current(&f).as_deref(), Some(&b"abc"[..]));
        std::fs::write(&f, b"short").unwrap();
        assert_eq!(read_current(&f), None);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(escape(b"a\"\x00"), "b\"a\\\"\\x00\"");
    }
}
