//! Version queries. `include/hdb.h` carries the same numbers as `HDB_VERSION_*` macros.

use std::ffi::c_char;

use super::boundary::ffi_infallible;

const VERSION_C: &std::ffi::CStr = match std::ffi::CStr::from_bytes_with_nul(
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
) {
    Ok(s) => s,
    Err(_) => c"unknown",
};

/// The library version, `"MAJOR.MINOR.PATCH"`; static storage.
#[no_mangle]
pub extern "C" fn hdb_version_string() -> *const c_char {
    ffi_infallible(c"unknown".as_ptr(), || VERSION_C.as_ptr())
}

/// The ABI version; the shared library's SONAME is `libhdb.so.<this>`. A program built
/// against `HDB_ABI_VERSION` may check it at start-up.
#[no_mangle]
pub extern "C" fn hdb_abi_version() -> u32 {
    ffi_infallible(0, || crate::ABI_VERSION)
}
