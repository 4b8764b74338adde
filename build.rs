//! Gives libhdb.so its SONAME (`libhdb.so.<abi major>`) and exports the ABI version to the crate.

/// Bumped whenever a change breaks callers compiled against an older `include/hdb.h`.
const ABI_VERSION: u32 = 1;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-env=HDB_ABI_VERSION={ABI_VERSION}");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" || os == "android" || os == "freebsd" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libhdb.so.{ABI_VERSION}");
    }
}
