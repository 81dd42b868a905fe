//! What the dashboard and the alert sweep read from the ledger and the
//! spend tables beyond a key's own row: refused calls grouped by key and
//! reason, and the spend of a key's whole subtree for each of its
//! ancestors. Read-only shapes; the queries are in `sql_store`.

use chrono::{DateTime, Utc};
use keycap_proto::Micros;

use crate::domain::KeySpend;

/// Most groups `Store::refusal_counts` returns.
pub const MAX_REFUSAL_GROUPS: u32 = 1000;

/// Which refusal entries (outcome `refused`) to count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefusalCountQuery {
    /// Entries at or after this time (a refusal entry's time is the start
    /// of its minute).
    pub since: Option<DateTime<Utc>>,
    /// Entries before this time (exclusive).
    pub until: Option<DateTime<Utc>>,
    pub key_id: Option<String>,
    /// Only these refusal reasons (error codes); `None` for all.
    pub reasons: Option<Vec<String>>,
    /// Only entries of these vendors (an admin token's restriction).
    pub vendors: Option<Vec<String>>,
}

/// The calls of one key refused for one reason, summed over the entries
/// the query named (every proxy and minute).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalCount {
    pub key_id: String,
    pub agent_run_label: String,
    pub vendor: String,
    pub reason: String,
    pub calls: i64,
}

#[derive(sqlx::FromRow)]
pub struct RefusalCountRow {
    key_id: String,
    agent_run_label: String,
    vendor: String,
    refusal_reason: String,
    calls: i64,
}

impl RefusalCountRow {
    pub(super) fn into_domain(self) -> RefusalCount {
        RefusalCount {
            key_id: self.key_id,
            agent_run_label: self.agent_run_label,
            vendor: self.vendor,
            reason: self.refusal_reason,
            calls: self.calls,
        }
    }
}

/// One key of a lineage (the key itself, then each ancestor up to its
/// root) and the spend of its whole subtree: what its caps are measured
/// against, since a child's spend draws on every ancestor's budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineageSpend {
    pub key_id: String,
    pub spend: KeySpend,
}

#[derive(sqlx::FromRow)]
pub struct LineageSpendRow {
    pub(super) ancestor_id: String,
    /// The least depth at which one of the keys asked about sees it.
    pub(super) depth: i64,
    spent_day: i64,
    calls_day: i64,
    spent_lifetime: i64,
}

impl LineageSpendRow {
    pub(super) fn into_domain(self) -> LineageSpend {
        LineageSpend {
            key_id: self.ancestor_id,
            spend: KeySpend {
                spent_day: Micros(self.spent_day),
                calls_day: self.calls_day,
                spent_lifetime: Micros(self.spent_lifetime),
            },
        }
    }
}
