//! Fuzz targets for every parser and matcher of the proxy, and the engine that runs them on
//! the stable toolchain ([`engine`]). `cargo xtask fuzz [--time SECS] [TARGET]` runs them; the
//! CI smoke (`cargo xtask test`) runs each briefly; `tests/corpus.rs` replays the committed
//! corpus (`fuzz/corpus/<target>/`) as ordinary tests.
//!
//! A target panics when the code under test does: a panic of the proxy's own, or a broken
//! invariant the target checks (idempotence, exact put-back, agreement with a reference model).
pub mod engine;
pub mod targets;

pub use engine::Target;

/// Every target, by name.
pub static TARGETS: &[Target] = &[
    targets::route::TARGET,
    targets::authz::TARGET,
    targets::sniff::TARGET,
    targets::path::TARGET,
    targets::identity::TARGET,
    targets::xds::TARGET,
    targets::config::TARGET,
    targets::authority::TARGET,
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
