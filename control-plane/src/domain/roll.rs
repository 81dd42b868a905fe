//! Vault key rolls: what links a key to the key it succeeded, and the grace
//! a rolled key keeps working for.
//!
//! Owns the validated shapes only. A roll never gives a chain more budget:
//! every key of a chain spends the budget of the chain's first key
//! (`budget_id`), so what the store and the proxies count is keyed by that
//! id, never by the key that made the call.

use chrono::{DateTime, TimeDelta, Utc};

use super::{invalid, InvalidInput};

/// The grace a roll gives when the caller names none.
pub const DEFAULT_GRACE: TimeDelta = TimeDelta::minutes(10);
/// The longest grace a roll may give: a rolled key is a key an operator
/// wants gone, so it never lingers longer than a day.
pub const MAX_GRACE: TimeDelta = TimeDelta::hours(24);

/// Where a key stands in its roll chain. All `None` for a key never rolled
/// and never rolled into.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRoll {
    /// The budget this key spends, when it is not its own: the chain's
    /// first key. Fixed when the key is minted.
    pub budget_id: Option<String>,
    /// The key this one succeeded.
    pub rolled_from: Option<String>,
    /// The key that succeeded this one (a key is rolled at most once).
    pub successor_id: Option<String>,
    /// When this rolled key's grace ends: the control plane revokes it then.
    pub retire_at: Option<DateTime<Utc>>,
}

/// Parses a roll's grace: "10m", "90s", "1h"; empty for the default. From 0
/// (the key is revoked at once, with the proxies' confirmation) to
/// `MAX_GRACE`.
pub fn parse_grace(s: &str) -> Result<TimeDelta, InvalidInput> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(DEFAULT_GRACE);
    }
    let d = if t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>()
            .map(std::time::Duration::from_secs)
            .map_err(|_| invalid("grace", "too large"))?
    } else {
        humantime::parse_duration(t).map_err(|e| {
            invalid(
                "grace",
                format!("{s:?} is not a duration like \"10m\": {e}"),
            )
        })?
    };
    let d = TimeDelta::from_std(d).map_err(|_| invalid("grace", "too large"))?;
    if d > MAX_GRACE {
        return Err(invalid("grace", "must be at most 24h"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_defaults_to_ten_minutes_and_is_bounded_by_a_day() {
        assert_eq!(parse_grace("").unwrap(), DEFAULT_GRACE);
        assert_eq!(parse_grace("90s").unwrap(), TimeDelta::seconds(90));
        assert_eq!(parse_grace("0s").unwrap(), TimeDelta::zero());
        assert_eq!(parse_grace("30").unwrap(), TimeDelta::seconds(30));
        assert_eq!(parse_grace("24h").unwrap(), MAX_GRACE);
        assert_eq!(parse_grace("25h").unwrap_err().field, "grace");
        assert_eq!(parse_grace("soon").unwrap_err().field, "grace");
    }
}
