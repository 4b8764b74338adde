#![no_main]
//! Fuzz target `hypernet_config`: see `harness::hypernet_config`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::hypernet_config(data));
