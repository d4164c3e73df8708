#![no_main]
//! See `keel_fuzz::object_key` for what is generated and checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_fuzz::object_key(data));
