//! keycap's wire API and the few value types both planes share.
//!
//! The control plane and the proxy are separate deployables that meet only
//! here: the generated protobuf types and services (`pb`), the descriptor set
//! for gRPC reflection, integer money (`Micros`), the vault-key secret format
//! (`secret`), vendor profiles (`profile`), the price tables they read (`prices`),
//! allowed-endpoint patterns (`endpoint`, so the control plane
//! accepts exactly the patterns the proxy can match), a key's network limits
//! (`network`: CIDRs, zone, rate) and timestamp conversions. Nothing in this crate does I/O.

#![forbid(unsafe_code)]

pub mod endpoint;
pub mod money;
pub mod network;
pub mod prices;
pub mod profile;
pub mod secret;
pub mod time;
pub mod tls;

/// Generated protobuf messages and gRPC services for `keycap.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keycap.v1");
}

/// Encoded `FileDescriptorSet` of keycap/v1, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keycap_descriptor.bin"));

pub use money::{Micros, MICROS_PER_USD};

/// Client-controlled text shortened to at most `keep` bytes (on a char
/// boundary, with "..." when cut) before it goes into an error message.
pub fn clip(s: &str, keep: usize) -> String {
    if s.len() <= keep {
        return s.to_string();
    }
    let mut end = keep;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    #[test]
    fn clip_keeps_short_text_and_cuts_on_a_char_boundary() {
        assert_eq!(super::clip("abc", 3), "abc");
        assert_eq!(super::clip("abcd", 3), "abc...");
        // 'é' is two bytes: a cut inside it backs off to before it.
        assert_eq!(super::clip("aé", 2), "a...");
    }
}
