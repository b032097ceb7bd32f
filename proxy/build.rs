//! Generates the gRPC messages and services of our own `.proto` files (under `proto/`), with a
//! pure-Rust protobuf compiler so no `protoc` is needed on the build machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/istio/ca/ca.proto",
        "proto/istio/workload/workload.proto",
        "proto/istio/security/authorization.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().build_server(true).compile_fds(fds)?;
    Ok(())
}
