//! Generates the gRPC code of `proto/csi.proto` (CSI) and `proto/pluginregistration.proto`
//! (kubelet's plugin registration) with a pure-Rust protobuf compiler (protox), so building
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: [&str; 2] = ["proto/csi.proto", "proto/pluginregistration.proto"];
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Clients are generic over the transport: the library does not pull in tonic's
        // channel stack; tests (and later tools) bring their own unix-socket channel.
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
