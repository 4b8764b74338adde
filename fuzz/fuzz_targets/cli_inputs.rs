#![no_main]
//! Fuzz target `cli_inputs`: see `harness::cli_inputs`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::cli_inputs(data));
