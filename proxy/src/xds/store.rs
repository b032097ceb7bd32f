//! The client's copy of the control plane's resources: name → decoded resource and version, per
//! type. A response is applied whole or not at all.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use envoy_types::pb::envoy::service::discovery::v3::Resource;

use super::convert::{self, Address};
use crate::{
    authz::{Policy, PolicyStore},
    service::ServiceIndex,
    workload::WorkloadIndex,
};

/// `istio.workload.Address`: workloads and services, named `uid` / `namespace/hostname` by istiod.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// `istio.security.Authorization`, named `namespace/name`.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// The types nodeway subscribes to, in subscription order.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];

#[derive(Clone, Debug)]
pub struct Entry<T> {
    pub version: String,
    pub value: T,
}

/// One resource that made a response unacceptable, and why.
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
    /// Kept in step with `addresses`, change by change (persistent maps: snapshots are O(1)).
    workloads: WorkloadIndex,
    services: ServiceIndex,
}

impl Store {
    /// Checks every resource of a response, then applies all of it; with any bad resource, nothing
    /// changes and every bad one is returned.
    pub fn apply(&mut self, type_url: &str, resources: &[Resource], removed: &[String]) -> Result<(), Vec<Rejected>> {
        match type_url {
            ADDRESS_TYPE => {
                let changes = update(&mut self.addresses, type_url, resources, removed, convert::address)?;
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
                Ok(())
            }
            AUTHORIZATION_TYPE => update(
                &mut self.authorizations,
                type_url,
                resources,
                removed,
                convert::authorization,
            )
            .map(drop),
            other => Err(vec![Rejected {
                name: "*".to_string(),
                reason: format!("unsupported resource type {other:?}"),
            }]),
        }
    }

    /// What to send as `initial_resource_versions` on reconnect.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        fn of<T>(m: &BTreeMap<String, Entry<T>>) -> HashMap<String, String> {
            m.iter().map(|(k, e)| (k.clone(), e.version.clone())).collect()
        }
        match type_url {
            ADDRESS_TYPE => of(&self.addresses),
            AUTHORIZATION_TYPE => of(&self.authorizations),
            _ => HashMap::new(),
        }
    }

    pub fn len(&self, type_url: &str) -> usize {
        match type_url {
            ADDRESS_TYPE => self.addresses.len(),
            AUTHORIZATION_TYPE => self.authorizations.len(),
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
        serde_json::json!({ ADDRESS_TYPE: addresses, AUTHORIZATION_TYPE: authorizations })
    }
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_else(|e| serde_json::Value::String(format!("unserializable: {e}")))
}

/// What one response changed: (old value, new value) per name touched.
type Changes<T> = Vec<(Option<T>, Option<T>)>;

fn update<T: Clone>(
    map: &mut BTreeMap<String, Entry<T>>,
    type_url: &str,
    resources: &[Resource],
    removed: &[String],
    decode: impl Fn(&[u8]) -> Result<T, String>,
) -> Result<Changes<T>, Vec<Rejected>> {
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
    if !rejected.is_empty() {
        return Err(rejected);
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
    Ok(changes)
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

    #[test]
    fn a_bad_resource_rejects_the_whole_response() {
        let mut s = Store::default();
        s.apply(ADDRESS_TYPE, &[res("a", "1", "demo", &[198, 18, 0, 1])], &[])
            .unwrap();
        let err = s
            .apply(
                ADDRESS_TYPE,
                &[
                    res("b", "2", "demo", &[198, 18, 0, 2]),
                    res("c", "2", "demo", &[1, 2, 3]),
                ],
                &["a".to_string()],
            )
            .unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].name, "c");
        assert_eq!(
            s.versions(ADDRESS_TYPE),
            HashMap::from([("a".to_string(), "1".to_string())])
        );
        assert!(s.workloads().by_ip(ip("198.18.0.1")).is_some());
        assert!(s.workloads().by_ip(ip("198.18.0.2")).is_none());
    }

    #[test]
    fn an_address_that_moves_ends_with_its_new_owner() {
        let mut s = Store::default();
        s.apply(ADDRESS_TYPE, &[res("a", "1", "demo", &[198, 18, 0, 1])], &[])
            .unwrap();
        let before = s.workloads();
        // In one response, a releases the IP and b takes it.
        s.apply(
            ADDRESS_TYPE,
            &[
                res("b", "2", "demo", &[198, 18, 0, 1]),
                res("a", "2", "demo", &[198, 18, 0, 9]),
            ],
            &[],
        )
        .unwrap();
        let w = s.workloads();
        assert_eq!(w.by_ip(ip("198.18.0.1")).unwrap().name, "b");
        assert_eq!(w.by_ip(ip("198.18.0.9")).unwrap().name, "a");
        assert_eq!(w.len(), 2);
        // A reader's older snapshot is untouched.
        assert_eq!(before.by_ip(ip("198.18.0.1")).unwrap().name, "a");
        assert_eq!(before.len(), 1);
        s.apply(ADDRESS_TYPE, &[], &["b".to_string()]).unwrap();
        assert!(s.workloads().by_ip(ip("198.18.0.1")).is_none());
        assert_eq!(s.workloads().len(), 1);
    }

    #[test]
    fn a_body_of_another_type_or_an_unknown_type_is_rejected() {
        let mut s = Store::default();
        let r = res("a", "1", "demo", &[198, 18, 0, 1]);
        let err = s.apply(AUTHORIZATION_TYPE, std::slice::from_ref(&r), &[]).unwrap_err();
        assert!(err[0].reason.contains("istio.workload.Address"), "{err:?}");
        let err = s
            .apply("type.googleapis.com/envoy.config.cluster.v3.Cluster", &[r], &[])
            .unwrap_err();
        assert!(err[0].reason.contains("unsupported resource type"), "{err:?}");
    }
}
