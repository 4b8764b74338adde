#![no_main]
//! Fuzz target `hypernet`: see `harness::hypernet`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::hypernet(data));
