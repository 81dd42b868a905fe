//! Integer money. Every amount keycap reserves, settles or caps is a whole
//! number of micro-dollars (`Micros`); a float never holds a price. Decimal
//! text ("499.99") is parsed exactly and rejected when it has more precision
//! than a micro-dollar.

use std::fmt;

/// Micro-dollars: 1 USD = 1_000_000.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub i64);

pub const MICROS_PER_USD: i64 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("not a decimal amount: {0:?}")]
    NotDecimal(String),
    #[error("amount has more than 6 decimal places: {0:?}")]
    TooPrecise(String),
    #[error("amount is too large: {0:?}")]
    TooLarge(String),
}

impl Micros {
    pub const ZERO: Micros = Micros(0);

    pub fn from_usd(whole: i64) -> Option<Micros> {
        whole.checked_mul(MICROS_PER_USD).map(Micros)
    }

    /// Parses decimal USD text such as "500", "0.5", "-3.25", "1e2" is refused.
    pub fn parse_usd(text: &str) -> Result<Micros, MoneyError> {
        let t = text.trim();
        let (neg, digits) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (int_part, frac_part) = match digits.split_once('.') {
            Some((i, f)) => (i, f),
            None => (digits, ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int_part.is_empty() || !all_digits(int_part) || !all_digits(frac_part) {
            return Err(MoneyError::NotDecimal(text.to_string()));
        }
        if digits.contains('.') && frac_part.is_empty() {
            return Err(MoneyError::NotDecimal(text.to_string()));
        }
        let frac_trimmed = frac_part.trim_end_matches('0');
        if frac_trimmed.len() > 6 {
            return Err(MoneyError::TooPrecise(text.to_string()));
        }
        let too_large = || MoneyError::TooLarge(text.to_string());
        let whole: i64 = int_part.parse().map_err(|_| too_large())?;
        let mut frac: i64 = 0;
        for (i, b) in frac_trimmed.bytes().enumerate() {
            frac += i64::from(b - b'0') * 10i64.pow(5 - i as u32);
        }
        let v = whole
            .checked_mul(MICROS_PER_USD)
            .and_then(|w| w.checked_add(frac))
            .ok_or_else(too_large)?;
        Ok(Micros(if neg { -v } else { v }))
    }

    pub fn checked_add(self, o: Micros) -> Option<Micros> {
        self.0.checked_add(o.0).map(Micros)
    }

    pub fn saturating_add(self, o: Micros) -> Micros {
        Micros(self.0.saturating_add(o.0))
    }

    pub fn saturating_sub(self, o: Micros) -> Micros {
        Micros(self.0.saturating_sub(o.0))
    }

    pub fn max(self, o: Micros) -> Micros {
        Micros(self.0.max(o.0))
    }

    pub fn min(self, o: Micros) -> Micros {
        Micros(self.0.min(o.0))
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// The amount as a JSON number of dollars, for display at the JSON edge
    /// only (the exact integer travels beside it as `*_micros`).
    pub fn to_json_usd(self) -> serde_json_number::Number {
        serde_json_number::Number(self)
    }
}

/// A tiny Serialize shim so JSON bodies can carry `"cap_usd": 499.99` as a
/// number written from the exact decimal text, not from a float.
pub mod serde_json_number {
    use super::Micros;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Number(pub Micros);

    impl serde::Serialize for Number {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            // Every micro-dollar amount below 2^53 / 1e6 dollars round-trips
            // exactly through the shortest f64 text; larger caps are refused
            // at validation, so this conversion is display-only and exact.
            s.serialize_f64(self.0 .0 as f64 / super::MICROS_PER_USD as f64)
        }
    }
}

impl fmt::Display for Micros {
    /// Decimal dollars with trailing zeros trimmed: 499990000 -> "499.99".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / MICROS_PER_USD as u64;
        let frac = abs % MICROS_PER_USD as u64;
        if frac == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let s = format!("{frac:06}");
            write!(f, "{sign}{whole}.{}", s.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Micros::parse_usd("500"), Ok(Micros(500_000_000)));
        assert_eq!(Micros::parse_usd("0.5"), Ok(Micros(500_000)));
        assert_eq!(Micros::parse_usd("12.345678"), Ok(Micros(12_345_678)));
        assert_eq!(Micros::parse_usd("1.2300000"), Ok(Micros(1_230_000)));
        assert_eq!(Micros::parse_usd("-3.25"), Ok(Micros(-3_250_000)));
    }

    #[test]
    fn refuses_bad_text() {
        for bad in ["", "abc", "1e3", "1.", ".5", "1.2.3", "--1", "NaN", "1,5"] {
            assert!(Micros::parse_usd(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Micros::parse_usd("0.0000001"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(matches!(
            Micros::parse_usd("99999999999999999"),
            Err(MoneyError::TooLarge(_))
        ));
    }

    #[test]
    fn displays_trimmed() {
        assert_eq!(Micros(499_990_000).to_string(), "499.99");
        assert_eq!(Micros(5_000_000).to_string(), "5");
        assert_eq!(Micros(1).to_string(), "0.000001");
        assert_eq!(Micros(-1_500_000).to_string(), "-1.5");
    }
}
