//! Vendor profiles: how keycap prices a vendor's calls and injects its
//! credential. Shared so the control plane accepts exactly the profiles the
//! proxy can serve.

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
}
