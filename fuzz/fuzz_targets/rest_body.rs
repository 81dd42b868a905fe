//! Arbitrary bytes as the JSON body of a REST admin call (new key, vendor).
//! Invariants: `keycap_control::check::rest_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_control::check::rest_body(data));
