//! Arbitrary bytes as a presented vault key, and as the seed of a well-formed one.
//! Invariants: `keycap_proxy::check::vault_key`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::check::vault_key(data));
