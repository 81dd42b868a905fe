//! Arbitrary bytes as what a client sends on one connection (`keycap_proxy::edge`).
//! Invariants: `keycap_proxy::check::request_framing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::check::request_framing(data));
