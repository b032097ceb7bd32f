//! Which sidecar streams the node needs: captured pods that istiod configures alike form one
//! class, and each class has one stream ([`super::sidecar`]) in the name of a representative
//! pod. Pure bookkeeping, no I/O: the caller feeds the current pods and acts on the changes.
//!
//! What istiod's outbound config for a sidecar depends on: its namespace (Sidecar resources,
//! `exportTo` visibility), its labels (Sidecar `workloadSelector`, VirtualService
//! `sourceLabels`, EnvoyFilters) and its service account (the identity in the stream's
//! certificate). Labels Kubernetes sets per pod of one workload (`pod-template-hash`, ...) are
//! left out of the class, so the replicas of one Deployment share a stream.
use std::collections::{BTreeMap, BTreeSet};

/// Labels that differ between replicas of one workload and select nothing in Istio's config.
pub const PER_POD_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedPod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ip: String,
    pub labels: BTreeMap<String, String>,
}

/// What makes two pods' sidecar config the same.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClassKey {
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

impl ClassKey {
    pub fn of(p: &CapturedPod) -> ClassKey {
        ClassKey {
            namespace: p.namespace.clone(),
            service_account: p.service_account.clone(),
            labels: p
                .labels
                .iter()
                .filter(|(k, _)| !PER_POD_LABELS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Class {
    /// The pod whose name the stream carries.
    pub representative: CapturedPod,
    /// Every pod of the class, by uid.
    pub members: BTreeSet<String>,
}

/// What to do with the streams after a change of pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new class: open its stream as `representative`.
    Open { key: ClassKey, representative: CapturedPod },
    /// The representative went away: reopen the stream as another member (the config stays in
    /// use until the new stream delivers).
    Switch { key: ClassKey, representative: CapturedPod },
    /// The class has no pods left: close its stream, drop its config.
    Close { key: ClassKey },
}

#[derive(Debug, Default)]
pub struct ClassPlan {
    classes: BTreeMap<ClassKey, Class>,
}

impl ClassPlan {
    pub fn classes(&self) -> &BTreeMap<ClassKey, Class> {
        &self.classes
    }

    /// The class of the pod `uid`: whose config its outbound traffic uses.
    pub fn class_of(&self, uid: &str) -> Option<&ClassKey> {
        self.classes
            .iter()
            .find(|(_, c)| c.members.contains(uid))
            .map(|(k, _)| k)
    }

    /// Makes the classes those of `pods` (every captured pod of the node, now) and says what
    /// changed. A representative stays while it is in its class (a pod whose labels changed
    /// moves to its new class); a new one is the member with the lowest uid, so the choice does
    /// not depend on the order pods arrive in.
    pub fn update(&mut self, pods: &[CapturedPod]) -> Vec<Change> {
        let mut next: BTreeMap<ClassKey, Vec<&CapturedPod>> = BTreeMap::new();
        for p in pods {
            next.entry(ClassKey::of(p)).or_default().push(p);
        }
        let mut changes = Vec::new();
        let gone: Vec<ClassKey> = self
            .classes
            .keys()
            .filter(|k| !next.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.classes.remove(&key);
            changes.push(Change::Close { key });
        }
        for (key, members) in next {
            let uids: BTreeSet<String> = members.iter().map(|p| p.uid.clone()).collect();
            let lowest = members.iter().min_by(|a, b| a.uid.cmp(&b.uid)).map(|p| (*p).clone());
            let Some(lowest) = lowest else { continue };
            match self.classes.get_mut(&key) {
                None => {
                    changes.push(Change::Open {
                        key: key.clone(),
                        representative: lowest.clone(),
                    });
                    self.classes.insert(
                        key,
                        Class {
                            representative: lowest,
                            members: uids,
                        },
                    );
                }
                Some(c) => {
                    // Still here: keep it, with its current details (its IP may have changed,
                    // which changes the node id: reopen then too).
                    let current = members.iter().find(|p| p.uid == c.representative.uid);
                    match current {
                        Some(p) if **p == c.representative => {}
                        Some(p) => {
                            c.representative = (*p).clone();
                            changes.push(Change::Switch {
                                key: key.clone(),
                                representative: c.representative.clone(),
                            });
                        }
                        None => {
                            c.representative = lowest;
                            changes.push(Change::Switch {
                                key: key.clone(),
                                representative: c.representative.clone(),
                            });
                        }
                    }
                    c.members = uids;
                }
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, sa: &str, labels: &[(&str, &str)]) -> CapturedPod {
        CapturedPod {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "demo".into(),
            service_account: sa.into(),
            ip: format!("198.18.9.{}", uid.len()),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn replicas_share_a_class_and_other_labels_or_accounts_do_not() {
        let mut plan = ClassPlan::default();
        let a = pod(
            "a",
            "reviews",
            &[("app", "reviews"), ("version", "v1"), ("pod-template-hash", "x1")],
        );
        let b = pod(
            "b",
            "reviews",
            &[("app", "reviews"), ("version", "v1"), ("pod-template-hash", "x2")],
        );
        let v2 = pod("c", "reviews", &[("app", "reviews"), ("version", "v2")]);
        let other_sa = pod("d", "ratings", &[("app", "reviews"), ("version", "v1")]);
        let changes = plan.update(&[b.clone(), a.clone(), v2, other_sa]);
        assert_eq!(plan.classes().len(), 3);
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(changes.iter().all(|c| matches!(c, Change::Open { .. })));
        let key = ClassKey::of(&a);
        assert_eq!(
            plan.classes()[&key].representative.uid,
            "a",
            "lowest uid, whatever the order"
        );
        assert_eq!(plan.class_of("b"), Some(&key));
        assert_eq!(plan.update(&[a, b]).len(), 2, "two classes closed, nothing else");
    }

    #[test]
    fn the_representative_is_replaced_when_it_goes_and_the_class_closes_with_its_last_pod() {
        let mut plan = ClassPlan::default();
        let a = pod("a", "sa", &[("app", "x")]);
        let b = pod("b", "sa", &[("app", "x")]);
        let key = ClassKey::of(&a);
        plan.update(&[a.clone(), b.clone()]);
        assert_eq!(plan.update(&[a.clone(), b.clone()]), []);
        assert_eq!(
            plan.update(std::slice::from_ref(&b)),
            [Change::Switch {
                key: key.clone(),
                representative: b.clone()
            }]
        );
        // A returning pod does not take the stream back.
        assert_eq!(plan.update(&[a, b]), []);
        assert_eq!(plan.update(&[]), [Change::Close { key }]);
        assert!(plan.classes().is_empty());
    }

    #[test]
    fn a_relabelled_representative_moves_and_its_old_class_switches() {
        let mut plan = ClassPlan::default();
        let a = pod("a", "sa", &[("version", "v1")]);
        let b = pod("b", "sa", &[("version", "v1")]);
        plan.update(&[a.clone(), b.clone()]);
        let moved = pod("a", "sa", &[("version", "v2")]);
        let changes = plan.update(&[moved.clone(), b.clone()]);
        assert!(changes.contains(&Change::Switch {
            key: ClassKey::of(&b),
            representative: b
        }));
        assert!(changes.contains(&Change::Open {
            key: ClassKey::of(&moved),
            representative: moved
        }));
    }
}
