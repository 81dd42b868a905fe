//! The operator's dashboard under `/ui`: server-rendered HTML (maud), one
//! stylesheet and one small script (the Run page's live audit) embedded in
//! the binary, so it works offline and under a Content-Security-Policy
//! that allows no inline code. Every page works without the script.
//!
//! It owns presentation only: every read and every action goes through
//! `Control` with the signed-in token's principal, so the dashboard can
//! never do more than the same token could over REST or gRPC (a button
//! hidden for a read-only token is refused by the server as well). It never
//! shows a vendor credential or an admin token.

mod approvals;
mod live;
mod pages;
mod session;
mod webhooks;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use maud::Markup;

use crate::domain::{AuditQuery, KeyFilter};
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::Control;
pub use session::Tls;
use session::{same_origin, Session};

type Ctl = State<Arc<Control>>;
type TlsOn = Option<Extension<Tls>>;

/// Scripts only from the dashboard's own files (never inline), and
/// connections (the live audit stream) only to its own origin.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
                   script-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const STYLESHEET: &str = include_str!("assets/keycap.css");
const LIVE_SCRIPT: &str = include_str!("assets/live.js");

pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/ui", get(overview))
        .route("/ui/sign-in", get(sign_in_form).post(sign_in))
        .route("/ui/sign-out", post(sign_out))
        .route("/ui/keys", get(keys).post(mint_key))
        .route("/ui/keys/{id}/revoke", post(revoke_key))
        .route("/ui/run", get(run))
        .route("/ui/run/revoke", post(revoke_run))
        .route("/ui/runs/{label}/events", get(live::events))
        .route("/ui/vendors", get(vendors))
        .route("/ui/audit", get(audit))
        .route("/ui/audit/export", get(export_audit))
        .route("/ui/webhooks", get(webhooks::list).post(webhooks::create))
        .route("/ui/webhooks/{id}", get(webhooks::show))
        .route("/ui/webhooks/{id}/test", post(webhooks::test))
        .route("/ui/webhooks/{id}/delete", post(webhooks::delete))
        .route("/ui/approvals", get(approvals::list))
        .route(
            "/ui/approvals/{id}",
            get(approvals::show).post(approvals::decide),
        )
        .route("/ui/assets/keycap.css", get(stylesheet))
        .route("/ui/assets/live.js", get(live_script))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(control)
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        // `no-referrer` would make browsers send `Origin: null` on the
        // dashboard's own form posts, which the same-origin check refuses.
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

async fn live_script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        LIVE_SCRIPT,
    )
        .into_response()
}

fn html(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

/// Where a request without a live session goes; its stale cookie, if any,
/// is cleared.
fn to_sign_in(tls: bool) -> Response {
    let mut res = Redirect::to("/ui/sign-in").into_response();
    res.headers_mut()
        .insert(header::SET_COOKIE, session::clear_cookie(tls));
    res
}

fn form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// The session of a state-changing request: refused unless it is same
/// origin and carries the session's CSRF value.
async fn post_session(
    c: &Control,
    uri: &Uri,
    headers: &HeaderMap,
    fields: &HashMap<String, String>,
    tls: bool,
) -> Result<Session, Response> {
    if !same_origin(headers, uri) {
        return Err(forbidden("cross-site request refused"));
    }
    let Some(s) = session::current(c, headers).await else {
        return Err(to_sign_in(tls));
    };
    if !s.csrf_matches(fields.get("csrf").map(String::as_str)) {
        return Err(forbidden("missing or wrong CSRF token; reload the page"));
    }
    Ok(s)
}

/// The session of a page view that needs `op`: a request without a live
/// session goes to sign in; a token without the scope is told which one.
async fn page_session(
    c: &Control,
    headers: &HeaderMap,
    tls: TlsOn,
    op: Operation,
) -> Result<Session, Response> {
    let Some(s) = session::current(c, headers).await else {
        return Err(to_sign_in(tls.is_some()));
    };
    match s.principal.require(op) {
        Ok(()) => Ok(s),
        Err(e) => Err(api_error(&s, e)),
    }
}

fn forbidden(why: &str) -> Response {
    html(StatusCode::FORBIDDEN, pages::message(None, "Refused", why))
}

fn api_error(s: &Session, e: ApiError) -> Response {
    html(
        e.http_status(),
        pages::message(Some(s), "Refused", &e.to_string()),
    )
}

async fn sign_in_form(State(c): Ctl, headers: HeaderMap) -> Response {
    if session::current(&c, &headers).await.is_some() {
        return Redirect::to("/ui").into_response();
    }
    html(StatusCode::OK, pages::sign_in(None))
}

async fn sign_in(State(c): Ctl, tls: TlsOn, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    if !same_origin(&headers, &uri) {
        return forbidden("cross-site request refused");
    }
    let fields = form(&body);
    let token = fields.get("token").map(|t| t.trim()).unwrap_or_default();
    if c.authenticate_admin(Some(&format!("Bearer {token}")))
        .await
        .is_err()
    {
        return html(
            StatusCode::UNAUTHORIZED,
            pages::sign_in(Some("That is not a valid, active admin token.")),
        );
    }
    let mut res = Redirect::to("/ui").into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(&session::seal(&c, token), tls.is_some()),
    );
    res
}

async fn sign_out(
    State(c): Ctl,
    tls: TlsOn,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(res) = post_session(&c, &uri, &headers, &form(&body), tls.is_some()).await {
        return res;
    }
    to_sign_in(tls.is_some())
}

async fn overview(State(c): Ctl, tls: TlsOn, headers: HeaderMap) -> Response {
    let Some(s) = session::current(&c, &headers).await else {
        return to_sign_in(tls.is_some());
    };
    if let Err(e) = s.principal.require(Operation::ListKeys) {
        return html(
            StatusCode::OK,
            pages::overview(&s, None, Some(&e.to_string()), &[], 0, None),
        );
    }
    let filter = KeyFilter {
        include_inactive: true,
        ..KeyFilter::default()
    };
    let connected_after = chrono::Utc::now() - crate::service::FLEET_NODE_STALE;
    let proxies: Vec<_> = c
        .store()
        .fleet_nodes()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.heartbeat_at > connected_after)
        .collect();
    let head = c.store().latest_version().await.unwrap_or(0);
    // Refusals are ledger entries: shown to a token that may read the audit.
    let refusals = match s.principal.require(Operation::QueryAudit) {
        Ok(()) => match c.refusals_today(&s.principal.vendors).await {
            Ok(r) => Some(r),
            Err(e) => return api_error(&s, e),
        },
        Err(_) => None,
    };
    match c.list_keys(&s.principal.vendors, &filter).await {
        Ok(keys) => html(
            StatusCode::OK,
            pages::overview(&s, Some(&keys), None, &proxies, head, refusals.as_deref()),
        ),
        Err(e) => api_error(&s, e),
    }
}

async fn keys(
    State(c): Ctl,
    tls: TlsOn,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let s = match page_session(&c, &headers, tls, Operation::ListKeys).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let filters = pages::KeyFilters::from_query(&q);
    let filter = KeyFilter {
        agent_run_label: filters.label.clone(),
        vendor: filters.vendor.clone(),
        include_inactive: filters.status.as_deref() != Some("active"),
    };
    match c.list_keys(&s.principal.vendors, &filter).await {
        Ok(keys) => html(StatusCode::OK, pages::keys(&s, &filters, &keys)),
        Err(e) => api_error(&s, e),
    }
}

async fn revoke_key(
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
    if let Err(e) = s.principal.require(Operation::RevokeKey) {
        return api_error(&s, e);
    }
    match c.revoke_key(&s.principal.vendors, &id, None).await {
        Ok((view, confirmation)) => html(
            StatusCode::OK,
            pages::revoked(
                &s,
                &format!("key {}", view.key.id),
                std::slice::from_ref(&view.key.id),
                &confirmation,
            ),
        ),
        Err(e) => api_error(&s, e),
    }
}

async fn run(
    State(c): Ctl,
    tls: TlsOn,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let s = match page_session(&c, &headers, tls, Operation::ListKeys).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let label = q.get("label").cloned().unwrap_or_default();
    let filter = KeyFilter {
        agent_run_label: Some(label.clone()),
        vendor: None,
        include_inactive: true,
    };
    let keys = match c.list_keys(&s.principal.vendors, &filter).await {
        Ok(k) => k,
        Err(e) => return api_error(&s, e),
    };
    // The run's newest entries, which the page's script then follows live.
    let entries = match s.principal.require(Operation::QueryAudit) {
        Ok(()) => {
            let q = AuditQuery {
                agent_run_label: Some(label.clone()),
                limit: AUDIT_PAGE,
                ..AuditQuery::default()
            };
            match c.query_audit(&s.principal.vendors, &q).await {
                Ok(entries) => Some(entries),
                Err(e) => return api_error(&s, e),
            }
        }
        Err(_) => None,
    };
    html(
        StatusCode::OK,
        pages::run(&s, &label, &keys, entries.as_deref()),
    )
}

async fn revoke_run(
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
    if let Err(e) = s.principal.require(Operation::RevokeRun) {
        return api_error(&s, e);
    }
    let label = fields.get("label").cloned().unwrap_or_default();
    match c.revoke_run(&s.principal.vendors, &label, None).await {
        Ok((ids, confirmation)) => html(
            StatusCode::OK,
            pages::revoked(&s, &format!("run {label}"), &ids, &confirmation),
        ),
        Err(e) => api_error(&s, e),
    }
}

async fn vendors(State(c): Ctl, tls: TlsOn, headers: HeaderMap) -> Response {
    let s = match page_session(&c, &headers, tls, Operation::ListVendors).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let vendors = match c.list_vendors(&s.principal.vendors).await {
        Ok(vendors) => vendors,
        Err(e) => return api_error(&s, e),
    };
    let mut fingerprints = Vec::with_capacity(vendors.len());
    for v in &vendors {
        match c.credential_fingerprint(v.vendor.name.as_str()).await {
            Ok(f) => fingerprints.push(f),
            Err(e) => return api_error(&s, e),
        }
    }
    html(StatusCode::OK, pages::vendors(&s, &vendors, &fingerprints))
}

/// Entries per audit page.
const AUDIT_PAGE: u32 = 50;

async fn audit(
    State(c): Ctl,
    tls: TlsOn,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let s = match page_session(&c, &headers, tls, Operation::QueryAudit).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let filters = pages::AuditFilters::from_query(&q);
    let before_seq = match filters.before.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(seq)) => Some(seq),
        Some(Err(_)) => {
            let e = crate::domain::invalid("before", "must be an audit sequence number");
            return api_error(&s, e.into());
        }
    };
    let query = AuditQuery {
        key_id: filters.key_id.clone(),
        agent_run_label: filters.label.clone(),
        vendor: filters.vendor.clone(),
        before_seq,
        limit: AUDIT_PAGE,
        ..AuditQuery::default()
    };
    match c.query_audit(&s.principal.vendors, &query).await {
        Ok(entries) => {
            let more = entries.len() == AUDIT_PAGE as usize;
            html(StatusCode::OK, pages::audit(&s, &filters, &entries, more))
        }
        Err(e) => api_error(&s, e),
    }
}

/// The ledger export (`GET /vault/audit/export`'s), for the session's
/// token: a download link on the Audit page.
async fn export_audit(
    State(c): Ctl,
    tls: TlsOn,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let s = match page_session(&c, &headers, tls, Operation::QueryAudit).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let Some(format) =
        crate::ledger::export::Format::parse(q.get("format").map_or("jsonl", String::as_str))
    else {
        return api_error(
            &s,
            crate::domain::invalid("format", "must be jsonl or csv").into(),
        );
    };
    let records = match c.export_audit(&s.principal.vendors, format, None, None) {
        Ok(r) => r,
        Err(e) => return api_error(&s, e),
    };
    let body = axum::body::Body::from_stream(futures_util::TryStreamExt::map_err(records, |e| {
        tracing::error!(error = %e, "audit export stopped");
        std::io::Error::other("audit export stopped")
    }));
    let name = match format.content_type() {
        t if t.contains("csv") => "keycap-audit.csv",
        _ => "keycap-audit.jsonl",
    };
    let mut res = (StatusCode::OK, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
            .expect("a constant file name"),
    );
    res
}

/// The Keys page's mint form: the fields of `POST /vault/keys`, validated by
/// the same code; the answer shows the secret once.
async fn mint_key(
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
    if let Err(e) = s.principal.require(Operation::CreateKey) {
        return api_error(&s, e);
    }
    let get = |k: &str| fields.get(k).map(|v| v.trim()).unwrap_or_default();
    let mut req = serde_json::json!({
        "vendor": get("vendor"),
        "daily_usd_cap": get("daily_usd_cap"),
        "allowed_endpoints": get("allowed_endpoints")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>(),
        "expires_in": get("expires_in"),
        "agent_run_label": get("agent_run_label"),
    });
    for optional in ["per_call_usd_cap", "lifetime_usd_cap"] {
        if !get(optional).is_empty() {
            req[optional] = serde_json::json!(get(optional));
        }
    }
    let minted = match crate::rest::create_key_request(req.to_string().as_bytes()) {
        Ok((new, _)) => {
            c.mint_key(
                &crate::service::KeyMinter::Admin(s.principal.clone()),
                new,
                None,
            )
            .await
        }
        Err(e) => Err(e),
    };
    match minted {
        Ok((view, secret, confirmation)) => html(
            StatusCode::CREATED,
            pages::minted(&s, &view, &secret, &confirmation),
        ),
        Err(ApiError::Invalid(i)) => html(
            StatusCode::BAD_REQUEST,
            pages::message(
                Some(&s),
                "Not minted",
                &format!("{}: {}", i.field, i.reason),
            ),
        ),
        Err(e) => api_error(&s, e),
    }
}
