//! Test support shared by keycap's test suites: the end-to-end harness, the
//! mock vendor, a PostgreSQL database per test (`pg`), a throwaway
//! certificate authority for TLS tests (`pki`), an OTLP trace collector
//! (`otlp`), a webhook receiver (`receiver`), and a whole fleet with the load that drives it (`fleet`, also
//! used by the fleet benchmark).

pub mod fleet;
pub mod harness;
pub mod mock;
pub mod otlp;
pub mod pg;
pub mod pki;
pub mod receiver;
