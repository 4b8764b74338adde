//! Status codes. Values are explicit and never reused; new codes are only appended.

use std::ffi::c_char;

use super::boundary::ffi_infallible;
use crate::error::Error;

/// The result of every fallible hdb call. On anything but `HDB_STATUS_OK`,
/// `hdb_last_error_message()` describes what went wrong and out-pointers are left untouched.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum hdb_status {
    /// Success.
    HDB_STATUS_OK = 0,
    /// A required pointer argument was NULL; the message names it.
    HDB_STATUS_NULL_ARGUMENT = 1,
    /// An argument or params field has a value outside its domain; the message names it.
    HDB_STATUS_INVALID_ARGUMENT = 2,
    /// A file or directory does not exist.
    HDB_STATUS_FILE_NOT_FOUND = 3,
    /// Reading or writing a file failed (permissions, I/O error).
    HDB_STATUS_IO_ERROR = 4,
    /// A file's bytes do not follow its format (truncated safetensors, bad JSON, ...).
    HDB_STATUS_INVALID_FILE = 5,
    /// The path exists but holds no model hdb recognises.
    HDB_STATUS_NOT_A_MODEL = 6,
    /// A tensor has a dtype hdb cannot use (hdb reads f32, f16 and bf16 weights).
    HDB_STATUS_UNSUPPORTED_DTYPE = 7,
    /// A model whose tensors are missing, unexpected or of the wrong shape.
    HDB_STATUS_INVALID_MODEL = 8,
    /// A feature, architecture or file kind hdb does not support (yet).
    HDB_STATUS_UNSUPPORTED = 9,
    /// An adapter's layers or shapes do not match the model.
    HDB_STATUS_ADAPTER_MISMATCH = 10,
    /// The requested device is not available (no driver, no such device, built without it).
    HDB_STATUS_NO_DEVICE = 11,
    /// The device reported an error.
    HDB_STATUS_DEVICE_ERROR = 12,
    /// Memory could not be allocated.
    HDB_STATUS_OUT_OF_MEMORY = 13,
    /// A progress callback asked to stop.
    HDB_STATUS_CANCELLED = 14,
    /// A caller-provided buffer is too small; the call reports the size it needs.
    HDB_STATUS_BUFFER_TOO_SMALL = 15,
    /// hdb panicked; this is a bug in hdb. The message holds the panic text.
    HDB_STATUS_PANIC = 16,
    /// An internal invariant failed; this is a bug in hdb.
    HDB_STATUS_INTERNAL = 17,
    /// The object is in use by another thread: a session was called from a second thread
    /// while a call on it was running (a session belongs to one thread at a time). Nothing
    /// was changed; call again once the other call has returned.
    HDB_STATUS_BUSY = 18,
    /// Training stopped because the loss or a gradient became NaN or infinite; the message
    /// names the step (a lower learning rate usually helps).
    HDB_STATUS_DIVERGED = 19,
}

/// The C status code of each error: exactly one per variant.
impl From<&Error> for hdb_status {
    fn from(e: &Error) -> hdb_status {
        match e {
            Error::NullArgument(_) | Error::NullEntry { .. } => {
                hdb_status::HDB_STATUS_NULL_ARGUMENT
            }
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
            Error::Busy(_) => hdb_status::HDB_STATUS_BUSY,
            Error::Diverged(_) => hdb_status::HDB_STATUS_DIVERGED,
        }
    }
}

const NAMES: [&std::ffi::CStr; 20] = [
    c"HDB_STATUS_OK",
    c"HDB_STATUS_NULL_ARGUMENT",
    c"HDB_STATUS_INVALID_ARGUMENT",
    c"HDB_STATUS_FILE_NOT_FOUND",
    c"HDB_STATUS_IO_ERROR",
    c"HDB_STATUS_INVALID_FILE",
    c"HDB_STATUS_NOT_A_MODEL",
    c"HDB_STATUS_UNSUPPORTED_DTYPE",
    c"HDB_STATUS_INVALID_MODEL",
    c"HDB_STATUS_UNSUPPORTED",
    c"HDB_STATUS_ADAPTER_MISMATCH",
    c"HDB_STATUS_NO_DEVICE",
    c"HDB_STATUS_DEVICE_ERROR",
    c"HDB_STATUS_OUT_OF_MEMORY",
    c"HDB_STATUS_CANCELLED",
    c"HDB_STATUS_BUFFER_TOO_SMALL",
    c"HDB_STATUS_PANIC",
    c"HDB_STATUS_INTERNAL",
    c"HDB_STATUS_BUSY",
    c"HDB_STATUS_DIVERGED",
];

/// The name of a status code (`"HDB_STATUS_OK"`, ...), or `"HDB_STATUS_UNKNOWN"`. Takes a
/// plain integer so any value is safe to pass. The string is static.
#[no_mangle]
pub extern "C" fn hdb_status_name(status: u32) -> *const c_char {
    ffi_infallible(c"HDB_STATUS_UNKNOWN".as_ptr(), || {
        NAMES
            .get(status as usize)
            .map_or(c"HDB_STATUS_UNKNOWN".as_ptr(), |n| n.as_ptr())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_values() {
        let all = [
            hdb_status::HDB_STATUS_OK,
            hdb_status::HDB_STATUS_NULL_ARGUMENT,
            hdb_status::HDB_STATUS_INVALID_ARGUMENT,
            hdb_status::HDB_STATUS_FILE_NOT_FOUND,
            hdb_status::HDB_STATUS_IO_ERROR,
            hdb_status::HDB_STATUS_INVALID_FILE,
            hdb_status::HDB_STATUS_NOT_A_MODEL,
            hdb_status::HDB_STATUS_UNSUPPORTED_DTYPE,
            hdb_status::HDB_STATUS_INVALID_MODEL,
            hdb_status::HDB_STATUS_UNSUPPORTED,
            hdb_status::HDB_STATUS_ADAPTER_MISMATCH,
            hdb_status::HDB_STATUS_NO_DEVICE,
            hdb_status::HDB_STATUS_DEVICE_ERROR,
            hdb_status::HDB_STATUS_OUT_OF_MEMORY,
            hdb_status::HDB_STATUS_CANCELLED,
            hdb_status::HDB_STATUS_BUFFER_TOO_SMALL,
            hdb_status::HDB_STATUS_PANIC,
            hdb_status::HDB_STATUS_INTERNAL,
            hdb_status::HDB_STATUS_BUSY,
            hdb_status::HDB_STATUS_DIVERGED,
        ];
        assert_eq!(all.len(), NAMES.len());
        for s in all {
            let name = NAMES[s as usize].to_str().expect("ascii");
            assert_eq!(name, format!("{s:?}"));
        }
    }
}
