#![no_main]
//! See `keel_fuzz::presign_url` for what is generated and checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_fuzz::presign_url(data));
