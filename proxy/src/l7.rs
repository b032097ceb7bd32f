//! The L7 part of the model: route tables, clusters and load assignments, as one snapshot that the
//! data path reads and a config source (xDS or the local file) replaces whole.
use std::sync::Arc;

use imbl::OrdMap;

use crate::{
    cluster::{Cluster, Discovery, Endpoint, LoadAssignment},
    route::RouteTable,
};

/// Persistent maps: a snapshot is an O(1) clone and one resource changes in O(log n).
#[derive(Debug, Default, Clone)]
pub struct L7Config {
    pub routes: OrdMap<String, Arc<RouteTable>>,
    pub clusters: OrdMap<String, Arc<Cluster>>,
    /// `ClusterLoadAssignment`s by name (Istio: the cluster's name).
    pub assignments: OrdMap<String, Arc<LoadAssignment>>,
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
            Discovery::Static | Discovery::OriginalDst => inline,
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
        use envoy_types::pb::envoy::config::{cluster::v3 as cv3, endpoint::v3 as ev3, route::v3 as rv3};

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
            assignments: each::<ev3::ClusterLoadAssignment, _, _>(
                "endpoints",
                "clusterName",
                endpoints,
                crate::cluster::load_assignment,
                |m| m.cluster_name.clone(),
            )?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.clusters.is_empty() && self.assignments.is_empty()
    }
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
