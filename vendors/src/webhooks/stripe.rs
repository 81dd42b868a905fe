//! Stripe's webhook signature, as Stripe documents it and stripe-python's
//! `WebhookSignature` checks it: `Stripe-Signature: t=<unix>,v1=<hex>,...`
//! where each `v1` is the hex HMAC-SHA256 of `"<t>.<body>"` keyed with the
//! endpoint's `whsec_...` secret (its text, prefix included). During a
//! secret roll Stripe sends one `v1` per live secret; any may match. The
//! event id (replay) is the body's `id`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{fresh, header, same, Inbound, Refusal, Verified};

pub const SIGNATURE_HEADER: &str = "stripe-signature";

/// A parsed `Stripe-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeSignature {
    pub t: i64,
    /// The `v1` signatures, hex as sent.
    pub v1: Vec<String>,
}

/// Parses the header as stripe-python does: comma-separated `key=value`
/// items, the first `t` a decimal timestamp, every `v1` a signature; other
/// schemes (`v0`, test-mode extras) are ignored.
pub fn parse_header(value: &str) -> Result<StripeSignature, Refusal> {
    let mut t = None;
    let mut v1 = Vec::new();
    for item in value.split(',') {
        let Some((k, v)) = item.split_once('=') else {
            continue;
        };
        match k {
            "t" if t.is_none() => {
                t = Some(v.parse::<i64>().map_err(|_| Refusal::Malformed)?);
            }
            "v1" => v1.push(v.to_string()),
            _ => {}
        }
    }
    match t {
        Some(t) if !v1.is_empty() => Ok(StripeSignature { t, v1 }),
        _ => Err(Refusal::Malformed),
    }
}

/// The hex `v1` for `body` at `t` under `secret`.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Stripe signing secrets are `whsec_` followed by the secret.
pub fn check_secret(secret: &str) -> Result<(), &'static str> {
    match secret.strip_prefix("whsec_") {
        Some(rest) if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_graphic()) => Ok(()),
        _ => Err("a Stripe signing secret starts with whsec_"),
    }
}

/// The event's id: the body's top-level `id` (`evt_...`). A signed body
/// without one is still named, by its signature, so a replay of it is
/// caught all the same.
pub fn event_id(body: &[u8], sig: &StripeSignature) -> String {
    #[derive(serde::Deserialize)]
    struct Event {
        id: String,
    }
    match serde_json::from_slice::<Event>(body) {
        Ok(e) if !e.id.is_empty() => e.id,
        _ => format!("sig:{}", sig.v1[0]),
    }
}

pub fn verify(
    secrets: &[&str],
    event: &Inbound<'_>,
    now: i64,
    tolerance_secs: i64,
) -> Result<Verified, Refusal> {
    let sig = parse_header(header(event.headers, SIGNATURE_HEADER)?)?;
    let matched = secrets.iter().any(|secret| {
        let expected = sign(secret, sig.t, event.body);
        sig.v1
            .iter()
            .any(|v| same(expected.as_bytes(), v.as_bytes()))
    });
    if !matched {
        return Err(Refusal::Forged);
    }
    // After the signature, as Stripe orders it: a stale refusal then means
    // a genuine event arrived late (or was replayed), never a forgery.
    if !fresh(sig.t, now, tolerance_secs) {
        return Err(Refusal::Stale);
    }
    Ok(Verified {
        event_id: event_id(event.body, &sig),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    // Produced by stripe-python 16.1.0:
    // WebhookSignature._compute_signature("1700000000.{...}", SECRET).
    const SECRET: &str = "whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_test_1","object":"event"}"#;
    const V1: &str = "29ab30b7065c11b28e53ac114fac5d6c492ed811a12d11ed2c2aad5bb4cf9809";

    fn event(sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(SIGNATURE_HEADER, sig.parse().unwrap());
        h
    }

    fn check(secrets: &[&str], sig: &str, body: &[u8], now: i64) -> Result<Verified, Refusal> {
        let headers = event(sig);
        verify(
            secrets,
            &Inbound {
                headers: &headers,
                body,
                url: "",
            },
            now,
            300,
        )
    }

    #[test]
    fn the_stripe_python_vector_verifies() {
        assert_eq!(sign(SECRET, 1_700_000_000, BODY), V1);
        let v = check(
            &[SECRET],
            &format!("t=1700000000,v1={V1}"),
            BODY,
            1_700_000_100,
        )
        .unwrap();
        assert_eq!(v.event_id, "evt_test_1");
    }

    #[test]
    fn any_v1_may_match_during_a_roll() {
        let old = sign("whsec_old", 1_700_000_000, BODY);
        let new = sign("whsec_new", 1_700_000_000, BODY);
        let header = format!("t=1700000000,v1={old},v1={new},v0=ignored");
        assert!(check(&["whsec_new"], &header, BODY, 1_700_000_000).is_ok());
        assert!(check(&["whsec_old"], &header, BODY, 1_700_000_000).is_ok());
        assert!(check(&["whsec_x", "whsec_new"], &header, BODY, 1_700_000_000).is_ok());
        assert_eq!(
            check(&["whsec_other"], &header, BODY, 1_700_000_000),
            Err(Refusal::Forged)
        );
    }

    #[test]
    fn forged_stale_and_malformed_are_refused() {
        let good = format!("t=1700000000,v1={V1}");
        assert_eq!(
            check(&[SECRET], &good, b"{}", 1_700_000_000),
            Err(Refusal::Forged)
        );
        assert_eq!(
            check(&[SECRET], &good, BODY, 1_700_000_301),
            Err(Refusal::Stale)
        );
        assert_eq!(
            check(&[SECRET], &good, BODY, 1_699_999_699),
            Err(Refusal::Stale)
        );
        assert!(check(&[SECRET], &good, BODY, 1_700_000_300).is_ok());
        // The timestamp is signed: moving it forward breaks the signature.
        let moved = format!("t=1700000100,v1={V1}");
        assert_eq!(
            check(&[SECRET], &moved, BODY, 1_700_000_100),
            Err(Refusal::Forged)
        );
        for bad in [
            "",
            "t=1700000000",
            &format!("v1={V1}"),
            "t=x,v1=00",
            "garbage",
        ] {
            assert_eq!(
                check(&[SECRET], bad, BODY, 1_700_000_000),
                Err(Refusal::Malformed),
                "{bad}"
            );
        }
        let none = HeaderMap::new();
        assert_eq!(
            verify(
                &[SECRET],
                &Inbound {
                    headers: &none,
                    body: BODY,
                    url: ""
                },
                0,
                300
            ),
            Err(Refusal::Unsigned)
        );
    }

    #[test]
    fn secrets_must_look_like_stripes() {
        assert!(check_secret("whsec_abc").is_ok());
        for bad in ["", "whsec_", "sk_live_abc", "whsec_a b"] {
            assert!(check_secret(bad).is_err(), "{bad}");
        }
    }
}
