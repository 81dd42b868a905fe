//! Observe mode's cap marks (docs/observe.md). A key in observe mode is
//! held to its observe ceiling; its own daily and lifetime caps only say
//! which calls enforcement would have refused. Those caps count spend
//! across the whole fleet, which only the control plane sees, so the marks
//! are made here, as the calls are appended: under the ledger head's lock,
//! in the ledger's order, against the spend already settled.
//!
//! A call is marked when its reservation, added to what its budget had
//! settled before it, passes a cap, as a proxy enforcing that cap would
//! have refused it for lack of budget. Calls that reserved nothing are
//! never marked (enforcement lets them through too). The proxy's own marks
//! (allowlist, rate, per-call cap) come first: a call carries one mark, of
//! the first rule that would have fired.

use std::borrow::Cow;
use std::collections::HashMap;

use keycap_proto::Micros;

use crate::domain::SpendEvent;

/// What a key in observe mode would be held to under enforcement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedCaps {
    /// The budget the key spends (its roll chain's first key).
    pub budget_id: String,
    pub daily_cap: Micros,
    pub lifetime_cap: Option<Micros>,
}

/// Spend settled before the batch: per (budget, UTC day) and per budget
/// over its life.
#[derive(Debug, Default)]
pub struct SettledBefore {
    pub day: HashMap<(String, String), i64>,
    pub life: HashMap<String, i64>,
}

/// The batch's events, those of observed keys marked where a cap would
/// have refused them; the others borrowed as they are.
pub fn mark<'a>(
    events: &[&'a SpendEvent],
    observed: &HashMap<String, ObservedCaps>,
    mut settled: SettledBefore,
) -> Vec<Cow<'a, SpendEvent>> {
    events
        .iter()
        .map(|&e| {
            let Some(caps) = observed.get(&e.key_id).filter(|_| e.outcome.is_call()) else {
                return Cow::Borrowed(e);
            };
            let day = settled
                .day
                .entry((caps.budget_id.clone(), e.day.clone()))
                .or_default();
            let before_day = *day;
            *day = day.saturating_add(e.cost.0);
            let life = settled.life.entry(caps.budget_id.clone()).or_default();
            let before_life = *life;
            *life = life.saturating_add(e.cost.0);
            if !e.would_refuse.is_empty() || e.reserved.0 <= 0 {
                return Cow::Borrowed(e);
            }
            let code = if before_day.saturating_add(e.reserved.0) > caps.daily_cap.0 {
                "daily_cap_exceeded"
            } else if caps
                .lifetime_cap
                .is_some_and(|cap| before_life.saturating_add(e.reserved.0) > cap.0)
            {
                "lifetime_cap_exceeded"
            } else {
                return Cow::Borrowed(e);
            };
            let mut marked = e.clone();
            marked.would_refuse = code.to_string();
            Cow::Owned(marked)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Outcome;

    fn call(key: &str, reserved: i64, cost: i64) -> SpendEvent {
        SpendEvent::settled(&format!("e{reserved}-{cost}"), key, reserved, cost)
    }

    fn caps(daily: i64, life: Option<i64>) -> HashMap<String, ObservedCaps> {
        HashMap::from([(
            "k".to_string(),
            ObservedCaps {
                budget_id: "b".into(),
                daily_cap: Micros(daily),
                lifetime_cap: life.map(Micros),
            },
        )])
    }

    fn marks(
        events: &[SpendEvent],
        observed: &HashMap<String, ObservedCaps>,
        settled: SettledBefore,
    ) -> Vec<String> {
        let refs: Vec<&SpendEvent> = events.iter().collect();
        mark(&refs, observed, settled)
            .into_iter()
            .map(|e| e.would_refuse.clone())
            .collect()
    }

    #[test]
    fn a_call_whose_reservation_passes_the_daily_cap_is_marked_and_still_counts() {
        let events = [
            call("k", 4, 4),
            call("k", 4, 3),
            call("k", 2, 2),
            call("other", 50, 50),
        ];
        let settled = SettledBefore {
            day: HashMap::from([(("b".into(), "2026-12-06".into()), 1)]),
            ..Default::default()
        };
        // 1 + 4 = 5 fits; 5 + 4 = 9 > 8; 8 + 2 = 10 > 8 (the marked call
        // was forwarded and spent); another key is no observed key.
        assert_eq!(
            marks(&events, &caps(8, None), settled),
            ["", "daily_cap_exceeded", "daily_cap_exceeded", ""]
        );
    }

    #[test]
    fn the_lifetime_cap_marks_after_the_daily_one_and_earlier_marks_stay() {
        let mut proxy_marked = call("k", 3, 3);
        proxy_marked.would_refuse = "endpoint_not_allowed".into();
        let events = [
            call("k", 3, 3),
            proxy_marked,
            call("k", 3, 3),
            call("k", 0, 5),
        ];
        let settled = SettledBefore {
            life: HashMap::from([("b".into(), 10)]),
            ..Default::default()
        };
        assert_eq!(
            marks(&events, &caps(100, Some(17)), settled),
            ["", "endpoint_not_allowed", "lifetime_cap_exceeded", ""]
        );
    }

    #[test]
    fn refusal_records_are_never_marked() {
        let mut r = call("k", 0, 0);
        r.outcome = Outcome::Refused;
        r.reserved = Micros(99);
        assert_eq!(marks(&[r], &caps(1, None), SettledBefore::default()), [""]);
    }
}
