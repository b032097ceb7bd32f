//! nodeway's kernel programs: steer captured pods' TCP into the node proxy's in-pod sockets.
//!
//! * `nodeway_connect4` / `nodeway_connect6` (cgroup/connect4|6 at the cgroup-v2 root): a connect()
//!   from a captured pod's network namespace is rewritten to the pod's loopback outbound listener,
//!   and its original destination is remembered under the socket cookie.
//! * `nodeway_sockops` (sock_ops at the same root): once that connection is established, moves the
//!   original destination to a key the proxy can compute from its accepted socket
//!   (netns cookie, client source port, listener family).
//! * `nodeway_getpeername4` / `6`: the app's `getpeername()` on a redirected socket returns the
//!   original destination, as it would without the proxy.
//! * `nodeway_sk_lookup` (sk_lookup, one link per captured pod netns): a TCP SYN that arrives on
//!   the pod's interface for the pod's address goes to the in-pod inbound socket (HBONE for 15008,
//!   plaintext for the rest). Connections from the pod's own address to itself are left alone,
//!   which is how the proxy reaches the application (from inside the pod) without a loop. A SYN
//!   for an address not listed for the pod (IPv6 link-local, a secondary interface) is dropped:
//!   the program runs only in captured namespaces, where nothing may arrive around the proxy.
//!   The proxy's socket is assigned with `BPF_SK_LOOKUP_F_NO_REUSEPORT`, so a socket the app
//!   binds to the same port with SO_REUSEPORT (the proxy's listeners set it for restarts) never
//!   gets a share of the pod's inbound connections.
//!
//! Fail closed: a captured pod whose proxy sockets are gone gets refused connects (nobody listens
//! on the loopback port) and dropped inbound SYNs, never a silent bypass.
//!
//! The programs use no `unsafe` themselves: [`kernel`] wraps every access that needs it.
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]
// Map keys and values go to aya's `impl Borrow` arguments by reference: by value they are copied
// to further stack slots first (more instructions, e.g. in sk_lookup), for nothing.
#![allow(clippy::needless_borrows_for_generic_args)]

mod kernel;

use kernel::read_once;

use aya_ebpf::{
    bindings::{BPF_SK_LOOKUP_F_NO_REUSEPORT, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use nodeway_ebpf_common::{
    socket_index, stat, ConnKey, IpKey, OrigDst, PodEntry, PortKey, AF_INET, AF_INET6, DIRECTION_INBOUND,
    DIRECTION_OUTBOUND, HBONE_PORT, MAX_EXCLUDED_PORTS_PER_POD, MAX_HOST_ADDRS, MAX_IPS_PER_POD, MAX_PODS,
    PROXY_SOCKET_MARK, PROXY_SOCKET_MARK_MASK, SOCKETS_PER_POD,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const LOOPBACK_IFINDEX: u32 = 1;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
/// Redirected sockets tracked (original destination for the proxy and for getpeername); LRU, so
/// entries of closed sockets age out and only the oldest live ones lose their getpeername fix-up.
const PENDING_ORIG_DST: u32 = 65536;

/// Set by user space at load time (`--ebpf-log`); aya-log output is off by default.
#[no_mangle]
static LOG_ENABLED: u8 = 0;

#[map]
static PODS_BY_NETNS: HashMap<u64, PodEntry> = HashMap::pinned(MAX_PODS, 0);
#[map]
static PODS_BY_IP: HashMap<IpKey, PodEntry> = HashMap::pinned(MAX_PODS * MAX_IPS_PER_POD, 0);
#[map]
static EXCLUDED_PORTS: HashMap<PortKey, u8> = HashMap::pinned(MAX_PODS * MAX_EXCLUDED_PORTS_PER_POD, 0);
/// The node's own addresses: a SYN from one of them is the kubelet (or another host process)
/// and goes to the app directly, as Istio ambient exempts kubelet probes from the mesh.
#[map]
static HOST_ADDRS: HashMap<IpKey, u8> = HashMap::pinned(MAX_HOST_ADDRS, 0);
#[map]
static PROXY_SOCKETS: SockMap = SockMap::pinned(MAX_PODS * SOCKETS_PER_POD, 0);
#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(PENDING_ORIG_DST, 0);
#[map]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(PENDING_ORIG_DST, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

#[inline(always)]
fn log_enabled() -> bool {
    kernel::read_once(&LOG_ENABLED) != 0
}

#[inline(always)]
fn count(slot: u32) {
    kernel::increment(&STATS, slot);
}

#[inline(always)]
fn excluded(slot: u32, port: u16, direction: u8) -> bool {
    let key = PortKey {
        slot,
        port,
        direction,
        _pad: 0,
    };
    EXCLUDED_PORTS.get_ptr(&key).is_some()
}

/// Which pod (if any) owns this socket's network namespace, unless it is the proxy's own socket
/// or not TCP.
#[inline(always)]
fn captured_pod(ctx: &SockAddrContext) -> Option<PodEntry> {
    let sa = kernel::sock_addr(ctx);
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return None;
    }
    let netns = kernel::netns_cookie(ctx);
    let pod = kernel::pod_entry(&PODS_BY_NETNS, &netns)?;
    if kernel::socket_mark(ctx)? & PROXY_SOCKET_MARK_MASK == PROXY_SOCKET_MARK {
        return None;
    }
    Some(pod)
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: OrigDst) {
    let cookie = kernel::socket_cookie(ctx);
    let _ = ORIG_DST_BY_COOKIE.insert(&cookie, &dst, 0);
    count(stat::OUTBOUND_REDIRECTED);
}

/// Whether `addr` is an address of the pod in `slot` (its traffic to itself stays direct).
#[inline(always)]
fn is_own_ip(slot: u32, family: u16, addr: [u32; 4]) -> bool {
    let key = IpKey {
        family: family as u32,
        addr,
    };
    matches!(kernel::pod_entry(&PODS_BY_IP, &key), Some(e) if e.slot == slot)
}

#[cgroup_sock_addr(connect4)]
pub fn nodeway_connect4(mut ctx: SockAddrContext) -> i32 {
    let Some(pod) = captured_pod(&ctx) else { return 1 };
    let sa = kernel::sock_addr(&ctx);
    let ip = sa.user_ip4; // network order
    let port = u16::from_be(sa.user_port as u16);
    // 127.0.0.0/8 and 0.0.0.0 stay in the pod.
    let first = (u32::from_be(ip) >> 24) as u8;
    if first == 127 || ip == 0 || is_own_ip(pod.slot, AF_INET, [ip, 0, 0, 0]) {
        return 1;
    }
    if excluded(pod.slot, port, DIRECTION_OUTBOUND) {
        count(stat::OUTBOUND_EXCLUDED);
        return 1;
    }
    remember(
        &ctx,
        OrigDst {
            family: AF_INET,
            port,
            addr: [ip, 0, 0, 0],
        },
    );
    let sa = kernel::sock_addr_mut(&mut ctx);
    sa.user_ip4 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    sa.user_port = (pod.outbound_port.to_be()) as u32;
    if log_enabled() {
        debug!(&ctx, "connect4: {:i}:{} -> proxy", u32::from_be(ip), port);
    }
    1
}

#[cgroup_sock_addr(connect6)]
pub fn nodeway_connect6(mut ctx: SockAddrContext) -> i32 {
    let Some(pod) = captured_pod(&ctx) else { return 1 };
    let sa = kernel::sock_addr(&ctx);
    let ip = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let port = u16::from_be(sa.user_port as u16);
    let mapped_prefix = u32::from_be_bytes([0, 0, 0xff, 0xff]).to_be();
    let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == mapped_prefix;
    let (family, orig) = if v4_mapped {
        let first = (u32::from_be(ip[3]) >> 24) as u8;
        if first == 127 || ip[3] == 0 || is_own_ip(pod.slot, AF_INET, [ip[3], 0, 0, 0]) {
            return 1;
        }
        (AF_INET, [ip[3], 0, 0, 0])
    } else {
        let loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 1u32.to_be();
        let unspecified = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 0;
        if loopback || unspecified || is_own_ip(pod.slot, AF_INET6, ip) {
            return 1;
        }
        (AF_INET6, ip)
    };
    if excluded(pod.slot, port, DIRECTION_OUTBOUND) {
        count(stat::OUTBOUND_EXCLUDED);
        return 1;
    }
    remember(
        &ctx,
        OrigDst {
            family,
            port,
            addr: orig,
        },
    );
    let sa = kernel::sock_addr_mut(&mut ctx);
    if v4_mapped {
        // ::ffff:127.0.0.1 reaches the IPv4 outbound listener.
        sa.user_ip6[3] = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    } else {
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = 0;
        sa.user_ip6[3] = 1u32.to_be();
    }
    sa.user_port = (pod.outbound_port.to_be()) as u32;
    if log_enabled() {
        debug!(&ctx, "connect6: port {} -> proxy", port);
    }
    1
}

#[sock_ops]
pub fn nodeway_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let cookie = kernel::socket_cookie(&ctx);
    // The entry stays: getpeername4/6 still need it while the socket lives (LRU ages it out).
    let Some(dst) = kernel::orig_dst(&ORIG_DST_BY_COOKIE, &cookie) else {
        return 1;
    };
    // The accepted socket sees the client as an IPv4 peer unless the client reached the IPv6
    // listener (::1), i.e. a native IPv6 original destination.
    let family = if dst.family == AF_INET6 { AF_INET6 } else { AF_INET };
    let netns_cookie = kernel::netns_cookie(&ctx);
    let key = ConnKey {
        netns_cookie,
        port: ctx.local_port() as u16,
        family,
        _pad: 0,
    };
    let _ = ORIG_DST.insert(&key, &dst, 0);
    count(stat::ORIG_DST_RECORDED);
    1
}

/// The app's `getpeername()` shows the original destination, not the proxy's loopback listener.
#[inline(always)]
fn original_peer(ctx: &SockAddrContext) -> Option<OrigDst> {
    let netns = kernel::netns_cookie(ctx);
    PODS_BY_NETNS.get_ptr(&netns)?;
    let cookie = kernel::socket_cookie(ctx);
    kernel::orig_dst(&ORIG_DST_BY_COOKIE, &cookie)
}

#[cgroup_sock_addr(getpeername4)]
pub fn nodeway_getpeername4(mut ctx: SockAddrContext) -> i32 {
    if let Some(d) = original_peer(&ctx) {
        if d.family == AF_INET {
            let sa = kernel::sock_addr_mut(&mut ctx);
            sa.user_ip4 = d.addr[0];
            sa.user_port = (d.port.to_be()) as u32;
        }
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn nodeway_getpeername6(mut ctx: SockAddrContext) -> i32 {
    if let Some(d) = original_peer(&ctx) {
        let sa = kernel::sock_addr_mut(&mut ctx);
        if d.family == AF_INET {
            sa.user_ip6[0] = 0;
            sa.user_ip6[1] = 0;
            sa.user_ip6[2] = u32::from_be_bytes([0, 0, 0xff, 0xff]).to_be();
            sa.user_ip6[3] = d.addr[0];
        } else {
            sa.user_ip6[0] = d.addr[0];
            sa.user_ip6[1] = d.addr[1];
            sa.user_ip6[2] = d.addr[2];
            sa.user_ip6[3] = d.addr[3];
        }
        sa.user_port = (d.port.to_be()) as u32;
    }
    1
}

#[sk_lookup]
pub fn nodeway_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = kernel::sk_lookup(&ctx);
    // `read_once` keeps each context access a fixed-offset load, which the verifier requires
    // (a merged load through an offset context pointer is rejected).
    let (protocol, ifindex, fam) = (
        read_once(&l.protocol),
        read_once(&l.ingress_ifindex),
        read_once(&l.family),
    );
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let (family, addr, remote) = if fam == AF_INET as u32 {
        (
            AF_INET,
            [read_once(&l.local_ip4), 0, 0, 0],
            [read_once(&l.remote_ip4), 0, 0, 0],
        )
    } else {
        (
            AF_INET6,
            [
                read_once(&l.local_ip6[0]),
                read_once(&l.local_ip6[1]),
                read_once(&l.local_ip6[2]),
                read_once(&l.local_ip6[3]),
            ],
            [
                read_once(&l.remote_ip6[0]),
                read_once(&l.remote_ip6[1]),
                read_once(&l.remote_ip6[2]),
                read_once(&l.remote_ip6[3]),
            ],
        )
    };
    let local_port = read_once(&l.local_port);
    let key = IpKey {
        family: family as u32,
        addr,
    };
    let Some(pod) = kernel::pod_entry(&PODS_BY_IP, &key) else {
        // Only captured namespaces run this program: an address nobody listed is no way around.
        count(stat::INBOUND_UNLISTED_DROPPED);
        return SK_DROP;
    };
    let slot = pod.slot;
    // The pod talking to its own address: the proxy's delivery to the app, or the app itself.
    // (Such packets look like they came in on the pod's interface: the route's device.)
    if is_own_ip(slot, family, remote) {
        return SK_PASS;
    }
    let from = IpKey {
        family: family as u32,
        addr: remote,
    };
    if HOST_ADDRS.get_ptr(&from).is_some() {
        count(stat::INBOUND_HOST_EXEMPT);
        return SK_PASS;
    }
    let port = local_port as u16;
    if excluded(slot, port, DIRECTION_INBOUND) {
        count(stat::INBOUND_EXCLUDED);
        return SK_PASS;
    }
    let index = socket_index(slot, port == HBONE_PORT, family == AF_INET6);
    match PROXY_SOCKETS.redirect_sk_lookup(&ctx, index, BPF_SK_LOOKUP_F_NO_REUSEPORT as u64) {
        Ok(()) => {
            count(stat::INBOUND_REDIRECTED);
            SK_PASS
        }
        Err(_) => {
            count(stat::INBOUND_FAIL_CLOSED);
            if log_enabled() {
                debug!(&ctx, "sk_lookup: pod slot {} has no proxy socket, dropping", slot);
            }
            SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
