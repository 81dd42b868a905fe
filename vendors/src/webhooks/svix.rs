//! Svix's webhook signature, which Resend uses, as Svix documents it and
//! the `svix` package's `Webhook.verify` checks it: headers `svix-id`,
//! `svix-timestamp` (unix seconds) and `svix-signature`, a space-separated
//! list of `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed
//! with the base64-decoded part of the `whsec_<base64>` secret. The
//! Standard Webhooks names (`webhook-id`, ...) are accepted too, as the
//! package does. The event id (replay) is `svix-id`.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{fresh, header, same, Inbound, Refusal, Verified};

/// The signing key inside a `whsec_<base64>` secret (the prefix optional,
/// as in the package).
pub fn key(secret: &str) -> Option<Vec<u8>> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .filter(|k| !k.is_empty())
}

pub fn check_secret(secret: &str) -> Result<(), &'static str> {
    match secret.strip_prefix("whsec_").and_then(|_| key(secret)) {
        Some(_) => Ok(()),
        None => Err("a Resend (Svix) signing secret is whsec_ followed by base64"),
    }
}

/// The base64 `v1` signature of `body` for message `id` at `timestamp`.
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The `v1` signatures in an `svix-signature` value; other versions are
/// skipped, as the package skips them.
pub fn parse_signatures(value: &str) -> Result<Vec<&str>, Refusal> {
    let mut v1 = Vec::new();
    for item in value.split(' ').filter(|s| !s.is_empty()) {
        let (version, sig) = item.split_once(',').ok_or(Refusal::Malformed)?;
        if version == "v1" {
            v1.push(sig);
        }
    }
    if v1.is_empty() {
        return Err(Refusal::Malformed);
    }
    Ok(v1)
}

fn either<'a>(event: &'a Inbound<'_>, svix: &str, standard: &str) -> Result<&'a str, Refusal> {
    match header(event.headers, svix) {
        Err(Refusal::Unsigned) => header(event.headers, standard),
        other => other,
    }
}

pub fn verify(
    secrets: &[&str],
    event: &Inbound<'_>,
    now: i64,
    tolerance_secs: i64,
) -> Result<Verified, Refusal> {
    let id = either(event, "svix-id", "webhook-id")?;
    let timestamp = either(event, "svix-timestamp", "webhook-timestamp")?;
    let signatures = parse_signatures(either(event, "svix-signature", "webhook-signature")?)?;
    if id.is_empty() {
        return Err(Refusal::Malformed);
    }
    let t: i64 = timestamp.parse().map_err(|_| Refusal::Malformed)?;
    let matched = secrets.iter().filter_map(|s| key(s)).any(|key| {
        let expected = sign(&key, id, timestamp, event.body);
        signatures
            .iter()
            .any(|sig| same(expected.as_bytes(), sig.as_bytes()))
    });
    if !matched {
        return Err(Refusal::Forged);
    }
    if !fresh(t, now, tolerance_secs) {
        return Err(Refusal::Stale);
    }
    Ok(Verified {
        event_id: id.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    // Produced by the svix package 2.9.1: Webhook(SECRET).sign(ID, ts, BODY).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const BODY: &[u8] = br#"{"type":"email.delivered","data":{"email_id":"e1"}}"#;
    const SIG: &str = "v1,1sS8a2sT34ABmvYeC+wA6cezvKsFz578m38UcOmej+s=";

    fn check(
        secret: &str,
        id: &str,
        ts: &str,
        sig: &str,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, Refusal> {
        let mut h = HeaderMap::new();
        h.insert("svix-id", id.parse().unwrap());
        h.insert("svix-timestamp", ts.parse().unwrap());
        h.insert("svix-signature", sig.parse().unwrap());
        verify(
            &[secret],
            &Inbound {
                headers: &h,
                body,
                url: "",
            },
            now,
            300,
        )
    }

    #[test]
    fn the_svix_package_vector_verifies() {
        let v = check(SECRET, ID, "1700000000", SIG, BODY, 1_700_000_000).unwrap();
        assert_eq!(v.event_id, ID);
        let many = format!("v1a,xyz v1,AAAA {SIG}");
        assert!(check(SECRET, ID, "1700000000", &many, BODY, 1_700_000_000).is_ok());
    }

    #[test]
    fn forged_stale_and_malformed_are_refused() {
        let at = |now| check(SECRET, ID, "1700000000", SIG, BODY, now);
        assert_eq!(at(1_700_000_301), Err(Refusal::Stale));
        assert_eq!(at(1_699_999_699), Err(Refusal::Stale));
        assert_eq!(
            check(SECRET, "msg_other", "1700000000", SIG, BODY, 1_700_000_000),
            Err(Refusal::Forged)
        );
        assert_eq!(
            check(SECRET, ID, "1700000001", SIG, BODY, 1_700_000_000),
            Err(Refusal::Forged)
        );
        assert_eq!(
            check("whsec_b3RoZXI=", ID, "1700000000", SIG, BODY, 1_700_000_000),
            Err(Refusal::Forged)
        );
        for bad in ["", "v1", "v2,abc"] {
            assert_eq!(
                check(SECRET, ID, "1700000000", bad, BODY, 1_700_000_000),
                Err(Refusal::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            check(SECRET, ID, "soon", SIG, BODY, 1_700_000_000),
            Err(Refusal::Malformed)
        );
    }

    #[test]
    fn secrets_are_whsec_base64() {
        assert!(check_secret(SECRET).is_ok());
        for bad in ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_!!!"] {
            assert!(check_secret(bad).is_err(), "{bad}");
        }
    }
}
