#![no_main]
//! See `keel_fuzz::s3_error` for what is generated and checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_fuzz::s3_error(data));
