//! Arbitrary bytes as a write's query string and body, for Stripe (which
//! reads both as one set) and every other profile (which refuses a write's
//! query unless it is harmless).
//! Invariants: `keycap_proxy::pricing::check::query_and_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::pricing::check::query_and_body(data));
