//! The dashboard's pages as maud templates. Pure functions of what the
//! handlers read through `Control`: no I/O here. Charts are inline SVG
//! drawn from attributes only (the CSP allows no inline style or script);
//! the one script, the Run page's live audit, is a file (`assets/live.js`).

use std::collections::{BTreeMap, HashMap};

use keycap_proto::Micros;
use maud::{html, Markup, DOCTYPE};

use super::session::Session;
use crate::domain::{AuditEntry, KeyStatus};
use crate::scope::Operation;
use crate::service::{Confirmation, KeyView, VendorView};
use crate::store::RefusalCount;

fn usd(m: Micros) -> String {
    format!("${m}")
}

pub(super) fn layout(session: Option<&Session>, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · keycap" }
                link rel="stylesheet" href="/ui/assets/keycap.css";
            }
            body {
                header {
                    nav aria-label="Main" {
                        a.brand href="/ui" { "keycap" }
                        @if session.is_some() {
                            a href="/ui" { "Overview" }
                            a href="/ui/keys" { "Keys" }
                            a href="/ui/vendors" { "Vendors" }
                            a href="/ui/audit" { "Audit" }
                            a href="/ui/webhooks" { "Webhooks" }
                            a href="/ui/approvals" { "Approvals" }
                        }
                    }
                    @if let Some(s) = session {
                        form.sign-out method="post" action="/ui/sign-out" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            span.token { "Token " (s.principal.token_id) }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

pub fn message(session: Option<&Session>, title: &str, text: &str) -> Markup {
    layout(session, title, html! { p.notice role="alert" { (text) } })
}

pub fn sign_in(error: Option<&str>) -> Markup {
    layout(
        None,
        "Sign in",
        html! {
            @if let Some(e) = error { p.notice role="alert" { (e) } }
            form method="post" action="/ui/sign-in" {
                label for="token" { "Admin token" }
                input #token type="password" name="token" autocomplete="off" required
                    aria-describedby="token-help";
                p #token-help .help {
                    "The session carries this token's scopes and ends when it is revoked."
                }
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// A horizontal bar chart of `(label, amount)`, largest first.
fn bar_chart(caption: &str, rows: &[(String, Micros)]) -> Markup {
    const ROW: usize = 28;
    let max = rows.iter().map(|(_, m)| m.0).max().unwrap_or(0).max(1);
    let height = ROW * rows.len().max(1);
    html! {
        figure {
            figcaption { (caption) }
            @if rows.is_empty() {
                p.help { "No spend yet today." }
            } @else {
                svg role="img" aria-label=(caption) viewBox={"0 0 600 " (height)}
                    width="100%" preserveAspectRatio="xMinYMin meet" {
                    @for (i, (label, amount)) in rows.iter().enumerate() {
                        @let y = i * ROW;
                        @let w = 8 + (amount.0.max(0) as i128 * 352 / max as i128) as i64;
                        text x="0" y=(y + 18) font-size="13" fill="currentColor" { (label) }
                        rect x="200" y=(y + 4) width=(w) height="18" fill="#3b6fd8" {}
                        text x=(208 + w) y=(y + 18) font-size="13" fill="currentColor" { (usd(*amount)) }
                    }
                }
            }
        }
    }
}

/// Today's spend summed by a key attribute, largest first.
fn spend_by(keys: &[KeyView], by: impl Fn(&KeyView) -> String) -> Vec<(String, Micros)> {
    let mut sums: BTreeMap<String, i64> = BTreeMap::new();
    for k in keys {
        *sums.entry(by(k)).or_default() += k.spend.spent_day.0;
    }
    let mut rows: Vec<_> = sums
        .into_iter()
        .filter(|(_, m)| *m > 0)
        .map(|(l, m)| (l, Micros(m)))
        .collect();
    rows.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.cmp(&b.0)));
    rows
}

/// `proxies` are those connected now; `head` the latest policy version.
pub fn overview(
    s: &Session,
    keys: Option<&[KeyView]>,
    error: Option<&str>,
    proxies: &[crate::domain::FleetNode],
    head: i64,
    refusals: Option<&[RefusalCount]>,
) -> Markup {
    layout(
        Some(s),
        "Overview",
        html! {
            @if let Some(e) = error { p.notice role="alert" { (e) } }
            @if let Some(keys) = keys {
                @let by_vendor = spend_by(keys, |k| k.key.vendor.as_str().to_string());
                @let by_run = spend_by(keys, |k| k.key.agent_run_label.clone());
                section.charts {
                    (bar_chart("Today's spend by vendor", &by_vendor))
                    (bar_chart("Today's spend by run", &by_run))
                }
                @if let Some(refusals) = refusals { (refusals_today(refusals)) }
                h2 { "Runs" }
                ul.runs {
                    @for (label, amount) in &by_run {
                        li { a href={"/ui/run?label=" (urlencode(label))} { (label) } " — " (usd(*amount)) }
                    }
                }
                h2 { "Proxies connected" }
                @if proxies.is_empty() { p.help { "None." } } @else {
                    div.table-wrap { table #proxies {
                        thead { tr {
                            th scope="col" { "Proxy" } th scope="col" { "Policy version" }
                            th scope="col" { "Last heartbeat" }
                        } }
                        tbody { @for n in proxies { tr {
                            td { (n.node_id) }
                            td {
                                (n.applied_version)
                                @if n.applied_version < head { " (behind " (head) ")" } @else { " (current)" }
                            }
                            td { (n.heartbeat_at.format("%H:%M:%S UTC")) }
                        } } }
                    } }
                }
            }
        },
    )
}

/// A horizontal bar chart of `(label, count)`, largest first.
fn count_chart(caption: &str, rows: &[(String, i64)]) -> Markup {
    const ROW: usize = 28;
    let max = rows.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let height = ROW * rows.len().max(1);
    html! {
        figure.narrow {
            figcaption { (caption) }
            svg role="img" aria-label=(caption) viewBox={"0 0 600 " (height)}
                width="100%" preserveAspectRatio="xMinYMin meet" {
                @for (i, (label, n)) in rows.iter().enumerate() {
                    @let y = i * ROW;
                    @let w = 8 + (i128::from((*n).max(0)) * 352 / i128::from(max)) as i64;
                    text x="0" y=(y + 18) font-size="13" fill="currentColor" { (label) }
                    rect x="200" y=(y + 4) width=(w) height="18" fill="#c0392b" {}
                    text x=(208 + w) y=(y + 18) font-size="13" fill="currentColor" { (n) }
                }
            }
        }
    }
}

/// Today's refused calls: a chart by reason, and a table by key and
/// reason (from the proxies' refusal records, a minute late at most).
fn refusals_today(refusals: &[RefusalCount]) -> Markup {
    let mut by_reason: BTreeMap<&str, i64> = BTreeMap::new();
    for r in refusals {
        *by_reason.entry(r.reason.as_str()).or_default() += r.calls;
    }
    let mut rows: Vec<(String, i64)> = by_reason
        .into_iter()
        .map(|(reason, n)| (reason.to_string(), n))
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    html! {
        section #refusals aria-labelledby="refusals-heading" {
            h2 #refusals-heading { "Refusals today" }
            @if refusals.is_empty() {
                p.help { "No calls refused today." }
            } @else {
                (count_chart("Calls refused today by reason", &rows))
                div.table-wrap { table #refusals-by-key {
                    thead { tr {
                        th scope="col" { "Reason" } th scope="col" { "Key" }
                        th scope="col" { "Run" } th scope="col" { "Vendor" }
                        th scope="col" { "Calls" }
                    } }
                    tbody { @for r in refusals { tr {
                        td { code { (r.reason) } }
                        td { small { (r.key_id) } }
                        td { a href={"/ui/run?label=" (urlencode(&r.agent_run_label))} { (r.agent_run_label) } }
                        td { (r.vendor) }
                        td { (r.calls) }
                    } } }
                } }
            }
            p.help { "Proxies report each minute's refusals once the minute is over." }
        }
    }
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A filter from the query string; an empty one is no filter.
fn filter_value(q: &HashMap<String, String>, name: &str) -> Option<String> {
    q.get(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The filters of the Keys page, as the query string gave them.
pub struct KeyFilters {
    pub vendor: Option<String>,
    pub label: Option<String>,
    /// "active" or "all".
    pub status: Option<String>,
}

impl KeyFilters {
    pub fn from_query(q: &HashMap<String, String>) -> KeyFilters {
        let get = |k: &str| filter_value(q, k);
        KeyFilters {
            vendor: get("vendor"),
            label: get("label"),
            status: get("status"),
        }
    }
}

fn status_text(s: KeyStatus) -> &'static str {
    s.as_str()
}

fn keys_table(s: &Session, keys: &[KeyView]) -> Markup {
    let can_revoke = s.principal.require(Operation::RevokeKey).is_ok();
    html! {
        div.table-wrap {
            table {
                thead { tr {
                    th scope="col" { "Key" } th scope="col" { "Vendor" } th scope="col" { "Run" }
                    th scope="col" { "Status" } th scope="col" { "Daily cap" }
                    th scope="col" { "Spent today" } th scope="col" { "Remaining" }
                    th scope="col" { "Lifetime spent" }
                    @if can_revoke { th scope="col" { span.visually-hidden { "Actions" } } }
                } }
                tbody {
                    @for k in keys {
                        tr {
                            td { code { (k.key.key_prefix) } br; small { (k.key.id) } }
                            td { (k.key.vendor.as_str()) }
                            td { a href={"/ui/run?label=" (urlencode(&k.key.agent_run_label))} { (k.key.agent_run_label) } }
                            td { (status_text(k.status)) }
                            td {
                                (usd(k.key.daily_cap))
                                @if let Some(ceiling) = k.key.observe_ceiling {
                                    br; small { "observing, ceiling " (usd(ceiling)) }
                                }
                            }
                            td { (usd(k.spend.spent_day)) }
                            td { (usd(k.remaining_today)) }
                            td { (usd(k.spend.spent_lifetime)) }
                            @if can_revoke {
                                td {
                                    @if k.status == KeyStatus::Active {
                                        form method="post" action={"/ui/keys/" (k.key.id) "/revoke"} {
                                            input type="hidden" name="csrf" value=(s.csrf);
                                            button.danger type="submit"
                                                aria-label={"Revoke key " (k.key.id)} { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn keys(s: &Session, f: &KeyFilters, keys: &[KeyView]) -> Markup {
    let status = f.status.as_deref().unwrap_or("all");
    layout(
        Some(s),
        "Keys",
        html! {
            form.filters method="get" action="/ui/keys" role="search" {
                label { "Vendor " input type="text" name="vendor" value=[f.vendor.as_deref()]; }
                label { "Run label " input type="text" name="label" value=[f.label.as_deref()]; }
                label { "Status "
                    select name="status" {
                        option value="all" selected[status == "all"] { "All" }
                        option value="active" selected[status == "active"] { "Active" }
                    }
                }
                button type="submit" { "Filter" }
            }
            @if keys.is_empty() { p.help { "No keys match." } } @else { (keys_table(s, keys)) }
            @if s.principal.require(Operation::CreateKey).is_ok() {
                h2 { "Mint a key" }
                p.help { "The fields of POST /vault/keys; the secret is shown once." }
                form.mint method="post" action="/ui/keys" {
                    input type="hidden" name="csrf" value=(s.csrf);
                    label { "Vendor " input type="text" name="vendor" required; }
                    label { "Daily cap, USD " input type="text" name="daily_usd_cap" required inputmode="decimal"; }
                    label { "Per-call cap, USD " input type="text" name="per_call_usd_cap" inputmode="decimal"; }
                    label { "Lifetime cap, USD " input type="text" name="lifetime_usd_cap" inputmode="decimal"; }
                    label { "Allowed endpoints, one a line "
                        textarea name="allowed_endpoints" rows="3" required placeholder="POST /v1/payment_intents" {}
                    }
                    label { "Expires in " input type="text" name="expires_in" value="24h" required; }
                    label { "Run label " input type="text" name="agent_run_label" required; }
                    button type="submit" { "Mint" }
                }
            }
        },
    )
}

/// A key just minted: its secret, once, and the proxies that serve it.
pub fn minted(s: &Session, k: &KeyView, secret: &str, c: &Confirmation) -> Markup {
    layout(
        Some(s),
        "Key minted",
        html! {
            div.notice role="status" {
                p { "Key " code #key-id { (k.key.id) } " for run " (k.key.agent_run_label) ". Its secret, shown only now:" }
                p { code #key-secret { (secret) } }
            }
            p { "Served by " (c.confirmed.len()) " proxy(ies)"
                @if !c.unconfirmed.is_empty() { "; not yet confirmed by " (c.unconfirmed.join(", ")) } "." }
            p { a href="/ui/keys" { "Back to keys" } }
        },
    )
}

/// `entries`: the run's newest audit entries, or `None` when the token may
/// not read the audit.
pub fn run(s: &Session, label: &str, keys: &[KeyView], entries: Option<&[AuditEntry]>) -> Markup {
    let spent: i64 = keys.iter().map(|k| k.spend.spent_day.0).sum();
    let can_revoke = s.principal.require(Operation::RevokeRun).is_ok();
    let any_active = keys.iter().any(|k| k.status == KeyStatus::Active);
    layout(
        Some(s),
        &format!("Run {label}"),
        html! {
            p.total { "Spent today: " strong #run-spend { (usd(Micros(spent))) } }
            @if can_revoke && any_active {
                form method="post" action="/ui/run/revoke" {
                    input type="hidden" name="csrf" value=(s.csrf);
                    input type="hidden" name="label" value=(label);
                    button.danger type="submit" { "Revoke run" }
                }
            }
            h2 { "Keys" }
            @if keys.is_empty() { p.help { "No keys carry this run label." } } @else { (keys_table(s, keys)) }
            h2 #audit-heading { "Audit" }
            @match entries {
                None => p.help { "Reading the audit needs the audit:read scope." },
                Some(entries) => (run_audit(label, entries)),
            }
        },
    )
}

/// The run's audit table; `assets/live.js` adds entries as they arrive.
fn run_audit(label: &str, entries: &[AuditEntry]) -> Markup {
    html! {
        p #live-status .help role="status" aria-live="polite" {
            "The newest entries; reload to see more (live with JavaScript on)."
        }
        @if entries.is_empty() {
            p #run-audit-empty .help { "No audit entries yet." }
        }
        div.table-wrap {
            table #run-audit aria-labelledby="audit-heading" data-label=(label)
                data-after=(entries.first().map_or(0, |e| e.seq)) hidden[entries.is_empty()] {
                thead { tr {
                    th scope="col" { "#" } th scope="col" { "At (UTC)" } th scope="col" { "Key" }
                    th scope="col" { "Call" } th scope="col" { "Status" } th scope="col" { "Cost" }
                    th scope="col" { "Outcome" } th scope="col" { "Proxy" }
                } }
                tbody { @for e in entries {
                    tr #{"audit-" (e.seq)} { @for cell in super::live::cells(e) { td { (cell) } } }
                } }
            }
        }
        script src="/ui/assets/live.js" defer {}
    }
}

pub fn revoked(s: &Session, what: &str, ids: &[String], c: &Confirmation) -> Markup {
    layout(
        Some(s),
        "Revoked",
        html! {
            p role="status" { "Revoked " (what) ": " (ids.len()) " key(s)." }
            h2 { "Proxies that confirmed" }
            @if c.confirmed.is_empty() { p.help { "None connected." } }
            ul #confirmed { @for n in &c.confirmed { li { (n) } } }
            @if !c.unconfirmed.is_empty() {
                h2 { "Proxies that did not confirm" }
                p.notice { "They may still spend up to " (usd(c.unconfirmed_lease)) " of leases already granted." }
                ul #unconfirmed { @for n in &c.unconfirmed { li { (n) } } }
            }
            p { a href="/ui/keys" { "Back to keys" } }
        },
    )
}

/// `fingerprints[i]` is `vendors[i]`'s credential fingerprint (see
/// `Control::credential_fingerprint`).
pub fn vendors(s: &Session, vendors: &[VendorView], fingerprints: &[Option<String>]) -> Markup {
    layout(
        Some(s),
        "Vendors",
        html! {
            p.help {
                "Credentials are never shown; they stay sealed in the control plane. "
                "The fingerprint is the start of the credential's SHA-256: "
                code { "printf %s \"$KEY\" | sha256sum | cut -c1-12" }
                " prints the same for the key you hold."
            }
            div.table-wrap { table {
                thead { tr {
                    th scope="col" { "Vendor" } th scope="col" { "Profile" }
                    th scope="col" { "Base URL" } th scope="col" { "Credential" }
                    th scope="col" { "Prices" }
                    th scope="col" { "Proxies that cannot load it" }
                } }
                tbody { @for (v, fingerprint) in vendors.iter().zip(fingerprints) {
                    tr {
                        td { (v.vendor.name.as_str()) }
                        td { (v.vendor.profile.as_str()) }
                        td { code { (v.vendor.base_url) } }
                        td {
                            @match fingerprint {
                                Some(f) => code { (f) },
                                None => "cannot be opened",
                            }
                            @if v.vendor.rotation_overdue(chrono::Utc::now()) {
                                " " strong.overdue { "due for rotation" }
                            }
                        }
                        td {
                            @if v.vendor.prices.is_empty() { "shipped with keycap" }
                            @else { "operator's table, set " (v.vendor.updated_at.format("%Y-%m-%d %H:%M UTC")) }
                        }
                        td { @if v.proxy_errors.is_empty() { "none" } @else {
                            ul { @for e in &v.proxy_errors { li { (e.node_id) ": " (e.error) } } }
                        } }
                    }
                } }
            } }
        },
    )
}

/// The filters of the Audit page, as the query string gave them.
pub struct AuditFilters {
    pub label: Option<String>,
    pub vendor: Option<String>,
    pub key_id: Option<String>,
    /// The sequence number the page starts below.
    pub before: Option<String>,
}

impl AuditFilters {
    pub fn from_query(q: &HashMap<String, String>) -> AuditFilters {
        let get = |k: &str| filter_value(q, k);
        AuditFilters {
            label: get("label"),
            vendor: get("vendor"),
            key_id: get("key_id"),
            before: get("before"),
        }
    }

    fn next_page(&self, before: i64) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("label", &self.label),
            ("vendor", &self.vendor),
            ("key_id", &self.key_id),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        q.append_pair("before", &before.to_string());
        format!("/ui/audit?{}", q.finish())
    }
}

pub fn audit(s: &Session, f: &AuditFilters, entries: &[AuditEntry], more: bool) -> Markup {
    layout(
        Some(s),
        "Audit",
        html! {
            form.filters method="get" action="/ui/audit" role="search" {
                label { "Run label " input type="text" name="label" value=[f.label.as_deref()]; }
                label { "Vendor " input type="text" name="vendor" value=[f.vendor.as_deref()]; }
                label { "Key id " input type="text" name="key_id" value=[f.key_id.as_deref()]; }
                button type="submit" { "Filter" }
            }
            @if s.principal.vendors.check_all().is_ok() {
                p.export {
                    "Export the whole ledger (chain fields included, verifiable offline): "
                    a href="/ui/audit/export?format=jsonl" download { "JSON lines" } " · "
                    a href="/ui/audit/export?format=csv" download { "CSV" }
                }
            }
            @if entries.is_empty() { p.help { "No audit entries match." } } @else {
                div.table-wrap { table #audit {
                    thead { tr {
                        th scope="col" { "#" } th scope="col" { "At (UTC)" } th scope="col" { "Run" }
                        th scope="col" { "Key" } th scope="col" { "Call" } th scope="col" { "Status" }
                        th scope="col" { "Reserved" } th scope="col" { "Cost" } th scope="col" { "Outcome" }
                        th scope="col" { "Proxy" }
                    } }
                    tbody { @for e in entries {
                        tr {
                            td { (e.seq) }
                            td { (e.event.at.format("%Y-%m-%d %H:%M:%S")) }
                            td { (e.agent_run_label) }
                            td { small { (e.event.key_id) } }
                            td { (e.event.vendor) " " (e.event.method) " " code { (e.event.path) } }
                            td { (e.event.upstream_status) }
                            td { (usd(e.event.reserved)) }
                            td { (usd(e.event.cost)) }
                            td { (e.event.outcome.as_str()) }
                            td { (e.event.node_id) }
                        }
                    } }
                } }
                @if more {
                    @if let Some(last) = entries.last() {
                        p { a href=(f.next_page(last.seq)) rel="next" { "Older entries" } }
                    }
                }
            }
        },
    )
}
