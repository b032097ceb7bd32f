//! Resolves the hosts of `STRICT_DNS` / `LOGICAL_DNS` clusters (Istio's DNS ServiceEntries) with
//! the system resolver, at once for a new cluster and then every `dnsRefreshRate`, as Envoy
//! does; the answers become the cluster's endpoints ([`crate::l7::L7Config::resolved`]). A failed
//! lookup keeps the last answer.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use crate::{
    cluster::{dns::DnsDiscovery, Discovery},
    l7::{L7Config, Resolved},
    state::L7State,
};

/// A lookup that takes longer counts as failed (the last answer stays).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The DNS clusters of `l7` that are due at `now`: never resolved for their current hosts, or
/// resolved `refresh_rate` ago. Pure, so that the schedule is testable.
pub fn due(l7: &L7Config, last: &HashMap<String, Instant>, now: Instant) -> Vec<(String, DnsDiscovery)> {
    l7.clusters
        .values()
        .filter_map(|c| match &c.discovery {
            Discovery::Dns(d) => Some((c.name.clone(), d.clone())),
            _ => None,
        })
        .filter(|(name, d)| {
            let current = l7.resolved.get(name.as_str()).is_some_and(|r| r.discovery == *d);
            let fresh = last.get(name).is_some_and(|t| now.duration_since(*t) < d.refresh_rate);
            !(current && fresh)
        })
        .collect()
}

/// When the next cluster falls due (at the latest `cap` from `now`).
fn next_wake(l7: &L7Config, last: &HashMap<String, Instant>, now: Instant, cap: Duration) -> Duration {
    l7.clusters
        .values()
        .filter_map(|c| match &c.discovery {
            Discovery::Dns(d) => last
                .get(&c.name)
                .map(|t| (*t + d.refresh_rate).saturating_duration_since(now)),
            _ => None,
        })
        .min()
        .unwrap_or(cap)
        .min(cap)
}

async fn lookup(host: &str, port: u16) -> Option<Vec<IpAddr>> {
    let found = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host, port))).await;
    match found {
        Ok(Ok(addrs)) => Some(addrs.map(|a| a.ip()).collect()),
        Ok(Err(e)) => {
            tracing::warn!(host, error = %e, "DNS cluster: lookup failed, keeping the last answer");
            None
        }
        Err(_) => {
            tracing::warn!(host, "DNS cluster: lookup timed out, keeping the last answer");
            None
        }
    }
}

/// Resolves every target of `d`; `None` when any lookup failed (the last answer then stays).
async fn resolve(d: &DnsDiscovery) -> Option<Vec<crate::cluster::Endpoint>> {
    let mut answers = Vec::with_capacity(d.targets.len());
    for t in &d.targets {
        answers.push(lookup(&t.host, t.port).await?);
    }
    Some(d.endpoints(&answers))
}

/// Keeps DNS clusters resolved for as long as the task lives.
pub async fn run(state: Arc<L7State>) {
    let changed = Arc::new(Notify::new());
    let wake = changed.clone();
    state.on_l7_change(Box::new(move |_| wake.notify_one()));
    let mut last: HashMap<String, Instant> = HashMap::new();
    loop {
        let l7 = state.l7();
        let mut answers = Vec::new();
        for (name, d) in due(&l7, &last, Instant::now()) {
            last.insert(name.clone(), Instant::now());
            if let Some(endpoints) = resolve(&d).await {
                answers.push((
                    name,
                    Resolved {
                        discovery: d,
                        endpoints,
                    },
                ));
            }
        }
        last.retain(|name, _| l7.clusters.contains_key(name.as_str()));
        if !answers.is_empty() {
            state.update_l7(|current| apply(current, answers));
        }
        let wait = next_wake(&state.l7(), &last, Instant::now(), Duration::from_secs(60));
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// `current` with the answers for clusters that still have the discovery they were resolved
/// for; `None` when nothing changed.
fn apply(current: &L7Config, answers: Vec<(String, Resolved)>) -> Option<L7Config> {
    let mut next = current.clone();
    let mut changed = false;
    for (name, r) in answers {
        let still = current
            .clusters
            .get(name.as_str())
            .is_some_and(|c| matches!(&c.discovery, Discovery::Dns(d) if *d == r.discovery));
        let same = current.resolved.get(name.as_str()).is_some_and(|old| **old == r);
        if still && !same {
            next.resolved.insert(name, Arc::new(r));
            changed = true;
        }
    }
    changed.then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{
        dns::{DnsMode, DnsTarget, Family, DEFAULT_REFRESH},
        Cluster, Health, LbPolicy, Limits, UpstreamProtocol,
    };

    fn dns_cluster(name: &str, host: &str) -> Cluster {
        Cluster {
            name: name.into(),
            discovery: Discovery::Dns(DnsDiscovery {
                mode: DnsMode::Strict,
                refresh_rate: DEFAULT_REFRESH,
                family: Family::V4Only,
                targets: vec![DnsTarget {
                    host: host.into(),
                    port: 80,
                    weight: 1,
                    priority: 0,
                    health: Health::Healthy,
                }],
            }),
            lb_policy: LbPolicy::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            limits: Limits::default(),
            outlier_detection: None,
            load_assignment: None,
            upstream_protocol: UpstreamProtocol::Http1,
            istio_config: None,
        }
    }

    fn config(c: Cluster) -> L7Config {
        let mut l7 = L7Config::default();
        l7.clusters.insert(c.name.clone(), Arc::new(c));
        l7
    }

    #[test]
    fn new_clusters_are_due_then_again_after_the_refresh_rate() {
        let l7 = config(dns_cluster("outbound|80||ext.test", "localhost"));
        let now = Instant::now();
        let mut last = HashMap::new();
        assert_eq!(due(&l7, &last, now).len(), 1, "never resolved");
        let Discovery::Dns(d) = &l7.clusters["outbound|80||ext.test"].discovery else {
            unreachable!()
        };
        let resolved = Resolved {
            discovery: d.clone(),
            endpoints: d.endpoints(&[vec!["198.18.7.1".parse().unwrap()]]),
        };
        let l7 = apply(&l7, vec![("outbound|80||ext.test".into(), resolved)]).expect("changed");
        last.insert("outbound|80||ext.test".to_string(), now);
        assert!(due(&l7, &last, now + Duration::from_secs(1)).is_empty());
        assert_eq!(due(&l7, &last, now + DEFAULT_REFRESH).len(), 1, "refresh");
        assert_eq!(
            l7.endpoints(&l7.clusters["outbound|80||ext.test"])[0]
                .address
                .to_string(),
            "198.18.7.1:80"
        );
    }

    #[test]
    fn a_push_keeps_answers_for_unchanged_hosts_and_drops_changed_ones() {
        let c = dns_cluster("outbound|80||ext.test", "a.test");
        let Discovery::Dns(d) = &c.discovery else {
            unreachable!()
        };
        let mut old = config(dns_cluster("outbound|80||ext.test", "a.test"));
        old.resolved.insert(
            c.name.clone(),
            Arc::new(Resolved {
                discovery: d.clone(),
                endpoints: d.endpoints(&[vec!["198.18.7.1".parse().unwrap()]]),
            }),
        );
        let mut same = config(dns_cluster("outbound|80||ext.test", "a.test"));
        same.keep_resolved(&old);
        assert_eq!(same.endpoints(&same.clusters[&c.name]).len(), 1);
        let mut moved = config(dns_cluster("outbound|80||ext.test", "b.test"));
        moved.keep_resolved(&old);
        assert!(moved.endpoints(&moved.clusters[&c.name]).is_empty());
    }

    #[tokio::test]
    async fn resolves_through_the_system_resolver() {
        let state = Arc::new(L7State::default());
        state.set_l7(config(dns_cluster("outbound|80||local", "localhost")));
        let task = tokio::spawn(run(state.clone()));
        let mut found = Vec::new();
        for _ in 0..100 {
            let l7 = state.l7();
            found = l7.endpoints(&l7.clusters["outbound|80||local"]).to_vec();
            if !found.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
        assert!(
            found.iter().any(|e| e.address.to_string() == "127.0.0.1:80"),
            "{found:?}"
        );
    }
}
