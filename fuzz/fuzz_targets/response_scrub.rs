//! Arbitrary bytes as a secret and a vendor's response body cut into chunks
//! (`keycap_proxy::scrub`). Invariants: `keycap_proxy::check::response_scrub`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::check::response_scrub(data));
