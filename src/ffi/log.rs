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
/// message, both UTF-8 and valid only during the call. May be called from any thread.
pub type hdb_log_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        level: hdb_log_level,
        target: *const c_char,
        message: *const c_char,
    ),
>;

struct UserData(*mut c_void);
// SAFETY: the host promises (see hdb_set_log_callback) that its callback and user_data may be
// used from any thread.
unsafe impl Send for UserData {}
unsafe impl Sync for UserData {}

impl UserData {
    // A method, so closures capture the whole (Send) wrapper rather than its raw field.
    fn ptr(&self) -> *mut c_void {
        self.0
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
/// one); a NULL callback or `HDB_LOG_LEVEL_OFF` stops logging. The callback must be
/// thread-safe: it may be called from hdb's worker threads. It may call hdb functions,
/// including this one (e.g. to stop logging). This is the only process-wide setting of hdb.
///
/// Synchronous: when called outside any hdb log callback, this returns only after every call
/// into the callbacks it replaced has returned on every thread, so the old `user_data` may be
/// freed as soon as it returns. Called from inside a callback it cannot wait (its own call is
/// in flight) and returns at once; free the user data after a later call from outside. Do not
/// call it while holding a lock that the callback takes.
#[no_mangle]
pub extern "C" fn hdb_set_log_callback(
    callback: hdb_log_fn,
    user_data: *mut c_void,
    max_level: hdb_log_level,
) -> hdb_status {
    ffi_boundary("hdb_set_log_callback", || {
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
        let sink: Option<crate::logging::Sink> = callback.map(|cb| {
            let ud = UserData(user_data);
            let sink: crate::logging::Sink = Box::new(move |lvl, target, msg| {
                let target = CString::new(target.replace('\0', "")).unwrap_or_default();
                let msg = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
                // SAFETY: the host registered this callback with this user_data.
                unsafe { cb(ud.ptr(), level_of(lvl), target.as_ptr(), msg.as_ptr()) };
            });
            sink
        });
        if !crate::logging::set_sink(sink, level) {
            log::warn!(
                "another `log` logger is installed in this process; hdb's callback is not used"
            );
        }
        Ok(())
    })
}
