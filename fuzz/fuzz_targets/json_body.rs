//! Arbitrary bytes as the JSON body of every JSON-priced endpoint.
//! Invariants: `keycap_proxy::pricing::check::json_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::pricing::check::json_body(data));
