//! Arbitrary bytes, cut where the fuzzer says, as an SSE response through
//! the SSE reader and every profile's stream settler.
//! Invariants: `keycap_proxy::pricing::check::sse_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keycap_proxy::pricing::check::sse_stream(data));
