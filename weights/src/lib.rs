//! Checkpoint I/O: safetensors (mmap), PyTorch `.pt/.pth` import through a
//! safe unpickler, the local model store and the model catalog.

pub mod catalog;
mod error;
pub mod http;
pub mod hub;
pub mod pickle;
pub mod pth;
pub mod pull;
pub mod safetensors_io;
pub mod store;
pub mod url;

#[cfg(any(test, feature = "standin"))]
pub mod standin;

pub use error::WeightsError;
