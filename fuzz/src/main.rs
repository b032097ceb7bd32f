//! `nodeway-fuzz`: runs the fuzz targets (what `cargo xtask fuzz` calls).
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nodeway_fuzz::{
    engine::{self, Options, Outcome},
    TARGETS,
};

#[derive(Parser)]
#[command(name = "nodeway-fuzz", about = "Fuzz the proxy's parsers and matchers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The targets and what each checks
    List,
    /// Replay each target's corpus, then mutate it for --time seconds
    Run {
        /// Seconds of mutation per target
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Mutator seed (default: from the clock; printed, so a run can be repeated)
        #[arg(long)]
        seed: Option<u64>,
        /// Seeds: <corpus>/<target>/* (default: fuzz/corpus)
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Crashes: <artifacts>/<target>/crash-*
        #[arg(long)]
        artifacts: PathBuf,
        /// Seconds one input may run before it is reported as a hang
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Targets to run (default: all)
        targets: Vec<String>,
    },
    /// Run one target on the given files (a crash found earlier)
    Replay { target: String, files: Vec<PathBuf> },
}

fn default_corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("nodeway-fuzz: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn target(name: &str) -> Result<&'static nodeway_fuzz::Target> {
    match nodeway_fuzz::target(name) {
        Some(t) => Ok(t),
        None => bail!(
            "no fuzz target {name:?}; targets: {}",
            TARGETS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn run(cli: Cli) -> Result<bool> {
    match cli.cmd {
        Cmd::List => {
            for t in TARGETS {
                println!("{:<10} {}", t.name, t.about);
            }
            Ok(true)
        }
        Cmd::Replay { target: name, files } => {
            let t = target(&name)?;
            let mut ok = true;
            for f in files {
                let data = std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?;
                match engine::run_one(t, &data) {
                    Ok(()) => println!("{}: ok", f.display()),
                    Err(msg) => {
                        ok = false;
                        println!("{}: fuzz target `{name}` crashed: {msg}", f.display());
                    }
                }
            }
            Ok(ok)
        }
        Cmd::Run {
            time,
            seed,
            corpus,
            artifacts,
            timeout,
            targets,
        } => {
            let chosen: Vec<&'static nodeway_fuzz::Target> = if targets.is_empty() {
                TARGETS.iter().collect()
            } else {
                targets.iter().map(|n| target(n)).collect::<Result<_>>()?
            };
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
            let opts = Options {
                time: Duration::from_secs(time),
                seed,
                corpus: corpus.unwrap_or_else(default_corpus),
                artifacts,
                timeout: Duration::from_secs(timeout),
            };
            let mut ok = true;
            for t in chosen {
                let started = std::time::Instant::now();
                match engine::fuzz(t, &opts)? {
                    Outcome::Clean { execs, seeds } => println!(
                        "fuzz {}: ok, {execs} inputs ({seeds} corpus files) in {:.1?}, seed {seed}",
                        t.name,
                        started.elapsed()
                    ),
                    Outcome::Crash(c) => {
                        ok = false;
                        println!("{c}\n(seed {seed})");
                    }
                }
            }
            Ok(ok)
        }
    }
}
