//! Routing the library's log records to the host.

use std::ffi::{c_char, c_void, CString};

use super::boundary::ffi_boundary;
use super::status::hdb_status;
use crate::error::Error;

/// Log levels, most severe first. `HDB_LOG_LEVEL_OFF` disables logging.
pub type hdb_log_level = u32;
pub const HDB_LOG_LEVEL_OFF: hdb_log_level = 0;
pub const HDB_LOG_LEVEL_ERROR: hdb_log_level = 1;
pub const HDB_LOG_LEVEL_WARN: hdb_log_level = 2;
pub const HDB_LOG_LEVEL_INFO: hdb_log_level = 3;
pub const HDB_LOG_LEVEL_DEBUG: hdb_log_level = 4;
pub const HDB_LOG_LEVEL_TRACE: hdb_log_level = 5;

/// Receives one log record: its level, the emitting module (e.g. "hdb::model") and the
/// message, both UTF-8 and valid only during the call.
///
/// Thread: called from any thread (the one logging: a caller's or an hdb worker), from
/// several at once. It must not unwind (catch inside), and may call hdb functions
/// (`hdb_set_log_callback` included).
pub type hdb_log_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        level: hdb_log_level,
        target: *const c_char,
        message: *const c_char,
    ),
>;

/// Frees a stored callback's user data once hdb no longer uses it (see
/// `hdb_set_log_callback_ex`): called once, must not unwind.
pub type hdb_free_fn = Option<unsafe extern "C" fn(user_data: *mut c_void)>;

/// The host's user data and its destructor, run when the last sink holding it is dropped:
/// the logging layer drops a replaced sink only after every call into it has returned.
struct UserData {
    ptr: *mut c_void,
    free: hdb_free_fn,
}
// SAFETY: the host promises (see hdb_set_log_callback) that its callback, user_data and
// destructor may be used from any thread.
unsafe impl Send for UserData {}
unsafe impl Sync for UserData {}

impl UserData {
    // A method, so closures capture the whole (Send) wrapper rather than its raw field.
    fn ptr(&self) -> *mut c_void {
        self.ptr
    }
}

impl Drop for UserData {
    fn drop(&mut self) {
        if let Some(free) = self.free {
            // SAFETY: the host's destructor for its own user data, called exactly once.
            unsafe { free(self.ptr) };
        }
    }
}

fn level_of(l: log::Level) -> hdb_log_level {
    match l {
        log::Level::Error => HDB_LOG_LEVEL_ERROR,
        log::Level::Warn => HDB_LOG_LEVEL_WARN,
        log::Level::Info => HDB_LOG_LEVEL_INFO,
        log::Level::Debug => HDB_LOG_LEVEL_DEBUG,
        log::Level::Trace => HDB_LOG_LEVEL_TRACE,
    }
}

/// Sends the library's log records up to `max_level` to `callback` (replacing any earlier
/// one); a NULL callback or `HDB_LOG_LEVEL_OFF` stops logging. The same as
/// `hdb_set_log_callback_ex(callback, user_data, NULL, max_level)`.
///
/// Thread: the callback may be called from any thread, hdb's workers included, and from
/// several at once; it must be thread-safe and must not unwind (no C++ exception, C#
/// exception or Go panic may leave it: catch inside). It may call hdb functions, including
/// this one (e.g. to stop logging). This is the only process-wide setting of hdb.
///
/// Synchronous: when called outside any hdb log callback, this returns only after every call
/// into the callbacks it replaced has returned on every thread, so the old `user_data` may be
/// freed as soon as it returns. Called from inside a callback it cannot wait (its own call is
/// in flight) and returns at once; free the user data after a later call from outside, or use
/// `hdb_set_log_callback_ex`, which frees it for you. Do not call it while holding a lock
/// that the callback takes.
#[no_mangle]
pub extern "C" fn hdb_set_log_callback(
    callback: hdb_log_fn,
    user_data: *mut c_void,
    max_level: hdb_log_level,
) -> hdb_status {
    set_log_callback("hdb_set_log_callback", callback, user_data, None, max_level)
}

/// As `hdb_set_log_callback`, and hdb owns `user_data` from then on: `free_user_data` (may be
/// NULL) is called with it exactly once, when hdb no longer uses it, that is when a later
/// call replaces or removes this callback and every call into it has returned (during that
/// later call when made outside a callback; otherwise on the thread whose call into the old
/// callback returns last). It is called on that thread, must not unwind and must not call
/// `hdb_set_log_callback*`. On failure (`max_level` out of range) nothing is stored and
/// `free_user_data` is not called: the caller still owns `user_data`. Bindings use this to
/// release the handle their trampoline's user data stands for (a Go `cgo.Handle`, a .NET
/// `GCHandle`).
#[no_mangle]
pub extern "C" fn hdb_set_log_callback_ex(
    callback: hdb_log_fn,
    user_data: *mut c_void,
    free_user_data: hdb_free_fn,
    max_level: hdb_log_level,
) -> hdb_status {
    set_log_callback(
        "hdb_set_log_callback_ex",
        callback,
        user_data,
        free_user_data,
        max_level,
    )
}

fn set_log_callback(
    func: &'static str,
    callback: hdb_log_fn,
    user_data: *mut c_void,
    free_user_data: hdb_free_fn,
    max_level: hdb_log_level,
) -> hdb_status {
    ffi_boundary(func, || {
        let level = match max_level {
            HDB_LOG_LEVEL_OFF => log::LevelFilter::Off,
            HDB_LOG_LEVEL_ERROR => log::LevelFilter::Error,
            HDB_LOG_LEVEL_WARN => log::LevelFilter::Warn,
            HDB_LOG_LEVEL_INFO => log::LevelFilter::Info,
            HDB_LOG_LEVEL_DEBUG => log::LevelFilter::Debug,
            HDB_LOG_LEVEL_TRACE => log::LevelFilter::Trace,
            other => {
                return Err(Error::invalid_arg(
                    "max_level",
                    format!("{other} is not an hdb_log_level (0..=5)"),
                ))
            }
        };
        let ud = UserData {
            ptr: user_data,
            free: free_user_data,
        };
        let sink: Option<crate::logging::Sink> = match callback {
            Some(cb) => Some(Box::new(move |lvl, target, msg| {
                let target = CString::new(target.replace('\0', "")).unwrap_or_default();
                let msg = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
                // SAFETY: the host registered this callback with this user_data.
                unsafe { cb(ud.ptr(), level_of(lvl), target.as_ptr(), msg.as_ptr()) };
            })),
            // No callback: nothing will use user_data, so it is released now (by `ud`'s drop).
            None => None,
        };
        if !crate::logging::set_sink(sink, level) {
            log::warn!(
                "another `log` logger is installed in this process; hdb's callback is not used"
            );
        }
        Ok(())
    })
}
