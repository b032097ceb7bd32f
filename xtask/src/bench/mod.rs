//! `cargo xtask bench ...`: benchmarks (not tests). Results go to target/bench/ as Markdown and JSON.

pub mod echo;
pub mod hbone;
pub mod istiod;
pub mod istiod_l7;
pub mod l7;
pub mod memory;
pub mod redirect;
pub mod report;
mod topology;
pub mod xds;
mod zds;
pub mod ztunnel;
