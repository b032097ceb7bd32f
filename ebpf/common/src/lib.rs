//! Types shared by the kernel programs (`nodeway-ebpf`) and user space (`nodeway` agent).
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree on the layout byte for byte.
//! IP addresses are kept as four `u32` words in network byte order, the way `bpf_sock_addr` and
//! `bpf_sk_lookup` hand them to the programs; an IPv4 address uses word 0 only.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]

/// `SO_MARK` the proxy sets on every socket it opens inside a pod, so `connect4/6` leave it alone.
pub const PROXY_SOCKET_MARK: u32 = 0x4e57;
/// The bits of a mark `connect4/6` compare with [`PROXY_SOCKET_MARK`]: the proxy's sockets may
/// carry more (see [`DELIVERY_SOCKET_MARK`]).
pub const PROXY_SOCKET_MARK_MASK: u32 = 0xffff;
/// `SO_MARK` of the proxy's sockets that deliver to a pod's app from the client's address
/// (`IP_TRANSPARENT`): a [`PROXY_SOCKET_MARK`] too, plus a bit that the pod's policy routing
/// (`fwmark` rule to [`DELIVERY_ROUTE_TABLE`]) uses to send the app's replies, which the app's
/// socket inherits (`tcp_fwmark_accept`), back to the proxy over loopback, as ztunnel's in-pod
/// mode does.
pub const DELIVERY_SOCKET_MARK: u32 = 0x1_4e57;
/// The pod's routing table for [`DELIVERY_SOCKET_MARK`]: every destination is local.
pub const DELIVERY_ROUTE_TABLE: u32 = 0x4e57;
/// Priority of the pod's rule that selects [`DELIVERY_ROUTE_TABLE`] (before `main`, 32766).
pub const DELIVERY_RULE_PRIORITY: u32 = 0x4e57;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Ports of the proxy's listeners inside each captured pod (the same as ztunnel's in-pod mode).
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;

/// Version of what the pinned maps' entries mean. Bump it by hand when an entry's meaning
/// changes without its size changing (a field reused, a new direction value): the agent then
/// migrates pinned state without copying entries. Sizes and capacities are compared by
/// themselves (the agent's pin layout digest covers them).
pub const PIN_LAYOUT_VERSION: u32 = 1;

/// Most pods one node agent captures at once: sizes the pod and socket maps.
pub const MAX_PODS: u32 = 1024;
/// The slot of a pod held closed after a failed capture: no proxy sockets, exclusions or
/// addresses are ever registered under it, so its connects go to a loopback port nobody serves
/// and its inbound SYNs are dropped.
pub const HELD_CLOSED_SLOT: u32 = MAX_PODS;
/// Per-pod budgets of the shared maps (which are sized `MAX_PODS` times these): a pod over one
/// is not captured (it is held closed, with the reason on `/captured`), so no pod's annotations
/// can fill a map and break the capture of the others.
pub const MAX_EXCLUDED_PORTS_PER_POD: u32 = 16;
pub const MAX_IPS_PER_POD: u32 = 4;
/// Addresses of the node itself (`HOST_ADDRS`): what a kubelet probe comes from.
pub const MAX_HOST_ADDRS: u32 = 64;
/// Inbound sockets per pod in `PROXY_SOCKETS`: (plaintext, HBONE) x (IPv4, IPv6).
pub const SOCKETS_PER_POD: u32 = 4;

/// Index of an inbound proxy socket in the `PROXY_SOCKETS` sockmap.
#[inline(always)]
pub const fn socket_index(slot: u32, hbone: bool, ipv6: bool) -> u32 {
    slot * SOCKETS_PER_POD + if hbone { 2 } else { 0 } + if ipv6 { 1 } else { 0 }
}

/// Value of `PODS_BY_NETNS` (key: the pod's netns cookie) and `PODS_BY_IP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodEntry {
    /// The pod's slot: its sockets live at `socket_index(slot, ..)`, its exclusions are keyed by it.
    pub slot: u32,
    /// Port of the in-pod outbound listener, host byte order.
    pub outbound_port: u16,
    pub _pad: u16,
}

/// Key of `PODS_BY_IP`: a local pod address (the destination of an inbound SYN).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub family: u32,
    pub addr: [u32; 4],
}

pub const DIRECTION_OUTBOUND: u8 = 1;
pub const DIRECTION_INBOUND: u8 = 2;

/// Key of `EXCLUDED_PORTS`: a port of one pod that bypasses the proxy in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub slot: u32,
    pub port: u16,
    pub direction: u8,
    pub _pad: u8,
}

/// A socket address: the original destination of a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub family: u16,
    /// host byte order
    pub port: u16,
    pub addr: [u32; 4],
}

/// Key of `ORIG_DST`: how the proxy finds a redirected connection from its accepted socket.
/// `port` is the client's source port (the accepted socket's peer port), `family` the family of
/// the listener that accepted it (the IPv4 or IPv6 outbound listener of the pod).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Slots of the `STATS` per-CPU counter array.
pub mod stat {
    pub const OUTBOUND_REDIRECTED: u32 = 0;
    pub const OUTBOUND_EXCLUDED: u32 = 1;
    pub const INBOUND_REDIRECTED: u32 = 2;
    pub const INBOUND_EXCLUDED: u32 = 3;
    /// Inbound SYN dropped because the pod is captured but its proxy socket is gone.
    pub const INBOUND_FAIL_CLOSED: u32 = 4;
    /// Established redirected connection whose original destination was recorded for the proxy.
    pub const ORIG_DST_RECORDED: u32 = 5;
    /// Inbound SYN dropped in a captured pod's namespace because it was for an address not
    /// listed for the pod (IPv6 link-local, a secondary interface): never delivered around the
    /// proxy.
    pub const INBOUND_UNLISTED_DROPPED: u32 = 6;
    /// Inbound SYN from one of the node's own addresses (the kubelet's probes) delivered to the
    /// app directly, as Istio ambient exempts them.
    pub const INBOUND_HOST_EXEMPT: u32 = 7;
    /// Slots in the pinned STATS array (fixed: spare slots keep the pinned layout across versions).
    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; 8] = [
        "outbound_redirected",
        "outbound_excluded",
        "inbound_redirected",
        "inbound_excluded",
        "inbound_fail_closed",
        "orig_dst_recorded",
        "inbound_unlisted_dropped",
        "inbound_host_exempt",
    ];
}

// The map types have no implicit padding (each size is the sum of its fields): what makes them
// `aya::Pod` below, and what lets both sides agree on every byte.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<PodEntry>() == 4 + 2 + 2);
    assert!(size_of::<IpKey>() == 4 + 16);
    assert!(size_of::<PortKey>() == 4 + 2 + 1 + 1);
    assert!(size_of::<OrigDst>() == 2 + 2 + 16);
    assert!(size_of::<ConnKey>() == 8 + 2 + 2 + 4);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: a #[repr(C)] struct of integers with no implicit padding (asserted above), so every
    // byte is initialised and every bit pattern is a valid value.
    unsafe impl aya::Pod for PodEntry {}
    // SAFETY: as for `PodEntry`.
    unsafe impl aya::Pod for IpKey {}
    // SAFETY: as for `PodEntry`.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as for `PodEntry`.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: as for `PodEntry`.
    unsafe impl aya::Pod for ConnKey {}
}
