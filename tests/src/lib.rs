//! Test support shared by keycap's test suites: the end-to-end harness, the
//! mock vendor, a PostgreSQL database per test (`pg`), and a throwaway
//! certificate authority for TLS tests (`pki`).

pub mod harness;
pub mod mock;
pub mod pg;
pub mod pki;
