#![no_main]
//! Fuzz target `safetensors`: see `harness::safetensors`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::safetensors(data));
