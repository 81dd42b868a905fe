//! Arbitrary bytes as the form-encoded body of every form-priced endpoint.
//! Invariants: `keycap_proxy::pricing::check::form_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::pricing::check::form_body(data));
