//! Arbitrary bytes as an allowed-endpoint pattern, a method and a path.
//! Invariants: `keycap_proxy::check::endpoint_match`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::check::endpoint_match(data));
