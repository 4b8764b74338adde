#![no_main]
//! Fuzz target `configs`: see `harness::configs`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::configs(data));
