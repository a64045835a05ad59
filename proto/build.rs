//! Compiles every .proto under proto/ with the system's `protoc` (Debian's
//! protobuf-compiler; `scripts/test.sh` installs it). `PROTOC` overrides the path.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Berth's own APIs: every RPC must be implemented (no default stubs).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["volume/v1/volume.proto", "meta/v1/meta.proto"], &["."])?;
    // CSI: RPCs Berth does not advertise (alpha health calls, group
    // snapshots, snapshot metadata) answer UNIMPLEMENTED, as the spec allows.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .compile_protos(&["csi/v1/csi.proto"], &["."])?;
    println!("cargo:rerun-if-changed=volume");
    println!("cargo:rerun-if-changed=meta");
    println!("cargo:rerun-if-changed=csi");
    Ok(())
}
