//! keycap-control: the control plane.
//!
//! Owns vendors (with envelope-encrypted credentials), vault keys, budget
//! leases and the audit ledger; serves the admin API over gRPC and REST and
//! the fleet API proxies use. Reading order: `domain` (validated types),
//! `store` (persistence), `ledger` (the audit chain's rules), `service` (operations, with `ingest` for spend reports), then the front ends
//! `grpc` and `rest` (whose JSON shapes, shared with the CLI, are `answers`),
//! the dashboard `ui`, and `server` (wiring).

#![forbid(unsafe_code)]

pub mod answers;
pub mod approval;
pub mod check;
pub mod config;
pub mod credential;
pub mod crypto;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod hooks;
pub mod ingest;
pub mod ledger;
pub mod metrics;
pub mod probe;
pub mod rest;
pub mod scope;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod ui;
pub mod webhook;
