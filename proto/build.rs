//! Compile the `.proto` files with protox (pure Rust: no system `protoc`),
//! then generate the prost messages and tonic services from its output.

use std::path::PathBuf;

use prost::Message;

const FILES: &[&str] = &[
    "proto/inference/grpc_predict_v2.proto",
    "proto/fovea/v1/vision.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(FILES, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("fovea_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
