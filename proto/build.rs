//! Compiles every .proto under proto/ with the system's `protoc` (Debian's
//! protobuf-compiler; `scripts/test.sh` installs it). `PROTOC` overrides the path.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["volume/v1/volume.proto", "meta/v1/meta.proto"], &["."])?;
    println!("cargo:rerun-if-changed=volume");
    println!("cargo:rerun-if-changed=meta");
    Ok(())
}
