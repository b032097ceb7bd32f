//! The L7 part of the model: route tables, clusters and load assignments, as one snapshot that the
//! data path reads and a config source (xDS or the local file) replaces whole.
use std::sync::Arc;

use imbl::OrdMap;

use crate::{
    cluster::{Cluster, Discovery, Endpoint, LoadAssignment},
    listener::OutboundPorts,
    route::RouteTable,
};

/// Persistent maps: a snapshot is an O(1) clone and one resource changes in O(log n).
#[derive(Debug, Default, Clone)]
pub struct L7Config {
    pub routes: OrdMap<String, Arc<RouteTable>>,
    pub clusters: OrdMap<String, Arc<Cluster>>,
    /// `ClusterLoadAssignment`s by name (Istio: the cluster's name).
    pub assignments: OrdMap<String, Arc<LoadAssignment>>,
    /// The endpoints of `STRICT_DNS`/`LOGICAL_DNS` clusters by cluster name, as last resolved
    /// (the resolver task); kept across config pushes for clusters whose hosts did not change.
    pub resolved: OrdMap<String, Arc<Resolved>>,
    /// The outbound listeners, when configured: they, not the route tables' names, say which
    /// destinations carry HTTP and which are TCP routes. `None`: a port with a route table
    /// named after it carries HTTP (the config before listeners were applied).
    pub listeners: Option<Arc<OutboundPorts>>,
}

/// A DNS cluster's endpoints and the discovery they were resolved for.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved {
    pub discovery: crate::cluster::dns::DnsDiscovery,
    pub endpoints: Vec<Endpoint>,
}

impl L7Config {
    /// The route table for outbound traffic to `port`: Istio names a sidecar's outbound
    /// `RouteConfiguration` after the port (`"9080"`). A port with a table carries HTTP.
    pub fn routes_for_port(&self, port: u16) -> Option<&Arc<RouteTable>> {
        if self.routes.is_empty() {
            return None;
        }
        self.routes.get(port.to_string().as_str())
    }

    /// How outbound connections to `dst` are served, by the listeners when there are some,
    /// else by the route table named after the port.
    pub fn outbound(&self, dst: std::net::SocketAddr) -> Outbound<'_> {
        let Some(listeners) = &self.listeners else {
            return match self.routes_for_port(dst.port()) {
                Some(t) => Outbound::Http { route_config: &t.name },
                None => Outbound::Unrouted,
            };
        };
        match listeners.listener(dst) {
            Some(l) => Outbound::Listener(l.select(dst)),
            None => Outbound::Unrouted,
        }
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    /// A cluster's endpoints: inline for STATIC, else its EDS assignment (inline
    /// `load_assignment` of an EDS cluster is the fallback until EDS arrives, as in Envoy).
    pub fn endpoints<'a>(&'a self, cluster: &'a Cluster) -> &'a [Endpoint] {
        let inline = cluster.load_assignment.as_ref().map_or(&[][..], |a| &a.endpoints[..]);
        match &cluster.discovery {
            Discovery::Eds { service_name } => self
                .assignments
                .get(service_name.as_str())
                .map_or(inline, |a| &a.endpoints[..]),
            Discovery::Dns(_) => self
                .resolved
                .get(cluster.name.as_str())
                .map_or(&[][..], |r| &r.endpoints[..]),
            Discovery::Static | Discovery::OriginalDst => inline,
        }
    }

    /// Takes over `old`'s resolved DNS endpoints for the clusters of `self` that still resolve
    /// the same hosts the same way (a push does not drop a DNS cluster's endpoints).
    pub fn keep_resolved(&mut self, old: &L7Config) {
        for (name, r) in old.resolved.iter() {
            let same = self
                .clusters
                .get(name.as_str())
                .is_some_and(|c| matches!(&c.discovery, Discovery::Dns(d) if *d == r.discovery));
            if same && !self.resolved.contains_key(name.as_str()) {
                self.resolved.insert(name.clone(), r.clone());
            }
        }
    }

    /// The model as JSON, for `/config_dump`: route tables, clusters with their endpoints, and
    /// the load assignments by name.
    pub fn to_json(&self) -> serde_json::Value {
        let v = |x: &dyn erased::Ser| x.value();
        serde_json::json!({
            "routes": self.routes.values().map(|r| v(r.as_ref())).collect::<Vec<_>>(),
            "clusters": self.clusters.values().map(|c| {
                let mut j = v(c.as_ref());
                j["endpoints"] = serde_json::to_value(self.endpoints(c)).unwrap_or_default();
                j
            }).collect::<Vec<_>>(),
            "assignments": self.assignments.values().map(|a| v(a.as_ref())).collect::<Vec<_>>(),
            "listeners": self.listeners.as_ref().map(|l| v(l.as_ref())),
        })
    }

    /// Builds the model from Envoy resources in protobuf-JSON (the local config file's
    /// `routes:`, `clusters:` and `endpoints:`). An error names the list, the index, the
    /// resource's name and the field: `routes[0] ("9080"): virtualHosts[0]...: why`.
    pub fn from_json(
        routes: &[serde_json::Value],
        clusters: &[serde_json::Value],
        endpoints: &[serde_json::Value],
    ) -> Result<L7Config, String> {
        use envoy_types::pb::envoy::config::{cluster::v3 as cv3, route::v3 as rv3};

        use crate::envoy_json::from_json;
        fn each<M: prost::Message + prost::Name + Default, T, E: std::fmt::Display>(
            key: &str,
            name_field: &str,
            items: &[serde_json::Value],
            compile: impl Fn(&M) -> Result<T, E>,
            name_of: impl Fn(&M) -> String,
        ) -> Result<OrdMap<String, Arc<T>>, String> {
            let mut out = OrdMap::new();
            for (i, v) in items.iter().enumerate() {
                let at = match v.get(name_field).and_then(serde_json::Value::as_str) {
                    Some(n) => format!("{key}[{i}] ({n:?})"),
                    None => format!("{key}[{i}]"),
                };
                let msg: M = from_json(v).map_err(|e| format!("{at}: {e}"))?;
                let value = compile(&msg).map_err(|e| format!("{at}: {e}"))?;
                let name = name_of(&msg);
                if name.is_empty() {
                    return Err(format!("{at}: {name_field} is empty"));
                }
                if out.insert(name, Arc::new(value)).is_some() {
                    return Err(format!("{at}: listed twice"));
                }
            }
            Ok(out)
        }
        Ok(L7Config {
            routes: each::<rv3::RouteConfiguration, _, _>(
                "routes",
                "name",
                routes,
                crate::route::route_configuration,
                |m| m.name.clone(),
            )?,
            clusters: each::<cv3::Cluster, _, _>("clusters", "name", clusters, crate::cluster::cluster, |m| {
                m.name.clone()
            })?,
            assignments: assignments(endpoints)?,
            resolved: OrdMap::new(),
            listeners: None,
        })
    }

    /// Compiles Envoy `Listener`s in protobuf-JSON (the file's `listeners:`, as `istioctl
    /// proxy-config listeners -o json` prints them) into the outbound table
    /// ([`crate::listener`]); none given: `None`, the route tables' names decide.
    pub fn listeners_from_json(items: &[serde_json::Value]) -> Result<Option<Arc<OutboundPorts>>, String> {
        use envoy_types::pb::envoy::config::listener::v3::Listener;
        if items.is_empty() {
            return Ok(None);
        }
        let mut parsed = Vec::with_capacity(items.len());
        for (i, v) in items.iter().enumerate() {
            let at = match v.get("name").and_then(serde_json::Value::as_str) {
                Some(n) => format!("listeners[{i}] ({n:?})"),
                None => format!("listeners[{i}]"),
            };
            let l: Listener = crate::envoy_json::from_json(v).map_err(|e| format!("{at}: {e}"))?;
            parsed.push(l);
        }
        let table = crate::listener::outbound_ports(&parsed).map_err(|e| e.to_string())?;
        Ok(Some(Arc::new(table)))
    }

    /// [`L7Config::listeners_from_json`], for the result only.
    pub fn check_listeners(items: &[serde_json::Value]) -> Result<(), String> {
        Self::listeners_from_json(items).map(drop)
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.clusters.is_empty() && self.assignments.is_empty() && self.listeners.is_none()
    }
}

/// What the L7 config says of an outbound destination ([`L7Config::outbound`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound<'a> {
    /// No listener (or no route table) for it: L4 as the mesh view decides.
    Unrouted,
    /// A route table serves it (no listeners configured: the table named after the port).
    Http { route_config: &'a str },
    /// Its listener's filter chains decide.
    Listener(crate::listener::Selection<'a>),
}

impl Outbound<'_> {
    /// Whether HTTP sent there is served by the router.
    pub fn is_http(&self) -> bool {
        use crate::listener::{ChainAction, Selection};
        matches!(
            self,
            Outbound::Http { .. }
                | Outbound::Listener(Selection::Always(ChainAction::Http { .. }) | Selection::Sniff { .. })
        )
    }
}

/// The file's `endpoints:`: each a `ClusterLoadAssignment` (`clusterName`, `endpoints`), or
/// what `istioctl proxy-config endpoint -o json` prints, Envoy's admin `ClusterStatus` (`name`,
/// `hostStatuses`), taken as the assignment of that cluster.
fn assignments(items: &[serde_json::Value]) -> Result<OrdMap<String, Arc<LoadAssignment>>, String> {
    use envoy_types::pb::envoy::{admin::v3::ClusterStatus, config::endpoint::v3::ClusterLoadAssignment};

    use crate::envoy_json::from_json;
    let mut out = OrdMap::new();
    for (i, v) in items.iter().enumerate() {
        let name_of = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
        let (at, compiled) = if let Some(n) = name_of("clusterName").or_else(|| name_of("cluster_name")) {
            let at = format!("endpoints[{i}] ({n:?})");
            let m: ClusterLoadAssignment = from_json(v).map_err(|e| format!("{at}: {e}"))?;
            (at, crate::cluster::load_assignment(&m))
        } else if v.get("hostStatuses").is_some() || v.get("host_statuses").is_some() || name_of("name").is_some() {
            let at = format!("endpoints[{i}] ({:?})", name_of("name").unwrap_or_default());
            let m: ClusterStatus = from_json(v).map_err(|e| format!("{at}: {e} (read as istioctl's ClusterStatus)"))?;
            (at, crate::cluster::cluster_status(&m))
        } else {
            return Err(format!(
                "endpoints[{i}]: neither a ClusterLoadAssignment (clusterName, endpoints) nor what \
                 `istioctl proxy-config endpoint -o json` prints (name, hostStatuses)"
            ));
        };
        let value = compiled.map_err(|e| format!("{at}: {e}"))?;
        if value.cluster_name.is_empty() {
            return Err(format!("{at}: clusterName is empty"));
        }
        if out.insert(value.cluster_name.clone(), Arc::new(value)).is_some() {
            return Err(format!("{at}: listed twice"));
        }
    }
    Ok(out)
}

mod erased {
    pub trait Ser {
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or_else(|e| serde_json::Value::String(format!("unserializable: {e}")))
        }
    }
}

/// What users paste from `istioctl proxy-config` (endpoints, listeners) into the file's L7 keys.
#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::cluster::Health;

    /// What `istioctl proxy-config endpoint -o json` prints: Envoy's admin `ClusterStatus`.
    fn cluster_status_json() -> Value {
        json!({
            "name": "outbound|8080|v1|reviews.demo.svc.cluster.local",
            "addedViaApi": true,
            "circuitBreakers": {"thresholds": [{"maxConnections": 4294967295u32, "maxPendingRequests": 4294967295u32,
                "maxRequests": 4294967295u32, "maxRetries": 4294967295u32}]},
            "observabilityName": "outbound|8080|v1|reviews.demo.svc.cluster.local",
            "edsServiceName": "outbound|8080|v1|reviews.demo.svc.cluster.local",
            "hostStatuses": [
                {"address": {"socketAddress": {"address": "198.18.1.10", "portValue": 8080}},
                 "stats": [{"name": "cx_connect_fail"}, {"value": "3", "name": "cx_total"}, {"type": "GAUGE", "name": "sub_zone"}],
                 "healthStatus": {"edsHealthStatus": "HEALTHY"}, "weight": 1, "locality": {}},
                {"address": {"socketAddress": {"address": "198.18.1.11", "portValue": 8080}},
                 "healthStatus": {"failedOutlierCheck": true, "edsHealthStatus": "HEALTHY"}, "weight": 3, "locality": {}},
                {"address": {"socketAddress": {"address": "198.18.1.12", "portValue": 8080}},
                 "healthStatus": {"edsHealthStatus": "UNHEALTHY"}, "weight": 1, "priority": 1, "locality": {}}
            ]
        })
    }

    #[test]
    fn istioctl_endpoint_output_is_taken_as_the_clusters_endpoints() {
        let l7 = L7Config::from_json(&[], &[], &[cluster_status_json()]).expect("ClusterStatus accepted");
        let a = &l7.assignments["outbound|8080|v1|reviews.demo.svc.cluster.local"];
        let got: Vec<(String, u32, u32, Health)> = a
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.weight, e.priority, e.health))
            .collect();
        assert_eq!(
            got,
            [
                ("198.18.1.10:8080".to_string(), 1, 0, Health::Healthy),
                // An ejection is Envoy's runtime state: nodeway's own detection starts afresh.
                ("198.18.1.11:8080".to_string(), 3, 0, Health::Healthy),
                ("198.18.1.12:8080".to_string(), 1, 1, Health::Unhealthy),
            ]
        );
        let e = L7Config::from_json(&[], &[], &[json!({"endpoints": []})]).expect_err("neither form");
        assert!(
            e.contains("ClusterLoadAssignment") && e.contains("istioctl proxy-config endpoint"),
            "{e}"
        );
    }

    #[test]
    fn pasted_listeners_are_checked() {
        let listener = json!({
            "name": "0.0.0.0_9080",
            "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 9080}},
            "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "statPrefix": "outbound_0.0.0.0_9080",
                "rds": {"configSource": {"ads": {}, "initialFetchTimeout": "0s", "resourceApiVersion": "V3"}, "routeConfigName": "9080"},
                "httpFilters": [
                    {"name": "istio.metadata_exchange", "typedConfig": {"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                        "typeUrl": "type.googleapis.com/io.istio.http.peer_metadata.Config", "value": {"upstream_discovery": [{"istio_headers": {}}]}}},
                    {"name": "istio.alpn", "typedConfig": {"@type": "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
                        "alpnOverride": [{"alpnOverride": ["istio-http/1.0", "istio", "http/1.0"]}, {"upstreamProtocol": "HTTP11", "alpnOverride": ["istio-http/1.1", "istio", "http/1.1"]}]}},
                    {"name": "envoy.filters.http.fault", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                    {"name": "envoy.filters.http.cors", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
                    {"name": "envoy.filters.http.router", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                ],
                "requestIdExtension": {"typedConfig": {"@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig", "useRequestIdForTraceSampling": true}}
            }}]}]
        });
        L7Config::check_listeners(std::slice::from_ref(&listener)).expect("what istioctl prints for a sidecar");
        let mut bad = listener.clone();
        bad["filterChains"][0]["filters"][0]["typedConfig"]["hedging"] = json!(true);
        let e = L7Config::check_listeners(&[bad]).expect_err("unknown field");
        assert!(
            e.starts_with("listeners[0] (\"0.0.0.0_9080\")") && e.contains("hedging"),
            "{e}"
        );

        // The file's listeners name the refused one; two on one address are refused.
        let mut again = listener.clone();
        again["name"] = json!("0.0.0.0_9080_again");
        let e = L7Config::listeners_from_json(&[listener.clone(), again]).expect_err("same address");
        assert!(
            e.starts_with(
                r#"listeners[1] ("0.0.0.0_9080_again"): address: address 0.0.0.0:9080 is listener "0.0.0.0_9080"'s"#
            ),
            "{e}"
        );
        let mut tls = listener.clone();
        tls["filterChains"][0]["filterChainMatch"] = json!({"transportProtocol": "tls"});
        let e = L7Config::listeners_from_json(&[tls]).expect_err("tls");
        assert!(
            e.starts_with(
                r#"listeners[0] ("0.0.0.0_9080"): filterChains[0].filterChainMatch.transportProtocol: "tls""#
            ),
            "{e}"
        );
        let t = L7Config::listeners_from_json(&[listener])
            .expect("accepted")
            .expect("some");
        assert_eq!(t.listeners.len(), 1);
        assert!(L7Config::listeners_from_json(&[]).expect("none").is_none());
    }
}
