//! keycap-vendors: what each vendor means, written once for both planes.
//!
//! Owns the vendor profiles' rules: what a call costs before it is sent and
//! after it is answered (`pricing`, one module per vendor), how a vendor's
//! event stream is read for settlement (`sse`), how a refusal is worded in
//! the vendor's own error envelope (`envelope`), which request headers would
//! make a vendor read a body differently from pricing (`body_headers`), and
//! how a vendor signs the webhooks it sends (`webhooks`). The proxy enforces
//! with this code; the control plane runs the same code when it answers what a
//! call would cost, so the two never disagree on a price.
//!
//! It must never do I/O, read a clock or touch a budget: pricing is a pure
//! function of the request, the response and the price tables, and the
//! callers own everything stateful.
//!
//! Reading order: `pricing` (the trait, then a vendor module), `sse`,
//! `envelope`, `webhooks` (inbound signatures and keycap's own).

#![forbid(unsafe_code)]

pub mod body_headers;
pub mod envelope;
pub mod pricing;
pub mod sse;
pub mod webhooks;
