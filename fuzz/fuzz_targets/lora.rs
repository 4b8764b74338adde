#![no_main]
//! Fuzz target `lora`: see `harness::adapter`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::adapter(data));
