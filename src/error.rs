//! The one error type of the crate. Every variant names what is at fault (file, key, argument)
//! and maps to exactly one C status code.

use std::path::{Path, PathBuf};

use crate::ffi::status::hdb_status;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("argument '{0}' is NULL")]
    NullArgument(&'static str),
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

    /// The C status code for this error.
    pub fn status(&self) -> hdb_status {
        match self {
            Error::NullArgument(_) => hdb_status::HDB_STATUS_NULL_ARGUMENT,
            Error::NotFound { .. } => hdb_status::HDB_STATUS_FILE_NOT_FOUND,
            Error::Io { .. } => hdb_status::HDB_STATUS_IO_ERROR,
            Error::InvalidFile { .. } => hdb_status::HDB_STATUS_INVALID_FILE,
            Error::NotAModel { .. } => hdb_status::HDB_STATUS_NOT_A_MODEL,
            Error::UnsupportedDtype { .. } => hdb_status::HDB_STATUS_UNSUPPORTED_DTYPE,
            Error::InvalidModel { .. } => hdb_status::HDB_STATUS_INVALID_MODEL,
            Error::Unsupported(_) => hdb_status::HDB_STATUS_UNSUPPORTED,
            Error::InvalidArgument { .. } => hdb_status::HDB_STATUS_INVALID_ARGUMENT,
            Error::AdapterMismatch(_) => hdb_status::HDB_STATUS_ADAPTER_MISMATCH,
            Error::NoDevice(_) => hdb_status::HDB_STATUS_NO_DEVICE,
            Error::Device(_) => hdb_status::HDB_STATUS_DEVICE_ERROR,
            Error::OutOfMemory(_) => hdb_status::HDB_STATUS_OUT_OF_MEMORY,
            Error::Cancelled => hdb_status::HDB_STATUS_CANCELLED,
            Error::BufferTooSmall { .. } => hdb_status::HDB_STATUS_BUFFER_TOO_SMALL,
            Error::Internal(_) => hdb_status::HDB_STATUS_INTERNAL,
        }
    }
}
