//! Fovea's gRPC API, generated at build time from `proto/` with a pure-Rust
//! protobuf compiler (protox), so no system `protoc` is needed.
//!
//! - [`inference`]: the Open Inference Protocol (KServe V2)
//!   `inference.GRPCInferenceService`, wire compatible with Triton's and
//!   KServe's clients.
//! - [`vision`]: `fovea.v1.Vision`, typed classification and detection of
//!   encoded images, with a streaming call for video frames.
//! - [`FILE_DESCRIPTOR_SET`]: both files' descriptors, for server reflection.

#![allow(clippy::all)]

pub mod inference {
    tonic::include_proto!("inference");
}

pub mod vision {
    tonic::include_proto!("fovea.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` file here.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fovea_descriptor");
