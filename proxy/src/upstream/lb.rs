//! Load-balancing algorithms over a candidate set of hosts (already filtered for priority, health
//! and ejection by the caller). Kept free of cluster state so they can be tested alone.
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicI64, Ordering},
};

/// Envoy's defaults for `ring_hash_lb_config`.
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;
pub const DEFAULT_MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's default Maglev table size (a prime).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;

/// One host as the algorithms see it: its index in the cluster's host list, address and weight.
#[derive(Debug, Clone, Copy)]
pub struct Weighted {
    pub index: usize,
    pub address: SocketAddr,
    pub weight: u32,
}

/// Weighted random choice; `None` only for an empty set.
pub fn random(hosts: &[Weighted]) -> Option<usize> {
    let total: u64 = hosts.iter().map(|h| u64::from(h.weight.max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(0..total);
    for h in hosts {
        let w = u64::from(h.weight.max(1));
        if r < w {
            return Some(h.index);
        }
        r -= w;
    }
    hosts.last().map(|h| h.index)
}

/// Smooth weighted round robin (nginx): every host's current weight grows by its weight, the
/// largest wins and pays back the total. Spreads a weight-3 host as A B A C A, not A A A B C.
/// `current(i)` is the per-host running weight; the caller serialises calls.
pub fn smooth_round_robin<'a>(hosts: &[Weighted], current: impl Fn(usize) -> &'a AtomicI64) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<(usize, i64)> = None;
    for h in hosts {
        let w = i64::from(h.weight.max(1));
        total += w;
        let cw = current(h.index).fetch_add(w, Ordering::Relaxed) + w;
        if best.is_none_or(|(_, b)| cw > b) {
            best = Some((h.index, cw));
        }
    }
    let (index, _) = best?;
    current(index).fetch_sub(total, Ordering::Relaxed);
    Some(index)
}

/// Power of `choice_count` choices: sample that many hosts (by weight) and keep the one with the
/// fewest active requests relative to its weight.
pub fn least_request(hosts: &[Weighted], choice_count: u32, active: impl Fn(usize) -> u32) -> Option<usize> {
    if hosts.len() == 1 {
        return hosts.first().map(|h| h.index);
    }
    let weight_of = |i: usize| hosts.iter().find(|h| h.index == i).map_or(1, |h| h.weight.max(1));
    let mut best: Option<(usize, f64)> = None;
    for _ in 0..choice_count.max(2) {
        let i = random(hosts)?;
        let load = f64::from(active(i)) / f64::from(weight_of(i));
        if best.is_none_or(|(_, b)| load < b) {
            best = Some((i, load));
        }
    }
    best.map(|(i, _)| i)
}

/// A ketama ring: sorted (hash, host index) points.
#[derive(Debug)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// Envoy's construction: each host gets points proportional to its normalised weight, scaled so
    /// the lightest host has at least one point per `1/min_size`, capped at `max_size` points in all.
    /// Point `i` of a host hashes `"ip:port_i"` with xxHash64.
    pub fn build(hosts: &[Weighted], min_size: u64, max_size: u64) -> Ring {
        let min_size = if min_size == 0 { DEFAULT_MIN_RING_SIZE } else { min_size };
        let max_size = if max_size == 0 { DEFAULT_MAX_RING_SIZE } else { max_size }.max(min_size);
        let total: f64 = hosts.iter().map(|h| f64::from(h.weight.max(1))).sum();
        if hosts.is_empty() || total == 0.0 {
            return Ring { points: Vec::new() };
        }
        let min_norm = hosts
            .iter()
            .map(|h| f64::from(h.weight.max(1)) / total)
            .fold(f64::INFINITY, f64::min);
        let scale = ((min_norm * min_size as f64).ceil() / min_norm).min(max_size as f64);
        let mut points = Vec::with_capacity(scale as usize + hosts.len());
        let (mut current, mut target) = (0.0f64, 0.0f64);
        for h in hosts {
            target += scale * f64::from(h.weight.max(1)) / total;
            let mut i = 0u64;
            while current < target {
                let key = format!("{}_{i}", h.address);
                points.push((xxhash64(key.as_bytes(), 0), h.index));
                i += 1;
                current += 1.0;
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The host at the first point ≥ `hash` (wrapping); attempt `n` > 0 walks on to the n-th
    /// different host after it, so a retry lands on the key's next replica.
    pub fn get(&self, hash: u64, attempt: u32) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(h, _)| *h < hash) % self.points.len();
        let mut host = self.points[start].1;
        let mut seen = vec![host];
        let mut remaining = attempt;
        for step in 1..self.points.len() {
            if remaining == 0 {
                break;
            }
            let candidate = self.points[(start + step) % self.points.len()].1;
            if !seen.contains(&candidate) {
                seen.push(candidate);
                host = candidate;
                remaining -= 1;
            }
        }
        Some(host)
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// A Maglev lookup table (Eisenbud et al. 2016, weighted as in Envoy).
#[derive(Debug)]
pub struct Maglev {
    table: Vec<usize>,
}

impl Maglev {
    /// Hosts are sorted by address first so the table does not depend on endpoint order. A
    /// non-prime `table_size` is raised to the next prime: the permutation needs it.
    pub fn build(hosts: &[Weighted], table_size: u64) -> Maglev {
        let size = if table_size == 0 {
            DEFAULT_MAGLEV_TABLE_SIZE
        } else {
            table_size
        };
        let size = next_prime(size.max(2)) as usize;
        let mut hosts: Vec<Weighted> = hosts.to_vec();
        hosts.sort_by_key(|h| h.address);
        if hosts.is_empty() {
            return Maglev { table: Vec::new() };
        }
        struct Entry {
            index: usize,
            offset: u64,
            skip: u64,
            next: u64,
            weight: f64,
            target: f64,
        }
        let total: f64 = hosts.iter().map(|h| f64::from(h.weight.max(1))).sum();
        let m = size as u64;
        let mut entries: Vec<Entry> = hosts
            .iter()
            .map(|h| {
                let key = h.address.to_string();
                Entry {
                    index: h.index,
                    offset: xxhash64(key.as_bytes(), 0) % m,
                    skip: xxhash64(key.as_bytes(), 1) % (m - 1) + 1,
                    next: 0,
                    weight: f64::from(h.weight.max(1)) / total,
                    target: 0.0,
                }
            })
            .collect();
        let max_weight = entries.iter().map(|e| e.weight).fold(0.0, f64::max);
        let mut table: Vec<Option<usize>> = vec![None; size];
        let mut filled = 0usize;
        let mut iteration = 1u64;
        while filled < size {
            for e in entries.iter_mut() {
                // Heavier hosts take a slot on more iterations.
                if (iteration as f64) * e.weight < e.target {
                    continue;
                }
                e.target += max_weight;
                let mut c = ((e.offset + e.skip * e.next) % m) as usize;
                while table[c].is_some() {
                    e.next += 1;
                    c = ((e.offset + e.skip * e.next) % m) as usize;
                }
                table[c] = Some(e.index);
                e.next += 1;
                filled += 1;
                if filled == size {
                    break;
                }
            }
            iteration += 1;
        }
        Maglev {
            table: table.into_iter().map(|s| s.unwrap_or(0)).collect(),
        }
    }

    /// Attempt `n` > 0 rehashes, so a retry usually lands elsewhere.
    pub fn get(&self, hash: u64, attempt: u32) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let h = if attempt == 0 {
            hash
        } else {
            mix(hash ^ u64::from(attempt))
        };
        self.table.get((h % self.table.len() as u64) as usize).copied()
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

fn next_prime(mut n: u64) -> u64 {
    let is_prime = |n: u64| {
        if n < 2 {
            return false;
        }
        let mut d = 2;
        while d * d <= n {
            if n.is_multiple_of(d) {
                return false;
            }
            d += 1;
        }
        true
    };
    while !is_prime(n) {
        n += 1;
    }
    n
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn xx_round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn xx_merge(acc: u64, val: u64) -> u64 {
    (acc ^ xx_round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn read_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// xxHash64, the hash Envoy uses for ring points, Maglev permutations and hash policies; the
/// router can use it for request hashes so keys spread the same way as in Envoy.
pub fn xxhash64(data: &[u8], seed: u64) -> u64 {
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        while rest.len() >= 32 {
            for (i, lane) in v.iter_mut().enumerate() {
                *lane = xx_round(*lane, read_u64(&rest[i * 8..]));
            }
            rest = &rest[32..];
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = xx_merge(h, lane);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(data.len() as u64);
    while rest.len() >= 8 {
        h ^= xx_round(0, read_u64(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        h ^= u64::from(read_u32(rest)).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= u64::from(b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}
