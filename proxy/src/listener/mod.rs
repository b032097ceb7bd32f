//! Istio's outbound listeners (LDS, or the file's `listeners:`), compiled into the table that
//! says, for a connection's original destination, whether it carries HTTP (and which route table
//! serves it) or is a TCP route (`tcp_proxy` to one cluster or weighted clusters).
//!
//! A sidecar's `virtualOutbound` hands each connection to the listener bound to its original
//! destination (`<vip>_<port>`, else `0.0.0.0_<port>`), which picks one filter chain by Envoy's
//! match rules. Istio uses them in a few ways only, so only those are implemented:
//! `destinationPort`, `prefixRanges` (the destination address), `transportProtocol: raw_buffer`
//! and `applicationProtocols` `http/1.1` + `h2c` (the HTTP chain of a sniffed port, the others
//! taking the default chain). Every connection counts as `raw_buffer` (no TLS inspection).
mod convert;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

pub use convert::{listener, outbound_ports};
use serde::{Serialize, Serializer};

use crate::authz::Cidr;

/// The outbound listeners by the address they stand for.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundPorts {
    /// Every listener, by name.
    pub listeners: BTreeMap<String, Arc<Listener>>,
    #[serde(skip)]
    by_addr: BTreeMap<SocketAddr, Arc<Listener>>,
}

impl OutboundPorts {
    /// The table of `listeners` (in the order given), and those left out because another one has
    /// their address already (Envoy refuses such a listener too): (name, why).
    /// Each listener comes with its key (its xDS resource name), by which a refusal names it.
    pub fn build(listeners: impl IntoIterator<Item = (String, Arc<Listener>)>) -> (Self, Vec<(String, String)>) {
        let mut table = OutboundPorts::default();
        let mut refused = Vec::new();
        for (key, l) in listeners {
            if let Err(why) = table.insert(l) {
                refused.push((key, why));
            }
        }
        (table, refused)
    }

    /// Adds `l` under each of its addresses; `Err` names the listener that has one already.
    fn insert(&mut self, l: impl Into<Arc<Listener>>) -> Result<(), String> {
        let l: Arc<Listener> = l.into();
        for a in &l.addresses {
            if let Some(other) = self.by_addr.get(a) {
                return Err(format!("address {a} is listener {:?}'s already", other.name));
            }
        }
        for a in &l.addresses {
            self.by_addr.insert(*a, l.clone());
        }
        self.listeners.insert(l.name.clone(), l);
        Ok(())
    }

    /// The listener Envoy's original-destination hand-off picks for `dst`: the one bound to
    /// that address, else the wildcard one of its family on the port. `None`: no listener,
    /// the catch-all (`virtualOutbound`) applies.
    pub fn listener(&self, dst: SocketAddr) -> Option<&Arc<Listener>> {
        let any: IpAddr = match dst.ip() {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        self.by_addr
            .get(&dst)
            .or_else(|| self.by_addr.get(&SocketAddr::new(any, dst.port())))
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }
}

/// One outbound listener: its filter chains and the default chain.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    /// `address` and `additionalAddresses`.
    pub addresses: Vec<SocketAddr>,
    pub chains: Vec<Chain>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_chain: Option<Chain>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Chain {
    pub name: String,
    pub matcher: ChainMatch,
    pub action: ChainAction,
}

/// The part of Envoy's `FilterChainMatch` Istio's outbound listeners use.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "cidrs")]
    pub prefix_ranges: Vec<Cidr>,
    /// `transportProtocol: raw_buffer` (which every connection is, here).
    pub raw_buffer: bool,
    /// Sniffed HTTP (`http/1.1` and `h2c`, maybe `http/1.0`); empty: any bytes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub application_protocols: Vec<String>,
}

fn cidrs<S: Serializer>(v: &[Cidr], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|c| format!("{}/{}", c.addr, c.len)))
}

/// What a chain does with the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ChainAction {
    /// An HTTP connection manager: requests are routed by the route table of this name (RDS).
    Http { route_config: String },
    /// `tcp_proxy`: the bytes go to one of these clusters.
    Tcp(TcpRoute),
}

/// `tcp_proxy`'s `cluster` (one entry, weight 1) or `weighted_clusters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    pub clusters: Vec<WeightedCluster>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
}

impl TcpRoute {
    /// The cluster for a connection, by weight (Envoy: a random number modulo the total).
    /// `None` only when every weight is 0.
    pub fn pick(&self, random: u64) -> Option<&str> {
        by_weight(&self.clusters, |c| c.weight, random).map(|c| c.name.as_str())
    }
}

/// One of `items` by weight, as Envoy's weighted clusters and ztunnel's weighted waypoints
/// pick: `random` modulo the total weight, walking the list. `None` when every weight is 0.
pub fn by_weight<T>(items: &[T], weight: impl Fn(&T) -> u32, random: u64) -> Option<&T> {
    let total: u64 = items.iter().map(|x| u64::from(weight(x))).sum();
    if total == 0 {
        return None;
    }
    let mut at = random % total;
    items.iter().find(|x| {
        let w = u64::from(weight(x));
        if at < w {
            return true;
        }
        at -= w;
        false
    })
}

/// What a listener does with a connection to `dst`, before its first bytes are seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection<'a> {
    /// No chain matches: Envoy closes the connection.
    None,
    /// The same chain whatever the bytes.
    Always(&'a ChainAction),
    /// HTTP bytes take `http` (an HTTP connection manager), others `other` (`None`: closed).
    Sniff {
        http: &'a str,
        other: Option<&'a ChainAction>,
    },
}

impl Listener {
    /// The chain for a connection to `dst` whose sniffed application protocol is `alpn`
    /// (`None`: not HTTP), by Envoy's rule: at each criterion in turn (destination port,
    /// destination address, application protocol) only the chains that match it most
    /// specifically stay; when none stay, the default chain.
    pub fn chain(&self, dst: SocketAddr, alpn: Option<&str>) -> Option<&Chain> {
        let all: Vec<&Chain> = self.chains.iter().collect();
        let port = narrow(all, |m| match m.destination_port {
            Some(p) if p == dst.port() => Some(1),
            Some(_) => None,
            None => Some(0),
        });
        let ip = narrow(port, |m| {
            if m.prefix_ranges.is_empty() {
                return Some(0);
            }
            let best = m
                .prefix_ranges
                .iter()
                .filter(|c| c.contains(dst.ip()))
                .map(|c| c.len)
                .max()?;
            Some(u32::from(best) + 1)
        });
        let transport = narrow(ip, |m| Some(u32::from(m.raw_buffer)));
        let app = narrow(transport, |m| match (&m.application_protocols[..], alpn) {
            ([], _) => Some(0),
            (list, Some(a)) if list.iter().any(|p| p == a) => Some(1),
            _ => None,
        });
        app.first().copied().or(self.default_chain.as_ref())
    }

    /// [`Listener::chain`] for HTTP and for other bytes, as the plan needs it.
    pub fn select(&self, dst: SocketAddr) -> Selection<'_> {
        let http = self.chain(dst, Some("http/1.1"));
        let other = self.chain(dst, None);
        match (http, other) {
            (None, None) => Selection::None,
            (Some(h), Some(o)) if std::ptr::eq(h, o) => Selection::Always(&h.action),
            (Some(h), other) => match &h.action {
                ChainAction::Http { route_config } => Selection::Sniff {
                    http: route_config,
                    other: other.map(|o| &o.action),
                },
                // The converter lets only HTTP chains match on application protocols.
                tcp => Selection::Always(tcp),
            },
            (None, Some(o)) => Selection::Always(&o.action),
        }
    }
}

/// The chains whose `rank` (how specifically they match; `None`: not at all) is the highest.
fn narrow(chains: Vec<&Chain>, rank: impl Fn(&ChainMatch) -> Option<u32>) -> Vec<&Chain> {
    let ranked: Vec<(u32, &Chain)> = chains
        .into_iter()
        .filter_map(|c| rank(&c.matcher).map(|r| (r, c)))
        .collect();
    let Some(best) = ranked.iter().map(|(r, _)| *r).max() else {
        return Vec::new();
    };
    ranked.into_iter().filter(|(r, _)| *r == best).map(|(_, c)| c).collect()
}
