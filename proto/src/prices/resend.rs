//! Resend's unit price table: one price per recipient of a sent email.

use serde::Deserialize;

use super::{clip, PriceTableError};
use crate::Micros;

/// Resend's unit price, as shipped or set by the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResendPrices {
    /// The date the price was checked.
    pub as_of: String,
    pub per_recipient: Micros,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    as_of: String,
    currency: String,
    per_recipient: String,
}

impl ResendPrices {
    pub fn from_json(text: &str) -> Result<Self, PriceTableError> {
        let raw: RawTable = serde_json::from_str(text)
            .map_err(|e| PriceTableError(format!("Resend price table is not valid: {e}")))?;
        if raw.currency != "usd" {
            return Err(PriceTableError(
                "Resend price table must have \"currency\": \"usd\"".into(),
            ));
        }
        let per_recipient = Micros::parse_usd(&raw.per_recipient)
            .ok()
            .filter(|m| m.0 > 0)
            .ok_or_else(|| {
                PriceTableError(format!(
                    "Resend price table: per_recipient must be a positive decimal, got {:?}",
                    clip(&raw.per_recipient)
                ))
            })?;
        Ok(ResendPrices {
            as_of: raw.as_of,
            per_recipient,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_table_validation() {
        let ok = ResendPrices::from_json(
            r#"{"as_of":"2026-11-01","currency":"usd","per_recipient":"0.0009"}"#,
        )
        .unwrap();
        assert_eq!(ok.per_recipient, Micros(900));
        for bad in [
            r#"{"as_of":"x","currency":"eur","per_recipient":"0.001"}"#,
            r#"{"as_of":"x","currency":"usd","per_recipient":"0"}"#,
            r#"{"as_of":"x","currency":"usd","per_recipient":"-1"}"#,
            r#"{"as_of":"x","currency":"usd","per_recipient":0.001}"#,
            r#"{"as_of":"x","currency":"usd"}"#,
        ] {
            assert!(ResendPrices::from_json(bad).is_err(), "{bad}");
        }
    }
}
