#![no_main]
//! Fuzz target `ldm_keys`: see `harness::ldm_keys`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::ldm_keys(data));
