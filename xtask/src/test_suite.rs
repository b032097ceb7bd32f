//! `cargo xtask test`: setup, build everything, run every test (unit, integration, end-to-end).
//!
//! `cargo test --no-fail-fast` runs every test binary even when one fails; its output (stdout and
//! stderr through one pipe, so in the order it was written) is shown as it comes and read for a
//! summary at the end: which test binaries failed and which of their tests.

use std::{
    io::{BufRead, BufReader},
    process::{Command, ExitStatus},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{command, workspace::Workspace};

/// `extra` goes to `cargo test` as given: `cargo xtask test -p nodeway-proxy -- --nocapture`.
/// Without `-p`/`--package` among them, the whole workspace is tested.
pub fn run(ws: &Workspace, extra: &[String]) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        println!(
            "note: not root: the end-to-end tests in tests/ need root (network namespaces, eBPF); \
             they skip, or fail when CI=true"
        );
    }
    ws.run_cargo(["build", "--workspace", "--all-targets"])?;
    let cmd = ws.cargo(test_args(extra));
    let line = command::display(&cmd);
    let (summary, status) = run_and_summarize(cmd, &line)?;
    // The fuzz smoke runs on a whole-suite run only (not when tests are selected).
    let fuzz = if extra.is_empty() {
        crate::fuzz::smoke(ws)
    } else {
        println!("fuzz smoke: skipped (test arguments given)");
        Ok(())
    };
    println!("\n{}", summary.render());
    if !summary.failed.is_empty() {
        bail!(
            "{} test binar{} failed",
            summary.failed.len(),
            plural_y(summary.failed.len())
        );
    }
    if !status.success() {
        bail!("`{line}` failed ({status}) without a failed test binary: see its output above");
    }
    fuzz
}

/// Runs `cmd` (shown as `line`) with stdout and stderr through one pipe, echoing every line and
/// summarizing.
fn run_and_summarize(mut cmd: Command, line: &str) -> Result<(Summary, ExitStatus)> {
    println!("==> {line}");
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    cmd.stdout(writer.try_clone().context("duplicating a pipe")?)
        .stderr(writer);
    let mut child = cmd.spawn().with_context(|| format!("cannot start `{line}`"))?;
    // Closes this process's write ends: the reader sees EOF when cargo and the tests are done.
    drop(cmd);
    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        for l in BufReader::new(reader).split(b'\n') {
            let Ok(l) = l else { break };
            if tx.send(String::from_utf8_lossy(&l).into_owned()).is_err() {
                break;
            }
        }
    });
    let mut summary = Summary::default();
    let mut exited: Option<Instant> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                println!("{l}");
                summary.line(&l);
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => match exited {
                // cargo is done, but a process a test left behind still holds the pipe.
                Some(at) if at.elapsed() > LINGER => {
                    println!("note: a process started by a test still holds cargo's output; not waiting for it");
                    break;
                }
                Some(_) => {}
                None => exited = child.try_wait()?.map(|_| Instant::now()),
            },
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((summary, status))
}

/// How long output may keep coming after cargo exited.
const LINGER: Duration = Duration::from_secs(5);

fn plural_y(n: usize) -> &'static str {
    if n == 1 {
        "y"
    } else {
        "ies"
    }
}

/// What `cargo test --no-fail-fast` said, line by line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    /// Test binaries started (unit, integration and doc tests).
    binaries: usize,
    failed: Vec<FailedBinary>,
    /// Failed tests of the binary running now (its `Running` line came last).
    current: Vec<String>,
    /// Past the binary's first `failures:` line: tests' output follows, not libtest's results.
    in_report: bool,
}

/// One test binary that failed: how to run it again (`-p nodeway-tests --test hbone`) and the
/// tests that failed in it (none when it crashed or could not start).
#[derive(Debug, PartialEq, Eq)]
struct FailedBinary {
    target: String,
    tests: Vec<String>,
}

impl Summary {
    fn line(&mut self, line: &str) {
        let l = line.trim_end();
        let cargo = l.trim_start();
        if cargo.starts_with("Running ") || cargo.starts_with("Doc-tests ") {
            self.binaries += 1;
            self.current.clear();
            self.in_report = false;
        } else if l == "failures:" {
            self.in_report = true;
        } else if let Some(name) = l.strip_prefix("test ").and_then(|r| r.strip_suffix(" ... FAILED")) {
            if !self.in_report {
                self.current.push(name.to_owned());
            }
        } else if let Some(target) = rerun_target(l) {
            self.failed.push(FailedBinary {
                target: target.to_owned(),
                tests: std::mem::take(&mut self.current),
            });
        }
    }

    fn render(&self) -> String {
        if self.failed.is_empty() {
            return format!("test summary: {} test binaries, none failed", self.binaries);
        }
        let mut out = format!(
            "test summary: {} of {} test binaries failed:",
            self.failed.len(),
            self.binaries
        );
        for f in &self.failed {
            out += &format!("\n  cargo test {}", f.target);
            if f.tests.is_empty() {
                out += "  (no failed test named: it crashed or did not start; see its output above)";
            }
            for t in &f.tests {
                out += &format!("\n      {t}");
            }
        }
        out
    }
}

/// `-p nodeway-tests --test hbone` from cargo's "error: test failed, to rerun pass `...`".
fn rerun_target(line: &str) -> Option<&str> {
    line.strip_prefix("error: test failed, to rerun pass `")?
        .strip_suffix('`')
}

fn test_args(extra: &[String]) -> Vec<String> {
    let own = extra.iter().take_while(|a| *a != "--");
    let (mut selects_package, mut no_fail_fast) = (false, false);
    for a in own {
        selects_package |= a == "--package" || a.starts_with("--package=") || a.starts_with("-p");
        no_fail_fast |= a == "--no-fail-fast";
    }
    let mut args = vec!["test".to_owned()];
    if !selects_package {
        args.push("--workspace".to_owned());
    }
    if !no_fail_fast {
        args.push("--no-fail-fast".to_owned());
    }
    args.extend(extra.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use super::{test_args, FailedBinary, Summary};

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn whole_workspace_by_default() {
        assert_eq!(test_args(&[]), s(&["test", "--workspace", "--no-fail-fast"]));
        assert_eq!(
            test_args(&s(&["--", "--nocapture", "-p"])),
            s(&["test", "--workspace", "--no-fail-fast", "--", "--nocapture", "-p"])
        );
    }

    #[test]
    fn package_selection_drops_workspace() {
        assert_eq!(
            test_args(&s(&["-p", "xtask"])),
            s(&["test", "--no-fail-fast", "-p", "xtask"])
        );
        assert_eq!(
            test_args(&s(&["--package=xtask"])),
            s(&["test", "--no-fail-fast", "--package=xtask"])
        );
    }

    #[test]
    fn no_fail_fast_is_not_given_twice() {
        assert_eq!(
            test_args(&s(&["--no-fail-fast", "--", "--no-fail-fast"])),
            s(&["test", "--workspace", "--no-fail-fast", "--", "--no-fail-fast"])
        );
    }

    fn summarize(output: &str) -> Summary {
        let mut summary = Summary::default();
        output.lines().for_each(|l| summary.line(l));
        summary
    }

    /// The shape of `cargo test --no-fail-fast` output (cargo 1.95): a failed unit test, a test
    /// binary that aborted, one that passed, and the doc tests.
    const OUTPUT: &str = "\
     Running unittests src/lib.rs (target/debug/deps/nodeway_proxy-682c7c66d8d3d6c3)

running 3 tests
test http::tests::good ... ok
test http::tests::bad ... FAILED
test http::tests::worse ... FAILED

failures:

---- http::tests::bad stdout ----
thread 'http::tests::bad' panicked at proxy/src/http/mod.rs:4:24:
test inside a message ... FAILED

failures:
    http::tests::bad
    http::tests::worse

test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.20s

error: test failed, to rerun pass `-p nodeway-proxy --lib`
     Running tests/hbone.rs (target/debug/deps/hbone-455e32a1e69ca757)

running 1 test
error: test failed, to rerun pass `-p nodeway-tests --test hbone`

Caused by:
  process didn't exit successfully: `target/debug/deps/hbone-455e32a1e69ca757` (signal: 6, SIGABRT: process abort signal)
     Running tests/capture.rs (target/debug/deps/capture-6bb5b25fbb824985)

running 1 test
test fine ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

   Doc-tests nodeway_proxy

running 0 tests

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

error: 2 targets failed:
    `-p nodeway-proxy --lib`
    `-p nodeway-tests --test hbone`
";

    #[test]
    fn failed_binaries_and_their_tests_are_named() {
        let summary = summarize(OUTPUT);
        assert_eq!(summary.binaries, 4);
        assert_eq!(
            summary.failed,
            [
                FailedBinary {
                    target: "-p nodeway-proxy --lib".into(),
                    // Not "inside a message": that line is a test's output, after `failures:`.
                    tests: s(&["http::tests::bad", "http::tests::worse"]),
                },
                FailedBinary {
                    target: "-p nodeway-tests --test hbone".into(),
                    tests: vec![],
                },
            ]
        );
        let text = summary.render();
        assert!(text.starts_with("test summary: 2 of 4 test binaries failed:"), "{text}");
        assert!(
            text.contains("\n  cargo test -p nodeway-proxy --lib\n      http::tests::bad\n      http::tests::worse"),
            "{text}"
        );
        assert!(
            text.contains("\n  cargo test -p nodeway-tests --test hbone  (no failed test named"),
            "{text}"
        );
    }

    #[test]
    fn a_clean_run_says_so() {
        let ok = "     Running tests/capture.rs (target/debug/deps/capture-6bb5)\ntest fine ... ok\n   Doc-tests x\n";
        let summary = summarize(ok);
        assert!(summary.failed.is_empty());
        assert_eq!(summary.render(), "test summary: 2 test binaries, none failed");
    }
}
