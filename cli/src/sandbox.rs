//! The sandbox vendor `keycap dev` starts: a local, Stripe-like endpoint so
//! a newcomer can watch a capped call succeed and then be refused without a
//! real vendor account. It moves no money and talks to nothing else.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

/// The credential keycap injects for the sandbox vendor. Not a secret: the
/// sandbox only checks that keycap, not the agent, supplied it.
pub const SANDBOX_CREDENTIAL: &str = "sk_test_keycap_sandbox";

pub fn router() -> Router {
    Router::new()
        .route(
            "/v1/payment_intents",
            post(|h, b| create(h, b, "payment_intent", "pi")),
        )
        .route("/v1/charges", post(|h, b| create(h, b, "charge", "ch")))
        .route("/v1/customers/{id}", get(customer))
}

fn authorized(h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {SANDBOX_CREDENTIAL}"))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}})),
    )
        .into_response()
}

async fn create(h: HeaderMap, body: Bytes, object: &'static str, prefix: &'static str) -> Response {
    if !authorized(&h) {
        return unauthorized();
    }
    let form: HashMap<String, String> = String::from_utf8_lossy(&body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let Some(amount) = form.get("amount").and_then(|a| a.parse::<i64>().ok()) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"type": "invalid_request_error", "message": "Missing required param: amount."}})),
        )
            .into_response();
    };
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    Json(json!({
        "id": format!("{prefix}_sandbox_{n:x}"),
        "object": object,
        "amount": amount,
        "currency": form.get("currency").cloned().unwrap_or_default(),
        // Like Stripe: a charge is made at once, a payment intent only when
        // it is confirmed.
        "status": if object == "charge" || form.get("confirm").map(String::as_str) == Some("true") {
            "succeeded"
        } else {
            "requires_payment_method"
        },
        "livemode": false,
    }))
    .into_response()
}

async fn customer(h: HeaderMap, Path(id): Path<String>) -> Response {
    if !authorized(&h) {
        return unauthorized();
    }
    Json(json!({"id": id, "object": "customer", "livemode": false})).into_response()
}
