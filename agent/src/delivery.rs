//! A captured pod's policy routing for transparent delivery: the proxy connects to the pod's app
//! from the client's address (`IP_TRANSPARENT`, mark [`DELIVERY_SOCKET_MARK`]), so the app sees
//! who is calling; the app's socket inherits the mark (`net.ipv4.tcp_fwmark_accept`), and a rule
//! sends marked packets to a table where every destination is local, so the replies come back to
//! the proxy over loopback instead of leaving the pod (`fwmark_reflect` does the same for the
//! kernel's own answers, a RST from a closed port). ztunnel's in-pod mode does the same with
//! iptables' connmark; here only the mark, a rule and a route, set over netlink in the pod's
//! namespace. Nothing else in the pod carries that mark, so its own traffic is untouched.
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use nodeway_ebpf_common::{DELIVERY_ROUTE_TABLE, DELIVERY_RULE_PRIORITY, DELIVERY_SOCKET_MARK};
use nodeway_proxy::netns::Netns;
use rtnetlink::{
    packet_route::{
        route::{RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute},
    },
    Handle, IpVersion, RouteMessageBuilder,
};

const LOOPBACK_IFINDEX: u32 = 1;
/// The sysctls (per namespace) that make the replies to a marked packet carry its mark: an
/// accepted socket and its SYN-ACK (`tcp_fwmark_accept`), and what the kernel answers itself, a
/// RST from a port nobody listens on (`fwmark_reflect`: without it the proxy's connect would
/// time out instead of being refused).
const MARK_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/tcp_fwmark_accept",
    "/proc/sys/net/ipv4/fwmark_reflect",
];

/// Sets the routing up in `netns` (idempotent).
pub fn install(netns: &Netns) -> Result<()> {
    in_netns(netns, |h| async move {
        let rule = h
            .rule()
            .add()
            .v4()
            .fw_mark(DELIVERY_SOCKET_MARK)
            .table_id(DELIVERY_ROUTE_TABLE)
            .priority(DELIVERY_RULE_PRIORITY)
            // Not implied by the table: an unspecified action fails every lookup it matches.
            .action(RuleAction::ToTable)
            .execute()
            .await;
        match rule {
            Ok(()) => {}
            // Already there (a restarted agent, a re-capture).
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => {}
            Err(e) => anyhow::bail!("adding the delivery rule: {e}"),
        }
        let local = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(DELIVERY_ROUTE_TABLE)
            .output_interface(LOOPBACK_IFINDEX)
            .build();
        h.route()
            .add(local)
            .replace()
            .execute()
            .await
            .context("adding the delivery table's local route")?;
        Ok(())
    })?;
    for path in MARK_SYSCTLS {
        netns
            .run(|| std::fs::write(path, "1"))
            .map_err(anyhow::Error::from)?
            .with_context(|| format!("setting {path}"))?;
    }
    Ok(())
}

/// Removes the rule again (the table's route goes with it being unused; best effort: a pod
/// being released may be gone already).
pub fn remove(netns: &Netns) -> Result<()> {
    in_netns(netns, |h| async move {
        let mine = |r: &rtnetlink::packet_route::rule::RuleMessage| {
            r.attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == DELIVERY_RULE_PRIORITY))
        };
        let rules: Vec<_> = h.rule().get(IpVersion::V4).execute().try_collect().await?;
        for r in rules.into_iter().filter(mine) {
            h.rule().del(r).execute().await?;
        }
        Ok(())
    })
}

/// Runs `f` with a netlink connection opened inside `netns` (the socket stays in the namespace
/// it was created in), on a thread and runtime of its own (the caller may be on a runtime).
fn in_netns<F, Fut>(netns: &Netns, f: F) -> Result<()>
where
    F: FnOnce(Handle) -> Fut + Send,
    Fut: std::future::Future<Output = Result<()>>,
{
    let work = || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("netlink runtime")?;
        // The socket registers with this runtime, and is made inside the pod's namespace.
        let _in = rt.enter();
        let (conn, handle, _) = netns
            .run(rtnetlink::new_connection)
            .map_err(anyhow::Error::from)?
            .context("netlink socket in the pod's namespace")?;
        rt.block_on(async move {
            let driver = tokio::spawn(conn);
            let r = f(handle).await;
            driver.abort();
            r
        })
    };
    std::thread::scope(|s| s.spawn(work).join())
        .map_err(|_| anyhow::anyhow!("the netlink thread panicked"))?
        .with_context(|| format!("delivery routing in {}", netns.path().display()))
}
