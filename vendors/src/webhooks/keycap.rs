//! keycap's own signature on what it sends: alert webhooks and relayed
//! inbound events. One scheme, Stripe's, so a receiver verifies it with
//! code it likely has: `Keycap-Signature: t=<unix>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>">`. Signing only; receivers verify.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying keycap's signature.
pub const SIGNATURE_HEADER: &str = "Keycap-Signature";

/// The `Keycap-Signature` value for `body` sent at unix time `t`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_stripes_scheme() {
        // Known answer: HMAC-SHA256("whsec_test", "1700000000.{}").
        let sig = signature(b"whsec_test", 1_700_000_000, b"{}");
        let (t, v1) = sig.split_once(',').unwrap();
        assert_eq!(t, "t=1700000000");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_test").unwrap();
        mac.update(b"1700000000.{}");
        assert_eq!(
            v1,
            format!("v1={}", hex::encode(mac.finalize().into_bytes()))
        );
        assert_eq!(v1.len(), 3 + 64);
    }

    #[test]
    fn a_keycap_signature_verifies_as_a_stripe_one() {
        // Receivers are told to verify with Stripe's scheme; keycap's own
        // Stripe verifier is the proof that they can.
        let body = br#"{"id":"evt_1"}"#;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "stripe-signature",
            signature(b"kchook_s", 1_700_000_000, body).parse().unwrap(),
        );
        let event = super::super::Inbound {
            headers: &headers,
            body,
            url: "",
        };
        super::super::stripe::verify(&["kchook_s"], &event, 1_700_000_000, 300).unwrap();
    }
}
