//! The one error type of the crate. Every variant names what is at fault (file, key, argument)
//! and maps to exactly one C status code (`ffi::status`).

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("argument '{0}' is NULL")]
    NullArgument(&'static str),
    /// An entry of an array argument is NULL.
    #[error("argument '{name}[{index}]' is NULL")]
    NullEntry { name: &'static str, index: usize },
    #[error("{path}: file or directory not found")]
    NotFound { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes of a file do not follow its format (truncated, bad header, bad JSON, ...).
    #[error("{path}: invalid {format} file: {reason}")]
    InvalidFile {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    /// The path exists but holds no model hdb recognises.
    #[error("{path}: not a model: {reason}")]
    NotAModel { path: PathBuf, reason: String },
    #[error("{path}: tensor '{key}' has dtype {dtype}, expected one of {expected}")]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
        expected: &'static str,
    },
    /// A model whose tensors are missing, unexpected or of the wrong shape.
    #[error("{path}: {reason}")]
    InvalidModel { path: PathBuf, reason: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid argument '{name}': {reason}")]
    InvalidArgument { name: &'static str, reason: String },
    #[error("adapter does not match the model: {0}")]
    AdapterMismatch(String),
    #[error("no device: {0}")]
    NoDevice(String),
    #[error("device error: {0}")]
    Device(String),
    /// An allocation failed: device memory, or a host buffer sized from a file or an argument
    /// (reserved fallibly, see [`crate::limits`]).
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("cancelled by the progress callback")]
    Cancelled,
    #[error("buffer too small: need {needed} bytes, got {got}")]
    BufferTooSmall { needed: usize, got: usize },
    #[error("internal error: {0}")]
    Internal(String),
    /// Training stopped: the loss or a gradient became NaN or infinite (the message names the
    /// step).
    #[error("training diverged: {0}")]
    Diverged(String),
    /// An object that belongs to one thread at a time is in use by another.
    #[error("busy: {0}")]
    Busy(String),
}

impl Error {
    /// An I/O error on `path`, with "not found" kept distinct so callers can tell it apart.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }

    pub fn invalid_arg(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }

    pub fn invalid_model(path: &Path, reason: impl Into<String>) -> Self {
        Error::InvalidModel {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub fn not_a_model(path: &Path, reason: impl Into<String>) -> Self {
        Error::NotAModel {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
