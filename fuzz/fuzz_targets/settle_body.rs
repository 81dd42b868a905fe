//! Arbitrary statuses and bodies as the response to every profile's priced call.
//! Invariants: `keycap_proxy::pricing::check::settle_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::pricing::check::settle_body(data));
