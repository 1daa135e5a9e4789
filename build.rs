//! Generates the CSI gRPC code from `proto/csi.proto` with a pure-Rust protobuf compiler
//! (protox), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/csi.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Clients are generic over the transport: the library does not pull in tonic's
        // channel stack; tests (and later tools) bring their own unix-socket channel.
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
