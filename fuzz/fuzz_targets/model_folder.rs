#![no_main]
//! Fuzz target `model_folder`: see `harness::model_folder`.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::model_folder(data));
