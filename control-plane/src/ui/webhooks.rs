//! The dashboard's Webhooks page: register an endpoint (the secret is shown
//! once), list endpoints, an endpoint's deliveries with every attempt, send
//! a test event, delete. Same rules as the other pages: reads need
//! `webhooks:read`, actions `webhooks:write` (buttons hidden without it,
//! and refused by `Control`'s callers here anyway), every post same-origin
//! with the session's CSRF value.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use maud::{html, Markup};

use super::pages::layout;
use super::session::Session;
use super::{api_error, form, html as page, page_session, post_session, Ctl, TlsOn};
use crate::domain::invalid;
use crate::error::ApiError;
use crate::scope::Operation;
use crate::webhook::{Delivery, EndpointRequest, EventType, WebhookEndpoint};

fn require_all_vendors(s: &Session) -> Result<(), ApiError> {
    s.principal.vendors.check_all()
}

pub(super) async fn list(State(c): Ctl, tls: TlsOn, headers: HeaderMap) -> Response {
    let s = match page_session(&c, &headers, tls, Operation::ListWebhooks).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    if let Err(e) = require_all_vendors(&s) {
        return api_error(&s, e);
    }
    match c.list_webhooks().await {
        Ok(all) => page(StatusCode::OK, endpoints_page(&s, &all, None, None)),
        Err(e) => api_error(&s, e),
    }
}

pub(super) async fn create(
    State(c): Ctl,
    tls: TlsOn,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fields = form(&body);
    let s = match post_session(&c, &uri, &headers, &fields, tls.is_some()).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    if let Err(e) = s
        .principal
        .require(Operation::CreateWebhook)
        .and_then(|()| require_all_vendors(&s))
    {
        return api_error(&s, e);
    }
    let get = |k: &str| {
        fields
            .get(k)
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    // Checkboxes arrive as `event=<type>` pairs.
    let events: Vec<String> = form_urlencoded::parse(&body)
        .filter(|(k, _)| k == "event")
        .map(|(_, v)| v.into_owned())
        .collect();
    let thresholds: Result<Vec<u32>, _> = get("thresholds")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.trim_end_matches('%')
                .parse::<u32>()
                .map_err(|_| invalid("thresholds", format!("{t:?} is not a percentage")))
        })
        .collect();
    let thresholds = match thresholds {
        Ok(t) => t,
        Err(e) => return api_error(&s, e.into()),
    };
    let req = EndpointRequest {
        url: get("url"),
        secret: get("secret"),
        events,
        thresholds,
        run_label: get("run_label"),
        key_id: get("key_id"),
        format: get("format"),
        description: get("description"),
    };
    let all = c.list_webhooks().await.unwrap_or_default();
    match c.create_webhook(&req).await {
        Ok((endpoint, secret)) => {
            let all = c.list_webhooks().await.unwrap_or(all);
            page(
                StatusCode::CREATED,
                endpoints_page(&s, &all, Some((&endpoint, &secret)), None),
            )
        }
        Err(ApiError::Invalid(i)) => page(
            StatusCode::BAD_REQUEST,
            endpoints_page(&s, &all, None, Some(&format!("{}: {}", i.field, i.reason))),
        ),
        Err(e) => api_error(&s, e),
    }
}

pub(super) async fn show(
    State(c): Ctl,
    tls: TlsOn,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let s = match page_session(&c, &headers, tls, Operation::ListWebhookDeliveries).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    if let Err(e) = require_all_vendors(&s) {
        return api_error(&s, e);
    }
    let endpoint = match c.get_webhook(&id).await {
        Ok(e) => e,
        Err(e) => return api_error(&s, e),
    };
    match c.webhook_deliveries(&id, 50).await {
        Ok(d) => page(StatusCode::OK, deliveries_page(&s, &endpoint, &d, None)),
        Err(e) => api_error(&s, e),
    }
}

pub(super) async fn test(
    State(c): Ctl,
    tls: TlsOn,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let s = match post_session(&c, &uri, &headers, &form(&body), tls.is_some()).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    if let Err(e) = s
        .principal
        .require(Operation::TestWebhook)
        .and_then(|()| require_all_vendors(&s))
    {
        return api_error(&s, e);
    }
    let event = match c.test_webhook(&id).await {
        Ok(e) => e,
        Err(e) => return api_error(&s, e),
    };
    let (endpoint, deliveries) = match (
        c.get_webhook(&id).await,
        c.webhook_deliveries(&id, 50).await,
    ) {
        (Ok(e), Ok(d)) => (e, d),
        (Err(e), _) | (_, Err(e)) => return api_error(&s, e),
    };
    page(
        StatusCode::ACCEPTED,
        deliveries_page(&s, &endpoint, &deliveries, Some(&event.id)),
    )
}

pub(super) async fn delete(
    State(c): Ctl,
    tls: TlsOn,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let s = match post_session(&c, &uri, &headers, &form(&body), tls.is_some()).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    if let Err(e) = s
        .principal
        .require(Operation::DeleteWebhook)
        .and_then(|()| require_all_vendors(&s))
    {
        return api_error(&s, e);
    }
    if let Err(e) = c.delete_webhook(&id).await {
        return api_error(&s, e);
    }
    match c.list_webhooks().await {
        Ok(all) => page(StatusCode::OK, endpoints_page(&s, &all, None, None)),
        Err(e) => api_error(&s, e),
    }
}

fn endpoints_page(
    s: &Session,
    all: &[WebhookEndpoint],
    created: Option<(&WebhookEndpoint, &str)>,
    error: Option<&str>,
) -> Markup {
    let can_write = s.principal.require(Operation::CreateWebhook).is_ok();
    layout(
        Some(s),
        "Webhooks",
        html! {
            @if let Some((e, secret)) = created {
                div.notice role="status" #created {
                    p { "Registered " code { (e.id) } ". Its signing secret, shown only now:" }
                    p { code #secret { (secret) } }
                    p.help { "Verify each delivery's Keycap-Signature with it (docs/webhooks.md)." }
                }
            }
            @if let Some(err) = error { p.notice role="alert" { (err) } }
            @if all.is_empty() { p.help { "No endpoints yet." } } @else {
                div.table-wrap { table #webhooks {
                    thead { tr {
                        th scope="col" { "Endpoint" } th scope="col" { "URL" }
                        th scope="col" { "Events" } th scope="col" { "Thresholds" }
                        th scope="col" { "Only" } th scope="col" { "Format" }
                    } }
                    tbody { @for e in all { tr {
                        td { a href={ "/ui/webhooks/" (e.id) } { (e.id) } }
                        td { code { (e.url) } }
                        td { @if e.events.is_empty() { "all" } @else {
                            (e.events.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", "))
                        } }
                        td { (e.thresholds.iter().map(|t| format!("{t}%")).collect::<Vec<_>>().join(" ")) }
                        td {
                            @if let Some(r) = &e.run_label { "run " (r) " " }
                            @if let Some(k) = &e.key_id { "key " (k) }
                        }
                        td { (e.format.as_str()) }
                    } } }
                } }
            }
            @if can_write {
                h2 { "Register an endpoint" }
                form.register method="post" action="/ui/webhooks" {
                    input type="hidden" name="csrf" value=(s.csrf);
                    label { "URL " input type="url" name="url" required placeholder="https://ops.example.com/keycap"; }
                    label { "Secret (blank: keycap draws one) " input type="password" name="secret" autocomplete="off"; }
                    fieldset {
                        legend { "Events (none ticked: all)" }
                        @for t in EventType::ALL.iter().filter(|t| **t != EventType::Test) {
                            label { input type="checkbox" name="event" value=(t.as_str()); " " (t.as_str()) }
                        }
                    }
                    label { "Thresholds, % " input type="text" name="thresholds" value="50,80,100" inputmode="numeric"; }
                    label { "Only run label " input type="text" name="run_label"; }
                    label { "Only key id " input type="text" name="key_id"; }
                    label { "Payload "
                        select name="format" {
                            option value="keycap" selected { "keycap JSON" }
                            option value="slack" { "Slack message" }
                        }
                    }
                    label { "Description " input type="text" name="description"; }
                    button type="submit" { "Register" }
                }
            }
        },
    )
}

fn deliveries_page(
    s: &Session,
    e: &WebhookEndpoint,
    deliveries: &[Delivery],
    queued: Option<&str>,
) -> Markup {
    let can_write = s.principal.require(Operation::TestWebhook).is_ok();
    layout(
        Some(s),
        &format!("Webhook {}", e.id),
        html! {
            p { code { (e.url) } }
            @if let Some(id) = queued { p role="status" #queued { "Queued test event " code { (id) } "." } }
            @if can_write {
                form.inline method="post" action={ "/ui/webhooks/" (e.id) "/test" } {
                    input type="hidden" name="csrf" value=(s.csrf);
                    button type="submit" { "Send test event" }
                }
                form.inline method="post" action={ "/ui/webhooks/" (e.id) "/delete" } {
                    input type="hidden" name="csrf" value=(s.csrf);
                    button.danger type="submit" aria-label={ "Delete webhook " (e.id) } { "Delete" }
                }
            }
            h2 { "Deliveries" }
            @if deliveries.is_empty() { p.help { "Nothing delivered yet." } } @else {
                div.table-wrap { table #deliveries {
                    thead { tr {
                        th scope="col" { "Event" } th scope="col" { "Type" }
                        th scope="col" { "State" } th scope="col" { "Attempts" }
                        th scope="col" { "Next attempt" }
                    } }
                    tbody { @for d in deliveries { tr {
                        td { code { (d.event_id) } }
                        td { (d.event_type) }
                        td.state { (d.state) }
                        td { ol.attempts { @for a in &d.attempts { li {
                            (a.at.format("%H:%M:%S")) " "
                            @match a.status { Some(st) => { "HTTP " (st) }, None => { "no answer" } }
                            @if !a.error.is_empty() { " — " (a.error) }
                            " (" (a.duration_ms) " ms)"
                        } } } }
                        td { @if let Some(t) = d.next_attempt_at { (t.format("%Y-%m-%d %H:%M:%S UTC")) } }
                    } } }
                } }
            }
            p { a href="/ui/webhooks" { "All webhooks" } }
        },
    )
}
