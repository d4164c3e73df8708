#![no_main]
//! See `keel_fuzz::s3_config` for what is generated and checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_fuzz::s3_config(data));
