//! Arbitrary bytes as a raw request-target (`keycap_proxy::target`).
//! Invariants: `keycap_proxy::check::target_path`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::check::target_path(data));
