#![no_main]
//! See `keel_fuzz::envelope_decode` for what is generated and checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_fuzz::envelope_decode(data));
