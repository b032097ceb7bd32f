//! Which pinned eBPF state an agent may reuse.
//!
//! aya reuses a map pinned under the name it wants without comparing it to the map the object
//! declares, so an agent whose maps changed (a value size, `MAX_PODS`) would run its programs
//! over the old maps: the verifier rejects them (a crash loop) or they misbehave. Each layout
//! is therefore pinned in a directory of its own, `<pin dir>/v<version>-<digest>`, named for
//! [`PIN_LAYOUT_VERSION`] (bumped by hand when the meaning of an entry changes) and a digest of
//! every pinned map's type, key size, value size and max entries (read from the object being
//! loaded, so it cannot drift from the programs). What is pinned decides the start:
//! nothing ([`Decision::Fresh`]), this layout ([`Decision::Reuse`], after checking each pinned
//! map's kernel info against it), or other layouts ([`Decision::Migrate`]: a new directory,
//! entries copied where the version and the map's key and value sizes agree, pods re-registered,
//! the old directories removed once every pod is). Layout 1's state from before versioning
//! (`<pin dir>/maps`, `<pin dir>/links`) is an other layout like any.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
};

use aya_obj::maps::PinningType;
pub use nodeway_ebpf_common::PIN_LAYOUT_VERSION;

/// The shape of one map, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MapSpec {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl fmt::Display for MapSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B max {}",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// Every pinned map of an eBPF object, with the layout version it was built for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: u32,
    pub maps: BTreeMap<String, MapSpec>,
}

impl Layout {
    /// The pinned maps the object declares, with `max_entries` overrides applied as the loader
    /// applies them.
    pub fn of_object(object: &[u8], version: u32, max_entries: &[(&str, u32)]) -> Result<Layout, String> {
        let obj = aya_obj::Object::parse(object).map_err(|e| format!("parsing the eBPF object: {e}"))?;
        let maps = obj
            .maps
            .iter()
            .filter(|(_, m)| m.pinning() == PinningType::ByName)
            .map(|(name, m)| {
                let max = max_entries
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(m.max_entries(), |(_, v)| *v);
                let spec = MapSpec {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: max,
                };
                (name.clone(), spec)
            })
            .collect();
        Ok(Layout { version, maps })
    }

    /// The name of this layout's pin directory: `v<version>-<digest>`.
    pub fn dir_name(&self) -> String {
        // FNV-1a: stable across builds and Rust versions (unlike `DefaultHasher`).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for (name, s) in &self.maps {
            eat(name.as_bytes());
            eat(&[0]);
            for v in [s.map_type, s.key_size, s.value_size, s.max_entries] {
                eat(&v.to_le_bytes());
            }
        }
        format!("v{}-{:016x}", self.version, h)
    }
}

/// Where a pin directory's version comes from: its name, or (before versioning) layout 1.
pub fn version_of(dir_name: Option<&str>) -> Option<u32> {
    match dir_name {
        None => Some(1),
        Some(n) => n.strip_prefix('v')?.split_once('-')?.0.parse().ok(),
    }
}

/// A layout directory found under the pin directory, with what its maps are.
#[derive(Clone, Debug)]
pub struct Pinned {
    pub dir: PathBuf,
    /// Parsed from the directory name.
    pub version: u32,
    /// Each pinned map's kernel info, or why it could not be read.
    pub maps: BTreeMap<String, Result<MapSpec, String>>,
}

/// An old layout to migrate from, and which of its maps' entries carry over as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OldLayout {
    pub dir: PathBuf,
    pub copy: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing pinned: create this layout's directory.
    Fresh,
    /// This layout's directory is there and every pinned map matches it.
    Reuse,
    /// Other layouts are pinned (this one too if an earlier migration was interrupted).
    Migrate(Vec<OldLayout>),
    /// This layout's directory holds a map that is not what its name says: something else
    /// wrote there. Never guessed at.
    Refuse(String),
}

/// Decides from what is pinned (`ours`: this layout's directory, if there; `others`: every
/// other layout directory) against `expected`.
pub fn decide(expected: &Layout, ours: Option<&Pinned>, others: &[Pinned]) -> Decision {
    if let Some(p) = ours {
        for (name, found) in &p.maps {
            let Some(want) = expected.maps.get(name) else {
                // A map this layout does not declare cannot be in a directory named for it.
                return Decision::Refuse(format!(
                    "{}: map {name} is not part of layout {}",
                    p.dir.display(),
                    expected.dir_name()
                ));
            };
            match found {
                Ok(s) if s == want => {}
                Ok(s) => {
                    return Decision::Refuse(format!(
                        "{}: map {name} has {s}, layout {} has {want}",
                        p.dir.display(),
                        expected.dir_name()
                    ))
                }
                Err(e) => return Decision::Refuse(format!("{}: map {name}: {e}", p.dir.display())),
            }
        }
    }
    if others.is_empty() {
        return if ours.is_some() {
            Decision::Reuse
        } else {
            Decision::Fresh
        };
    }
    let olds = others
        .iter()
        .map(|o| OldLayout {
            dir: o.dir.clone(),
            copy: copyable(expected, o),
        })
        .collect();
    Decision::Migrate(olds)
}

/// Maps whose entries mean the same in `old` (same layout version, map type, key and value
/// size; only capacities may differ): these are copied before the new programs attach.
fn copyable(expected: &Layout, old: &Pinned) -> BTreeSet<String> {
    if old.version != expected.version {
        return BTreeSet::new();
    }
    old.maps
        .iter()
        .filter_map(|(name, found)| {
            let (want, s) = (expected.maps.get(name)?, found.as_ref().ok()?);
            (s.map_type == want.map_type && s.key_size == want.key_size && s.value_size == want.value_size)
                .then(|| name.clone())
        })
        .collect()
}

/// Whether `dir` (under the pin directory) is a layout directory by its name.
pub fn is_layout_dir_name(name: &str) -> bool {
    name.starts_with('v') && version_of(Some(name)).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max: u32) -> MapSpec {
        MapSpec {
            map_type: 1,
            key_size: 8,
            value_size: 8,
            max_entries: max,
        }
    }

    fn layout(version: u32, max: u32) -> Layout {
        Layout {
            version,
            maps: [("PODS".to_string(), spec(max)), ("IPS".to_string(), spec(16))].into(),
        }
    }

    fn pinned(dir: &str, version: u32, maps: &[(&str, Result<MapSpec, String>)]) -> Pinned {
        Pinned {
            dir: PathBuf::from(dir),
            version,
            maps: maps.iter().map(|(n, s)| (n.to_string(), s.clone())).collect(),
        }
    }

    #[test]
    fn the_directory_name_follows_every_map_property_and_the_version() {
        let base = layout(1, 1024);
        assert_eq!(base.dir_name(), layout(1, 1024).dir_name());
        assert!(base.dir_name().starts_with("v1-"));
        assert_ne!(base.dir_name(), layout(1, 1025).dir_name(), "max entries");
        assert_ne!(base.dir_name(), layout(2, 1024).dir_name(), "version");
        let mut wider = base.clone();
        wider.maps.get_mut("IPS").unwrap().value_size = 16;
        assert_ne!(base.dir_name(), wider.dir_name(), "value size");
        assert_eq!(version_of(Some(&base.dir_name())), Some(1));
        assert_eq!(version_of(None), Some(1), "the unversioned layout is layout 1");
        assert!(is_layout_dir_name("v7-00ff") && !is_layout_dir_name("maps") && !is_layout_dir_name("vx-1"));
    }

    #[test]
    fn nothing_pinned_is_fresh_and_our_own_layout_is_reused() {
        let want = layout(1, 1024);
        assert_eq!(decide(&want, None, &[]), Decision::Fresh);
        let ours = pinned("/p/ours", 1, &[("PODS", Ok(spec(1024))), ("IPS", Ok(spec(16)))]);
        assert_eq!(decide(&want, Some(&ours), &[]), Decision::Reuse);
        // A map not created yet (an interrupted start) is created by the loader.
        let partial = pinned("/p/ours", 1, &[("PODS", Ok(spec(1024)))]);
        assert_eq!(decide(&want, Some(&partial), &[]), Decision::Reuse);
    }

    #[test]
    fn a_changed_map_in_our_own_directory_is_refused_in_one_line() {
        let want = layout(1, 1024);
        for ours in [
            pinned("/p/ours", 1, &[("PODS", Ok(spec(64)))]),
            pinned("/p/ours", 1, &[("PODS", Err("not a map".into()))]),
            pinned("/p/ours", 1, &[("STRANGER", Ok(spec(1)))]),
        ] {
            match decide(&want, Some(&ours), &[]) {
                Decision::Refuse(why) => {
                    assert!(why.contains("/p/ours") && !why.contains('\n'), "{why}");
                }
                d => panic!("{d:?}"),
            }
        }
        let Decision::Refuse(why) = decide(&want, Some(&pinned("/p/ours", 1, &[("PODS", Ok(spec(64)))])), &[]) else {
            unreachable!()
        };
        assert!(why.contains("max 64") && why.contains("max 1024"), "{why}");
    }

    #[test]
    fn other_layouts_migrate_copying_only_entries_that_mean_the_same() {
        let want = layout(1, 1024);
        // Same version, one capacity changed: both maps' entries carry over.
        let resized = pinned("/p/v1-old", 1, &[("PODS", Ok(spec(512))), ("IPS", Ok(spec(16)))]);
        // Same version, but IPS's value grew and PODS cannot be read: neither carries over.
        let mut grown = spec(16);
        grown.value_size = 16;
        let changed = pinned("/p/v1-older", 1, &[("PODS", Err("gone".into())), ("IPS", Ok(grown))]);
        // Another version: nothing carries over, pods are registered again from scratch.
        let older = pinned("/p/v0-x", 0, &[("PODS", Ok(spec(1024))), ("IPS", Ok(spec(16)))]);
        let d = decide(&want, None, &[resized, changed, older]);
        let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            d,
            Decision::Migrate(vec![
                OldLayout {
                    dir: "/p/v1-old".into(),
                    copy: set(&["IPS", "PODS"])
                },
                OldLayout {
                    dir: "/p/v1-older".into(),
                    copy: BTreeSet::new()
                },
                OldLayout {
                    dir: "/p/v0-x".into(),
                    copy: BTreeSet::new()
                },
            ])
        );
        // An interrupted migration: ours is there (and sound) next to the old one; it goes on.
        let ours = pinned("/p/ours", 1, &[("PODS", Ok(spec(1024)))]);
        let old = pinned("/p/v0-x", 0, &[]);
        assert!(matches!(decide(&want, Some(&ours), &[old]), Decision::Migrate(o) if o.len() == 1));
    }
}
