//! Arbitrary bytes as an agent's `Keycap-Context` header lines and its
//! `traceparent`.
//! Invariants: `keycap_proxy::check::keycap_context`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::check::keycap_context(data));
