//! Arbitrary bytes as request headers, through the check that refuses
//! headers changing how a vendor reads a body.
//! Invariants: `keycap_proxy::check::body_headers`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::check::body_headers(data));
