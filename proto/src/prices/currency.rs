//! A vendor's `currency_rates`: USD per major unit of each currency it may
//! charge in, so a non-USD Stripe amount can be priced.
//!
//! One rule for both planes: the control plane refuses what `CurrencyRates`
//! refuses, and the proxy prices with the same parsed rates, so a vendor the
//! control plane accepts is never one a proxy drops. Rates are exact
//! decimals held as integers; a float never holds one.

use std::collections::BTreeMap;

use super::{clip, PriceTableError};

/// Most fractional digits a configured rate may have. Eighteen is far more
/// than any real rate needs and keeps every product inside i128.
pub const MAX_RATE_SCALE: u32 = 18;

/// USD per major unit of a currency, held exactly as `num / 10^scale`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    pub num: i128,
    pub scale: u32,
    /// The rate as configured, for audit details.
    pub text: String,
}

impl Rate {
    /// A positive plain decimal (`1.08`, `0.0062`, `150`): digits, at most
    /// one '.', digits on both sides of it, no sign, exponent or spaces.
    pub fn parse(text: &str) -> Option<Rate> {
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty()
            || !digits(int)
            || !digits(frac)
            || (text.contains('.') && frac.is_empty())
        {
            return None;
        }
        let frac = frac.trim_end_matches('0');
        let scale = u32::try_from(frac.len()).ok()?;
        if scale > MAX_RATE_SCALE || int.trim_start_matches('0').len() > 12 {
            return None;
        }
        let num: i128 = format!("{int}{frac}").parse().ok()?;
        // A zero rate would make every charge in that currency free.
        (num > 0).then(|| Rate {
            num,
            scale,
            text: text.to_string(),
        })
    }
}

/// A vendor's rates by lowercase three-letter currency code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CurrencyRates(BTreeMap<String, Rate>);

impl CurrencyRates {
    /// Parses `raw` (code -> decimal USD per unit). Codes are three
    /// lowercase letters; `usd`, if given, must be 1. The error names the
    /// entry.
    pub fn parse(raw: &BTreeMap<String, String>) -> Result<CurrencyRates, PriceTableError> {
        let mut rates = BTreeMap::new();
        for (code, text) in raw {
            if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_lowercase()) {
                return Err(PriceTableError(format!(
                    "{:?} is not a lowercase three-letter currency code",
                    clip(code)
                )));
            }
            let rate = Rate::parse(text).ok_or_else(|| {
                PriceTableError(format!(
                    "{code}: the rate must be a positive decimal number of USD per unit \
                     (at most 12 digits before the point, 18 after), like \"1.08\"; got {:?}",
                    clip(text)
                ))
            })?;
            if code == "usd" && (rate.num, rate.scale) != (1, 0) {
                return Err(PriceTableError("usd: the rate for usd must be 1".into()));
            }
            rates.insert(code.clone(), rate);
        }
        Ok(CurrencyRates(rates))
    }

    pub fn get(&self, code: &str) -> Option<&Rate> {
        self.0.get(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(code: &str, rate: &str) -> Result<CurrencyRates, PriceTableError> {
        CurrencyRates::parse(&[(code.to_string(), rate.to_string())].into())
    }

    #[test]
    fn rates_parse_exactly() {
        assert_eq!(
            Rate::parse("1.0800").map(|r| (r.num, r.scale)),
            Some((108, 2))
        );
        assert_eq!(Rate::parse("100000").map(|r| r.num), Some(100_000));
        assert!(Rate::parse("1000000000000").is_none());
        let r = one("eur", "1.08").unwrap();
        assert_eq!(r.get("eur").map(|r| r.text.as_str()), Some("1.08"));
        assert!(one("usd", "1.000").is_ok());
    }

    #[test]
    fn bad_rates_are_refused_naming_the_entry() {
        for (code, rate) in [
            ("eur", "1,08"),
            ("eur", "-1.08"),
            ("eur", "0"),
            ("eur", "0.000"),
            ("eur", "1."),
            ("eur", ".5"),
            ("eur", "1e2"),
            ("eur", " 1.08"),
            ("eur", "0.0000000000000000001"),
            ("EUR", "1.08"),
            ("euro", "1.08"),
            ("usd", "2"),
        ] {
            let err = one(code, rate).unwrap_err().to_string();
            assert!(err.contains(&code[..3]), "{code}={rate}: {err}");
        }
    }
}
