//! `STRICT_DNS` and `LOGICAL_DNS` clusters (Istio: a `ServiceEntry` with `resolution: DNS` or
//! `DNS_ROUND_ROBIN`): which hosts to resolve, and which of the answers become endpoints, as
//! Envoy chooses them. The lookups themselves run in the resolver task (a layer above); this part is pure.
use std::{net::IpAddr, net::SocketAddr, time::Duration};

use serde::Serialize;

use super::{Endpoint, Health};

/// Envoy's `dns_refresh_rate` default.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsDiscovery {
    pub mode: DnsMode,
    /// Re-resolution period (`dnsRefreshRate`, 5 s by default). A failed lookup keeps the last
    /// answer, as Envoy does.
    pub refresh_rate: Duration,
    pub family: Family,
    /// The load assignment's hosts, in order.
    pub targets: Vec<DnsTarget>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DnsMode {
    /// Every address of every host is an endpoint.
    Strict,
    /// One host (Envoy refuses more); its first address is the endpoint.
    Logical,
}

/// `dnsLookupFamily`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Family {
    /// IPv6 addresses if there are any, else IPv4 (Envoy's default).
    Auto,
    V4Only,
    V6Only,
    /// IPv4 addresses if there are any, else IPv6.
    V4Preferred,
    /// Both.
    All,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsTarget {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub priority: u32,
    pub health: Health,
}

impl Family {
    /// The answers Envoy keeps of `addrs` (in the resolver's order).
    pub fn select(self, addrs: &[IpAddr]) -> Vec<IpAddr> {
        let v4: Vec<IpAddr> = addrs.iter().copied().filter(IpAddr::is_ipv4).collect();
        let v6: Vec<IpAddr> = addrs.iter().copied().filter(IpAddr::is_ipv6).collect();
        let prefer = |a: Vec<IpAddr>, b: Vec<IpAddr>| if a.is_empty() { b } else { a };
        match self {
            Family::Auto => prefer(v6, v4),
            Family::V4Only => v4,
            Family::V6Only => v6,
            Family::V4Preferred => prefer(v4, v6),
            Family::All => addrs.to_vec(),
        }
    }
}

impl DnsDiscovery {
    /// The endpoints from each target's answer (the addresses its lookup returned), in the
    /// order of `targets`; the target's weight, priority and health carry over.
    pub fn endpoints(&self, answers: &[Vec<IpAddr>]) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for (t, addrs) in self.targets.iter().zip(answers) {
            let mut chosen = self.family.select(addrs);
            if self.mode == DnsMode::Logical {
                chosen.truncate(1);
            }
            out.extend(chosen.into_iter().map(|ip| Endpoint {
                address: SocketAddr::new(ip, t.port),
                weight: t.weight,
                priority: t.priority,
                health: t.health,
            }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn discovery(mode: DnsMode, family: Family) -> DnsDiscovery {
        DnsDiscovery {
            mode,
            refresh_rate: DEFAULT_REFRESH,
            family,
            targets: vec![DnsTarget {
                host: "api.example.test".into(),
                port: 443,
                weight: 1,
                priority: 0,
                health: Health::Healthy,
            }],
        }
    }

    #[test]
    fn strict_dns_takes_every_address_logical_the_first() {
        let answer = vec![ips(&["198.18.5.1", "198.18.5.2", "2001:db8::1"])];
        let strict = discovery(DnsMode::Strict, Family::V4Only).endpoints(&answer);
        let addrs: Vec<String> = strict.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["198.18.5.1:443", "198.18.5.2:443"]);
        let logical = discovery(DnsMode::Logical, Family::V4Only).endpoints(&answer);
        assert_eq!(logical.len(), 1);
        assert_eq!(logical[0].address.to_string(), "198.18.5.1:443");
    }

    #[test]
    fn lookup_family_as_envoy() {
        let both = ips(&["198.18.5.1", "2001:db8::1"]);
        let v4 = ips(&["198.18.5.1"]);
        assert_eq!(Family::Auto.select(&both), ips(&["2001:db8::1"]));
        assert_eq!(Family::Auto.select(&v4), v4);
        assert_eq!(Family::V4Preferred.select(&both), v4);
        assert_eq!(Family::V6Only.select(&v4), Vec::<IpAddr>::new());
        assert_eq!(Family::All.select(&both), both);
    }
}
