//! Checkpoint I/O: safetensors (mmap), PyTorch `.pt/.pth` import through a
//! safe unpickler, the local model store and the model catalog.

pub mod catalog;
mod error;
pub mod pickle;
pub mod pth;
pub mod pull;
pub mod safetensors_io;
pub mod store;

pub use error::WeightsError;
