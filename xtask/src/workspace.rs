//! The nodeway workspace: where it is, and cargo invocations on it.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::{command, setup};

pub struct Workspace {
    root: PathBuf,
    cargo: OsString,
    tools_dir: PathBuf,
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        if !root.join("Cargo.toml").is_file() {
            anyhow::bail!(
                "{} is not the nodeway workspace (no Cargo.toml); run xtask through `cargo xtask`",
                root.display()
            );
        }
        // `cargo run` tells the program which cargo ran it; use the same one.
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        Ok(Self {
            root,
            cargo,
            tools_dir: setup::tools_dir()?,
        })
    }

    pub fn target_dir(&self) -> PathBuf {
        match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => self.root.join(dir),
            None => self.root.join("target"),
        }
    }

    /// The `nodeway` binary a `cargo build [--release]` produces.
    pub fn nodeway_bin(&self, release: bool) -> PathBuf {
        self.target_dir()
            .join(if release { "release" } else { "debug" })
            .join("nodeway")
    }

    /// `cargo ARGS` in the workspace root, with `NODEWAY_TOOLS_DIR` set for agent/build.rs.
    pub fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(&self.cargo);
        cmd.args(args)
            .current_dir(&self.root)
            .env("NODEWAY_TOOLS_DIR", &self.tools_dir);
        cmd
    }

    pub fn run_cargo<I, S>(&self, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        command::run(&mut self.cargo(args))
    }

    /// Builds the agent (binary `nodeway`); its build.rs builds and embeds the eBPF object.
    pub fn build_nodeway(&self, release: bool) -> Result<PathBuf> {
        let mut args = vec!["build", "--package", "nodeway-agent", "--bin", "nodeway"];
        if release {
            args.push("--release");
        }
        self.run_cargo(args)?;
        let bin = self.nodeway_bin(release);
        if !bin.is_file() {
            anyhow::bail!("cargo build succeeded but {} is missing", bin.display());
        }
        Ok(bin)
    }
}
