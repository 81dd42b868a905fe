//! Reservation rules that learn from an overrun.
//!
//! Owns what the proxy remembers when a call costs more than was reserved
//! for it: per vendor and reservation rule (`PriceModel::rule_of`), the
//! largest ratio of true cost to the rule's own quote. Later quotes under
//! that rule are scaled up by it (rounded up), so the same overrun cannot
//! happen again; a rule that quoted 0 gets the largest cost seen as its
//! floor. Rules only ever tighten here.
//!
//! The memory is per proxy process, shared by its serving threads, and
//! starts empty on restart: an overrun is also flagged in its audit entry
//! (`exceeded_reservation`), which is where an operator fixes the rule or
//! the price table for good.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keycap_proto::prices::mul_div_ceil;
use keycap_proto::Micros;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Factor {
    /// The largest cost / quote seen, as a fraction (`den` > 0).
    ratio: Option<(i64, i64)>,
    /// The largest cost seen for a quote of 0.
    floor: Micros,
}

/// Shared by every serving thread of one proxy.
#[derive(Clone, Default)]
pub struct Tightening {
    inner: Arc<Mutex<HashMap<(String, String), Factor>>>,
}

impl std::fmt::Debug for Tightening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tightening").finish_non_exhaustive()
    }
}

impl Tightening {
    pub fn new() -> Self {
        Self::default()
    }

    /// What to reserve for a call quoted at `quote` under `rule`.
    pub fn apply(&self, vendor: &str, rule: &str, quote: Micros) -> Micros {
        let inner = self.inner.lock().expect("tightening poisoned");
        let Some(f) = inner.get(&(vendor.to_string(), rule.to_string())) else {
            return quote;
        };
        if quote == Micros::ZERO {
            return f.floor;
        }
        match f.ratio {
            Some((num, den)) => mul_div_ceil(i128::from(quote.0), i128::from(num), i128::from(den))
                .map_or(Micros(i64::MAX), Micros)
                .max(quote),
            None => quote,
        }
    }

    /// A call quoted at `quote` under `rule` cost `cost`. Returns whether
    /// the rule was tightened (the cost exceeded what it would reserve).
    pub fn record(&self, vendor: &str, rule: &str, quote: Micros, cost: Micros) -> bool {
        if cost <= self.apply(vendor, rule, quote) {
            return false;
        }
        let mut inner = self.inner.lock().expect("tightening poisoned");
        let f = inner
            .entry((vendor.to_string(), rule.to_string()))
            .or_default();
        if quote == Micros::ZERO {
            f.floor = f.floor.max(cost);
        } else {
            let bigger = match f.ratio {
                // cost/quote > num/den  <=>  cost*den > num*quote
                Some((num, den)) => {
                    i128::from(cost.0) * i128::from(den) > i128::from(num) * i128::from(quote.0)
                }
                None => true,
            };
            if bigger {
                f.ratio = Some((cost.0, quote.0));
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overrun_scales_later_quotes_of_the_same_rule() {
        let t = Tightening::new();
        assert_eq!(t.apply("v", "POST /x", Micros(100)), Micros(100));
        assert!(!t.record("v", "POST /x", Micros(100), Micros(100)));
        assert!(t.record("v", "POST /x", Micros(100), Micros(250)));
        assert_eq!(t.apply("v", "POST /x", Micros(100)), Micros(250));
        // Scaled and rounded up for other quotes under the rule.
        assert_eq!(t.apply("v", "POST /x", Micros(3)), Micros(8));
        // Other rules and vendors are untouched.
        assert_eq!(t.apply("v", "POST /y", Micros(100)), Micros(100));
        assert_eq!(t.apply("w", "POST /x", Micros(100)), Micros(100));
        // Within the tightened reservation: nothing changes.
        assert!(!t.record("v", "POST /x", Micros(100), Micros(240)));
        assert_eq!(t.apply("v", "POST /x", Micros(100)), Micros(250));
        // A bigger overrun tightens further; a smaller ratio never loosens.
        assert!(t.record("v", "POST /x", Micros(10), Micros(40)));
        assert_eq!(t.apply("v", "POST /x", Micros(100)), Micros(400));
    }

    #[test]
    fn a_zero_quote_gets_a_floor_and_huge_ratios_saturate() {
        let t = Tightening::new();
        assert!(t.record("v", "r", Micros::ZERO, Micros(70)));
        assert_eq!(t.apply("v", "r", Micros::ZERO), Micros(70));
        assert!(t.record("v", "big", Micros(1), Micros(i64::MAX)));
        assert_eq!(t.apply("v", "big", Micros(2)), Micros(i64::MAX));
    }
}
