//! nodeway's data plane. The agent (`nodeway` binary) decides which pods are captured and hands
//! this crate their in-pod listeners ([`Proxy::start_pod`]); everything that moves bytes lives here.
//!
//! Layers, each using only those before it (checked by `tests/layers.rs`):
//! model (`workload`, `service`, `authz`, `route`, `cluster`, `listener`, `l7`, `identity`, `metrics`,
//! `connections`, `netns`) ← [`state`] (config snapshots) ← `resolver` (DNS clusters' answers into
//! an L7 model) ← `transport` (dialing inside a pod's
//! netns, copy loops) ← [`hbone`] (TLS + HTTP/2 CONNECT, client and server) ← `upstream`
//! (clusters' runtime state, pools; takes a connector, never sees a pod) ← `http` (Envoy's router,
//! part by part) ← `inbound` / `outbound` ← `pod` (composition; each L7 model's runtime: its
//! clusters and its resolver). `xds` and `admin` are config sources and views on the side.
//!
//! No unsafe code but `netns::netns_cookie_of` (a getsockopt neither nix nor socket2 wraps).
#![deny(unsafe_code)]
pub mod admin;
pub mod authz;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod envoy_json;
pub mod hbone;
pub(crate) mod http;
pub mod identity;
pub(crate) mod inbound;
pub mod l7;
pub mod listener;
pub mod metrics;
pub mod netns;
pub(crate) mod outbound;
pub mod pod;
pub mod proto;
pub mod resolver;
pub mod route;
pub mod service;
pub mod state;
pub(crate) mod timefmt;
pub(crate) mod transport;
pub mod upstream;
pub mod workload;
pub mod xds;

pub use config::{Config, Http2Guards, SameNodePath};
pub use outbound::OriginalDst;
pub use pod::{L7Runtime, Mtls, PodHandle, PodListeners, PodSpec, Proxy};

/// What the fuzz targets (`fuzz/`) call of the crate-private HTTP layer: the same functions the
/// data path uses, re-exported so the modules themselves stay private. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::headers::strip_hop_by_hop;
    pub use crate::http::path::{authz_path, normalize, PathError};
    pub use crate::http::rewrite::{redirect_location, rewrite_path, shadow_host, split_authority};
    pub use crate::http::sniff::{classify, sniff_stream, Prefixed, Sniffed};
}
