//! The C ABI. Every `extern "C"` function runs inside [`boundary::ffi_boundary`]; this layer
//! converts and checks arguments, nothing else.
//!
//! Ownership: every `hdb_*_new`/`_load` hands the caller an object that it frees with the
//! matching `hdb_*_free` (NULL is a no-op). Objects keep what they depend on alive, so free
//! order does not matter. Thread safety: `const` objects (model, adapter, hypernet) may be used
//! from many threads at once; a session belongs to one thread at a time.

#![allow(non_camel_case_types)]

pub mod adapter;
pub mod boundary;
pub mod finetune;
pub mod generate;
pub mod hypernet;
pub mod log;
pub mod model;
pub mod params;
pub mod runtime;
pub mod session;
pub mod status;
pub mod version;

pub use status::hdb_status;

/// A progress callback: `done` of `total` units of `stage` (a short UTF-8 name, valid during
/// the call) are finished. Return `true` to go on, `false` to cancel (the call then returns
/// `HDB_STATUS_CANCELLED`). `bool` is C's one-byte `_Bool` (C#: `[return:
/// MarshalAs(UnmanagedType.I1)]`). `user_data` is the params' `progress_user_data`, passed
/// unchanged; hdb stores neither beyond the call that received them.
///
/// Thread: called on the calling thread or on an hdb worker thread while the calling thread
/// waits inside the hdb call, one call at a time. It must not unwind (no C++ exception, C#
/// exception or Go panic may leave it: catch inside) and must not call back into hdb, except
/// `hdb_session_cancel`, `hdb_last_error_copy`/`hdb_last_error_message`, `hdb_status_name`
/// and the version functions.
pub type hdb_progress_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut std::ffi::c_void,
        done: u64,
        total: u64,
        stage: *const std::ffi::c_char,
    ) -> bool,
>;

/// A host progress callback and its user data, called from hdb's worker threads during a long
/// call while the calling thread waits (the headers say so).
pub(crate) struct HostProgress {
    pub(crate) cb: hdb_progress_fn,
    pub(crate) user_data: *mut std::ffi::c_void,
}

// SAFETY: the header documents that progress callbacks may run on an hdb thread while the
// caller waits; user_data is only passed back to the callback.
unsafe impl Send for HostProgress {}
unsafe impl Sync for HostProgress {}

impl HostProgress {
    /// Calls the callback (if any) with (done, total, stage); `true` means go on.
    pub(crate) fn call(&self, done: usize, total: usize, stage: &std::ffi::CStr) -> bool {
        match self.cb {
            // SAFETY: the host's callback with its own user data.
            Some(cb) => unsafe { cb(self.user_data, done as u64, total as u64, stage.as_ptr()) },
            None => true,
        }
    }
}
