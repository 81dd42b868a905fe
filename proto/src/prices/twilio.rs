//! Twilio's price table: what one SMS segment and one MMS cost per
//! destination, matched by the longest E.164 prefix of the number, and the
//! flat amount creating a call reserves.
//!
//! A destination no prefix matches takes the table's `default` when it has
//! one, and is otherwise not priced (the proxy refuses the message). Prices
//! are decimal strings in the file and integer micro-dollars here.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{clip, PriceTableError};
use crate::Micros;

/// The longest E.164 number: a country code and subscriber number of at
/// most 15 digits.
pub const E164_MAX_DIGITS: usize = 15;

/// Twilio's prices, as shipped or set by the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwilioPrices {
    /// The date the prices were checked.
    pub as_of: String,
    /// Price of one SMS segment.
    pub sms: DestinationPrices,
    /// Price of one MMS message; `None` when the table prices no MMS, so
    /// every MMS is refused.
    pub mms: Option<DestinationPrices>,
    /// What creating a call reserves and settles at; `None` refuses calls.
    pub call_reservation: Option<Micros>,
}

/// Prices per destination prefix, with an optional catch-all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationPrices {
    prefixes: BTreeMap<String, Micros>,
    default: Option<Micros>,
}

/// The price that applies to one number, and which entry gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationPrice<'a> {
    /// The matched prefix ("+44"), or "default".
    pub matched: &'a str,
    pub price: Micros,
}

impl DestinationPrices {
    /// The price for `number` (E.164, "+447700900123"): the longest prefix
    /// it starts with, else the default, else `None`.
    pub fn for_number(&self, number: &str) -> Option<DestinationPrice<'_>> {
        let longest = number.len().min(E164_MAX_DIGITS + 1);
        (2..=longest)
            .rev()
            .filter_map(|len| number.get(..len))
            .find_map(|prefix| self.prefixes.get_key_value(prefix))
            .map(|(matched, &price)| DestinationPrice { matched, price })
            .or_else(|| {
                self.default.map(|price| DestinationPrice {
                    matched: "default",
                    price,
                })
            })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    as_of: String,
    currency: String,
    sms: RawDestinations,
    #[serde(default)]
    mms: Option<RawDestinations>,
    #[serde(default)]
    call_reservation: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestinations {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    prefixes: BTreeMap<String, String>,
}

fn config(msg: String) -> PriceTableError {
    PriceTableError(format!("Twilio price table: {msg}"))
}

/// A positive decimal price; `field` names it in the error.
fn price(field: &str, text: &str) -> Result<Micros, PriceTableError> {
    Micros::parse_usd(text)
        .ok()
        .filter(|m| m.0 > 0)
        .ok_or_else(|| {
            config(format!(
                "{field} must be a positive decimal, got {:?}",
                clip(text)
            ))
        })
}

/// "+" then 1 to 15 digits, the first not 0: a country code or a longer
/// prefix of an E.164 number.
fn is_e164_prefix(p: &str) -> bool {
    p.strip_prefix('+').is_some_and(|digits| {
        (1..=E164_MAX_DIGITS).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

impl RawDestinations {
    fn into_prices(self, name: &str) -> Result<DestinationPrices, PriceTableError> {
        let mut prefixes = BTreeMap::new();
        for (prefix, text) in &self.prefixes {
            if !is_e164_prefix(prefix) {
                return Err(config(format!(
                    "{name}.prefixes key {:?} must be \"+\" and 1 to 15 digits, as in \"+44\"",
                    clip(prefix)
                )));
            }
            prefixes.insert(
                prefix.clone(),
                price(&format!("{name}.prefixes[{prefix:?}]"), text)?,
            );
        }
        let default = self
            .default
            .as_deref()
            .map(|t| price(&format!("{name}.default"), t))
            .transpose()?;
        if prefixes.is_empty() && default.is_none() {
            return Err(config(format!(
                "{name} must price at least one prefix or have a default"
            )));
        }
        Ok(DestinationPrices { prefixes, default })
    }
}

impl TwilioPrices {
    pub fn from_json(text: &str) -> Result<Self, PriceTableError> {
        let raw: RawTable = serde_json::from_str(text)
            .map_err(|e| PriceTableError(format!("Twilio price table is not valid: {e}")))?;
        if raw.currency != "usd" {
            return Err(config("\"currency\" must be \"usd\"".into()));
        }
        Ok(TwilioPrices {
            as_of: raw.as_of,
            sms: raw.sms.into_prices("sms")?,
            mms: raw.mms.map(|m| m.into_prices("mms")).transpose()?,
            call_reservation: raw
                .call_reservation
                .as_deref()
                .map(|t| price("call_reservation", t))
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = r#"{
        "as_of": "2026-11-01", "currency": "usd",
        "sms": {"prefixes": {"+1": "0.0083", "+1876": "0.1", "+44": "0.0524", "+447": "0.06"}},
        "mms": {"default": "0.5", "prefixes": {"+1": "0.022"}},
        "call_reservation": "0.50"
    }"#;

    #[test]
    fn parses_prices_exactly() {
        let t = TwilioPrices::from_json(TABLE).unwrap();
        assert_eq!(t.as_of, "2026-11-01");
        assert_eq!(t.call_reservation, Some(Micros(500_000)));
        let us = t.sms.for_number("+14155552671").unwrap();
        assert_eq!((us.matched, us.price), ("+1", Micros(8_300)));
    }

    #[test]
    fn the_longest_prefix_wins_then_the_default() {
        let t = TwilioPrices::from_json(TABLE).unwrap();
        let sms = |n: &str| t.sms.for_number(n).map(|p| (p.matched, p.price.0));
        assert_eq!(sms("+18765551234"), Some(("+1876", 100_000)));
        assert_eq!(sms("+18775551234"), Some(("+1", 8_300)));
        assert_eq!(sms("+447700900123"), Some(("+447", 60_000)));
        assert_eq!(sms("+442079460000"), Some(("+44", 52_400)));
        // No match and no default: not priced.
        assert_eq!(sms("+4930123456"), None);
        assert_eq!(sms("+"), None);
        assert_eq!(sms(""), None);
        let mms = t.mms.as_ref().unwrap();
        let p = mms.for_number("+4930123456").unwrap();
        assert_eq!((p.matched, p.price), ("default", Micros(500_000)));
        assert_eq!(
            mms.for_number("+14155552671").unwrap().price,
            Micros(22_000)
        );
    }

    #[test]
    fn mms_and_calls_are_optional() {
        let t =
            TwilioPrices::from_json(r#"{"as_of":"x","currency":"usd","sms":{"default":"0.01"}}"#)
                .unwrap();
        assert_eq!(t.mms, None);
        assert_eq!(t.call_reservation, None);
        assert_eq!(t.sms.for_number("+99912").unwrap().matched, "default");
    }

    #[test]
    fn validation_names_the_field() {
        for (bad, says) in [
            (
                r#"{"as_of":"x","currency":"eur","sms":{"default":"0.01"}}"#,
                "currency",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"prefixes":{"+44":"0"}}}"#,
                "sms.prefixes[\"+44\"]",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"prefixes":{"+44":"-0.05"}}}"#,
                "sms.prefixes[\"+44\"]",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"prefixes":{"+44":0.05}}}"#,
                "not valid",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"prefixes":{"44":"0.05"}}}"#,
                "sms.prefixes key",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"prefixes":{"+044":"0.05"}}}"#,
                "sms.prefixes key",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"prefixes":{"+1234567890123456":"0.05"}}}"#,
                "sms.prefixes key",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"prefixes":{"+4a":"0.05"}}}"#,
                "sms.prefixes key",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{}}"#,
                "sms must price",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"default":"1e-2"}}"#,
                "sms.default",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"default":"0.01"},"mms":{"prefixes":{}}}"#,
                "mms must price",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"default":"0.01"},"mms":{"default":"0.0000001"}}"#,
                "mms.default",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"default":"0.01"},"call_reservation":"0"}"#,
                "call_reservation",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"default":"0.01"},"whatsapp":{}}"#,
                "unknown field",
            ),
            (
                r#"{"as_of":"x","currency":"usd","sms":{"default":"0.01","per_segment":"1"}}"#,
                "unknown field",
            ),
            (r#"{"as_of":"x","currency":"usd"}"#, "sms"),
        ] {
            let err = TwilioPrices::from_json(bad).unwrap_err();
            assert!(err.0.contains(says), "{bad}: {err}");
        }
    }
}
