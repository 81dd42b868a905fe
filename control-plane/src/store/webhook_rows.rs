//! Row shapes of the webhook tables (migration 0016) and their conversion
//! to the types of `crate::webhook`. Encoding as in `store::sql`: times in
//! microseconds, lists as JSON text.

use super::sql::{from_micros, to_json};
use super::{StoreError, StoreResult};
use crate::webhook::{
    Attempt, ClaimedDelivery, Delivery, EventType, PayloadFormat, WebhookEndpoint,
};

pub(super) const ENDPOINT_COLUMNS: &str =
    "id, url, events, thresholds, run_label, key_id, format, description, created_at";

fn corrupt(column: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{column}: {e}"))
}

/// `events` and `thresholds` as stored.
pub(super) fn endpoint_lists(e: &WebhookEndpoint) -> StoreResult<(String, String)> {
    let events: Vec<&str> = e.events.iter().map(|e| e.as_str()).collect();
    Ok((
        to_json(&events, "webhook_endpoints.events")?,
        to_json(&e.thresholds, "webhook_endpoints.thresholds")?,
    ))
}

#[derive(sqlx::FromRow)]
pub struct WebhookEndpointRow {
    id: String,
    url: String,
    events: String,
    thresholds: String,
    run_label: Option<String>,
    key_id: Option<String>,
    format: String,
    description: String,
    created_at: i64,
}

impl WebhookEndpointRow {
    pub(super) fn into_domain(self) -> StoreResult<WebhookEndpoint> {
        let events: Vec<String> = serde_json::from_str(&self.events)
            .map_err(|e| corrupt("webhook_endpoints.events", e))?;
        let thresholds: Vec<u8> = serde_json::from_str(&self.thresholds)
            .map_err(|e| corrupt("webhook_endpoints.thresholds", e))?;
        Ok(WebhookEndpoint {
            id: self.id,
            url: self.url,
            events: events
                .iter()
                .map(|e| EventType::parse(e).map_err(|e| corrupt("webhook_endpoints.events", e)))
                .collect::<StoreResult<_>>()?,
            thresholds,
            run_label: self.run_label,
            key_id: self.key_id,
            format: PayloadFormat::parse(&self.format)
                .map_err(|e| corrupt("webhook_endpoints.format", e))?,
            description: self.description,
            created_at: from_micros(self.created_at, "webhook_endpoints.created_at")?,
        })
    }
}

pub(super) const CLAIM_COLUMNS: &str = "d.seq, d.endpoint_id, d.event_id, ev.type AS event_type, \
     ev.payload, ep.url, ep.sealed_secret, ep.format, CAST(d.attempts AS BIGINT) AS attempts, \
     d.created_at";

#[derive(sqlx::FromRow)]
pub struct ClaimRow {
    seq: i64,
    endpoint_id: String,
    event_id: String,
    event_type: String,
    payload: String,
    url: String,
    sealed_secret: Vec<u8>,
    format: String,
    attempts: i64,
    created_at: i64,
}

impl ClaimRow {
    pub(super) fn into_domain(self) -> StoreResult<ClaimedDelivery> {
        Ok(ClaimedDelivery {
            seq: self.seq,
            endpoint_id: self.endpoint_id,
            event_id: self.event_id,
            event_type: self.event_type,
            payload: self.payload,
            url: self.url,
            sealed_secret: self.sealed_secret,
            format: PayloadFormat::parse(&self.format)
                .map_err(|e| corrupt("webhook_endpoints.format", e))?,
            attempts: i32::try_from(self.attempts)
                .map_err(|e| corrupt("webhook_deliveries.attempts", e))?,
            created_at: from_micros(self.created_at, "webhook_deliveries.created_at")?,
        })
    }
}

pub(super) const DELIVERY_COLUMNS: &str = "d.seq, d.endpoint_id, d.event_id, \
     ev.type AS event_type, d.state, CAST(d.attempts AS BIGINT) AS attempts, d.next_attempt_at, \
     d.created_at, ev.payload";

#[derive(sqlx::FromRow)]
pub struct DeliveryRow {
    seq: i64,
    endpoint_id: String,
    event_id: String,
    event_type: String,
    state: String,
    attempts: i64,
    next_attempt_at: i64,
    created_at: i64,
    payload: String,
}

impl DeliveryRow {
    pub(super) fn seq(&self) -> i64 {
        self.seq
    }

    /// `attempts`: the delivery's attempts in order. They are read after
    /// the delivery, so an attempt finished in between may be among them;
    /// only those the delivery's own count includes are kept, and its state
    /// and its attempts agree (an attempt and the count move in one
    /// transaction).
    pub(super) fn into_domain(self, mut attempts: Vec<Attempt>) -> StoreResult<Delivery> {
        attempts.truncate(usize::try_from(self.attempts).unwrap_or(0));
        let pending = self.state == "pending";
        Ok(Delivery {
            seq: self.seq,
            endpoint_id: self.endpoint_id,
            event_id: self.event_id,
            event_type: self.event_type,
            state: self.state,
            attempts,
            next_attempt_at: if pending {
                Some(from_micros(
                    self.next_attempt_at,
                    "webhook_deliveries.next_attempt_at",
                )?)
            } else {
                None
            },
            created_at: from_micros(self.created_at, "webhook_deliveries.created_at")?,
            payload: self.payload,
        })
    }
}

pub(super) const ATTEMPT_COLUMNS: &str = "delivery_seq, CAST(attempt AS BIGINT) AS attempt, at, \
     CAST(status AS BIGINT) AS status, error, duration_ms";

#[derive(sqlx::FromRow)]
pub struct AttemptRow {
    delivery_seq: i64,
    attempt: i64,
    at: i64,
    status: Option<i64>,
    error: String,
    duration_ms: i64,
}

impl AttemptRow {
    pub(super) fn delivery_seq(&self) -> i64 {
        self.delivery_seq
    }

    pub(super) fn into_domain(self) -> StoreResult<Attempt> {
        Ok(Attempt {
            attempt: i32::try_from(self.attempt)
                .map_err(|e| corrupt("webhook_attempts.attempt", e))?,
            at: from_micros(self.at, "webhook_attempts.at")?,
            status: self
                .status
                .map(i32::try_from)
                .transpose()
                .map_err(|e| corrupt("webhook_attempts.status", e))?,
            error: self.error,
            duration_ms: self.duration_ms,
        })
    }
}
