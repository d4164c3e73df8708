#![no_main]
//! See `keel_fuzz::dead_letter_headers` for what is generated and checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_fuzz::dead_letter_headers(data));
