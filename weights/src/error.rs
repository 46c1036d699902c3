//! The error type shared by the checkpoint readers and writers.

use std::path::PathBuf;

use crate::pickle::PickleError;

/// Everything that can go wrong reading or writing a checkpoint. Each variant
/// names the file, so a message is useful on its own in a log or a CLI.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not one of the PyTorch checkpoint formats we read.
    #[error("{path}: not a PyTorch checkpoint ({reason})")]
    NotACheckpoint { path: PathBuf, reason: String },
    #[error("{path}: truncated file ({what})")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: bad pickle: {source}")]
    Pickle {
        path: PathBuf,
        #[source]
        source: PickleError,
    },
    /// A value where a tensor is expected is built by a global we do not
    /// interpret (it is never called: we refuse it).
    #[error("{path}: unsupported global {global} used as a tensor (at {at})")]
    UnsupportedGlobal {
        path: PathBuf,
        global: String,
        at: String,
    },
    #[error("{path}: no tensors found")]
    NoTensors { path: PathBuf },
    #[error("{path}: unsupported dtype {dtype} (tensor {name})")]
    UnsupportedDtype {
        path: PathBuf,
        dtype: String,
        name: String,
    },
    /// The file parses but its content is inconsistent (bad shapes, strides
    /// outside a storage, missing storages, ...).
    #[error("{path}: invalid checkpoint: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("{path}: safetensors: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: zip: {source}")]
    Zip {
        path: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("{path}: tensor: {source}")]
    Candle {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
}

impl WeightsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WeightsError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        WeightsError::Invalid {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn candle(path: impl Into<PathBuf>, source: candle_core::Error) -> Self {
        WeightsError::Candle {
            path: path.into(),
            source,
        }
    }

    /// Maps a pickle error, turning "ran out of input" into `Truncated`.
    pub(crate) fn pickle(path: impl Into<PathBuf>, what: &str, source: PickleError) -> Self {
        let path = path.into();
        match source {
            PickleError::Truncated { .. } => WeightsError::Truncated {
                path,
                what: format!("{what}: {source}"),
            },
            source => WeightsError::Pickle { path, source },
        }
    }
}
