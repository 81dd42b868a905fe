//! Invariant checks for the webhook signature parsers, in the form of
//! `pricing::check`: each `pub fn` takes arbitrary bytes and panics when an
//! invariant breaks; `fuzz/fuzz_targets/hook_signature.rs` calls it and the
//! proxy's `tests/fuzz_seeds.rs` runs it over `fuzz/corpus/hook_signature/`
//! on stable. Test support only: never called on the request path.

use http::{HeaderMap, HeaderValue};

use super::{stripe, svix, twilio, verify, HookVendor, Inbound, Refusal};

/// The bytes' first line as each vendor's signature header (the Svix id and
/// timestamp on the next two), the rest as the body. Parsers never panic;
/// what they accept has the shape they promise; and nothing verifies against
/// a secret the bytes cannot know, whatever the headers claim.
pub fn hook_signature(data: &[u8]) {
    let mut lines = data.splitn(4, |b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    let id = lines.next().unwrap_or_default();
    let ts = lines.next().unwrap_or_default();
    let body = lines.next().unwrap_or_default();
    let text = String::from_utf8_lossy(first);

    if let Ok(sig) = stripe::parse_header(&text) {
        assert!(!sig.v1.is_empty());
        assert!(sig.v1.iter().all(|v| !v.contains(',')));
    }
    if let Ok(sigs) = svix::parse_signatures(&text) {
        assert!(!sigs.is_empty());
        assert!(sigs.iter().all(|s| !s.contains(' ')));
    }
    let _ = twilio::url_forms(&text);

    let mut headers = HeaderMap::new();
    for (name, value) in [
        (stripe::SIGNATURE_HEADER, first),
        (twilio::SIGNATURE_HEADER, first),
        ("svix-signature", first),
        ("svix-id", id),
        ("svix-timestamp", ts),
    ] {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.insert(name, v);
        }
    }
    let event = Inbound {
        headers: &headers,
        body,
        url: "https://hooks.example.com/hooks/hk_fuzz",
    };
    let secrets: &[(HookVendor, &str)] = &[
        (HookVendor::Stripe, "whsec_fuzzing_secret_never_in_a_seed"),
        (HookVendor::Twilio, "0123456789abcdef0123456789abcdef"),
        (
            HookVendor::Resend,
            "whsec_ZnV6emluZyBzZWNyZXQgbmV2ZXIgaW4gYSBzZWVk",
        ),
    ];
    for (vendor, secret) in secrets {
        let r = verify(*vendor, &[secret], &event, 1_700_000_000, 300);
        assert!(
            matches!(
                r,
                Err(Refusal::Unsigned | Refusal::Malformed | Refusal::Forged)
            ),
            "{vendor}: {r:?}"
        );
    }
}
