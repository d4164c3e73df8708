#![no_main]
//! See `keel_fuzz::kafka_config` for what is generated and checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_fuzz::kafka_config(data));
