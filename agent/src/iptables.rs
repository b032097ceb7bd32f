//! The old way, kept as a baseline: iptables REDIRECT of the pod's outbound TCP to the same
//! in-pod listener (what sidecars and ztunnel's in-pod mode install). Outbound only; `cargo xtask
//! bench redirect` compares it with the eBPF capture.
use std::{net::SocketAddr, process::Command};

use anyhow::{bail, Context, Result};
use nodeway_ebpf_common::{OUTBOUND_PORT, PROXY_SOCKET_MARK};
use nodeway_proxy::{netns::Netns, OriginalDst};
use tokio::net::TcpStream;

use crate::{capture::ipv4s, config::Pod, redirect::PodKernelState};

const CHAIN: &str = "NODEWAY_OUTPUT";

fn iptables(netns: &Netns, args: &[&str]) -> Result<()> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.path().display()))
        .arg("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .context("running nsenter iptables (is iptables installed?)")?;
    if !out.status.success() {
        bail!(
            "iptables {} in {}: {}",
            args.join(" "),
            netns.path().display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn capture(netns: &Netns, pod: &Pod) -> Result<PodKernelState> {
    let _ = release(netns, pod);
    let mark = format!("{PROXY_SOCKET_MARK:#x}");
    let port = OUTBOUND_PORT.to_string();
    let mut rules: Vec<Vec<String>> = vec![
        vec![
            "-m".into(),
            "mark".into(),
            "--mark".into(),
            mark,
            "-j".into(),
            "RETURN".into(),
        ],
        vec!["-o".into(), "lo".into(), "-j".into(), "RETURN".into()],
    ];
    for ip in ipv4s(pod) {
        rules.push(vec!["-d".into(), format!("{ip}/32"), "-j".into(), "RETURN".into()]);
    }
    for p in &pod.exclude_outbound_ports {
        rules.push(vec![
            "-p".into(),
            "tcp".into(),
            "--dport".into(),
            p.to_string(),
            "-j".into(),
            "RETURN".into(),
        ]);
    }
    rules.push(vec![
        "-p".into(),
        "tcp".into(),
        "-j".into(),
        "REDIRECT".into(),
        "--to-ports".into(),
        port,
    ]);
    iptables(netns, &["-t", "nat", "-N", CHAIN])?;
    let mut st = PodKernelState::default();
    for r in &rules {
        let mut args = vec!["-t", "nat", "-A", CHAIN];
        args.extend(r.iter().map(String::as_str));
        iptables(netns, &args)?;
        st.map_entries
            .push(format!("iptables -t nat -A {CHAIN} {}", r.join(" ")));
    }
    iptables(netns, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", CHAIN])?;
    st.attachments.push(format!("iptables -t nat OUTPUT -j {CHAIN}"));
    Ok(st)
}

pub fn release(netns: &Netns, _pod: &Pod) -> Result<()> {
    let a = iptables(netns, &["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", CHAIN]);
    let b = iptables(netns, &["-t", "nat", "-F", CHAIN]);
    let c = iptables(netns, &["-t", "nat", "-X", CHAIN]);
    a.and(b).and(c)
}

/// `SO_ORIGINAL_DST` of a REDIRECTed connection.
pub struct IptablesOriginalDst;

impl OriginalDst for IptablesOriginalDst {
    fn original_dst(&self, _netns_cookie: u64, _peer: SocketAddr, stream: &TcpStream) -> Option<SocketAddr> {
        let sin = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst).ok()?;
        let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
    }
}
