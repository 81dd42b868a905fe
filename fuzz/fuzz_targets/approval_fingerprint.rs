//! Arbitrary bytes as two requests an approval could be bound to (key,
//! method, path, query, body, idempotency key, bound headers).
//! Invariants: `keycap_proxy::check::approval_fingerprint`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::check::approval_fingerprint(data));
