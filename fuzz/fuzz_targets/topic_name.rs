#![no_main]
//! See `keel_fuzz::topic_name` for what is generated and checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_fuzz::topic_name(data));
