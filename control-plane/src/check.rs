//! Invariant checks for the REST front end's request bodies (`rest`):
//! arbitrary bytes as the JSON body of `POST /vault/keys` and
//! `PUT /vault/vendors/{name}`, parsed into validated domain inputs.
//!
//! Test support, not part of the server, in the same form as the proxy's
//! `pricing::check`: `rest_body` panics when an invariant breaks. The fuzz
//! target `fuzz/fuzz_targets/rest_body.rs` calls it, and
//! `tests/fuzz_seeds.rs` runs it over `fuzz/corpus/rest_body/` on stable.
//! It must never be called by the server, and holds no `cfg` and no
//! `unsafe`.

use keycap_proto::endpoint::EndpointPattern;
use keycap_proto::Micros;

use crate::error::ApiError;
use crate::rest::{create_key_body, put_vendor_body};

/// A fuzz target's check: returns normally or panics on a broken invariant.
pub type Check = fn(&[u8]);

/// Every control-plane fuzz target, by the name of its file in
/// `fuzz/fuzz_targets/` and of its seed directory in `fuzz/corpus/`.
pub const TARGETS: &[(&str, Check)] = &[("rest_body", rest_body)];

/// The first byte picks the body (even: a new key, odd: a vendor); the rest
/// is the body. Parsing never panics; a refusal is a 400 `invalid_request`
/// naming a field, with a message no longer than the body allows for and
/// never carrying the credential sent; an accepted key has endpoints that
/// parse, non-negative caps and a lifetime; an accepted vendor has an
/// http(s) base URL and a credential fit for an HTTP header.
pub fn rest_body(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let refused = |e: ApiError| {
        assert_eq!(e.code(), "invalid_request", "{e:?}");
        assert_eq!(e.http_status(), http::StatusCode::BAD_REQUEST, "{e:?}");
        let ApiError::Invalid(i) = &e else {
            panic!("not an input error: {e:?}");
        };
        assert!(!i.field.is_empty() && !i.reason.is_empty(), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.len() <= body.len() + 512,
            "a {} byte body made a {} byte error",
            body.len(),
            msg.len()
        );
        if let Some(credential) = sent_credential(body) {
            assert!(
                !msg.contains(&credential),
                "the credential is echoed: {msg}"
            );
        }
    };
    if which % 2 == 0 {
        match create_key_body(body) {
            Err(e) => refused(e),
            Ok(k) => {
                assert!(!k.allowed_endpoints.is_empty());
                for e in &k.allowed_endpoints {
                    EndpointPattern::parse(e)
                        .unwrap_or_else(|err| panic!("accepted endpoint {e:?}: {err}"));
                }
                for cap in [Some(k.daily_cap), k.per_call_cap, k.lifetime_cap]
                    .into_iter()
                    .flatten()
                {
                    assert!(cap >= Micros::ZERO, "negative cap {cap:?}");
                }
                assert!(!k.expires_in.is_zero(), "a key that is born expired");
            }
        }
    } else {
        match put_vendor_body("vendor-1", body) {
            Err(e) => refused(e),
            Ok(v) => {
                let uri: http::Uri = v
                    .base_url
                    .parse()
                    .unwrap_or_else(|e| panic!("accepted base URL {:?}: {e}", v.base_url));
                assert!(
                    matches!(uri.scheme_str(), Some("http" | "https")),
                    "{:?}",
                    v.base_url
                );
                assert!(
                    uri.host().is_some_and(|h| !h.is_empty()),
                    "{:?}",
                    v.base_url
                );
                if let Some(c) = &v.credential {
                    assert!(http::HeaderValue::from_str(c).is_ok(), "credential {c:?}");
                }
            }
        }
    }
}

/// A credential string the body sends, when it is long enough to recognise
/// and appears nowhere else in the body (so an echo of another field that
/// happens to hold the same text is not taken for a leak).
fn sent_credential(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let c = v.get("credential")?.as_str()?;
    if c.len() < 8 {
        return None;
    }
    let text = String::from_utf8_lossy(body);
    (text.matches(c).count() == 1).then(|| c.to_string())
}
