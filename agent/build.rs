//! Builds the kernel programs (`ebpf/`) and embeds the object in the `nodeway` binary.
//!
//! The BPF target needs Debian's `rustc-web` with its precompiled `core` for bpfel-unknown-none and
//! `bpf-linker` (README, "Requirements"), not the rustup toolchain that builds the rest. So this runs
//! Debian's cargo in a clean environment, with its own target directory. `cargo xtask setup`
//! installs both; without them the build stops with a line saying so.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("agent/ sits in the workspace")
        .to_path_buf();
    let ebpf = root.join("ebpf");
    for p in ["src", "Cargo.toml", "Cargo.lock", "common/src", "common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=NODEWAY_TOOLS_DIR");

    let tools = env::var_os("NODEWAY_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".local/nodeway-tools")))
        .unwrap_or_else(|| PathBuf::from("/root/.local/nodeway-tools"));
    let linker = tools.join("bin/bpf-linker");
    let cargo = Path::new("/usr/bin/cargo");
    let core = Path::new("/usr/lib/rustlib/bpfel-unknown-none");
    for (what, path) in [
        ("bpf-linker", linker.as_path()),
        ("Debian cargo-web", cargo),
        ("libstd-rust-web-dev-bpf", core),
    ] {
        if !path.exists() {
            panic!(
                "nodeway: {what} not found at {}: run `cargo xtask setup` first",
                path.display()
            );
        }
    }

    let target_dir = root.join("target/ebpf");
    let path = format!(
        "{}:/usr/lib/llvm-22/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        tools.join("bin").display()
    );
    let mut cmd = Command::new(cargo);
    cmd.env_clear()
        .current_dir(&ebpf)
        .env("PATH", path)
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .args([
            "build",
            "--locked",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir);
    for keep in [
        "HOME",
        "CARGO_HOME",
        "CARGO_NET_OFFLINE",
        "http_proxy",
        "https_proxy",
        "TERM",
    ] {
        if let Some(v) = env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("nodeway: cannot run {}: {e}", cargo.display()));
    if !status.success() {
        panic!(
            "nodeway: building the eBPF programs in {} failed ({status})",
            ebpf.display()
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/nodeway-ebpf");
    println!("cargo:rustc-env=NODEWAY_EBPF_OBJ={}", obj.display());
}
