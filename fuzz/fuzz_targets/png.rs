#![no_main]
//! Fuzz target `png`: see `harness::png`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::png(data));
