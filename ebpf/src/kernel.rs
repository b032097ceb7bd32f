//! Safe access to what the kernel hands the programs: their context, helper calls, map values.
//!
//! Every `unsafe` of the crate is here, one block per reason. The arguments rest on two facts:
//! a context (`SockAddrContext`, `SkLookupContext`, ...) holds the pointer the kernel passed this
//! run of the program (aya's program macros build it; nothing in this crate does), and the
//! verifier checks every context access and helper call at load time, so a program that breaks
//! its rules never runs.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{bpf_sk_lookup, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SkLookupContext, SockAddrContext},
    EbpfContext,
};
use nodeway_ebpf_common::{OrigDst, PodEntry};

/// One load of exactly `value`, which the compiler may neither fold into a constant nor merge
/// with its neighbours: for a global user space sets at load time, and for context fields,
/// which the verifier only accepts as fixed-offset loads of their own size.
#[inline(always)]
pub fn read_once<T: Copy>(value: &T) -> T {
    // SAFETY: a reference is non-null, aligned and points to an initialised `T`.
    unsafe { read_volatile(value) }
}

/// The socket address a cgroup sock_addr program (connect, getpeername) runs for.
#[inline(always)]
pub fn sock_addr(ctx: &SockAddrContext) -> &bpf_sock_addr {
    // SAFETY: the kernel's context pointer, valid for the whole run; the borrow of `ctx` keeps
    // `sock_addr_mut` from handing out a mutable reference while this one lives.
    unsafe { &*ctx.sock_addr }
}

/// The same, to rewrite the address (connect) or to report another one (getpeername).
#[inline(always)]
pub fn sock_addr_mut(ctx: &mut SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: as in `sock_addr`; the exclusive borrow of `ctx` makes this the only reference
    // into the context while it lives.
    unsafe { &mut *ctx.sock_addr }
}

/// `SO_MARK` of the socket a sock_addr program runs for (`None` if the kernel gives no socket).
#[inline(always)]
pub fn socket_mark(ctx: &SockAddrContext) -> Option<u32> {
    // SAFETY: `sk` is the only member of this union, so reading it reads what the kernel set.
    let sk = unsafe { sock_addr(ctx).__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a non-null `sk` is the context's socket, which the verifier lets sock_addr
    // programs read `mark` of.
    Some(unsafe { (*sk).mark })
}

/// The socket lookup an sk_lookup program runs for. Read its fields with [`read_once`].
#[inline(always)]
pub fn sk_lookup(ctx: &SkLookupContext) -> &bpf_sk_lookup {
    // SAFETY: the kernel's context pointer, valid for the whole run; nothing in this crate
    // writes through it, so shared references are the only ones.
    unsafe { &*ctx.lookup }
}

/// Cookie of the network namespace of the socket the program runs for.
#[inline(always)]
pub fn netns_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper only reads the context it is given; the verifier accepts the call only
    // with this run's context, in a program type that may make it.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// Cookie of the socket the program runs for (unique while the socket lives).
#[inline(always)]
pub fn socket_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: as in `netns_cookie`.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// A copy of the pod entry under `key`.
#[inline(always)]
pub fn pod_entry<K>(map: &HashMap<K, PodEntry>, key: &K) -> Option<PodEntry> {
    // SAFETY: a lookup result points to an element that stays allocated for this run (programs
    // run under RCU). User space may rewrite it meanwhile, so the copy may be stale or mixed,
    // but `PodEntry` is plain integers: every bit pattern is a valid value.
    map.get_ptr(key).map(|p| unsafe { *p })
}

/// A copy of the original destination under `key`.
#[inline(always)]
pub fn orig_dst<K>(map: &LruHashMap<K, OrigDst>, key: &K) -> Option<OrigDst> {
    // SAFETY: as in `pod_entry`; `OrigDst` is plain integers too.
    map.get_ptr(key).map(|p| unsafe { *p })
}

/// Adds one to this CPU's counter `index` (nothing if the index is out of range).
#[inline(always)]
pub fn increment(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(p) = counters.get_ptr_mut(index) {
        // SAFETY: `p` is this CPU's slot of a live map, aligned and initialised. Only a program
        // that interrupts this one on the same CPU can write it meanwhile, and that costs at most
        // one count: an aligned 8-byte load or store does not tear.
        unsafe { *p += 1 };
    }
}
