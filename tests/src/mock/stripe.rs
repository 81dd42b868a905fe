//! The mock's Stripe: payment intents with Stripe's confirm/capture states,
//! charges, invoices (drafts, items, payment), prices, shipping and tax
//! rates, checkout sessions, subscriptions (by `/v1/subscriptions` and by
//! the legacy `/v1/customers/{id}/subscriptions`), refunds, and
//! Idempotency-Key replays. Parameters are read as Stripe reads them: the
//! query string merged with a form body.
//!
//! `stripe_amount` counts money the way keycap must: a charge when it is
//! made, a payment intent when it is confirmed (succeeded or authorized for
//! capture), an invoice when it is paid — or when it is set to auto-advance,
//! since Stripe then finalizes and charges it on its own — a checkout
//! session's total when it is created, a subscription's price when it is
//! created, when an update invoices prorations at once
//! (`proration_behavior=always_invoice`) and when a cancellation invoices at
//! once (`invoice_now=true`). Capturing an authorization, refunding and
//! creating an unconfirmed intent move nothing. A repeated Idempotency-Key
//! gets the first answer again, marked `Idempotent-Replayed: true`, and
//! changes nothing.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{authorized, charge_params, stripe_unauthorized, MockState, RecordedCall};

/// Stripe objects the mock keeps, by id.
#[derive(Default)]
pub(super) struct StripeObjects {
    intents: HashMap<String, Value>,
    invoices: HashMap<String, Value>,
    prices: HashMap<String, Value>,
    shipping_rates: HashMap<String, Value>,
    tax_rates: HashMap<String, Value>,
    subscriptions: HashMap<String, Value>,
    /// Saved answers by Idempotency-Key.
    answers: HashMap<String, (StatusCode, Value)>,
}

impl StripeObjects {
    pub(super) fn add_invoice(&mut self, id: String, amount_due: i64, currency: &str) {
        let inv = json!({
            "id": id, "object": "invoice", "status": "open", "currency": currency,
            "amount_due": amount_due, "amount_paid": 0, "amount_remaining": amount_due,
            "collection_method": "charge_automatically", "livemode": false,
        });
        self.invoices.insert(id, inv);
    }

    pub(super) fn add_price(&mut self, id: String, unit_amount: i64, currency: &str) {
        let price = json!({
            "id": id, "object": "price", "active": true, "currency": currency,
            "unit_amount": unit_amount, "billing_scheme": "per_unit", "type": "one_time",
        });
        self.prices.insert(id, price);
    }

    pub(super) fn add_shipping_rate(&mut self, id: String, amount: i64, currency: &str) {
        let rate = json!({
            "id": id, "object": "shipping_rate", "type": "fixed_amount", "active": true,
            "fixed_amount": {"amount": amount, "currency": currency},
        });
        self.shipping_rates.insert(id, rate);
    }

    pub(super) fn add_tax_rate(&mut self, id: String, percentage: f64, inclusive: bool) {
        let rate = json!({
            "id": id, "object": "tax_rate", "active": true,
            "percentage": percentage, "inclusive": inclusive,
        });
        self.tax_rates.insert(id, rate);
    }

    pub(super) fn intent(&self, id: &str) -> Option<Value> {
        self.intents.get(id).cloned()
    }

    pub(super) fn invoice(&self, id: &str) -> Option<Value> {
        self.invoices.get(id).cloned()
    }
}

/// Answers a Stripe route, or `None` when the request is not one.
pub(super) fn answer(state: &MockState, call: &RecordedCall) -> Option<Response> {
    let segs: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
    let route = match (call.method.as_str(), segs.as_slice()) {
        ("POST", ["v1", "subscriptions"] | ["v1", "customers", _, "subscriptions"]) => {
            Route::CreateSubscription
        }
        ("POST", ["v1", "subscriptions", id] | ["v1", "customers", _, "subscriptions", id]) => {
            Route::UpdateSubscription(id.to_string())
        }
        ("DELETE", ["v1", "subscriptions", id] | ["v1", "customers", _, "subscriptions", id]) => {
            Route::CancelSubscription(id.to_string())
        }
        ("POST", ["v1", "invoices"]) => Route::CreateInvoice,
        ("POST", ["v1", "invoices", id]) => Route::UpdateInvoice(id.to_string()),
        ("POST", ["v1", "invoiceitems"]) => Route::CreateInvoiceItem,
        ("POST", ["v1", "payment_intents", id]) => Route::UpdateIntent(id.to_string()),
        ("GET", ["v1", "shipping_rates", id]) => Route::Get(Kind::ShippingRate, id.to_string()),
        ("GET", ["v1", "tax_rates", id]) => Route::Get(Kind::TaxRate, id.to_string()),
        ("POST", ["v1", "payment_intents"]) => Route::CreateIntent,
        ("POST", ["v1", "charges"]) => Route::Charge,
        ("GET", ["v1", "payment_intents", id]) => Route::Get(Kind::Intent, id.to_string()),
        ("POST", ["v1", "payment_intents", id, "confirm"]) => Route::Confirm(id.to_string()),
        ("POST", ["v1", "payment_intents", id, "capture"]) => Route::Capture(id.to_string()),
        ("GET", ["v1", "invoices", id]) => Route::Get(Kind::Invoice, id.to_string()),
        ("POST", ["v1", "invoices", id, "pay"]) => Route::Pay(id.to_string()),
        ("POST", ["v1", "invoices", id, "finalize"]) => Route::FinalizeInvoice(id.to_string()),
        ("GET", ["v1", "prices", id]) => Route::Get(Kind::Price, id.to_string()),
        ("POST", ["v1", "checkout", "sessions"]) => Route::Checkout,
        ("POST", ["v1", "refunds"]) => Route::Refund,
        _ => return None,
    };
    if !authorized(state, call) {
        return Some(stripe_unauthorized());
    }
    let idem = call
        .header("idempotency-key")
        .filter(|_| call.method == "POST")
        .map(str::to_string);
    let mut objects = state.stripe.lock().expect("mock stripe lock");
    if let Some(k) = &idem {
        if let Some((status, body)) = objects.answers.get(k) {
            let mut r = (*status, Json(body.clone())).into_response();
            r.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Some(r);
        }
    }
    let (status, body) = route.run(state, &mut objects, call);
    if let Some(k) = idem {
        // Stripe saves the result of a request that started executing,
        // a decline included.
        if status.is_success() || status == StatusCode::PAYMENT_REQUIRED {
            objects.answers.insert(k, (status, body.clone()));
        }
    }
    Some((status, Json(body)).into_response())
}

/// The description of a payment intent whose first answer the mock loses
/// (see the module `mock`).
pub const LOSE_FIRST_ANSWER: &str = "mock:lose-first-answer";

/// Most a lost answer is held back.
const LOST_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends `resp`, the answer to `call` already made by `answer`, unless it
/// is the first answer to a `LOSE_FIRST_ANSWER` intent: that is held until
/// a retry under the same Idempotency-Key has been answered from it.
pub(super) async fn deliver(state: &MockState, call: &RecordedCall, resp: Response) -> Response {
    let lose = call.method == "POST"
        && call.path == "/v1/payment_intents"
        && charge_params(call).description.as_deref() == Some(LOSE_FIRST_ANSWER);
    let Some(key) = call.header("idempotency-key").filter(|_| lose) else {
        return resp;
    };
    let released = {
        let mut lost = state.lost_answers.lock().expect("mock lost answers lock");
        if resp.headers().contains_key("idempotent-replayed") {
            if let Some(first) = lost.remove(key) {
                first.send_replace(true);
            }
            return resp;
        }
        let (first, released) = tokio::sync::watch::channel(false);
        lost.insert(key.to_string(), first);
        released
    };
    let _ = tokio::time::timeout(LOST_FOR, super::until_released(released)).await;
    resp
}

enum Kind {
    Intent,
    Invoice,
    Price,
    ShippingRate,
    TaxRate,
}

enum Route {
    CreateSubscription,
    UpdateSubscription(String),
    CancelSubscription(String),
    CreateInvoice,
    UpdateInvoice(String),
    FinalizeInvoice(String),
    CreateInvoiceItem,
    UpdateIntent(String),
    CreateIntent,
    Charge,
    Get(Kind, String),
    Confirm(String),
    Capture(String),
    Pay(String),
    Checkout,
    Refund,
}

/// The request's parameters as Stripe reads them: the query string merged
/// with the form body.
fn form(call: &RecordedCall) -> HashMap<String, String> {
    let query = call.query.as_deref().unwrap_or("").as_bytes();
    form_urlencoded::parse(query)
        .chain(form_urlencoded::parse(&call.body))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn is_true(f: &HashMap<String, String>, name: &str) -> bool {
    f.get(name).map(String::as_str) == Some("true")
}

fn not_found(what: &str, id: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"error": {"type": "invalid_request_error", "code": "resource_missing",
                         "message": format!("No such {what}: '{id}'")}}),
    )
}

fn declined() -> (StatusCode, Value) {
    (
        StatusCode::PAYMENT_REQUIRED,
        json!({"error": {"type": "card_error", "code": "card_declined",
                         "decline_code": "generic_decline", "message": "Your card was declined."}}),
    )
}

fn missing_amount() -> (StatusCode, Value) {
    (
        StatusCode::BAD_REQUEST,
        json!({"error": {"type": "invalid_request_error", "code": "parameter_missing",
                         "param": "amount", "message": "Missing required param: amount."}}),
    )
}

impl Route {
    fn run(
        self,
        state: &MockState,
        objects: &mut StripeObjects,
        call: &RecordedCall,
    ) -> (StatusCode, Value) {
        let next_id = |prefix: &str| {
            format!(
                "{prefix}_mock_{}",
                state.next_id.fetch_add(1, Ordering::SeqCst)
            )
        };
        let moved = |amount: i64| {
            state.stripe_amount.fetch_add(amount, Ordering::SeqCst);
        };
        match self {
            Route::Charge => {
                let p = charge_params(call);
                let Some(amount) = p.amount.and_then(|a| a.parse::<i64>().ok()) else {
                    return missing_amount();
                };
                if amount == 402 {
                    return declined();
                }
                if p.description.as_deref() == Some("fail500") {
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        json!({"error": {"type": "api_error", "message": "mock internal failure"}}),
                    );
                }
                moved(amount);
                (
                    StatusCode::OK,
                    json!({"id": next_id("ch"), "object": "charge", "amount": amount,
                           "currency": p.currency.unwrap_or_default(), "description": p.description,
                           "status": "succeeded", "captured": true, "livemode": false}),
                )
            }
            Route::CreateIntent => {
                let p = charge_params(call);
                let Some(amount) = p.amount.and_then(|a| a.parse::<i64>().ok()) else {
                    return missing_amount();
                };
                let f = form(call);
                let id = next_id("pi");
                let manual = f.get("capture_method").map(String::as_str) == Some("manual");
                let mut intent = json!({
                    "id": id, "object": "payment_intent", "amount": amount,
                    "currency": p.currency.unwrap_or_default(), "description": p.description,
                    "capture_method": if manual { "manual" } else { "automatic" },
                    "status": "requires_payment_method", "amount_received": 0, "livemode": false,
                });
                if f.get("confirm").map(String::as_str) == Some("true") {
                    if amount == 402 {
                        return declined();
                    }
                    confirm(&mut intent);
                    moved(amount);
                }
                objects.intents.insert(id, intent.clone());
                (StatusCode::OK, intent)
            }
            Route::CreateSubscription => {
                let f = form(call);
                let unit = match f.get("items[0][price]") {
                    Some(price) => match objects.prices.get(price) {
                        Some(p) => p["unit_amount"].as_i64().unwrap_or(0),
                        None => return not_found("price", price),
                    },
                    None => f
                        .get("items[0][price_data][unit_amount]")
                        .and_then(|u| u.parse().ok())
                        .unwrap_or(0),
                };
                let quantity = f
                    .get("items[0][quantity]")
                    .and_then(|q| q.parse().ok())
                    .unwrap_or(1i64);
                let amount = unit * quantity;
                // The first invoice is charged at once.
                moved(amount);
                let id = next_id("sub");
                let sub = json!({"id": id, "object": "subscription", "status": "active",
                                 "customer": f.get("customer"), "amount": amount});
                objects.subscriptions.insert(id, sub.clone());
                (StatusCode::OK, sub)
            }
            Route::UpdateSubscription(id) | Route::CancelSubscription(id) => {
                let cancel = call.method == "DELETE";
                let Some(sub) = objects.subscriptions.get_mut(&id) else {
                    return not_found("subscription", &id);
                };
                let f = form(call);
                let amount = sub["amount"].as_i64().unwrap_or(0);
                // Prorations invoiced at once, or a final invoice: charged now.
                let charged_now = if cancel {
                    is_true(&f, "invoice_now")
                } else {
                    f.get("proration_behavior").map(String::as_str) == Some("always_invoice")
                };
                if charged_now {
                    moved(amount);
                }
                if cancel {
                    sub["status"] = "canceled".into();
                }
                (StatusCode::OK, sub.clone())
            }
            Route::CreateInvoice => {
                let f = form(call);
                let id = next_id("in");
                let inv = json!({
                    "id": id, "object": "invoice", "status": "draft",
                    "currency": f.get("currency").cloned().unwrap_or_else(|| "usd".into()),
                    "customer": f.get("customer"), "auto_advance": is_true(&f, "auto_advance"),
                    "collection_method": f.get("collection_method").cloned()
                        .unwrap_or_else(|| "charge_automatically".into()),
                    "amount_due": 0, "amount_paid": 0, "amount_remaining": 0, "livemode": false,
                });
                objects.invoices.insert(id, inv.clone());
                (StatusCode::OK, inv)
            }
            Route::UpdateInvoice(id) => {
                let Some(inv) = objects.invoices.get_mut(&id) else {
                    return not_found("invoice", &id);
                };
                let f = form(call);
                if let Some(a) = f.get("auto_advance") {
                    let on = a == "true";
                    if on && inv["auto_advance"] != true {
                        // Stripe finalizes it within the hour and charges it.
                        moved(inv["amount_remaining"].as_i64().unwrap_or(0));
                    }
                    inv["auto_advance"] = on.into();
                }
                (StatusCode::OK, inv.clone())
            }
            Route::FinalizeInvoice(id) => {
                let Some(inv) = objects.invoices.get_mut(&id) else {
                    return not_found("invoice", &id);
                };
                if inv["status"] != "draft" {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"error": {"type": "invalid_request_error",
                                         "code": "invoice_not_editable"}}),
                    );
                }
                let f = form(call);
                if let Some(a) = f.get("auto_advance") {
                    inv["auto_advance"] = (a == "true").into();
                }
                if inv["auto_advance"] == true {
                    // Stripe collects it on its own.
                    moved(inv["amount_remaining"].as_i64().unwrap_or(0));
                }
                inv["status"] = "open".into();
                (StatusCode::OK, inv.clone())
            }
            Route::CreateInvoiceItem => {
                let f = form(call);
                let amount = f
                    .get("amount")
                    .and_then(|a| a.parse::<i64>().ok())
                    .unwrap_or(0);
                if let Some(in_id) = f.get("invoice") {
                    let Some(inv) = objects.invoices.get_mut(in_id) else {
                        return not_found("invoice", in_id);
                    };
                    for field in ["amount_due", "amount_remaining"] {
                        inv[field] = (inv[field].as_i64().unwrap_or(0) + amount).into();
                    }
                }
                (
                    StatusCode::OK,
                    json!({"id": next_id("ii"), "object": "invoiceitem", "amount": amount,
                           "invoice": f.get("invoice"), "customer": f.get("customer")}),
                )
            }
            Route::UpdateIntent(id) => {
                let Some(intent) = objects.intents.get_mut(&id) else {
                    return not_found("payment_intent", &id);
                };
                if let Some(a) = form(call).get("amount").and_then(|a| a.parse::<i64>().ok()) {
                    intent["amount"] = a.into();
                }
                (StatusCode::OK, intent.clone())
            }
            Route::Get(kind, id) => {
                let (map, what) = match kind {
                    Kind::Intent => (&objects.intents, "payment_intent"),
                    Kind::Invoice => (&objects.invoices, "invoice"),
                    Kind::Price => (&objects.prices, "price"),
                    Kind::ShippingRate => (&objects.shipping_rates, "shipping_rate"),
                    Kind::TaxRate => (&objects.tax_rates, "tax_rate"),
                };
                match map.get(&id) {
                    Some(o) => (StatusCode::OK, o.clone()),
                    None => not_found(what, &id),
                }
            }
            Route::Confirm(id) => {
                let Some(intent) = objects.intents.get_mut(&id) else {
                    return not_found("payment_intent", &id);
                };
                if !intent["status"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("requires_") && s != "requires_capture")
                {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"error": {"type": "invalid_request_error",
                                         "code": "payment_intent_unexpected_state",
                                         "message": "This PaymentIntent's status does not allow confirmation."}}),
                    );
                }
                let amount = intent["amount"].as_i64().unwrap_or(0);
                if amount == 402 {
                    return declined();
                }
                confirm(intent);
                moved(amount);
                (StatusCode::OK, intent.clone())
            }
            Route::Capture(id) => {
                let Some(intent) = objects.intents.get_mut(&id) else {
                    return not_found("payment_intent", &id);
                };
                if intent["status"] != "requires_capture" {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"error": {"type": "invalid_request_error",
                                         "code": "payment_intent_unexpected_state"}}),
                    );
                }
                // Counted when it was authorized.
                intent["status"] = "succeeded".into();
                intent["amount_received"] = intent["amount"].clone();
                (StatusCode::OK, intent.clone())
            }
            Route::Pay(id) => {
                let Some(inv) = objects.invoices.get_mut(&id) else {
                    return not_found("invoice", &id);
                };
                let due = inv["amount_remaining"].as_i64().unwrap_or(0);
                // Paying a draft finalizes it first.
                if inv["status"] != "open" && inv["status"] != "draft" {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"error": {"type": "invalid_request_error",
                                         "code": "invoice_not_open"}}),
                    );
                }
                if due == 402 {
                    return declined();
                }
                moved(due);
                inv["status"] = "paid".into();
                inv["amount_paid"] = due.into();
                inv["amount_remaining"] = 0.into();
                (StatusCode::OK, inv.clone())
            }
            Route::Checkout => {
                let f = form(call);
                let (mut subtotal, mut tax) = (0i64, 0i64);
                let mut currency = String::new();
                for i in 0.. {
                    // `get("price_data][currency")` reads line_items[i][price_data][currency].
                    let get = |k: &str| f.get(&format!("line_items[{i}][{k}]"));
                    let qty = match get("quantity") {
                        Some(q) => q.parse::<i64>().unwrap_or(0),
                        None if get("price").is_some()
                            || get("price_data][unit_amount").is_some() =>
                        {
                            1
                        }
                        None => break,
                    };
                    let (unit, cur) = if let Some(price) = get("price") {
                        let Some(p) = objects.prices.get(price) else {
                            return not_found("price", price);
                        };
                        (
                            p["unit_amount"].as_i64().unwrap_or(0),
                            p["currency"].as_str().unwrap_or_default().to_string(),
                        )
                    } else {
                        (
                            get("price_data][unit_amount")
                                .and_then(|u| u.parse().ok())
                                .unwrap_or(0),
                            get("price_data][currency").cloned().unwrap_or_default(),
                        )
                    };
                    let line = unit * qty;
                    // Exclusive tax, rounded to the nearest minor unit.
                    for k in 0.. {
                        let Some(rate) = get(&format!("tax_rates][{k}")) else {
                            break;
                        };
                        let Some(r) = objects.tax_rates.get(rate) else {
                            return not_found("tax_rate", rate);
                        };
                        if r["inclusive"] != true {
                            let pct = r["percentage"].as_f64().unwrap_or(0.0);
                            tax += (line as f64 * pct / 100.0).round() as i64;
                        }
                    }
                    subtotal += line;
                    currency = cur;
                }
                // The first shipping option is the one selected at creation.
                let shipping = if let Some(rate) = f.get("shipping_options[0][shipping_rate]") {
                    match objects.shipping_rates.get(rate) {
                        Some(r) => r["fixed_amount"]["amount"].as_i64().unwrap_or(0),
                        None => return not_found("shipping_rate", rate),
                    }
                } else {
                    f.get("shipping_options[0][shipping_rate_data][fixed_amount][amount]")
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(0)
                };
                let total = subtotal + tax + shipping;
                moved(total);
                let id = next_id("cs");
                (
                    StatusCode::OK,
                    json!({"id": id, "object": "checkout.session", "amount_total": total,
                           "amount_subtotal": subtotal, "currency": currency,
                           "total_details": {"amount_tax": tax, "amount_shipping": shipping},
                           "mode": f.get("mode").cloned().unwrap_or_else(|| "payment".into()),
                           "status": "open", "payment_status": "unpaid",
                           "url": format!("https://checkout.stripe.com/c/pay/{id}")}),
                )
            }
            Route::Refund => {
                let f = form(call);
                (
                    StatusCode::OK,
                    json!({"id": next_id("re"), "object": "refund",
                           "amount": f.get("amount").and_then(|a| a.parse::<i64>().ok()),
                           "payment_intent": f.get("payment_intent"), "status": "succeeded"}),
                )
            }
        }
    }
}

/// Confirms an intent: authorized for a manual capture, else succeeded.
fn confirm(intent: &mut Value) {
    if intent["capture_method"] == "manual" {
        intent["status"] = "requires_capture".into();
    } else {
        intent["status"] = "succeeded".into();
        intent["amount_received"] = intent["amount"].clone();
    }
}
