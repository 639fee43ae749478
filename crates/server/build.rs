//! Generates the gRPC servers from `proto/`: Triton's `inference.GRPCInferenceService`
//! (KServe V2, vendored: BSD-3-Clause, NVIDIA; see `proto/LICENSE`) and Quiver's own
//! `quiver.v1.Ingest`. protox compiles the .proto in Rust, so building Quiver needs no
//! `protoc`. Clients are generated too, for the tests and the benchmark's load generator.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["grpc_service.proto", "quiver/v1/ingest.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
