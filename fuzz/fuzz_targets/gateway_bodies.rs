#![no_main]
//! See `keel_fuzz::gateway_bodies` for what is generated and checked. The body
//! types are the gateway example's own (`examples/gateway/body.rs`), compiled
//! into `keel_fuzz::body` by path.

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_fuzz::gateway_bodies(data));
