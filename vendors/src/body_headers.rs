//! Request headers that change how a vendor reads a call's body.
//!
//! Owns the one check every call passes before it is priced: pricing reads
//! the body as plain bytes of one media type, so a header that would make the
//! vendor read it otherwise — a second `Content-Type` (pricing reads the
//! first, the vendor may read the other), a list in one `Content-Type`, a
//! `charset` other than UTF-8, a `Content-Encoding` (a gzip body pricing
//! would see as noise), a `Content-Transfer-Encoding`, or a method override
//! (`X-HTTP-Method-Override` and its variants, which turn a priced POST into
//! another operation) — refuses the call.
//!
//! It must never let such a header through on any profile, and never
//! decode a body itself: no official vendor SDK compresses request bodies,
//! so refusing costs agents nothing and keeps one reading of every body.
//! `Content-Encoding: identity` (no coding at all) passes.

use http::header::{self, HeaderMap, HeaderName};

/// Headers some servers and frameworks read as the request's real method.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Why a call's headers could make the vendor read its body differently
/// from how keycap prices it. The message is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AmbiguousBody(pub String);

fn refuse(msg: impl Into<String>) -> Result<(), AmbiguousBody> {
    Err(AmbiguousBody(msg.into()))
}

/// Checks the headers that decide how a body is read.
pub fn check(headers: &HeaderMap) -> Result<(), AmbiguousBody> {
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    if let Some(ct) = types.next() {
        if types.next().is_some() {
            return refuse(
                "the request has more than one Content-Type: keycap and the vendor could read \
                 the body as different types; send one",
            );
        }
        let Ok(ct) = ct.to_str() else {
            return refuse("the Content-Type is not readable text");
        };
        content_type(ct)?;
    }
    for coding in headers.get_all(header::CONTENT_ENCODING) {
        if !coding
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"identity")
        {
            return refuse(
                "keycap does not read encoded (compressed) request bodies, so it could not price \
                 this one; send the body without Content-Encoding",
            );
        }
    }
    if headers.contains_key(HeaderName::from_static("content-transfer-encoding")) {
        return refuse(
            "Content-Transfer-Encoding changes how the body is read; send the body as it is",
        );
    }
    if let Some(name) = METHOD_OVERRIDES.iter().find(|n| headers.contains_key(**n)) {
        return refuse(format!(
            "{name} could make the vendor run another operation than the one keycap priced; \
             send the method itself"
        ));
    }
    Ok(())
}

/// One media type (`type/subtype`, no list) with at most one `charset`,
/// which must be UTF-8.
fn content_type(ct: &str) -> Result<(), AmbiguousBody> {
    let mut parts = ct.split(';');
    let media = parts.next().unwrap_or("").trim();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let is_media_type = media
        .split_once('/')
        .is_some_and(|(t, s)| token(t) && token(s));
    if !is_media_type {
        return refuse(
            "the Content-Type is not one media type (type/subtype): keycap and the vendor could \
             read the body as different types",
        );
    }
    let mut charsets = 0;
    for param in parts {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        if !name.trim().eq_ignore_ascii_case("charset") {
            continue;
        }
        charsets += 1;
        let value = value.trim();
        // A quoted value is one whole quoted string (a ';' inside would
        // have cut it above).
        let value = match value.strip_prefix('"') {
            Some(rest) => rest.strip_suffix('"').unwrap_or("\""),
            None => value,
        };
        if charsets > 1
            || !(value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8"))
        {
            return refuse(
                "keycap reads request bodies as UTF-8; send the body in UTF-8 with at most one \
                 charset=utf-8",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn one_plain_content_type_passes() {
        for pairs in [
            vec![],
            vec![("content-type", "application/x-www-form-urlencoded")],
            vec![("content-type", "application/json; charset=utf-8")],
            vec![("content-type", "Application/JSON;charset=\"UTF8\"")],
            vec![("content-type", "multipart/form-data; boundary=\"a,b\"")],
            vec![
                ("content-type", "application/json"),
                ("content-encoding", "identity"),
            ],
            vec![
                ("stripe-version", "2020-08-27"),
                ("accept-encoding", "gzip"),
            ],
        ] {
            assert_eq!(check(&headers(&pairs)), Ok(()), "{pairs:?}");
        }
    }

    #[test]
    fn headers_that_change_how_the_body_is_read_are_refused() {
        for pairs in [
            vec![
                ("content-type", "application/json"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            vec![
                ("content-type", "application/json"),
                ("content-type", "application/json"),
            ],
            vec![(
                "content-type",
                "application/json, application/x-www-form-urlencoded",
            )],
            vec![("content-type", "application/json; charset=utf-16")],
            vec![(
                "content-type",
                "application/x-www-form-urlencoded; charset=iso-8859-1",
            )],
            vec![(
                "content-type",
                "application/json; charset=utf-8; charset=utf-16",
            )],
            vec![("content-type", "application/json; charset=\"utf-8;x\"")],
            vec![("content-type", "json")],
            vec![("content-type", "")],
            vec![("content-encoding", "gzip")],
            vec![("content-encoding", "identity"), ("content-encoding", "br")],
            vec![("content-encoding", "identity, gzip")],
            vec![("content-transfer-encoding", "base64")],
            vec![("x-http-method-override", "DELETE")],
            vec![("x-http-method", "PUT")],
            vec![("x-method-override", "GET")],
        ] {
            let err = check(&headers(&pairs)).unwrap_err();
            assert!(!err.0.is_empty(), "{pairs:?}");
        }
    }
}
