//! Start-up checks: say in one line what is missing before touching the kernel.
use std::{fs, path::PathBuf};

/// Oldest kernel the programs load on: `sk_lookup`'s `ingress_ifindex` (5.17) is the newest thing
/// they use (`SO_NETNS_COOKIE` 5.14, netns cookie in sock_ops 5.15, bpf_link for cgroups 5.7).
pub const MIN_KERNEL: (u32, u32) = (5, 17);

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Checks privileges and kernel features for the chosen capture mode; `Err` is the one line to print.
pub fn check(ebpf: bool) -> Result<(), String> {
    let eff = effective_caps().map_err(|e| format!("cannot read capabilities from /proc/self/status: {e}"))?;
    let mut needed = vec![("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN)];
    if ebpf {
        needed.insert(0, ("CAP_BPF", CAP_BPF));
    }
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, bit)| eff & (1u64 << bit) == 0)
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing capabilities {} (run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)",
            missing.join(", ")
        ));
    }
    if !ebpf {
        return Ok(());
    }
    let release = nix::sys::utsname::uname().map_err(|e| format!("uname failed: {e}"))?;
    let release = release.release().to_string_lossy().into_owned();
    match parse_kernel(&release) {
        Some(v) if v >= MIN_KERNEL => {}
        Some(_) => {
            return Err(format!(
                "kernel {release} is too old: nodeway's capture needs Linux {}.{} or newer (sk_lookup ingress_ifindex)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ))
        }
        None => return Err(format!("cannot parse kernel version {release:?}")),
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(
            "kernel BTF missing (/sys/kernel/btf/vmlinux): build the kernel with CONFIG_DEBUG_INFO_BTF=y".into(),
        );
    }
    cgroup2_root().map(|_| ())
}

fn effective_caps() -> std::io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .ok_or_else(|| std::io::Error::other("no CapEff line"))?;
    u64::from_str_radix(hex, 16).map_err(std::io::Error::other)
}

fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Where the cgroup-v2 (unified) hierarchy is mounted: /sys/fs/cgroup, /sys/fs/cgroup/unified, ...
pub fn cgroup2_root() -> Result<PathBuf, String> {
    let mounts =
        fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            (f.get(sep + 1) == Some(&"cgroup2")).then(|| PathBuf::from(f[4]))
        })
        .ok_or_else(|| "no cgroup v2 hierarchy mounted (mount -t cgroup2 none /sys/fs/cgroup)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel("6.18.44-fc-v769"), Some((6, 18)));
        assert_eq!(parse_kernel("5.4.0"), Some((5, 4)));
        assert!(parse_kernel("5.4.0") < Some(MIN_KERNEL));
        assert!(parse_kernel("x").is_none());
    }
}
