//! Compiles the .proto files with protox (a pure-Rust protobuf compiler), so a fresh
//! machine needs nothing but cargo, and writes the encoded descriptor set that the
//! services hand to tonic-reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "reeve/credits/v1/credits.proto",
    "reeve/quota/v1/quota.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("reeve_descriptor.bin"), files.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(files)?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
