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

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.clusters.is_empty() && self.assignments.is_empty()
    }
}
