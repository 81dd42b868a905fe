//! How a refusal is worded on the wire: its envelope.
//!
//! Owns the choice of envelope and the two envelopes that are keycap's own:
//! the flat body (`{"error": code, "message", ...fields}`) of the generic
//! profile and of the `/vault/*` relay, and the one answered before a vault
//! key is authenticated. Each vendor's envelope lives in its profile's
//! module (`pricing::<vendor>::refusal_envelope`) and is chosen by
//! `pricing::envelope_for`, so that vendor's official SDK raises its own
//! exception for keycap's refusals (rate limit for a cap, authentication
//! for a bad key, permission for an endpoint outside the allowlist).
//!
//! The rule: once the key is known, a refusal is worded in the envelope of
//! the key's vendor's profile. Before that (a bad key, a target keycap
//! refuses, no policy yet, a malformed request head), it is worded in one
//! envelope that is every vendor envelope at once, so it never depends on,
//! and never reveals, which vendor a path names or whether it exists.
//!
//! An envelope says nothing a refusal does not state (code, message,
//! keycap's fields); it must never add a secret, an address or a vendor
//! name of its own.

use http::{HeaderName, HeaderValue, StatusCode};
use keycap_proto::profile::Profile;
use serde_json::{Map, Value};

/// A refusal as every envelope sees it.
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    pub status: StatusCode,
    /// keycap's stable code (`daily_cap_exceeded`).
    pub code: &'a str,
    pub message: &'a str,
    /// keycap's own fields (`cap_usd`, `remaining_usd`, `resets_at`, ...).
    pub fields: &'a Map<String, Value>,
    /// A retry would be refused the same way (a spent cap).
    pub retry_is_futile: bool,
}

/// A refusal's body and the headers its envelope adds to keycap's.
#[derive(Debug, Clone, PartialEq)]
pub struct Wire {
    pub body: Value,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Wire {
    /// A body with no headers of its own.
    pub fn body(body: Value) -> Wire {
        Wire {
            body,
            headers: Vec::new(),
        }
    }
}

/// How one profile words a refusal.
pub type Envelope = fn(&Refused<'_>) -> Wire;

/// keycap's flat body: `{"error": code, "message": ..., ...fields}`. The
/// generic profile's envelope after authentication, and the `/vault/*`
/// relay's (keycap's own API).
pub fn flat(r: &Refused<'_>) -> Wire {
    let mut body = Map::new();
    body.insert("error".into(), r.code.into());
    body.insert("message".into(), r.message.into());
    body.extend(r.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
    Wire::body(Value::Object(body))
}

/// The object every vendor envelope carries as `error`: keycap's code and
/// message, and keycap's fields beside them, so a plain HTTP client finds
/// them at `error.code`, `error.remaining_usd`, ... whatever the vendor.
/// A profile adds its vendor's own members (`type`, ...).
pub fn keycap_error(r: &Refused<'_>) -> Map<String, Value> {
    let mut error = Map::new();
    error.insert("code".into(), r.code.into());
    error.insert("message".into(), r.message.into());
    error.extend(r.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
    error
}

/// The envelope of a refusal answered before the vault key is known: every
/// vendor profile's envelope merged into one JSON object (and their headers
/// into one set), so each official SDK reads it as it reads its vendor's.
/// Where two profiles set the same member differently, the profile listed
/// first in `Profile::ALL` wins; a nested object is merged member by
/// member. The generic profile's flat body is keycap's own, not a vendor's,
/// and takes no part: its `error` is the code itself.
pub fn before_authentication(r: &Refused<'_>) -> Wire {
    let mut body = Map::new();
    let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
    for profile in Profile::ALL {
        if profile == Profile::Generic {
            continue;
        }
        let wire = crate::pricing::envelope_for(profile)(r);
        if let Value::Object(m) = wire.body {
            merge(&mut body, m);
        }
        for (name, value) in wire.headers {
            if !headers.iter().any(|(n, _)| *n == name) {
                headers.push((name, value));
            }
        }
    }
    Wire {
        body: Value::Object(body),
        headers,
    }
}

/// Adds `from`'s members to `into`, keeping what `into` already has; two
/// objects under one name are merged the same way.
fn merge(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (None, v) => {
                into.insert(k, v);
            }
            (Some(Value::Object(mine)), Value::Object(theirs)) => merge(mine, theirs),
            (Some(_), _) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields() -> Map<String, Value> {
        let v = json!({"cap_usd": 30, "remaining_usd": 5, "resets_at": "2026-11-24T00:00:00Z"});
        v.as_object().unwrap().clone()
    }

    fn cap(fields: &Map<String, Value>) -> Refused<'_> {
        Refused {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "daily_cap_exceeded",
            message: "this call would exceed the key's daily cap",
            fields,
            retry_is_futile: true,
        }
    }

    #[test]
    fn the_flat_body_is_keycaps_code_message_and_fields() {
        let f = fields();
        assert_eq!(
            flat(&cap(&f)).body,
            json!({"error": "daily_cap_exceeded",
                   "message": "this call would exceed the key's daily cap",
                   "cap_usd": 30, "remaining_usd": 5, "resets_at": "2026-11-24T00:00:00Z"})
        );
    }

    /// Every leaf of `part`, with its path.
    fn leaves(v: &Value, path: String, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    leaves(v, format!("{path}/{k}"), out);
                }
            }
            _ => out.push((path, v.clone())),
        }
    }

    #[test]
    fn the_pre_authentication_envelope_holds_every_vendor_envelope() {
        let f = fields();
        let r = cap(&f);
        let all = before_authentication(&r);
        for profile in Profile::ALL {
            if profile == Profile::Generic {
                continue;
            }
            let own = crate::pricing::envelope_for(profile)(&r);
            let mut paths = Vec::new();
            leaves(&own.body, String::new(), &mut paths);
            for (path, value) in paths {
                let found = all.body.pointer(&path);
                assert!(
                    found.is_some(),
                    "{profile:?}: {path} missing from {}",
                    all.body
                );
                // Only the vendor's name for the kind of error may differ.
                if !path.ends_with("/type") || path == "/type" {
                    assert_eq!(found, Some(&value), "{profile:?}: {path}");
                }
            }
            for (name, value) in own.headers {
                assert!(
                    all.headers.contains(&(name.clone(), value)),
                    "{profile:?}: header {name}"
                );
            }
        }
        // keycap's own fields are where every vendor envelope puts them.
        assert_eq!(all.body["error"]["code"], "daily_cap_exceeded");
        assert_eq!(all.body["error"]["remaining_usd"], 5);
    }

    #[test]
    fn merging_keeps_the_first_value_and_merges_objects() {
        let mut a = json!({"x": 1, "o": {"p": 1}}).as_object().unwrap().clone();
        let b = json!({"x": 2, "y": 3, "o": {"p": 2, "q": 4}})
            .as_object()
            .unwrap()
            .clone();
        merge(&mut a, b);
        assert_eq!(
            Value::Object(a),
            json!({"x": 1, "y": 3, "o": {"p": 1, "q": 4}})
        );
    }
}
