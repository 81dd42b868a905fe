//! Test support shared by keycap's test suites: the end-to-end harness, the
//! mock vendor, and a PostgreSQL database per test (`pg`).

pub mod harness;
pub mod mock;
pub mod pg;
