//! Alert webhooks as operations: registering endpoints, and raising events
//! from what the control plane sees — spend crossing a cap threshold,
//! refusals at a cap, revocations and the proxies that did not confirm
//! them, proxies' spool backlogs, credentials due for rotation.
//!
//! Raising an event only writes it to the store's outbox (once: the store's
//! unique constraint on what it is about decides); the replica's `Courier`
//! posts it. A failure to raise is logged, never returned to the call that
//! caused it: an alert must not undo a revocation or refuse spend.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use keycap_proto::Micros;
use serde_json::json;

use super::{Confirmation, Control};
use crate::domain::{
    Outcome, SpendDimension, SpendEvent, SpendReportQuery, VaultKey, MAX_REPORT_GROUPS,
};
use crate::error::ApiError;
use crate::store::RefusalCountQuery;
use crate::webhook::delivery::{Courier, Destinations};
use crate::webhook::{
    secret_record, Delivery, EndpointRequest, EventType, NewWebhookEndpoint, Subject,
    WebhookEndpoint, WebhookEvent, REFUSAL_BURST,
};

/// A proxy reporting at least this many undelivered spend events in its
/// spool raises `spool.backlog` (once per proxy and hour).
pub const SPOOL_BACKLOG: i64 = 1000;

fn usd(m: Micros) -> String {
    m.to_string()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The (key id, UTC day) pairs a batch of spend events touched: what
/// [`Control::check_thresholds`] looks at once the batch is stored.
pub(crate) fn touched(events: &[SpendEvent]) -> BTreeSet<(String, String)> {
    events
        .iter()
        .map(|e| (e.key_id.clone(), e.day.clone()))
        .collect()
}

/// The least time between the starts of two passes of alert checks on one
/// replica (`Control::check_alerts_soon`).
const ALERT_PASS: Duration = Duration::from_secs(1);

/// What waits to be checked for alerts after spend was recorded: the (key
/// id, UTC day) pairs whose cap thresholds, and the (key id, minute)
/// windows whose cap refusals, reports touched. A report adds what it
/// touched and returns; one pass at a time per replica takes everything
/// waiting, so a key that many reports touch meanwhile is checked once per
/// pass, not once per report.
#[derive(Default)]
pub(crate) struct PendingChecks {
    touched: std::sync::Mutex<BTreeSet<(String, String)>>,
    windows: std::sync::Mutex<BTreeSet<(String, DateTime<Utc>)>>,
    /// Held by the task running the passes.
    pub(super) checking: tokio::sync::Mutex<()>,
}

impl PendingChecks {
    pub(super) fn waiting(&self) -> std::sync::MutexGuard<'_, BTreeSet<(String, String)>> {
        self.touched.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn waiting_windows(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeSet<(String, DateTime<Utc>)>> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiting().is_empty() && self.waiting_windows().is_empty()
    }
}

/// The refusal reasons that are a cap refusing a call.
pub const CAP_REFUSALS: [&str; 3] = [
    "per_call_cap_exceeded",
    "daily_cap_exceeded",
    "lifetime_cap_exceeded",
];

/// The (key id, minute) windows of a batch's cap refusal records: what
/// [`Control::check_cap_refusals`] looks at once the batch is stored.
pub(crate) fn cap_refusal_windows(events: &[SpendEvent]) -> BTreeSet<(String, DateTime<Utc>)> {
    events
        .iter()
        .filter(|e| {
            e.outcome == Outcome::Refused && CAP_REFUSALS.contains(&e.refusal_reason.as_str())
        })
        .map(|e| (e.key_id.clone(), minute_start(e.at)))
        .collect()
}

fn minute_start(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp().div_euclid(60) * 60, 0).unwrap_or(t)
}

/// How far back the sweep looks for cap refusal bursts: the proxies
/// report a minute's refusals once it is over, so a burst is raised at
/// ingest; the sweep catches one whose endpoint was registered, or whose
/// ingest failed to raise, meanwhile.
const SWEEP_REFUSAL_MINUTES: i64 = 10;

impl Control {
    /// Starts this replica's webhook courier: from now on it posts what the
    /// outbox holds (whichever replica raised it).
    pub fn deliver_webhooks(
        &self,
        destinations: Destinations,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let courier = Courier::new(
            self.store.clone(),
            self.sealer.clone(),
            destinations,
            timeout,
        )?;
        courier.run();
        if self.courier.set(courier).is_err() {
            anyhow::bail!("webhook delivery already started");
        }
        Ok(())
    }

    pub async fn create_webhook(
        &self,
        req: &EndpointRequest,
    ) -> Result<(WebhookEndpoint, String), ApiError> {
        let new = NewWebhookEndpoint::new(req, Utc::now())?;
        if let Some(courier) = self.courier.get() {
            courier.check_destination(&new.endpoint.url).await?;
        }
        let sealed = self
            .sealer
            .seal(&secret_record(&new.endpoint.id), new.secret.as_bytes());
        self.store
            .insert_webhook_endpoint(&new.endpoint, &sealed)
            .await?;
        // The URL itself may be a secret (a Slack incoming webhook): log its host.
        let host = new
            .endpoint
            .url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_string))
            .unwrap_or_default();
        tracing::info!(webhook = %new.endpoint.id, host = %host, "webhook endpoint registered");
        let stored = self
            .store
            .get_webhook_endpoint(&new.endpoint.id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("webhook {}", new.endpoint.id)))?;
        Ok((stored, new.secret))
    }

    pub async fn list_webhooks(&self) -> Result<Vec<WebhookEndpoint>, ApiError> {
        Ok(self.store.list_webhook_endpoints().await?)
    }

    pub async fn get_webhook(&self, id: &str) -> Result<WebhookEndpoint, ApiError> {
        self.store
            .get_webhook_endpoint(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("webhook {id}")))
    }

    pub async fn delete_webhook(&self, id: &str) -> Result<(), ApiError> {
        self.store.delete_webhook_endpoint(id).await?;
        tracing::info!(webhook = %id, "webhook endpoint deleted");
        Ok(())
    }

    /// Queues a `webhook.test` event for one endpoint; returns the event.
    pub async fn test_webhook(&self, id: &str) -> Result<WebhookEvent, ApiError> {
        let endpoint = self.get_webhook(id).await?;
        let event = WebhookEvent::new(
            EventType::Test,
            Utc::now(),
            json!({"webhook_id": endpoint.id, "url": endpoint.url}),
        );
        self.store
            .enqueue_webhook_event(&event, None, &[endpoint.id], Utc::now())
            .await?;
        self.wake_courier();
        Ok(event)
    }

    /// An endpoint's newest deliveries (at most `limit`, 100 when 0).
    pub async fn webhook_deliveries(
        &self,
        id: &str,
        limit: u32,
    ) -> Result<Vec<Delivery>, ApiError> {
        self.get_webhook(id).await?;
        Ok(self.store.webhook_deliveries(id, limit).await?)
    }

    fn wake_courier(&self) {
        if let Some(c) = self.courier.get() {
            c.wake();
        }
    }

    /// Raises an event for the endpoints among `endpoints` that `wants`
    /// picks, once per `dedupe`. Nothing is stored when no endpoint wants
    /// it.
    pub(super) async fn raise(
        &self,
        endpoints: &[WebhookEndpoint],
        wants: impl Fn(&WebhookEndpoint) -> bool,
        kind: EventType,
        dedupe: Option<String>,
        data: serde_json::Value,
    ) {
        let targets: Vec<String> = endpoints
            .iter()
            .filter(|e| wants(e))
            .map(|e| e.id.clone())
            .collect();
        if targets.is_empty() {
            return;
        }
        let now = Utc::now();
        let event = WebhookEvent::new(kind, now, data);
        match self
            .store
            .enqueue_webhook_event(&event, dedupe.as_deref(), &targets, now)
            .await
        {
            Ok(true) => {
                tracing::info!(event = %event.id, kind = %kind, endpoints = targets.len(), "alert raised");
                self.wake_courier();
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, kind = %kind, "cannot store an alert"),
        }
    }

    /// Endpoints that may want `kind`, or `None` when none does (the
    /// common case: the caller does no more work).
    pub(super) async fn endpoints_for(&self, kind: EventType) -> Option<Vec<WebhookEndpoint>> {
        match self.store.list_webhook_endpoints().await {
            Ok(all) => {
                let some: Vec<_> = all
                    .into_iter()
                    .filter(|e| e.events.is_empty() || e.events.contains(&kind))
                    .collect();
                (!some.is_empty()).then_some(some)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read webhook endpoints");
                None
            }
        }
    }

    /// After spend was recorded: has the thresholds of the `touched` (key
    /// id, day) pairs (`check_thresholds`) and the cap refusals of the
    /// `windows` (key id, minute) (`check_cap_refusals`) checked without
    /// holding up the report. The first pass after a quiet spell starts at
    /// once; while reports keep coming, passes start at most once per
    /// `ALERT_PASS`, each covering everything touched since the one
    /// before. A fleet reporting a thousand keys several times a second
    /// would otherwise read each key's tree and run once per report
    /// (measured: 33 us of replica and 77 us of PostgreSQL CPU per event,
    /// BENCHMARKS.md).
    pub(crate) fn check_alerts_soon(
        self: &Arc<Self>,
        touched: BTreeSet<(String, String)>,
        windows: BTreeSet<(String, DateTime<Utc>)>,
    ) {
        if touched.is_empty() && windows.is_empty() {
            return;
        }
        self.pending.waiting().extend(touched);
        self.pending.waiting_windows().extend(windows);
        let control = self.clone();
        tokio::spawn(async move { control.alert_passes().await });
    }

    /// As the replica stops: runs one last pass over what waits, after
    /// the running one if any, so what the last reports touched is checked
    /// now rather than left to another replica's sweep. Gives up after
    /// `limit` (the sweep still covers today's thresholds and the last ten
    /// minutes' refusals).
    pub async fn finish_alert_checks(&self, limit: Duration) {
        let last = async {
            let _checking = self.pending.checking.lock().await;
            self.check_what_waits().await;
        };
        if tokio::time::timeout(limit, last).await.is_err() {
            tracing::warn!("alert checks still waiting at shutdown are left to the sweep");
        }
    }

    /// One pass: takes everything waiting and checks it. False when nothing
    /// waited. The caller holds `pending.checking`.
    async fn check_what_waits(&self) -> bool {
        let touched = std::mem::take(&mut *self.pending.waiting());
        let windows = std::mem::take(&mut *self.pending.waiting_windows());
        if touched.is_empty() && windows.is_empty() {
            return false;
        }
        self.check_thresholds(touched).await;
        self.check_cap_refusals(windows).await;
        true
    }

    /// Runs passes while checks wait, unless another task already does.
    async fn alert_passes(&self) {
        loop {
            {
                let Ok(_checking) = self.pending.checking.try_lock() else {
                    // The task holding it takes what this one added: it
                    // looks again after letting go.
                    return;
                };
                loop {
                    let started = tokio::time::Instant::now();
                    if !self.check_what_waits().await {
                        break;
                    }
                    tokio::time::sleep_until(started + ALERT_PASS).await;
                }
            }
            // Checks added after the last take, while this task still held
            // the lock, are this task's to run.
            if self.pending.is_empty() {
                return;
            }
        }
    }

    /// After spend was recorded: raises `cap.threshold` for each key, and
    /// each run, of the `touched` (key id, day) pairs whose spend has
    /// reached a threshold an endpoint asks for — once per key (or run),
    /// cap, period and threshold, however many proxies report at once.
    /// A pass reads a handful of statements per day it covers, whatever
    /// the number of keys: the keys, their trees' spend, their runs' keys
    /// and those runs' spend, each for all of them at once.
    pub(crate) async fn check_thresholds(&self, touched: BTreeSet<(String, String)>) {
        if touched.is_empty() {
            return;
        }
        let Some(endpoints) = self.endpoints_for(EventType::CapThreshold).await else {
            return;
        };
        let mut days: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key_id, day) in touched {
            days.entry(day).or_default().push(key_id);
        }
        for (day, key_ids) in days {
            if let Err(e) = self.day_thresholds(&endpoints, &key_ids, &day).await {
                tracing::warn!(error = %e, day, keys = key_ids.len(), "cannot check cap thresholds");
            }
        }
    }

    /// The caps of the keys of `key_ids`, and of each of their ancestors,
    /// against the spend of their whole subtree on `day` (a child's spend
    /// draws on every ancestor's budget, so it can take a parent over a
    /// threshold); then the runs of all those keys.
    async fn day_thresholds(
        &self,
        endpoints: &[WebhookEndpoint],
        key_ids: &[String],
        day: &str,
    ) -> Result<(), ApiError> {
        // A rolled key spends its chain's budget, kept under the chain's
        // first key: that is the tree whose thresholds its spend moves.
        let budgets: BTreeSet<String> = self
            .store
            .keys_by_id(key_ids)
            .await?
            .iter()
            .map(|k| k.budget_id().to_string())
            .collect();
        let budgets: Vec<String> = budgets.into_iter().collect();
        let lineage = self.store.lineage_spend(&budgets, day).await?;
        let ids: Vec<String> = lineage.iter().map(|l| l.key_id.clone()).collect();
        let keys: HashMap<String, VaultKey> = self
            .store
            .keys_by_id(&ids)
            .await?
            .into_iter()
            .map(|k| (k.id.clone(), k))
            .collect();
        let mut runs: BTreeSet<String> = BTreeSet::new();
        for l in lineage {
            let Some(key) = keys.get(&l.key_id) else {
                continue;
            };
            runs.insert(key.agent_run_label.clone());
            self.one_key_thresholds(endpoints, key, day, l.spend).await;
        }
        self.run_thresholds(endpoints, runs, day).await
    }

    async fn one_key_thresholds(
        &self,
        endpoints: &[WebhookEndpoint],
        key: &VaultKey,
        day: &str,
        spend: crate::domain::KeySpend,
    ) {
        let subject = Subject {
            run_label: Some(&key.agent_run_label),
            key_id: Some(&key.id),
        };
        let base = json!({
            "subject": "key",
            "key_id": key.id,
            "run_label": key.agent_run_label,
            "vendor": key.vendor.as_str(),
        });
        self.crossings(
            endpoints,
            &subject,
            "daily",
            day,
            spend.spent_day,
            key.daily_cap,
            &base,
        )
        .await;
        if let Some(cap) = key.lifetime_cap {
            self.crossings(
                endpoints,
                &subject,
                "lifetime",
                "lifetime",
                spend.spent_lifetime,
                cap,
                &base,
            )
            .await;
        }
    }

    /// A run's daily cap is the sum of the daily caps of its budgets that do
    /// not draw on another key of the run (a child's spend already counts
    /// against its parent's cap); its spend is that of all its budgets.
    async fn run_thresholds(
        &self,
        endpoints: &[WebhookEndpoint],
        labels: BTreeSet<String>,
        day: &str,
    ) -> Result<(), ApiError> {
        let labels: Vec<String> = labels.into_iter().collect();
        let mut runs: BTreeMap<String, Vec<VaultKey>> = BTreeMap::new();
        for k in self.store.run_keys(&labels).await? {
            runs.entry(k.agent_run_label.clone()).or_default().push(k);
        }
        // A roll chain's keys spend one budget, kept (with the caps grants
        // enforce) under the chain's first key: counted once, there, not
        // once per key of the chain.
        let budgets: Vec<String> = runs
            .values()
            .flatten()
            .filter(|k| k.id == k.budget_id())
            .map(|k| k.id.clone())
            .collect();
        let spent: HashMap<String, Micros> = self
            .store
            .budgets_spent_on(&budgets, day)
            .await?
            .into_iter()
            .collect();
        for (label, keys) in &runs {
            let ids: BTreeSet<&str> = keys.iter().map(|k| k.id.as_str()).collect();
            let mut cap = Micros::ZERO;
            let mut run_spent = Micros::ZERO;
            for k in keys.iter().filter(|k| k.id == k.budget_id()) {
                if !k.parent_id.as_deref().is_some_and(|p| ids.contains(p)) {
                    cap = Micros(cap.0.saturating_add(k.daily_cap.0));
                }
                let of_key = spent.get(&k.id).copied().unwrap_or(Micros::ZERO);
                run_spent = Micros(run_spent.0.saturating_add(of_key.0));
            }
            let subject = Subject {
                run_label: Some(label),
                key_id: None,
            };
            let base = json!({"subject": "run", "run_label": label, "keys": keys.len()});
            self.crossings(endpoints, &subject, "daily", day, run_spent, cap, &base)
                .await;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn crossings(
        &self,
        endpoints: &[WebhookEndpoint],
        subject: &Subject<'_>,
        cap_kind: &str,
        period: &str,
        spent: Micros,
        cap: Micros,
        base: &serde_json::Value,
    ) {
        if cap.0 <= 0 {
            return;
        }
        let wanted: BTreeSet<u8> = endpoints
            .iter()
            .flat_map(|e| e.thresholds.iter().copied())
            .collect();
        let who = match subject.key_id {
            Some(k) if base["subject"] == "key" => format!("key|{k}"),
            _ => format!("run|{}", subject.run_label.unwrap_or("")),
        };
        for t in wanted {
            if i128::from(spent.0) * 100 < i128::from(cap.0) * i128::from(t) {
                continue;
            }
            let mut data = base.clone();
            data["cap"] = json!(cap_kind);
            data["period"] = json!(period);
            data["threshold_percent"] = json!(t);
            data["cap_usd"] = json!(usd(cap));
            data["spent_usd"] = json!(usd(spent));
            data["remaining_usd"] = json!(usd(Micros((cap.0 - spent.0).max(0))));
            self.raise(
                endpoints,
                |e| e.wants_threshold(t, subject),
                EventType::CapThreshold,
                Some(format!("cap.threshold|{who}|{cap_kind}|{period}|{t}")),
                data,
            )
            .await;
        }
    }

    /// After refusal records were stored: raises one `cap.refusals` event
    /// for each (key, minute) window whose calls refused at a cap, summed
    /// over every proxy's record of that minute, reached `REFUSAL_BURST`.
    /// Read from the ledger, so a record delivered twice counts once and
    /// whichever replica stored the last record raises it (the event's
    /// dedupe makes it once).
    pub(crate) async fn check_cap_refusals(&self, windows: BTreeSet<(String, DateTime<Utc>)>) {
        if windows.is_empty() {
            return;
        }
        let Some(endpoints) = self.endpoints_for(EventType::CapRefusals).await else {
            return;
        };
        for (key_id, minute) in windows {
            let q = RefusalCountQuery {
                since: Some(minute),
                until: Some(minute + chrono::Duration::minutes(1)),
                key_id: Some(key_id.clone()),
                reasons: Some(CAP_REFUSALS.iter().map(|r| r.to_string()).collect()),
                vendors: None,
            };
            let counts = match self.store.refusal_counts(&q).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, key = %key_id, "cannot count cap refusals");
                    continue;
                }
            };
            let n: i64 = counts.iter().map(|c| c.calls).sum();
            if n < REFUSAL_BURST {
                continue;
            }
            let key = self.store.get_key(&key_id).await.ok().flatten();
            let run = key.as_ref().map(|k| k.agent_run_label.as_str());
            let subject = Subject {
                run_label: run,
                key_id: Some(&key_id),
            };
            let minute = minute.format("%Y-%m-%dT%H:%MZ").to_string();
            let reasons: serde_json::Map<String, serde_json::Value> = counts
                .iter()
                .map(|c| (c.reason.clone(), json!(c.calls)))
                .collect();
            self.raise(
                &endpoints,
                |e| e.wants(EventType::CapRefusals, &subject),
                EventType::CapRefusals,
                Some(format!("cap.refusals|{key_id}|{minute}")),
                json!({
                    "key_id": key_id,
                    "run_label": run,
                    "vendor": key.as_ref().map(|k| k.vendor.as_str()),
                    "minute": minute,
                    "refusals": n,
                    "reasons": reasons,
                }),
            )
            .await;
        }
    }

    /// After a key (and its subtree) was revoked: `key.revoked`, and
    /// `revocation.unconfirmed` when proxies did not confirm it.
    pub(crate) async fn alert_key_revoked(
        &self,
        key: &VaultKey,
        descendants: &[String],
        c: &Confirmation,
    ) {
        if let Some(endpoints) = self.endpoints_for(EventType::KeyRevoked).await {
            let subject = Subject {
                run_label: Some(&key.agent_run_label),
                key_id: Some(&key.id),
            };
            self.raise(
                &endpoints,
                |e| e.wants(EventType::KeyRevoked, &subject),
                EventType::KeyRevoked,
                Some(format!("key.revoked|{}", key.id)),
                json!({
                    "key_id": key.id,
                    "run_label": key.agent_run_label,
                    "vendor": key.vendor.as_str(),
                    "descendants": descendants,
                    "revoked_at": key.revoked_at.map(rfc3339),
                    "confirmed": c.confirmed,
                    "unconfirmed": c.unconfirmed,
                }),
            )
            .await;
        }
        self.alert_unconfirmed(Some(&key.agent_run_label), Some(&key.id), c)
            .await;
    }

    /// After a run was revoked (`ids` revoked by this call).
    pub(crate) async fn alert_run_revoked(&self, label: &str, ids: &[String], c: &Confirmation) {
        if ids.is_empty() {
            return;
        }
        if let Some(endpoints) = self.endpoints_for(EventType::RunRevoked).await {
            let subject = Subject {
                run_label: Some(label),
                key_id: None,
            };
            self.raise(
                &endpoints,
                |e| e.wants(EventType::RunRevoked, &subject),
                EventType::RunRevoked,
                Some(format!("run.revoked|{label}|{}", c.version)),
                json!({
                    "run_label": label,
                    "key_ids": ids,
                    "confirmed": c.confirmed,
                    "unconfirmed": c.unconfirmed,
                }),
            )
            .await;
        }
        self.alert_unconfirmed(Some(label), None, c).await;
    }

    async fn alert_unconfirmed(&self, run: Option<&str>, key: Option<&str>, c: &Confirmation) {
        if c.unconfirmed.is_empty() {
            return;
        }
        let Some(endpoints) = self.endpoints_for(EventType::RevocationUnconfirmed).await else {
            return;
        };
        let subject = Subject {
            run_label: run,
            key_id: key,
        };
        self.raise(
            &endpoints,
            |e| e.wants(EventType::RevocationUnconfirmed, &subject),
            EventType::RevocationUnconfirmed,
            Some(format!(
                "revocation.unconfirmed|{}|{}|{}",
                c.version,
                key.or(run).unwrap_or(""),
                c.unconfirmed.join(",")
            )),
            json!({
                "run_label": run,
                "key_id": key,
                "version": c.version,
                "unconfirmed": c.unconfirmed,
                "unconfirmed_lease_usd": usd(c.unconfirmed_lease),
            }),
        )
        .await;
    }

    /// A proxy reported how many spend events its spool holds undelivered;
    /// `SPOOL_BACKLOG` or more raises `spool.backlog`, once per proxy and
    /// UTC hour.
    pub async fn note_spool_depth(&self, node_id: &str, depth: i64) {
        if depth < SPOOL_BACKLOG {
            return;
        }
        let Some(endpoints) = self.endpoints_for(EventType::SpoolBacklog).await else {
            return;
        };
        let hour = Utc::now().format("%Y-%m-%dT%HZ").to_string();
        self.raise(
            &endpoints,
            |e| e.wants(EventType::SpoolBacklog, &Subject::default()),
            EventType::SpoolBacklog,
            Some(format!("spool.backlog|{node_id}|{hour}")),
            json!({"node_id": node_id, "spool_depth": depth, "threshold": SPOOL_BACKLOG}),
        )
        .await;
    }

    /// Every `period`, sweeps for alerts no request raises, or that one
    /// failed to: credentials due for rotation, cap thresholds already
    /// crossed today (say, by an endpoint registered after the spend), and
    /// cap refusal bursts of the last minutes. Every replica sweeps; each
    /// event's dedupe in the store makes it raised once however many do.
    pub fn sweep_alerts_every(self: &Arc<Self>, period: Duration) {
        self.every(period, |control| async move {
            control.sweep_alerts().await;
        });
    }

    pub async fn sweep_alerts(&self) {
        self.check_credential_rotation().await;
        let now = Utc::now();
        if self.endpoints_for(EventType::CapThreshold).await.is_some() {
            let today = now.date_naive();
            let q = SpendReportQuery {
                group_by: vec![SpendDimension::Key],
                since: today.and_hms_opt(0, 0, 0).map(|t| t.and_utc()),
                until: None,
                agent_run_label: None,
                vendors: None,
                top: MAX_REPORT_GROUPS,
            };
            match self.store.spend_report(&q).await {
                Ok(report) => {
                    let day = today.format("%Y-%m-%d").to_string();
                    let touched = report
                        .groups
                        .into_iter()
                        .filter(|g| g.total.0 > 0)
                        .filter_map(|g| g.key_id)
                        .map(|k| (k, day.clone()))
                        .collect();
                    self.check_thresholds(touched).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read today's spend for the alert sweep")
                }
            }
        }
        if self.endpoints_for(EventType::CapRefusals).await.is_some() {
            let since = minute_start(now) - chrono::Duration::minutes(SWEEP_REFUSAL_MINUTES);
            let q = RefusalCountQuery {
                since: Some(since),
                reasons: Some(CAP_REFUSALS.iter().map(|r| r.to_string()).collect()),
                ..RefusalCountQuery::default()
            };
            match self.store.refusal_counts(&q).await {
                Ok(counts) => {
                    let windows = counts
                        .iter()
                        .filter(|c| c.calls >= REFUSAL_BURST)
                        .flat_map(|c| {
                            (0..=SWEEP_REFUSAL_MINUTES).map(move |m| {
                                (c.key_id.clone(), since + chrono::Duration::minutes(m))
                            })
                        })
                        .collect();
                    self.check_cap_refusals(windows).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read cap refusals for the alert sweep")
                }
            }
        }
    }

    pub async fn check_credential_rotation(&self) {
        let now = Utc::now();
        let vendors = match self.store.list_vendors().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read vendors for rotation checks");
                return;
            }
        };
        let due: Vec<_> = vendors.iter().filter(|v| v.rotation_overdue(now)).collect();
        if due.is_empty() {
            return;
        }
        let Some(endpoints) = self.endpoints_for(EventType::CredentialRotationDue).await else {
            return;
        };
        for v in due {
            let rotate_after = v.rotate_after.unwrap_or_default();
            self.raise(
                &endpoints,
                |e| e.wants(EventType::CredentialRotationDue, &Subject::default()),
                EventType::CredentialRotationDue,
                Some(format!(
                    "credential.rotation_due|{}|{}",
                    v.name,
                    v.credential_set_at.timestamp_micros()
                )),
                json!({
                    "vendor": v.name.as_str(),
                    "credential_set_at": rfc3339(v.credential_set_at),
                    "rotate_after": humantime::format_duration(
                        rotate_after.to_std().unwrap_or_default()
                    ).to_string(),
                    "rotate_after_seconds": rotate_after.num_seconds(),
                    "due_at": v.rotation_due_at().map(rfc3339),
                }),
            )
            .await;
        }
    }
}
