//! nodeway's data plane. The agent (`nodeway` binary) decides which pods are captured and hands
//! this crate their in-pod listeners; everything that moves bytes lives here.
#![deny(unsafe_code)]
pub mod admin;
pub mod authz;
pub mod cluster;
pub mod connections;
pub mod copy;
pub mod envoy_json;
pub mod hbone;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod l7;
pub mod metrics;
pub mod netns;
pub mod outbound;
pub mod pod;
pub mod proto;
pub mod route;
pub mod service;
pub mod upstream;
pub mod workload;
pub mod xds;
