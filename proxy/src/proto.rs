//! Generated types of our `.proto` files (see `build.rs` and `proto/`): istiod's workload and
//! authorization resources, wire-compatible with what it sends ztunnel.
#![allow(clippy::all, missing_docs)]

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
}
