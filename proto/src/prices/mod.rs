//! Price tables: the data that prices a vendor's calls.
//!
//! Owns the format and validation of every table a profile prices from
//! (per-token LLM prices, Resend's unit price, Twilio's per-destination
//! prices, a vendor's currency rates), so the control plane accepts exactly the `prices` a proxy can
//! use and the proxy reads the shipped
//! tables with the same code. Prices are decimal strings in JSON and integer
//! micro-dollars here; a float never holds one. No I/O: callers read files.

use crate::profile::Profile;

pub mod currency;
pub mod generic;
pub mod litellm;
pub mod resend;
pub mod tokens;
pub mod twilio;

pub use currency::CurrencyRates;
pub use generic::GenericRules;
pub use resend::ResendPrices;
pub use tokens::{
    EmbeddingPrice, ImagePrice, LongContext, ModelPrice, Rates, TokenPrices, TokenUse, Uplift,
    Uplifts, TOKENS_PER_UNIT,
};
pub use twilio::TwilioPrices;

/// The LLM price tables shipped with keycap (`vendors/prices/`), read
/// by the proxy as its defaults and by the control plane as the base of a
/// price import for a vendor that has no table of its own.
pub mod shipped {
    pub const OPENAI: &str = include_str!("../../../vendors/prices/openai.json");
    pub const ANTHROPIC: &str = include_str!("../../../vendors/prices/anthropic.json");
}

/// Why a price table was refused. The message names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PriceTableError(pub String);

/// An operator's prices for one vendor, parsed for its profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VendorPrices {
    /// Per-token prices (openai, anthropic).
    Tokens(TokenPrices),
    Resend(ResendPrices),
    Generic(GenericRules),
    Twilio(TwilioPrices),
}

impl VendorPrices {
    /// Parses `text` as the price table of `profile`. Stripe has no table:
    /// its prices are the amounts in the requests (converted with the
    /// vendor's `currency_rates`).
    pub fn parse(profile: Profile, text: &str) -> Result<VendorPrices, PriceTableError> {
        match profile {
            Profile::Openai | Profile::Anthropic => TokenPrices::from_json(text).map(Self::Tokens),
            Profile::Resend => ResendPrices::from_json(text).map(Self::Resend),
            Profile::Generic => GenericRules::from_json(text).map(Self::Generic),
            Profile::Twilio => TwilioPrices::from_json(text).map(Self::Twilio),
            Profile::Stripe => Err(PriceTableError(
                "stripe takes no price table: a call costs the amount it states \
                 (set currency_rates for non-USD currencies)"
                    .into(),
            )),
        }
    }
}

/// `ceil(a * b / d)` in i128, for non-negative `a`, `b` and positive `d`;
/// `None` if the result does not fit in micro-dollars.
pub fn mul_div_ceil(a: i128, b: i128, d: i128) -> Option<i64> {
    debug_assert!(a >= 0 && b >= 0 && d > 0);
    let n = a.checked_mul(b)?;
    let q = n / d + i128::from(n % d != 0);
    i64::try_from(q).ok()
}

fn clip(s: &str) -> String {
    crate::clip(s, 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_div_ceil_rounds_up_exactly() {
        assert_eq!(mul_div_ceil(0, 5, 7), Some(0));
        assert_eq!(mul_div_ceil(7, 1, 7), Some(1));
        assert_eq!(mul_div_ceil(8, 1, 7), Some(2));
        assert_eq!(mul_div_ceil(1, 1, 1_000_000), Some(1));
        assert_eq!(
            mul_div_ceil(1_000_000, 2_500_000, 1_000_000),
            Some(2_500_000)
        );
        assert_eq!(mul_div_ceil(i128::from(i64::MAX), 2, 1), None);
        assert_eq!(mul_div_ceil(i128::MAX, 2, 1), None);
    }

    #[test]
    fn each_profile_parses_its_own_table_and_stripe_takes_none() {
        let tokens = r#"{"as_of":"2026-11-01","currency":"usd","unit":"per_million_tokens",
            "models":{"m":{"input":"1","output":"2","max_output_tokens":10}}}"#;
        let resend = r#"{"as_of":"2026-11-01","currency":"usd","per_recipient":"0.001"}"#;
        assert!(matches!(
            VendorPrices::parse(Profile::Openai, tokens),
            Ok(VendorPrices::Tokens(_))
        ));
        assert!(matches!(
            VendorPrices::parse(Profile::Anthropic, tokens),
            Ok(VendorPrices::Tokens(_))
        ));
        assert!(matches!(
            VendorPrices::parse(Profile::Resend, resend),
            Ok(VendorPrices::Resend(_))
        ));
        assert!(VendorPrices::parse(Profile::Resend, tokens).is_err());
        assert!(VendorPrices::parse(Profile::Openai, resend).is_err());
        let twilio = r#"{"as_of":"2026-11-01","currency":"usd","sms":{"default":"0.01"}}"#;
        assert!(matches!(
            VendorPrices::parse(Profile::Twilio, twilio),
            Ok(VendorPrices::Twilio(_))
        ));
        assert!(VendorPrices::parse(Profile::Twilio, resend).is_err());
        let err = VendorPrices::parse(Profile::Stripe, "{}").unwrap_err();
        assert!(err.0.contains("currency_rates"), "{err}");
    }
}
