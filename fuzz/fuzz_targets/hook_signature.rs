//! Arbitrary bytes as a vendor's webhook signature headers and body.
//! Invariants: `keycap_vendors::webhooks::check::hook_signature`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::check::hook_signature(data));
