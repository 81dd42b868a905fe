//! The dashboard's Approvals pages: calls held for a person's approval
//! (docs/approvals.md), the pending ones first, and one approval with its
//! Approve / Deny form (a reason is required). Same rules as the other
//! pages: reading needs `keys:read`, deciding `approvals:decide` (the form
//! is not shown without it, and the decision is refused by `Control`
//! anyway); every post same-origin with the session's CSRF value.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use chrono::Utc;
use maud::{html, Markup};

use super::pages::layout;
use super::session::Session;
use super::{api_error, form, html as page, page_session, post_session, Ctl, TlsOn};
use crate::approval::{Approval, ApprovalFilter};
use crate::scope::Operation;

pub(super) async fn list(State(c): Ctl, tls: TlsOn, headers: HeaderMap) -> Response {
    let s = match page_session(&c, &headers, tls, Operation::ListApprovals).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    match c
        .list_approvals(&s.principal.vendors, &ApprovalFilter::default())
        .await
    {
        Ok(all) => page(StatusCode::OK, list_page(&s, &all)),
        Err(e) => api_error(&s, e),
    }
}

pub(super) async fn show(
    State(c): Ctl,
    tls: TlsOn,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let s = match page_session(&c, &headers, tls, Operation::GetApproval).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    match c.get_approval(&s.principal.vendors, &id).await {
        Ok(a) => page(StatusCode::OK, approval_page(&s, &a, None)),
        Err(e) => api_error(&s, e),
    }
}

/// `POST /ui/approvals/{id}`: `verdict` (approve or deny) and `reason`.
pub(super) async fn decide(
    State(c): Ctl,
    tls: TlsOn,
    uri: Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let fields = form(&body);
    let s = match post_session(&c, &uri, &headers, &fields, tls.is_some()).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    if let Err(e) = s.principal.require(Operation::DecideApproval) {
        return api_error(&s, e);
    }
    let approve = fields.get("verdict").map(String::as_str) == Some("approve");
    let reason = fields.get("reason").map(String::as_str).unwrap_or_default();
    match c.decide_approval(&s.principal, &id, approve, reason).await {
        Ok(a) => page(
            StatusCode::OK,
            approval_page(&s, &a, Some(if approve { "Approved." } else { "Denied." })),
        ),
        Err(e) => api_error(&s, e),
    }
}

fn list_page(s: &Session, all: &[Approval]) -> Markup {
    let now = Utc::now();
    layout(
        Some(s),
        "Approvals",
        html! {
            p.help { "Calls priced above their key's approval threshold, held until a person decides. Newest first." }
            @if all.is_empty() { p.help { "No call has been held." } } @else {
                div.table-wrap { table #approvals {
                    thead { tr {
                        th scope="col" { "Approval" } th scope="col" { "State" }
                        th scope="col" { "Key" } th scope="col" { "Call" }
                        th scope="col" { "Quote (USD)" } th scope="col" { "Expires" }
                    } }
                    tbody { @for a in all { tr {
                        td { a href={ "/ui/approvals/" (a.id) } { code { (a.id) } } }
                        td.state { (a.state(now).as_str()) }
                        td { code { (a.key_id) } }
                        td { (a.method) " " code { (a.path) } }
                        td { (a.quote) }
                        td { (a.expires_at.format("%Y-%m-%d %H:%M:%S UTC")) }
                    } } }
                } }
            }
        },
    )
}

fn approval_page(s: &Session, a: &Approval, done: Option<&str>) -> Markup {
    let now = Utc::now();
    let state = a.state(now);
    let can_decide = s.principal.require(Operation::DecideApproval).is_ok()
        && state == crate::approval::ApprovalState::Pending;
    layout(
        Some(s),
        &format!("Approval {}", a.id),
        html! {
            @if let Some(msg) = done { p role="status" #decided { (msg) } }
            dl {
                dt { "State" } dd #state { (state.as_str()) }
                dt { "Key" } dd { code { (a.key_id) } " (run " (a.agent_run_label) ")" }
                dt { "Call" } dd { (a.vendor) ": " (a.method) " " code { (a.path) } }
                dt { "Quote (USD)" } dd { (a.quote) }
                dt { "Requested" } dd { (a.requested_at.format("%Y-%m-%d %H:%M:%S UTC")) " by proxy " (a.node_id) }
                dt { "Expires" } dd { (a.expires_at.format("%Y-%m-%d %H:%M:%S UTC")) }
                @if let Some(d) = &a.decision {
                    dt { "Decided by" } dd { (d.by) " at " (d.at.format("%Y-%m-%d %H:%M:%S UTC")) }
                    dt { "Reason" } dd #reason { (d.reason) }
                }
            }
            @if can_decide {
                form method="post" action={ "/ui/approvals/" (a.id) } {
                    input type="hidden" name="csrf" value=(s.csrf);
                    label for="reason" { "Reason (required)" }
                    input #reason-input type="text" name="reason" required maxlength="500";
                    button type="submit" name="verdict" value="approve" { "Approve" }
                    button.danger type="submit" name="verdict" value="deny" { "Deny" }
                }
            }
            p { a href="/ui/approvals" { "All approvals" } }
        },
    )
}
