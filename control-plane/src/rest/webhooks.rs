//! `/vault/webhooks`: alert webhook endpoints and their deliveries over
//! REST, the same operations as gRPC's `WebhookService`. Bodies and answers
//! are typed structs, built from domain types here and from gRPC messages
//! by the `keycap` CLI, so both print one shape. An endpoint's signing
//! secret appears only in the answer that registered it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{admin, parse_body, rfc3339, ErrorAnswers};
use crate::domain::invalid;
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::Control;
use crate::webhook::{Attempt, Delivery, EndpointRequest, WebhookEndpoint};
use keycap_proto::pb;

/// A gRPC timestamp as answers write times (empty when unset).
fn pb_time(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref()
        .and_then(keycap_proto::time::from_proto)
        .map(rfc3339)
}

pub fn routes() -> Router<Arc<Control>> {
    Router::new()
        .route("/vault/webhooks", post(create).get(list))
        .route("/vault/webhooks/{id}", get(read).delete(remove))
        .route("/vault/webhooks/{id}/test", post(test))
        .route("/vault/webhooks/{id}/deliveries", get(deliveries))
}

/// `POST /vault/webhooks`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookBody {
    pub url: String,
    /// Absent: keycap draws one and returns it (once).
    #[serde(default)]
    pub secret: Option<String>,
    /// Event types; absent or empty: every type.
    #[serde(default)]
    pub events: Vec<String>,
    /// Cap thresholds in percent; absent or empty: 50, 80, 100.
    #[serde(default)]
    pub thresholds: Vec<u32>,
    /// Only events about this run.
    #[serde(default)]
    pub run_label: Option<String>,
    /// Only events about this key.
    #[serde(default)]
    pub key_id: Option<String>,
    /// `keycap` (default) or `slack`.
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

impl CreateWebhookBody {
    pub fn into_request(self) -> EndpointRequest {
        EndpointRequest {
            url: self.url,
            secret: self.secret.unwrap_or_default(),
            events: self.events,
            thresholds: self.thresholds,
            run_label: self.run_label.unwrap_or_default(),
            key_id: self.key_id.unwrap_or_default(),
            format: self.format.unwrap_or_default(),
            description: self.description.unwrap_or_default(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookJson {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub thresholds: Vec<u8>,
    pub run_label: Option<String>,
    pub key_id: Option<String>,
    pub format: String,
    pub description: String,
    pub created_at: String,
}

impl From<&WebhookEndpoint> for WebhookJson {
    fn from(e: &WebhookEndpoint) -> Self {
        WebhookJson {
            id: e.id.clone(),
            url: e.url.clone(),
            events: e.events.iter().map(|e| e.as_str().to_string()).collect(),
            thresholds: e.thresholds.clone(),
            run_label: e.run_label.clone(),
            key_id: e.key_id.clone(),
            format: e.format.as_str().to_string(),
            description: e.description.clone(),
            created_at: rfc3339(e.created_at),
        }
    }
}

impl From<&pb::WebhookEndpoint> for WebhookJson {
    fn from(e: &pb::WebhookEndpoint) -> Self {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        WebhookJson {
            id: e.id.clone(),
            url: e.url.clone(),
            events: e.events.clone(),
            thresholds: e
                .thresholds
                .iter()
                .map(|&t| u8::try_from(t).unwrap_or(u8::MAX))
                .collect(),
            run_label: some(&e.run_label),
            key_id: some(&e.key_id),
            format: e.format.clone(),
            description: e.description.clone(),
            created_at: pb_time(&e.created_at).unwrap_or_default(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedWebhook {
    pub webhook: WebhookJson,
    /// The signing secret: shown here only.
    pub secret: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<WebhookJson>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub deleted: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TestQueued {
    pub event_id: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttemptJson {
    pub attempt: i32,
    pub at: String,
    /// The receiver's HTTP status; null when there was no answer.
    pub status: Option<i32>,
    pub error: String,
    pub duration_ms: i64,
}

impl From<&Attempt> for AttemptJson {
    fn from(a: &Attempt) -> Self {
        AttemptJson {
            attempt: a.attempt,
            at: rfc3339(a.at),
            status: a.status,
            error: a.error.clone(),
            duration_ms: a.duration_ms,
        }
    }
}

impl From<&pb::WebhookAttempt> for AttemptJson {
    fn from(a: &pb::WebhookAttempt) -> Self {
        AttemptJson {
            attempt: a.attempt,
            at: pb_time(&a.at).unwrap_or_default(),
            status: (a.status != 0).then_some(a.status),
            error: a.error.clone(),
            duration_ms: a.duration_ms,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryJson {
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    pub next_attempt_at: Option<String>,
    pub created_at: String,
    pub attempts: Vec<AttemptJson>,
    /// The event as delivered (keycap format).
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

impl From<&Delivery> for DeliveryJson {
    fn from(d: &Delivery) -> Self {
        DeliveryJson {
            seq: d.seq,
            event_id: d.event_id.clone(),
            event_type: d.event_type.clone(),
            state: d.state.clone(),
            next_attempt_at: d.next_attempt_at.map(rfc3339),
            created_at: rfc3339(d.created_at),
            attempts: d.attempts.iter().map(AttemptJson::from).collect(),
            payload: serde_json::from_str(&d.payload).unwrap_or(serde_json::Value::Null),
        }
    }
}

impl From<&pb::WebhookDelivery> for DeliveryJson {
    fn from(d: &pb::WebhookDelivery) -> Self {
        DeliveryJson {
            seq: d.seq,
            event_id: d.event_id.clone(),
            event_type: d.event_type.clone(),
            state: d.state.clone(),
            next_attempt_at: pb_time(&d.next_attempt_at),
            created_at: pb_time(&d.created_at).unwrap_or_default(),
            attempts: d.attempts.iter().map(AttemptJson::from).collect(),
            payload: serde_json::from_str(&d.payload_json).unwrap_or(serde_json::Value::Null),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryJson>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// At most this many, newest first.
    #[serde(default)]
    pub limit: u32,
}

/// Webhooks carry events about every vendor's keys: a token restricted to
/// some vendors may not manage them.
async fn caller(c: &Control, headers: &HeaderMap, op: Operation) -> Result<(), ApiError> {
    admin(c, headers, op).await?.vendors.check_all()
}

/// Registers an alert webhook endpoint; the answer carries its signing
/// secret, once (scope `webhooks:write`).
#[utoipa::path(post, path = "/vault/webhooks", tag = "webhooks", operation_id = "create_webhook",
    request_body = CreateWebhookBody,
    responses((status = 201, description = "The endpoint and its secret", body = CreatedWebhook), ErrorAnswers))]
async fn create(
    State(c): State<Arc<Control>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedWebhook>), ApiError> {
    caller(&c, &headers, Operation::CreateWebhook).await?;
    let b: CreateWebhookBody = parse_body(&body)?;
    let (endpoint, secret) = c.create_webhook(&b.into_request()).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook {
            webhook: WebhookJson::from(&endpoint),
            secret,
        }),
    ))
}

/// Every alert webhook endpoint (scope `webhooks:read`).
#[utoipa::path(get, path = "/vault/webhooks", tag = "webhooks", operation_id = "list_webhooks",
    responses((status = 200, description = "The endpoints", body = WebhookList), ErrorAnswers))]
async fn list(
    State(c): State<Arc<Control>>,
    headers: HeaderMap,
) -> Result<Json<WebhookList>, ApiError> {
    caller(&c, &headers, Operation::ListWebhooks).await?;
    let all = c.list_webhooks().await?;
    Ok(Json(WebhookList {
        webhooks: all.iter().map(WebhookJson::from).collect(),
    }))
}

/// One alert webhook endpoint, never its secret (scope `webhooks:read`).
#[utoipa::path(get, path = "/vault/webhooks/{id}", tag = "webhooks", operation_id = "get_webhook",
    params(("id" = String, Path, description = "The endpoint's id (`wh_...`)")),
    responses((status = 200, description = "The endpoint", body = WebhookJson), ErrorAnswers))]
async fn read(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WebhookJson>, ApiError> {
    caller(&c, &headers, Operation::ListWebhooks).await?;
    Ok(Json(WebhookJson::from(&c.get_webhook(&id).await?)))
}

/// Deletes an endpoint and its deliveries (scope `webhooks:write`).
#[utoipa::path(delete, path = "/vault/webhooks/{id}", tag = "webhooks", operation_id = "delete_webhook",
    params(("id" = String, Path, description = "The endpoint's id (`wh_...`)")),
    responses((status = 200, description = "Deleted", body = Deleted), ErrorAnswers))]
async fn remove(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Deleted>, ApiError> {
    caller(&c, &headers, Operation::DeleteWebhook).await?;
    c.delete_webhook(&id).await?;
    Ok(Json(Deleted { deleted: true }))
}

/// Queues a `webhook.test` event to the endpoint (scope `webhooks:write`).
#[utoipa::path(post, path = "/vault/webhooks/{id}/test", tag = "webhooks", operation_id = "test_webhook",
    params(("id" = String, Path, description = "The endpoint's id (`wh_...`)")),
    responses((status = 202, description = "The test event's id", body = TestQueued), ErrorAnswers))]
async fn test(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<TestQueued>), ApiError> {
    caller(&c, &headers, Operation::TestWebhook).await?;
    let event = c.test_webhook(&id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(TestQueued { event_id: event.id }),
    ))
}

/// An endpoint's newest deliveries with their attempts (scope
/// `webhooks:read`).
#[utoipa::path(get, path = "/vault/webhooks/{id}/deliveries", tag = "webhooks",
    operation_id = "list_webhook_deliveries",
    params(("id" = String, Path, description = "The endpoint's id (`wh_...`)"), DeliveriesQuery),
    responses((status = 200, description = "The deliveries, newest first", body = DeliveryList), ErrorAnswers))]
async fn deliveries(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<DeliveriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeliveryList>, ApiError> {
    caller(&c, &headers, Operation::ListWebhookDeliveries).await?;
    let Query(q) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let all = c.webhook_deliveries(&id, q.limit).await?;
    Ok(Json(DeliveryList {
        deliveries: all.iter().map(DeliveryJson::from).collect(),
    }))
}
