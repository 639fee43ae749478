//! Generates the gRPC server of Triton's `inference.GRPCInferenceService` (KServe V2) from the
//! vendored `proto/` files (BSD-3-Clause, NVIDIA; see `proto/LICENSE`). protox compiles the
//! .proto in Rust, so building Quiver needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["grpc_service.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
