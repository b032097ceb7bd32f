//! Generates the gRPC messages and services of our own `.proto` files (under `proto/`), with a
//! pure-Rust protobuf compiler so no `protoc` is needed on the build machine.
//!
//! It also compiles a `FileDescriptorSet` of the Envoy v3 resources the local config file and the
//! admin API read and write as protobuf-JSON (`src/envoy_json.rs`), from the `.proto` files the
//! `envoy-types` crate ships in its package, so the descriptors always match the prost structs
//! that crate generated from them.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Overrides where the `envoy-types` protos are (its `proto/` directory), for builds that do not
/// go through cargo's resolver (e.g. a distribution packaging the crates by other means).
const PROTO_DIR_ENV: &str = "NODEWAY_ENVOY_PROTO_DIR";

/// The Envoy resources, and the extension messages Istio puts in their `Any` fields.
const ENVOY_PROTOS: &[&str] = &[
    "envoy/config/route/v3/route.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/extensions/filters/http/fault/v3/fault.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/retry/host/previous_hosts/v3/previous_hosts.proto",
    "envoy/extensions/retry/priority/previous_priorities/v3/previous_priorities_config.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/transport_sockets/raw_buffer/v3/raw_buffer.proto",
    "envoy/extensions/transport_sockets/internal_upstream/v3/internal_upstream.proto",
    // Listeners and what Istio puts in them, for `istioctl proxy-config listeners -o json`.
    "envoy/config/listener/v3/listener.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/filters/listener/http_inspector/v3/http_inspector.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/extensions/filters/http/grpc_stats/v3/config.proto",
    "envoy/extensions/filters/http/cors/v3/cors.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
    "envoy/extensions/request_id/uuid/v3/uuid.proto",
    "envoy/extensions/network/dns_resolver/cares/v3/cares_dns_resolver.proto",
    // What `istioctl proxy-config endpoint -o json` prints (envoy.admin.v3.ClusterStatus).
    "envoy/admin/v3/clusters.proto",
    // Not shipped by envoy-types: this crate's `proto/` has them.
    "udpa/type/v1/typed_struct.proto",
    "xds/type/v3/typed_struct.proto",
    "istio/envoy/config/filter/http/alpn/v2alpha1/config.proto",
];

/// Include roots under `envoy-types`' `proto/` directory (the repositories it vendors).
const ENVOY_INCLUDES: &[&str] = &[
    "data-plane-api",
    "xds",
    "googleapis",
    "protoc-gen-validate",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/istio/ca/ca.proto",
        "proto/istio/workload/workload.proto",
        "proto/istio/security/authorization.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().build_server(true).compile_fds(fds)?;

    envoy_descriptors()?;
    Ok(())
}

fn envoy_descriptors() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed={PROTO_DIR_ENV}");
    let proto_dir = match env::var_os(PROTO_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => envoy_types_proto_dir()?,
    };
    let mut includes: Vec<PathBuf> = ENVOY_INCLUDES
        .iter()
        .map(|dir| proto_dir.join(dir))
        .filter(|dir| dir.is_dir())
        .collect();
    if !includes.iter().any(|dir| dir.ends_with("data-plane-api")) {
        return Err(format!(
            "{} has no data-plane-api/: not the proto directory of envoy-types",
            proto_dir.display()
        )
        .into());
    }
    includes.push(PathBuf::from("proto"));
    let mut compiler = protox::Compiler::new(&includes)?;
    compiler.include_imports(true).include_source_info(false);
    compiler.open_files(ENVOY_PROTOS)?;
    // Rerun when one of the files compiled (imports included) changes; the file names are
    // relative to their include root, so find which root each one came from.
    for file in compiler.files() {
        if let Some(path) = includes.iter().map(|root| root.join(file.name())).find(|p| p.is_file()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    std::fs::write(out.join("envoy_descriptors.bin"), compiler.encode_file_descriptor_set())?;
    Ok(())
}

/// The `proto/` directory of the `envoy-types` package this crate depends on, as cargo resolved
/// it (registry, vendored sources, `[patch]` or git: whatever the source, cargo knows the path).
fn envoy_types_proto_dir() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let manifest_path = PathBuf::from(
        env::var_os("CARGO_MANIFEST_PATH")
            .or_else(|| env::var_os("CARGO_MANIFEST_DIR").map(|d| Path::new(&d).join("Cargo.toml").into()))
            .ok_or("CARGO_MANIFEST_DIR not set")?,
    );
    // Offline first: after cargo built this package, every package it needs is on disk. If some
    // other workspace member's dependencies were never downloaded (`cargo build -p` on a fresh
    // machine), `cargo metadata` needs them too, so let it fetch them as `cargo build` would.
    let metadata = match cargo_metadata(&manifest_path, true) {
        Ok(m) => m,
        Err(offline_err) => cargo_metadata(&manifest_path, false).map_err(|err| {
            format!(
                "cannot locate the envoy-types crate's proto directory (set {PROTO_DIR_ENV} \
                 to it to skip this lookup): `cargo metadata --offline` failed: \
                 {offline_err}; `cargo metadata` failed: {err}"
            )
        })?,
    };
    if let Some(root) = metadata["workspace_root"].as_str() {
        // A new envoy-types version changes the lock file (and the directory to read).
        println!(
            "cargo:rerun-if-changed={}",
            Path::new(root).join("Cargo.lock").display()
        );
    }
    let packages = metadata["packages"].as_array().ok_or("no packages")?;
    let package_by_id = |id: &str| packages.iter().find(|p| p["id"].as_str() == Some(id));
    // Our package (the one with this manifest), then its resolved `envoy-types` dependency, so
    // several versions of envoy-types in the graph are not a problem.
    let ours = packages
        .iter()
        .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest_path.as_path()))
        .and_then(|p| p["id"].as_str())
        .ok_or_else(|| format!("{} not in cargo metadata", manifest_path.display()))?;
    let nodes = metadata["resolve"]["nodes"].as_array().ok_or("no resolve graph")?;
    let envoy_types = nodes
        .iter()
        .find(|n| n["id"].as_str() == Some(ours))
        .and_then(|n| n["deps"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|dep| dep["pkg"].as_str().and_then(package_by_id))
        .find(|p| p["name"].as_str() == Some("envoy-types"))
        .ok_or("envoy-types is not a resolved dependency of this package")?;
    let dir = envoy_types["manifest_path"]
        .as_str()
        .and_then(|m| Path::new(m).parent())
        .ok_or("envoy-types has no manifest path")?
        .join("proto");
    if !dir.is_dir() {
        return Err(format!(
            "envoy-types {} has no proto/ directory at {}",
            envoy_types["version"],
            dir.display()
        )
        .into());
    }
    Ok(dir)
}

fn cargo_metadata(manifest_path: &Path, offline: bool) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["metadata", "--format-version", "1", "--locked"])
        .arg("--manifest-path")
        .arg(manifest_path);
    if offline {
        cmd.arg("--offline");
    }
    // Only the dependencies of the platforms being built: the others (Windows crates, ...)
    // are never downloaded, and `cargo metadata` reads the package of every dependency listed.
    for var in ["TARGET", "HOST"] {
        if let Some(triple) = env::var_os(var) {
            cmd.arg("--filter-platform").arg(triple);
        }
    }
    let output = cmd.output()?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("{} {}", output.status, stderr.trim()).into());
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}
