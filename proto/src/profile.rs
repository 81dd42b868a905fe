//! Vendor profiles: how keycap prices a vendor's calls and injects its
//! credential. Shared so the control plane accepts exactly the profiles,
//! credentials and credential headers the proxy can serve: both planes
//! build the injected header with `CredentialInjection::new`. No I/O.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// A vendor profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    Stripe,
    Openai,
    Anthropic,
    Resend,
    /// Any HTTP API, priced by the operator's rules (`prices::GenericRules`).
    Generic,
    Twilio,
}

/// How a vendor expects its real credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialHeader {
    /// `Authorization: Bearer <credential>`.
    Bearer,
    /// `x-api-key: <credential>`.
    XApiKey,
    /// `Authorization: Basic base64(<credential>)`, the credential being
    /// `USER:PASSWORD` (Twilio: `ACCOUNT_SID:AUTH_TOKEN`).
    Basic,
}

impl Profile {
    pub const ALL: [Profile; 6] = [
        Profile::Stripe,
        Profile::Openai,
        Profile::Anthropic,
        Profile::Resend,
        Profile::Generic,
        Profile::Twilio,
    ];

    /// The profile named `s` (exact, lowercase).
    pub fn parse(s: &str) -> Option<Self> {
        Profile::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Stripe => "stripe",
            Profile::Openai => "openai",
            Profile::Anthropic => "anthropic",
            Profile::Resend => "resend",
            Profile::Generic => "generic",
            Profile::Twilio => "twilio",
        }
    }

    /// The known profile names, for error messages: "stripe, openai, ...".
    pub fn names() -> String {
        Profile::ALL.map(Profile::as_str).join(", ")
    }

    pub fn credential_header(self) -> CredentialHeader {
        match self {
            // A generic vendor's rules may name another header.
            Profile::Stripe | Profile::Openai | Profile::Resend | Profile::Generic => {
                CredentialHeader::Bearer
            }
            Profile::Anthropic => CredentialHeader::XApiKey,
            Profile::Twilio => CredentialHeader::Basic,
        }
    }
}

/// Shortest secret keycap injects. The proxy masks a vendor's secret
/// wherever a response repeats it, so a secret this short would mask
/// unrelated text; no real API key is.
pub const MIN_SECRET_LEN: usize = 8;
/// Longest credential keycap injects.
pub const MAX_CREDENTIAL_LEN: usize = 4096;

/// Headers a credential may never go in: those that frame the message or
/// describe one connection (hop-by-hop), and those keycap sets itself on
/// every forwarded call. `proxy-*` is refused as well.
pub const RESERVED_CREDENTIAL_HEADERS: [&str; 11] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "accept-encoding",
    "content-encoding",
];

/// Why a credential (or the header it goes in) cannot be injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "must be {MIN_SECRET_LEN} to {MAX_CREDENTIAL_LEN} visible ASCII characters (no spaces)"
    )]
    NotHeaderText,
    #[error("a {0} credential is ACCOUNT_SID:AUTH_TOKEN (or API_KEY_SID:API_KEY_SECRET)")]
    NotUserPassword(&'static str),
    #[error("{0:?} frames the request or is managed by keycap; the credential cannot go in it")]
    ReservedHeader(String),
}

/// Whether a (lowercase) header name may carry a vendor credential.
pub fn check_credential_header(name: &str) -> Result<(), CredentialError> {
    let lower = name.to_ascii_lowercase();
    if RESERVED_CREDENTIAL_HEADERS.contains(&lower.as_str()) || lower.starts_with("proxy-") {
        return Err(CredentialError::ReservedHeader(lower));
    }
    Ok(())
}

/// The header a vendor's credential goes in, its value, and the secret
/// parts that must never reach an agent.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialInjection {
    /// Lowercase header name: `authorization`, `x-api-key`, or a generic
    /// vendor's own.
    pub header: String,
    /// The value injected: `Bearer <credential>`, `Basic <base64>`, or the
    /// credential itself.
    pub value: String,
    /// Byte strings a response must never carry: the secret (for Basic, the
    /// password; otherwise the whole credential) and, for Basic, the
    /// base64 that carries it. Any other form the proxy injects contains
    /// one of them.
    pub secrets: Vec<String>,
}

impl std::fmt::Debug for CredentialInjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialInjection")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl CredentialInjection {
    /// How `credential` is injected for `profile`; `own_header` is a
    /// generic vendor's `credential_header`, if it names one.
    pub fn new(
        profile: Profile,
        own_header: Option<&str>,
        credential: &str,
    ) -> Result<Self, CredentialError> {
        // It goes into an HTTP header: anything but visible ASCII would
        // be refused by every proxy.
        if credential.len() > MAX_CREDENTIAL_LEN
            || !credential.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(CredentialError::NotHeaderText);
        }
        if let Some(name) = own_header {
            check_credential_header(name)?;
        }
        let (header, value, secret, encoded) = match (own_header, profile.credential_header()) {
            (Some(name), _) => (
                name.to_ascii_lowercase(),
                credential.to_string(),
                credential,
                None,
            ),
            (None, CredentialHeader::Bearer) => (
                "authorization".to_string(),
                format!("Bearer {credential}"),
                credential,
                None,
            ),
            (None, CredentialHeader::XApiKey) => (
                "x-api-key".to_string(),
                credential.to_string(),
                credential,
                None,
            ),
            (None, CredentialHeader::Basic) => {
                let Some((_, password)) = credential
                    .split_once(':')
                    .filter(|(u, p)| !u.is_empty() && !p.is_empty())
                else {
                    return Err(CredentialError::NotUserPassword(profile.as_str()));
                };
                let encoded = BASE64.encode(credential);
                (
                    "authorization".to_string(),
                    format!("Basic {encoded}"),
                    password,
                    Some(encoded),
                )
            }
        };
        if secret.len() < MIN_SECRET_LEN {
            return Err(CredentialError::NotHeaderText);
        }
        let mut secrets = vec![secret.to_string()];
        secrets.extend(encoded);
        Ok(CredentialInjection {
            header,
            value,
            secrets,
        })
    }
}

/// The cheap authenticated read that shows whether a credential works:
/// a `GET` of `path` (below the vendor's base URL) with the credential
/// injected as `CredentialInjection` injects it on every call. What each
/// vendor answers without side effects or cost: Stripe's balance, OpenAI's
/// and Anthropic's model lists, the Twilio account the credential names,
/// Resend's domains; a generic vendor's rules name their own `probe_path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeRequest {
    pub path: String,
}

/// Why a credential cannot be probed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "a generic vendor's credentials are probed at its rules' probe_path, which is not set"
    )]
    NoProbePath,
    #[error(
        "the probe path must start with '/' and hold only URL path characters (no query, no '..')"
    )]
    BadPath,
    #[error("a Twilio credential's user part must be an account SID (letters and digits)")]
    BadTwilioSid,
}

/// Whether `path` can be probed: absolute, no query or fragment, no dot
/// segments, visible ASCII only.
pub fn check_probe_path(path: &str) -> Result<(), ProbeError> {
    let ok = path.starts_with('/')
        && path.len() <= 512
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"?#\\%".contains(&b))
        && !path.split('/').any(|seg| seg == "." || seg == "..");
    if ok {
        Ok(())
    } else {
        Err(ProbeError::BadPath)
    }
}

impl ProbeRequest {
    /// The probe of a `profile` vendor's `credential`; `generic_path` is a
    /// generic vendor's `probe_path`.
    pub fn new(
        profile: Profile,
        generic_path: Option<&str>,
        credential: &str,
    ) -> Result<Self, ProbeError> {
        let path = match profile {
            Profile::Stripe => "/v1/balance".to_string(),
            Profile::Openai | Profile::Anthropic => "/v1/models".to_string(),
            Profile::Resend => "/domains".to_string(),
            Profile::Twilio => {
                // The account the credential authenticates as: its user part
                // (an API key's SID would be SK..., whose account is not
                // named; the probe then reads as the vendor answers).
                let sid = credential.split_once(':').map_or("", |(u, _)| u);
                if sid.is_empty() || !sid.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(ProbeError::BadTwilioSid);
                }
                format!("/2010-04-01/Accounts/{sid}.json")
            }
            Profile::Generic => {
                let p = generic_path.ok_or(ProbeError::NoProbePath)?;
                check_probe_path(p)?;
                p.to_string()
            }
        };
        Ok(ProbeRequest { path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        for p in Profile::ALL {
            assert_eq!(Profile::parse(p.as_str()), Some(p));
        }
        for s in ["", "Stripe", "stripe ", "Twilio", "paypal", "openai\0"] {
            assert_eq!(Profile::parse(s), None, "{s:?}");
        }
        assert_eq!(
            Profile::names(),
            "stripe, openai, anthropic, resend, generic, twilio"
        );
        assert_eq!(Profile::Twilio.credential_header(), CredentialHeader::Basic);
    }

    #[test]
    fn credentials_are_injected_as_each_profile_expects() {
        let bearer = CredentialInjection::new(Profile::Stripe, None, "sk_test_123").unwrap();
        assert_eq!(bearer.header, "authorization");
        assert_eq!(bearer.value, "Bearer sk_test_123");
        assert_eq!(bearer.secrets, ["sk_test_123"]);
        let key = CredentialInjection::new(Profile::Anthropic, None, "sk-ant-123").unwrap();
        assert_eq!(
            (key.header.as_str(), key.value.as_str()),
            ("x-api-key", "sk-ant-123")
        );
        let basic = CredentialInjection::new(Profile::Twilio, None, "AC1:authtoken").unwrap();
        assert_eq!(
            basic.value,
            format!("Basic {}", BASE64.encode("AC1:authtoken"))
        );
        assert_eq!(
            basic.secrets,
            ["authtoken".to_string(), BASE64.encode("AC1:authtoken")]
        );
        let own = CredentialInjection::new(Profile::Generic, Some("X-Token"), "tok_12345").unwrap();
        assert_eq!(
            (own.header.as_str(), own.value.as_str()),
            ("x-token", "tok_12345")
        );
        assert!(!format!("{own:?}").contains("tok_"));
    }

    #[test]
    fn each_profile_probes_a_cheap_read() {
        let path = |p, g, c| ProbeRequest::new(p, g, c).map(|r| r.path);
        assert_eq!(path(Profile::Stripe, None, "sk_1").unwrap(), "/v1/balance");
        assert_eq!(path(Profile::Openai, None, "sk").unwrap(), "/v1/models");
        assert_eq!(path(Profile::Anthropic, None, "sk").unwrap(), "/v1/models");
        assert_eq!(path(Profile::Resend, None, "re").unwrap(), "/domains");
        assert_eq!(
            path(Profile::Twilio, None, "AC123:token").unwrap(),
            "/2010-04-01/Accounts/AC123.json"
        );
        assert_eq!(
            path(Profile::Twilio, None, "../x:token"),
            Err(ProbeError::BadTwilioSid)
        );
        assert_eq!(
            path(Profile::Generic, Some("/v2/me"), "t").unwrap(),
            "/v2/me"
        );
        assert_eq!(
            path(Profile::Generic, None, "t"),
            Err(ProbeError::NoProbePath)
        );
        for bad in ["v2/me", "/a/../b", "/a?x=1", "/a b", "/%2e%2e/"] {
            assert_eq!(check_probe_path(bad), Err(ProbeError::BadPath), "{bad}");
        }
    }

    #[test]
    fn credentials_that_cannot_be_injected_are_refused() {
        use CredentialError::*;
        let new = |p, h, c| CredentialInjection::new(p, h, c).unwrap_err();
        assert_eq!(
            new(Profile::Stripe, None, "sk_caf\u{e9}xxxx"),
            NotHeaderText
        );
        assert_eq!(new(Profile::Stripe, None, "sk live key"), NotHeaderText);
        assert_eq!(new(Profile::Stripe, None, "short"), NotHeaderText);
        assert_eq!(
            new(Profile::Twilio, None, "justatoken"),
            NotUserPassword("twilio")
        );
        assert_eq!(
            new(Profile::Twilio, None, ":password1"),
            NotUserPassword("twilio")
        );
        assert_eq!(new(Profile::Twilio, None, "AC1:short"), NotHeaderText);
        for header in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "upgrade",
            "proxy-authorization",
            "Proxy-Foo",
            "accept-encoding",
        ] {
            assert!(
                matches!(
                    new(Profile::Generic, Some(header), "tok_12345"),
                    ReservedHeader(_)
                ),
                "{header}"
            );
        }
    }
}
