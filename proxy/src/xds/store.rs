//! The client's copy of the control plane's resources: name → decoded resource and version, per
//! type. Each resource of a response is accepted or rejected on its own, as ztunnel does: the good
//! ones apply, a bad one keeps its previous value and version (so a resumed stream does not claim
//! it, and the server sends it again).
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use envoy_types::pb::envoy::{
    config::{cluster::v3 as cv3, endpoint::v3 as ev3, listener::v3 as lv3, route::v3 as rv3},
    service::discovery::v3::Resource,
};
use prost::Message;

use super::convert::{self, Address};
use crate::{
    authz::{Policy, PolicyStore},
    cluster::{Cluster, LoadAssignment},
    l7::L7Config,
    listener::{Listener, OutboundPorts},
    route::RouteTable,
    service::ServiceIndex,
    workload::WorkloadIndex,
};

/// `istio.workload.Address`: workloads and services, named `uid` / `namespace/hostname` by istiod.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// `istio.security.Authorization`, named `namespace/name`.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// Envoy's `RouteConfiguration`, named after the port for Istio's outbound ones (`"9080"`).
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Envoy's `Cluster`, named `outbound|<port>|<subset>|<fqdn>` by Istio.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Envoy's `ClusterLoadAssignment`, named after its cluster (the EDS service name).
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Envoy's `Listener`, named `<ip>_<port>` / `virtualOutbound` / `virtualInbound` by Istio
/// (sidecar streams only: the node stream has no listeners).
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// The types nodeway subscribes to, in subscription order: clusters before their endpoints and
/// routes, as Envoy asks for them (CDS, EDS, RDS).
pub const TYPES: [&str; 5] = [
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    ROUTE_TYPE,
];

/// An Envoy resource as received (for `/config_dump`, printed back in Envoy's JSON) and as
/// compiled into the model.
#[derive(Debug)]
pub struct Compiled<R, T> {
    pub raw: R,
    pub value: Arc<T>,
}

/// Decodes one Envoy resource and compiles it; the error names the field path and why.
fn compiled<R: Message + Default, T, E: std::fmt::Display>(
    bytes: &[u8],
    what: &str,
    compile: impl Fn(&R) -> Result<T, E>,
) -> Result<Arc<Compiled<R, T>>, String> {
    let raw = R::decode(bytes).map_err(|e| format!("not an {what}: {e}"))?;
    let value = Arc::new(compile(&raw).map_err(|e| e.to_string())?);
    Ok(Arc::new(Compiled { raw, value }))
}

type RouteEntry = Arc<Compiled<rv3::RouteConfiguration, RouteTable>>;
type ClusterEntry = Arc<Compiled<cv3::Cluster, Cluster>>;
type AssignmentEntry = Arc<Compiled<ev3::ClusterLoadAssignment, LoadAssignment>>;
/// `None`: not an outbound listener (inbound, internal, the catch-all): kept, not in the table.
type ListenerEntry = Arc<Compiled<lv3::Listener, Option<Arc<Listener>>>>;

#[derive(Clone, Debug)]
pub struct Entry<T> {
    pub version: String,
    pub value: T,
}

/// One resource that could not be applied, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

#[derive(Debug, Default)]
pub struct Store {
    pub addresses: BTreeMap<String, Entry<Address>>,
    pub authorizations: BTreeMap<String, Entry<Arc<Policy>>>,
    pub routes: BTreeMap<String, Entry<RouteEntry>>,
    pub clusters: BTreeMap<String, Entry<ClusterEntry>>,
    pub assignments: BTreeMap<String, Entry<AssignmentEntry>>,
    pub listeners: BTreeMap<String, Entry<ListenerEntry>>,
    /// The compiled routes, clusters and assignments, kept in step like the indexes.
    l7: L7Config,
    /// Kept in step with `addresses`, change by change (persistent maps: snapshots are O(1)).
    workloads: WorkloadIndex,
    services: ServiceIndex,
}

impl Store {
    /// Applies every good resource and every removal of a response; returns the bad resources
    /// (each kept at its previous value), empty when all applied.
    pub fn apply(&mut self, type_url: &str, resources: &[Resource], removed: &[String]) -> Vec<Rejected> {
        match type_url {
            ADDRESS_TYPE => {
                let (changes, rejected) = update(&mut self.addresses, type_url, resources, removed, convert::address);
                // Out with every replaced or removed entry first, then in with the new ones, so a
                // response that moves an IP from one workload to another ends with the new owner.
                for old in changes.iter().filter_map(|(old, _)| old.as_ref()) {
                    match old {
                        Address::Workload(w) => self.workloads.remove(w),
                        Address::Service(s) => self.services.remove(s),
                    }
                }
                for new in changes.into_iter().filter_map(|(_, new)| new) {
                    match new {
                        Address::Workload(w) => self.workloads.insert(w),
                        Address::Service(s) => self.services.insert(s),
                    }
                }
                rejected
            }
            AUTHORIZATION_TYPE => {
                update(
                    &mut self.authorizations,
                    type_url,
                    resources,
                    removed,
                    convert::authorization,
                )
                .1
            }
            ROUTE_TYPE => {
                let (_, rejected) = update(&mut self.routes, type_url, resources, removed, |b| {
                    compiled(
                        b,
                        "envoy.config.route.v3.RouteConfiguration",
                        crate::route::route_configuration,
                    )
                });
                sync(&mut self.l7.routes, &self.routes, resources, removed);
                rejected
            }
            CLUSTER_TYPE => {
                let (_, rejected) = update(&mut self.clusters, type_url, resources, removed, |b| {
                    compiled(b, "envoy.config.cluster.v3.Cluster", crate::cluster::cluster)
                });
                sync(&mut self.l7.clusters, &self.clusters, resources, removed);
                rejected
            }
            ENDPOINT_TYPE => {
                let (_, rejected) = update(&mut self.assignments, type_url, resources, removed, |b| {
                    compiled(
                        b,
                        "envoy.config.endpoint.v3.ClusterLoadAssignment",
                        crate::cluster::load_assignment,
                    )
                });
                sync(&mut self.l7.assignments, &self.assignments, resources, removed);
                rejected
            }
            LISTENER_TYPE => self.apply_listeners(resources, removed),
            other => vec![Rejected {
                name: "*".to_string(),
                reason: format!("unsupported resource type {other:?}"),
            }],
        }
    }

    /// Listeners are compiled one by one, then into one table; one whose address another has
    /// already is refused (Envoy's duplicate address) and keeps its previous value.
    fn apply_listeners(&mut self, resources: &[Resource], removed: &[String]) -> Vec<Rejected> {
        let before = self.listeners.clone();
        let (_, mut rejected) = update(&mut self.listeners, LISTENER_TYPE, resources, removed, |b| {
            compiled(b, "envoy.config.listener.v3.Listener", |l: &lv3::Listener| {
                crate::listener::listener(l).map(|c| c.map(Arc::new))
            })
        });
        let table = |listeners: &BTreeMap<String, Entry<ListenerEntry>>| {
            OutboundPorts::build(
                listeners
                    .iter()
                    .filter_map(|(name, e)| Some((name.clone(), e.value.value.as_ref().clone()?))),
            )
        };
        let (mut built, refused) = table(&self.listeners);
        let received = |n: &String| resources.iter().any(|r| &r.name == n);
        let refused: Vec<(String, String)> = refused.into_iter().filter(|(n, _)| received(n)).collect();
        if !refused.is_empty() {
            for (name, _) in &refused {
                match before.get(name) {
                    Some(e) => self.listeners.insert(name.clone(), e.clone()),
                    None => self.listeners.remove(name),
                };
            }
            built = table(&self.listeners).0;
        }
        rejected.extend(refused.into_iter().map(|(name, reason)| Rejected { name, reason }));
        self.l7.listeners = Some(Arc::new(built));
        rejected
    }

    /// What to send as `initial_resource_versions` on reconnect.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        fn of<T>(m: &BTreeMap<String, Entry<T>>) -> HashMap<String, String> {
            m.iter().map(|(k, e)| (k.clone(), e.version.clone())).collect()
        }
        match type_url {
            ADDRESS_TYPE => of(&self.addresses),
            AUTHORIZATION_TYPE => of(&self.authorizations),
            ROUTE_TYPE => of(&self.routes),
            CLUSTER_TYPE => of(&self.clusters),
            ENDPOINT_TYPE => of(&self.assignments),
            LISTENER_TYPE => of(&self.listeners),
            _ => HashMap::new(),
        }
    }

    pub fn len(&self, type_url: &str) -> usize {
        match type_url {
            ADDRESS_TYPE => self.addresses.len(),
            AUTHORIZATION_TYPE => self.authorizations.len(),
            ROUTE_TYPE => self.routes.len(),
            CLUSTER_TYPE => self.clusters.len(),
            ENDPOINT_TYPE => self.assignments.len(),
            LISTENER_TYPE => self.listeners.len(),
            _ => 0,
        }
    }

    /// A snapshot of the workloads (O(1)).
    pub fn workloads(&self) -> WorkloadIndex {
        self.workloads.clone()
    }

    /// A snapshot of the services (O(1)).
    pub fn services(&self) -> ServiceIndex {
        self.services.clone()
    }

    /// A snapshot of the routes, clusters and assignments (O(1)).
    pub fn l7(&self) -> L7Config {
        self.l7.clone()
    }

    pub fn policies(&self) -> PolicyStore {
        PolicyStore::new(self.authorizations.values().map(|e| Policy::clone(&e.value)))
    }

    /// Every resource with its version, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let addresses: Vec<_> = self
            .addresses
            .iter()
            .map(|(name, e)| {
                let (kind, value) = match &e.value {
                    Address::Workload(w) => ("workload", to_json(w.as_ref())),
                    Address::Service(s) => ("service", to_json(s.as_ref())),
                };
                serde_json::json!({"name": name, "version": e.version, kind: value})
            })
            .collect();
        let authorizations: Vec<_> = self
            .authorizations
            .iter()
            .map(|(name, e)| serde_json::json!({"name": name, "version": e.version, "authorization": to_json(e.value.as_ref())}))
            .collect();
        serde_json::json!({
            ADDRESS_TYPE: addresses,
            AUTHORIZATION_TYPE: authorizations,
            CLUSTER_TYPE: envoy_dump(&self.clusters, "cluster"),
            ENDPOINT_TYPE: envoy_dump(&self.assignments, "endpointConfig"),
            ROUTE_TYPE: envoy_dump(&self.routes, "routeConfig"),
            LISTENER_TYPE: envoy_dump(&self.listeners, "listener"),
        })
    }
}

/// Envoy resources as Envoy's `/config_dump` prints them (protobuf-JSON), with their versions.
fn envoy_dump<R: Message + prost::Name, T>(
    map: &BTreeMap<String, Entry<Arc<Compiled<R, T>>>>,
    key: &str,
) -> Vec<serde_json::Value> {
    map.iter()
        .map(|(name, e)| {
            let json = crate::envoy_json::to_json(&e.value.raw)
                .unwrap_or_else(|err| serde_json::Value::String(format!("unprintable: {err}")));
            serde_json::json!({"name": name, "version": e.version, key: json})
        })
        .collect()
}

/// Brings a compiled map in line with the store's map after a response was applied.
fn sync<R, T>(
    l7: &mut imbl::OrdMap<String, Arc<T>>,
    map: &BTreeMap<String, Entry<Arc<Compiled<R, T>>>>,
    resources: &[Resource],
    removed: &[String],
) {
    for name in removed {
        l7.remove(name);
    }
    for r in resources {
        if let Some(e) = map.get(&r.name) {
            l7.insert(r.name.clone(), e.value.value.clone());
        }
    }
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_else(|e| serde_json::Value::String(format!("unserializable: {e}")))
}

/// What one response changed: (old value, new value) per name touched.
type Changes<T> = Vec<(Option<T>, Option<T>)>;

/// Applies the removals and every resource that decodes; the others are returned and keep
/// their previous entry.
fn update<T: Clone>(
    map: &mut BTreeMap<String, Entry<T>>,
    type_url: &str,
    resources: &[Resource],
    removed: &[String],
    decode: impl Fn(&[u8]) -> Result<T, String>,
) -> (Changes<T>, Vec<Rejected>) {
    let mut decoded = Vec::with_capacity(resources.len());
    let mut rejected = Vec::new();
    for r in resources {
        let reject = |reason: String| Rejected {
            name: r.name.clone(),
            reason,
        };
        let Some(any) = &r.resource else {
            rejected.push(reject("no resource body".to_string()));
            continue;
        };
        if any.type_url != type_url {
            rejected.push(reject(format!(
                "body of type {:?} in a {type_url} response",
                any.type_url
            )));
            continue;
        }
        match decode(&any.value) {
            Ok(v) => decoded.push((r.name.clone(), r.version.clone(), v)),
            Err(e) => rejected.push(reject(e)),
        }
    }
    let mut changes = Vec::with_capacity(removed.len() + decoded.len());
    for name in removed {
        if let Some(old) = map.remove(name) {
            changes.push((Some(old.value), None));
        }
    }
    for (name, version, value) in decoded {
        let old = map.insert(
            name,
            Entry {
                version,
                value: value.clone(),
            },
        );
        changes.push((old.map(|e| e.value), Some(value)));
    }
    (changes, rejected)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    use super::*;
    use crate::proto::istio::workload as wpb;

    fn res(name: &str, version: &str, ns: &str, ip: &[u8]) -> Resource {
        let body = wpb::Address {
            r#type: Some(wpb::address::Type::Workload(wpb::Workload {
                name: name.into(),
                namespace: ns.into(),
                addresses: vec![ip.to_vec()],
                ..Default::default()
            })),
        }
        .encode_to_vec();
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(Any {
                type_url: ADDRESS_TYPE.into(),
                value: body,
            }),
            ..Default::default()
        }
    }

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    fn ok(rejected: Vec<Rejected>) {
        assert!(rejected.is_empty(), "rejected: {rejected:?}");
    }

    #[test]
    fn a_bad_resource_is_rejected_alone_and_the_rest_applies() {
        let mut s = Store::default();
        ok(s.apply(
            ADDRESS_TYPE,
            &[
                res("a", "1", "demo", &[198, 18, 0, 1]),
                res("c", "1", "demo", &[198, 18, 0, 3]),
            ],
            &[],
        ));
        let err = s.apply(
            ADDRESS_TYPE,
            &[
                res("b", "2", "demo", &[198, 18, 0, 2]),
                // An update of c that cannot be converted: c keeps its previous value and version.
                res("c", "2", "demo", &[1, 2, 3]),
                res("d", "2", "", &[198, 18, 0, 4]),
            ],
            &["a".to_string()],
        );
        let names: Vec<&str> = err.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["c", "d"]);
        assert!(err[0].reason.contains("3 bytes"), "{err:?}");
        assert!(err[1].reason.contains("namespace is empty"), "{err:?}");
        assert_eq!(
            s.versions(ADDRESS_TYPE),
            HashMap::from([("b".to_string(), "2".to_string()), ("c".to_string(), "1".to_string())])
        );
        let w = s.workloads();
        assert!(w.by_ip(ip("198.18.0.1")).is_none(), "the removal applied");
        assert_eq!(w.by_ip(ip("198.18.0.2")).unwrap().name, "b", "the good update applied");
        assert_eq!(
            w.by_ip(ip("198.18.0.3")).unwrap().name,
            "c",
            "the bad one kept its old value"
        );
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn an_address_that_moves_ends_with_its_new_owner() {
        let mut s = Store::default();
        ok(s.apply(ADDRESS_TYPE, &[res("a", "1", "demo", &[198, 18, 0, 1])], &[]));
        let before = s.workloads();
        // In one response, a releases the IP and b takes it.
        ok(s.apply(
            ADDRESS_TYPE,
            &[
                res("b", "2", "demo", &[198, 18, 0, 1]),
                res("a", "2", "demo", &[198, 18, 0, 9]),
            ],
            &[],
        ));
        let w = s.workloads();
        assert_eq!(w.by_ip(ip("198.18.0.1")).unwrap().name, "b");
        assert_eq!(w.by_ip(ip("198.18.0.9")).unwrap().name, "a");
        assert_eq!(w.len(), 2);
        // A reader's older snapshot is untouched.
        assert_eq!(before.by_ip(ip("198.18.0.1")).unwrap().name, "a");
        assert_eq!(before.len(), 1);
        ok(s.apply(ADDRESS_TYPE, &[], &["b".to_string()]));
        assert!(s.workloads().by_ip(ip("198.18.0.1")).is_none());
        assert_eq!(s.workloads().len(), 1);
    }

    #[test]
    fn a_body_of_another_type_or_an_unknown_type_is_rejected() {
        let mut s = Store::default();
        let r = res("a", "1", "demo", &[198, 18, 0, 1]);
        let err = s.apply(AUTHORIZATION_TYPE, std::slice::from_ref(&r), &[]);
        assert!(err[0].reason.contains("istio.workload.Address"), "{err:?}");
        let err = s.apply(
            "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            &[r],
            &[],
        );
        assert!(err[0].reason.contains("unsupported resource type"), "{err:?}");
    }

    /// A real istiod's sidecar listeners, one resource each, as a class stream receives them.
    fn istiod_listeners() -> Vec<Resource> {
        let text = include_str!("../listener/testdata/istiod-sidecar-listeners.json");
        let items: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
        items
            .into_iter()
            .map(|v| {
                let name = v["name"].as_str().unwrap().to_string();
                envoy::<lv3::Listener>(LISTENER_TYPE, &name, "1", v)
            })
            .collect()
    }

    #[test]
    fn listeners_apply_one_by_one_and_an_address_taken_twice_is_refused_alone() {
        let mut s = Store::default();
        let all = istiod_listeners();
        ok(s.apply(LISTENER_TYPE, &all, &[]));
        let table = s.l7().listeners.expect("a listener table");
        assert!(table.listener("198.18.77.11:9080".parse().unwrap()).is_some());
        assert_eq!(
            s.len(LISTENER_TYPE),
            all.len(),
            "inbound and catch-all ones are held too"
        );
        // Another listener on 0.0.0.0:9080 is refused (Envoy's duplicate address); the rest
        // stays in force.
        let mut dup = all.iter().find(|r| r.name == "0.0.0.0_9080").unwrap().clone();
        dup.name = "copy_9080".into();
        let err = s.apply(LISTENER_TYPE, &[dup], &[]);
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].name, "copy_9080");
        assert!(err[0].reason.contains("0.0.0.0_9080"), "{err:?}");
        let table = s.l7().listeners.expect("a listener table");
        assert_eq!(
            table.listener("198.18.77.11:9080".parse().unwrap()).unwrap().name,
            "0.0.0.0_9080"
        );
        ok(s.apply(LISTENER_TYPE, &[], &["0.0.0.0_9080".to_string()]));
        assert!(s
            .l7()
            .listeners
            .unwrap()
            .listener("198.18.77.11:9080".parse().unwrap())
            .is_none());
    }

    fn envoy<M: Message + prost::Name + Default>(
        type_url: &str,
        name: &str,
        version: &str,
        json: serde_json::Value,
    ) -> Resource {
        let msg: M = crate::envoy_json::from_json(&json).unwrap();
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(Any {
                type_url: type_url.into(),
                value: msg.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    fn route(version: &str, action: serde_json::Value) -> Resource {
        envoy::<rv3::RouteConfiguration>(
            ROUTE_TYPE,
            "9080",
            version,
            serde_json::json!({"name": "9080", "virtualHosts": [{
                "name": "reviews.default.svc.cluster.local:9080",
                "domains": ["reviews.default.svc.cluster.local", "reviews"],
                "routes": [{"match": {"prefix": "/"}, "route": action}]
            }]}),
        )
    }

    #[test]
    fn envoy_resources_compile_into_the_l7_model_and_dump_as_envoy_json() {
        let mut s = Store::default();
        let cluster = "outbound|9080|v1|reviews.default.svc.cluster.local";
        ok(s.apply(ROUTE_TYPE, &[route("1", serde_json::json!({"cluster": cluster}))], &[]));
        ok(s.apply(
            CLUSTER_TYPE,
            &[envoy::<cv3::Cluster>(
                CLUSTER_TYPE,
                cluster,
                "1",
                serde_json::json!({"name": cluster, "type": "EDS", "edsClusterConfig": {"serviceName": cluster}, "connectTimeout": "1s"}),
            )],
            &[],
        ));
        ok(s.apply(
            ENDPOINT_TYPE,
            &[envoy::<ev3::ClusterLoadAssignment>(
                ENDPOINT_TYPE,
                cluster,
                "1",
                serde_json::json!({"clusterName": cluster, "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {"address": "198.18.0.7", "portValue": 9080}}}}]}]}),
            )],
            &[],
        ));
        let l7 = s.l7();
        assert_eq!(l7.routes_for_port(9080).unwrap().virtual_hosts[0].domains.len(), 2);
        let c = l7.cluster(cluster).unwrap();
        assert_eq!(l7.endpoints(c)[0].address, "198.18.0.7:9080".parse().unwrap());
        let dump = s.dump();
        assert_eq!(
            dump[ROUTE_TYPE][0]["routeConfig"]["virtualHosts"][0]["routes"][0]["route"]["cluster"],
            cluster
        );
        assert_eq!(dump[CLUSTER_TYPE][0]["cluster"]["type"], "EDS", "{dump}");
        assert_eq!(dump[ENDPOINT_TYPE][0]["version"], "1");

        // An unsupported feature: rejected by name and path, the old route stays.
        let err = s.apply(
            ROUTE_TYPE,
            &[route(
                "2",
                serde_json::json!({"cluster": "x", "hedgePolicy": {"hedgeOnPerTryTimeout": true}}),
            )],
            &[],
        );
        assert_eq!(
            err[0].to_string(),
            "9080: virtualHosts[0].routes[0].route.hedgePolicy: not supported by nodeway"
        );
        assert_eq!(s.versions(ROUTE_TYPE)["9080"], "1");
        assert!(s.l7().routes_for_port(9080).is_some());

        // Removal.
        ok(s.apply(ROUTE_TYPE, &[], &["9080".to_string()]));
        ok(s.apply(CLUSTER_TYPE, &[], &[cluster.to_string()]));
        assert!(s.l7().routes.is_empty() && s.l7().clusters.is_empty());
        assert_eq!(s.l7().assignments.len(), 1);
        assert!(l7.routes_for_port(9080).is_some(), "an older snapshot is untouched");
    }
}
