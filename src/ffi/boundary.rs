//! The one place where Rust results and panics become C status codes and messages.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};
use crate::ffi::status::hdb_status;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    /// Exported calls this thread is inside (a callback may call hdb again).
    static IN_CALL: Cell<usize> = const { Cell::new(0) };
}

/// Whether a panic on this thread belongs to hdb: raised inside an exported call, or on one of
/// hdb's worker threads (named `hdb-*` by the runtime) while a call waits for it.
fn panic_is_ours() -> bool {
    IN_CALL.with(Cell::get) > 0
        || std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("hdb-"))
}

/// Sends hdb's panics to the log (the host's callback) instead of the host's stderr; any
/// other panic in the process goes to the hook that was there before. Installed on the
/// first exported call, so Rust users of the crate keep their own hook untouched.
fn route_panics_to_the_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !panic_is_ours() {
                return previous(info);
            }
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let bt = std::backtrace::Backtrace::capture();
            let bt = match bt.status() {
                std::backtrace::BacktraceStatus::Captured => format!("\n{bt}"),
                _ => String::new(),
            };
            log::error!(target: "hdb::panic", "panic{at}: {}{bt}", panic_message(info.payload()));
        }));
    });
}

/// Counts the current thread into an exported call for as long as it lives.
struct InCall;

impl InCall {
    fn enter() -> InCall {
        route_panics_to_the_log();
        IN_CALL.with(|c| c.set(c.get() + 1));
        InCall
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        IN_CALL.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

fn set_last_error(msg: &str) {
    // Interior NULs would truncate the C string; replace them so nothing is lost silently.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs the body of an exported function: `Ok` -> `HDB_STATUS_OK`; `Err` -> its status and
/// the thread's last-error message; a panic -> `HDB_STATUS_PANIC` with the panic's text.
pub fn ffi_boundary(func: &'static str, f: impl FnOnce() -> Result<()>) -> hdb_status {
    let _in = InCall::enter();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => hdb_status::HDB_STATUS_OK,
        Ok(Err(e)) => {
            let msg = format!("{func}: {e}");
            log::debug!("{msg}");
            set_last_error(&msg);
            hdb_status::from(&e)
        }
        Err(payload) => {
            let msg = format!("{func}: panic: {}", panic_message(payload.as_ref()));
            log::error!("{msg}");
            set_last_error(&msg);
            hdb_status::HDB_STATUS_PANIC
        }
    }
}

/// For the few exported functions that cannot fail: a panic yields `fallback`.
pub fn ffi_infallible<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    let _in = InCall::enter();
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        set_last_error(&format!("panic: {}", panic_message(p.as_ref())));
        fallback
    })
}

/// Borrows a required pointer argument, or fails naming it.
///
/// # Safety
/// `p` must be NULL or point to a live, properly aligned `T`.
pub unsafe fn arg_ref<'a, T>(p: *const T, name: &'static str) -> Result<&'a T> {
    // SAFETY: the caller guarantees p is NULL or valid.
    unsafe { p.as_ref() }.ok_or(Error::NullArgument(name))
}

/// Checks a required out-pointer.
pub fn out_ptr<T>(p: *mut T, name: &'static str) -> Result<*mut T> {
    if p.is_null() {
        Err(Error::NullArgument(name))
    } else {
        Ok(p)
    }
}

/// A required C string argument, as bytes (paths need not be UTF-8).
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string.
pub unsafe fn arg_cstr<'a>(p: *const c_char, name: &'static str) -> Result<&'a CStr> {
    if p.is_null() {
        return Err(Error::NullArgument(name));
    }
    // SAFETY: non-null, NUL-terminated per the caller's contract.
    Ok(unsafe { CStr::from_ptr(p) })
}

/// A C string argument that must be UTF-8 text.
///
/// # Safety
/// As [`arg_cstr`].
pub unsafe fn arg_str<'a>(p: *const c_char, name: &'static str) -> Result<&'a str> {
    // SAFETY: forwarded contract.
    let c = unsafe { arg_cstr(p, name) }?;
    c.to_str()
        .map_err(|_| Error::invalid_arg(name, "is not valid UTF-8"))
}

/// A path argument; on Unix any bytes are a valid path.
///
/// # Safety
/// As [`arg_cstr`].
pub unsafe fn arg_path(p: *const c_char, name: &'static str) -> Result<std::path::PathBuf> {
    // SAFETY: forwarded contract.
    let c = unsafe { arg_cstr(p, name) }?;
    if c.is_empty() {
        return Err(Error::invalid_arg(name, "is an empty path"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::ffi::OsStr::from_bytes(c.to_bytes()).into())
    }
    #[cfg(not(unix))]
    {
        c.to_str()
            .map(Into::into)
            .map_err(|_| Error::invalid_arg(name, "is not valid UTF-8"))
    }
}

/// Copies `text` and a NUL into `buf` (of `buf_len` bytes) and stores the size it needs,
/// NUL included, in `*needed` when non-NULL. A NULL or short `buf` yields BUFFER_TOO_SMALL
/// (after `*needed` is set), so callers can ask for the size first.
///
/// # Safety
/// `buf` must be NULL or valid for `buf_len` bytes; `needed` NULL or valid.
pub unsafe fn write_string(
    text: &str,
    buf: *mut c_char,
    buf_len: usize,
    needed: *mut usize,
) -> Result<()> {
    let n = text.len() + 1;
    if !needed.is_null() {
        // SAFETY: non-null per check; the caller guarantees validity.
        unsafe { *needed = n };
    }
    if buf.is_null() || buf_len < n {
        return Err(Error::BufferTooSmall {
            needed: n,
            got: if buf.is_null() { 0 } else { buf_len },
        });
    }
    // SAFETY: buf holds at least n bytes per the check above and the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, text.len());
        *buf.add(text.len()) = 0;
    }
    Ok(())
}

/// The message of the last failing call on this thread ("" if none). Valid until the next
/// failing hdb call on this thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn hdb_last_error_message() -> *const c_char {
    ffi_infallible(c"".as_ptr(), || LAST_ERROR.with(|e| e.borrow().as_ptr()))
}

/// Copies the message of the last failing call on this thread into `buf` (`len` bytes),
/// truncated to `len - 1` bytes and NUL-terminated (nothing is written when `len` is 0), and
/// returns the message's full length in bytes, NUL excluded (as `snprintf` does: a result
/// `>= len` means it was truncated). "" (0) if no call on this thread has failed.
///
/// The message belongs to the OS thread that made the failing call: read it there, before
/// that thread's next hdb call. Hosts whose code can move between OS threads between two
/// native calls (Go goroutines, .NET tasks) call this inside the same native call as the
/// failing function (a cgo C shim, or the same P/Invoke sequence with no `await` between):
/// the bindings in `bindings/` do exactly that.
///
/// # Safety
/// `buf` NULL (only with `len` 0) or valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn hdb_last_error_copy(buf: *mut c_char, len: usize) -> usize {
    ffi_infallible(0, || {
        LAST_ERROR.with(|e| {
            let e = e.borrow();
            let bytes = e.as_bytes();
            if !buf.is_null() && len > 0 {
                let n = bytes.len().min(len - 1);
                // SAFETY: buf is valid for len > n bytes per the caller's contract.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, n);
                    *buf.add(n) = 0;
                }
            }
            bytes.len()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_status_and_message() {
        let s = ffi_boundary("hdb_test", || panic!("boom {}", 42));
        assert_eq!(s, hdb_status::HDB_STATUS_PANIC);
        // SAFETY: the pointer is the thread-local message, valid until the next failure.
        let msg = unsafe { CStr::from_ptr(hdb_last_error_message()) };
        assert_eq!(msg.to_str().ok(), Some("hdb_test: panic: boom 42"));
    }

    #[test]
    fn errors_map_to_their_status() {
        let s = ffi_boundary("hdb_test", || Err(Error::NullArgument("out")));
        assert_eq!(s, hdb_status::HDB_STATUS_NULL_ARGUMENT);
        // SAFETY: as above.
        let msg = unsafe { CStr::from_ptr(hdb_last_error_message()) };
        assert_eq!(msg.to_str().ok(), Some("hdb_test: argument 'out' is NULL"));
    }

    #[test]
    fn last_error_copy_truncates_and_reports_the_full_length() {
        let _ = ffi_boundary("hdb_test", || Err(Error::NullArgument("out")));
        let full = "hdb_test: argument 'out' is NULL";
        let mut buf = [0x55 as c_char; 64];
        // SAFETY: buf holds 64 bytes.
        let n = unsafe { hdb_last_error_copy(buf.as_mut_ptr(), buf.len()) };
        assert_eq!(n, full.len());
        // SAFETY: NUL-terminated by the call.
        assert_eq!(
            unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().ok(),
            Some(full)
        );
        let mut small = [0x55 as c_char; 9];
        // SAFETY: small holds 9 bytes.
        let n = unsafe { hdb_last_error_copy(small.as_mut_ptr(), small.len()) };
        assert_eq!(n, full.len());
        // SAFETY: NUL-terminated by the call.
        assert_eq!(
            unsafe { CStr::from_ptr(small.as_ptr()) }.to_str().ok(),
            Some("hdb_test")
        );
        // SAFETY: len 0 writes nothing.
        assert_eq!(
            unsafe { hdb_last_error_copy(std::ptr::null_mut(), 0) },
            full.len()
        );
    }
}
