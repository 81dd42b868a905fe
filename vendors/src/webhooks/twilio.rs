//! Twilio's request signature, as Twilio documents it and twilio-python's
//! `RequestValidator` checks it: `X-Twilio-Signature` is the base64
//! HMAC-SHA1, keyed with the account's auth token, of the full URL Twilio
//! called followed, for a form body, by every POST parameter sorted by name
//! as name+value. A JSON body is signed through the URL instead: Twilio adds
//! `bodySHA256=<hex SHA-256 of the body>` to the query. Because Twilio signs
//! the URL sometimes with the default port and sometimes without, both forms
//! are tried, as the validator does. Twilio signs no timestamp; the event id
//! (replay) is the signature itself: it covers the URL and every parameter,
//! so a retry of one event carries the same one. Twilio's
//! `I-Twilio-Idempotency-Token` is not signed — anyone holding one request
//! could replay it under a fresh token — so it never names the event.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::{header, same, Inbound, Refusal, Verified};

pub const SIGNATURE_HEADER: &str = "x-twilio-signature";
/// Sent by Twilio with each event but not signed: never an event id.
pub const IDEMPOTENCY_HEADER: &str = "i-twilio-idempotency-token";

/// The base64 signature Twilio sends for `url` and form `params`.
pub fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("any key length");
    mac.update(url.as_bytes());
    for (name, value) in sorted_params(params) {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Parameters in the validator's order: names sorted, and under each name
/// its distinct values sorted (a repeated identical pair counts once).
fn sorted_params(params: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut pairs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

/// A Twilio auth token is 32 hex digits.
pub fn check_secret(secret: &str) -> Result<(), &'static str> {
    if secret.len() == 32 && secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err("a Twilio auth token is 32 hexadecimal digits")
    }
}

/// The URL with its port made explicit and with it removed (for http and
/// https), the two forms Twilio may have signed.
pub fn url_forms(url: &str) -> [String; 2] {
    let Some((scheme, rest)) = url.split_once("://") else {
        return [url.to_string(), url.to_string()];
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host_end = authority.rfind(']').map_or(0, |i| i + 1);
    let (host, port) = match authority[host_end..].rfind(':') {
        Some(i) => authority.split_at(host_end + i),
        None => (authority, ""),
    };
    let default = if scheme.eq_ignore_ascii_case("https") {
        ":443"
    } else {
        ":80"
    };
    let with = if port.is_empty() { default } else { port };
    [
        format!("{scheme}://{host}{with}{tail}"),
        format!("{scheme}://{host}{tail}"),
    ]
}

/// The query's `bodySHA256` value, if the URL has one.
fn body_sha256(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "bodySHA256")
        .map(|(_, v)| v.into_owned())
}

fn is_form(event: &Inbound<'_>) -> bool {
    event
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

pub fn verify(secrets: &[&str], event: &Inbound<'_>) -> Result<Verified, Refusal> {
    let signature = header(event.headers, SIGNATURE_HEADER)?;
    if signature.is_empty() {
        return Err(Refusal::Malformed);
    }
    let params: Vec<(String, String)> = match body_sha256(event.url) {
        // The body is bound through the signed URL; no parameters.
        Some(expected) => {
            let actual = hex::encode(Sha256::digest(event.body));
            if !same(actual.as_bytes(), expected.as_bytes()) {
                return Err(Refusal::Forged);
            }
            Vec::new()
        }
        None if is_form(event) => form_urlencoded::parse(event.body).into_owned().collect(),
        // A body that neither the parameters nor the URL sign would be
        // relayed unauthenticated.
        None if !event.body.is_empty() => return Err(Refusal::Forged),
        None => Vec::new(),
    };
    let forms = url_forms(event.url);
    let matched = secrets.iter().any(|token| {
        forms
            .iter()
            .any(|url| same(sign(token, url, &params).as_bytes(), signature.as_bytes()))
    });
    if !matched {
        return Err(Refusal::Forged);
    }
    Ok(Verified {
        event_id: format!("sig:{signature}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    // Produced by twilio-python 9.13.0's RequestValidator(TOKEN).
    const TOKEN: &str = "12345678901234567890123456789012";
    const URL: &str = "https://hooks.example.com/hooks/hk_1?foo=bar";
    const FORM: &[u8] = b"To=%2B15005550006&From=%2B15005550001&Body=hi+there&MessageSid=SM1";
    const FORM_SIG: &str = "OTM5XruVUfqQ90Nyf8mk2OpUEYM=";
    const JSON_URL: &str = "https://hooks.example.com/hooks/hk_1?bodySHA256=d5729c000e5de6b3a10698fec78d482db85d744f1be820d1382b6bda1cfb7795";
    const JSON: &[u8] = br#"{"property":"value","boolean":true}"#;
    const JSON_SIG: &str = "o4C+Ja9hC6ljxg6IC1tvJKENtu8=";

    fn check(url: &str, content_type: &str, body: &[u8], sig: &str) -> Result<Verified, Refusal> {
        let mut h = HeaderMap::new();
        h.insert(SIGNATURE_HEADER, sig.parse().unwrap());
        h.insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
        verify(
            &[TOKEN],
            &Inbound {
                headers: &h,
                body,
                url,
            },
        )
    }

    #[test]
    fn the_twilio_python_form_vector_verifies() {
        let form = "application/x-www-form-urlencoded";
        let v = check(URL, form, FORM, FORM_SIG).unwrap();
        assert_eq!(v.event_id, format!("sig:{FORM_SIG}"));
        // The port variant Twilio sometimes signs.
        let with_port = "https://hooks.example.com:443/hooks/hk_1?foo=bar";
        assert!(check(with_port, form, FORM, FORM_SIG).is_ok());
        // A changed parameter or URL breaks it.
        let changed = b"To=%2B15005550006&From=%2B15005550001&Body=hi+there&MessageSid=SM2";
        assert_eq!(check(URL, form, changed, FORM_SIG), Err(Refusal::Forged));
        assert_eq!(
            check(
                "https://hooks.example.com/hooks/hk_2?foo=bar",
                form,
                FORM,
                FORM_SIG
            ),
            Err(Refusal::Forged)
        );
    }

    #[test]
    fn the_twilio_python_json_vector_verifies() {
        assert!(check(JSON_URL, "application/json", JSON, JSON_SIG).is_ok());
        assert_eq!(
            check(
                JSON_URL,
                "application/json",
                br#"{"property":"other"}"#,
                JSON_SIG
            ),
            Err(Refusal::Forged)
        );
        // A JSON body without bodySHA256 is not signed at all.
        assert_eq!(
            check(URL, "application/json", JSON, FORM_SIG),
            Err(Refusal::Forged)
        );
    }

    #[test]
    fn an_unsigned_idempotency_token_never_makes_a_replay_new() {
        let sig = sign(TOKEN, URL, &[]);
        let id_with = |token: &str| {
            let mut h = HeaderMap::new();
            h.insert(SIGNATURE_HEADER, sig.parse().unwrap());
            h.insert(IDEMPOTENCY_HEADER, token.parse().unwrap());
            verify(
                &[TOKEN],
                &Inbound {
                    headers: &h,
                    body: b"",
                    url: URL,
                },
            )
            .unwrap()
            .event_id
        };
        assert_eq!(id_with("tok-1"), format!("sig:{sig}"));
        assert_eq!(id_with("tok-1"), id_with("tok-2"));
    }

    #[test]
    fn url_forms_add_and_remove_the_default_port() {
        assert_eq!(
            url_forms("https://a.example/x?y=1"),
            [
                "https://a.example:443/x?y=1".to_string(),
                "https://a.example/x?y=1".to_string()
            ]
        );
        assert_eq!(
            url_forms("http://127.0.0.1:8080/h"),
            [
                "http://127.0.0.1:8080/h".to_string(),
                "http://127.0.0.1/h".to_string()
            ]
        );
        assert_eq!(
            url_forms("http://[::1]/h"),
            [
                "http://[::1]:80/h".to_string(),
                "http://[::1]/h".to_string()
            ]
        );
    }

    #[test]
    fn auth_tokens_are_32_hex_digits() {
        assert!(check_secret(TOKEN).is_ok());
        assert!(check_secret("whsec_x").is_err());
    }
}
