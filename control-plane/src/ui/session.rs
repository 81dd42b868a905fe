//! Dashboard sessions: signing in with an admin token yields a cookie that
//! holds the token sealed under the master key (so every replica can open
//! it, and nobody without the master key can read or forge it), with an
//! expiry. Every request re-authenticates the sealed token through
//! `Control::authenticate_admin`, so a session carries exactly the token's
//! current scopes and ends the moment the token is revoked or expires.
//!
//! State changes are guarded twice against cross-site requests: the
//! browser's own `Origin` / `Sec-Fetch-Site` headers must say same origin,
//! and the form must carry a CSRF value derived from the session cookie,
//! which a cross-site page can neither read nor compute. This module never
//! logs or renders the token.

use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, Uri};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::service::{AdminPrincipal, Control};

pub const COOKIE: &str = "keycap_session";
/// How long a session lasts at most, whatever the token's own expiry.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Associated data binding a sealed cookie to its purpose: a sealed vendor
/// credential can never pass for a session, nor the other way round.
const SEAL_PURPOSE: &str = "keycap-ui-session";

/// Whether the listener serves TLS: session cookies are then `Secure`.
/// Inserted as a request extension by the server when TLS is on.
#[derive(Clone, Copy, Debug)]
pub struct Tls;

#[derive(Serialize, Deserialize)]
struct Sealed {
    token: String,
    /// Unix seconds after which the cookie is refused.
    expires: i64,
}

/// A signed-in operator.
pub struct Session {
    pub principal: AdminPrincipal,
    /// The value every state-changing form must carry.
    pub csrf: String,
}

/// The cookie value for `token`, valid for `LIFETIME`.
pub fn seal(control: &Control, token: &str) -> String {
    let sealed = Sealed {
        token: token.to_string(),
        expires: Utc::now().timestamp() + LIFETIME.as_secs() as i64,
    };
    let json = serde_json::to_vec(&sealed).expect("session serialises");
    URL_SAFE_NO_PAD.encode(control.sealer().seal(SEAL_PURPOSE, &json))
}

/// The session the request's cookie holds, if it is well formed, unexpired
/// and its token still authenticates.
pub async fn current(control: &Control, headers: &HeaderMap) -> Option<Session> {
    let value = cookie(headers, COOKIE)?;
    let bytes = URL_SAFE_NO_PAD.decode(value).ok()?;
    let json = control.sealer().open(SEAL_PURPOSE, &bytes).ok()?;
    let sealed: Sealed = serde_json::from_slice(&json).ok()?;
    if sealed.expires <= Utc::now().timestamp() {
        return None;
    }
    let principal = control
        .authenticate_admin(Some(&format!("Bearer {}", sealed.token)))
        .await
        .ok()?;
    Some(Session {
        principal,
        csrf: csrf_for(value),
    })
}

/// The CSRF value of a session cookie: a hash only someone who can read
/// the (HttpOnly) cookie could compute.
fn csrf_for(cookie_value: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"keycap-ui-csrf\0");
    h.update(cookie_value.as_bytes());
    hex::encode(h.finalize())
}

impl Session {
    /// Whether a submitted CSRF value is this session's.
    pub fn csrf_matches(&self, submitted: Option<&str>) -> bool {
        submitted.is_some_and(|s| s.as_bytes().ct_eq(self.csrf.as_bytes()).into())
    }
}

/// Whether the browser says the request comes from this site. A request
/// without either header (a non-browser client) passes this check and
/// still needs the CSRF value.
/// `uri` gives the host where HTTP/2 carries it (`:authority`) instead of
/// a `Host` header.
pub fn same_origin(headers: &HeaderMap, uri: &Uri) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        if site.as_bytes() != b"same-origin" && site.as_bytes() != b"none" {
            return false;
        }
    }
    match headers.get(header::ORIGIN) {
        None => true,
        Some(origin) => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| uri.authority().map(|a| a.as_str()));
            let origin_host = origin
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://"))
                .map(|(_, rest)| rest);
            matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
        }
    }
}

/// `Set-Cookie` for a new session.
pub fn set_cookie(value: &str, tls: bool) -> HeaderValue {
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        LIFETIME.as_secs()
    ))
    .expect("cookie value is base64url")
}

/// `Set-Cookie` that ends the session in the browser.
pub fn clear_cookie(tls: bool) -> HeaderValue {
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0{secure}"
    ))
    .expect("static cookie")
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cross_site_requests_are_not_same_origin() {
        let host = ("host", "127.0.0.1:8080");
        let same = |h: &[(&'static str, &str)]| same_origin(&headers(h), &Uri::from_static("/ui"));
        assert!(same(&[host]));
        assert!(same(&[host, ("origin", "http://127.0.0.1:8080")]));
        assert!(!same(&[host, ("origin", "https://evil.example")]));
        assert!(!same(&[host, ("origin", "null")]));
        assert!(!same(&[host, ("sec-fetch-site", "cross-site")]));
        assert!(!same(&[host, ("sec-fetch-site", "same-site")]));
        // HTTP/2: no Host header, the authority is in the URI.
        let h2 = Uri::from_static("https://127.0.0.1:8443/ui/sign-out");
        let origin = |o: &str| headers(&[("origin", o)]);
        assert!(same_origin(&origin("https://127.0.0.1:8443"), &h2));
        assert!(!same_origin(&origin("https://evil.example"), &h2));
    }

    #[test]
    fn cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; keycap_session=xyz; b=2")]);
        assert_eq!(cookie(&h, COOKIE), Some("xyz"));
        assert_eq!(cookie(&headers(&[("cookie", "a=1")]), COOKIE), None);
    }
}
