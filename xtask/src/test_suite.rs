//! `cargo xtask test`: setup, build everything, run every test (unit, integration, end-to-end).

use anyhow::Result;

use crate::workspace::Workspace;

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
    ws.run_cargo(test_args(extra))
}

fn test_args(extra: &[String]) -> Vec<String> {
    let selects_package = extra
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--package" || a.starts_with("--package=") || a.starts_with("-p"));
    let mut args = vec!["test".to_owned()];
    if !selects_package {
        args.push("--workspace".to_owned());
    }
    args.extend(extra.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use super::test_args;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn whole_workspace_by_default() {
        assert_eq!(test_args(&[]), s(&["test", "--workspace"]));
        assert_eq!(
            test_args(&s(&["--", "--nocapture", "-p"])),
            s(&["test", "--workspace", "--", "--nocapture", "-p"])
        );
    }

    #[test]
    fn package_selection_drops_workspace() {
        assert_eq!(test_args(&s(&["-p", "xtask"])), s(&["test", "-p", "xtask"]));
        assert_eq!(test_args(&s(&["--package=xtask"])), s(&["test", "--package=xtask"]));
    }
}
