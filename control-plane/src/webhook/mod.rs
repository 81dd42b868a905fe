//! Alert webhooks: what an operator registers (an endpoint: URL, signing
//! secret, the event types and cap thresholds it wants), the events keycap
//! raises, how a delivery is signed, and the Slack form of a payload.
//!
//! Events are written to a durable outbox in the store (see
//! `Store::enqueue_webhook_event`) and posted by `delivery`, never from the
//! request that raised them: a slow or dead receiver never slows an API
//! call, and a control plane that dies mid-delivery delivers after restart.
//! This module never sends anything and never sees a vault key or vendor
//! credential; a signing secret leaves it only sealed.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use rand::RngCore;
use serde::Serialize;

use crate::domain::{invalid, InvalidInput};

pub mod delivery;

/// The header carrying a delivery's signature and its value:
/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, Stripe's scheme,
/// signed by the one signer the inbound relay uses too.
pub use keycap_vendors::webhooks::keycap::{signature, SIGNATURE_HEADER};

/// How old a signature a receiver should accept, in seconds; documented
/// for receivers (docs/webhooks.md). Retries are signed afresh, so a late
/// retry never carries a stale timestamp.
pub const REPLAY_WINDOW_SECS: i64 = 300;

/// The cap thresholds an endpoint gets unless it names its own.
pub const DEFAULT_THRESHOLDS: [u8; 3] = [50, 80, 100];

/// A key with this many cap refusals within one UTC minute raises one
/// `cap.refusals` event for that minute.
pub const REFUSAL_BURST: i64 = 5;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum EventType {
    /// A key or run crossed a threshold (percent) of a cap.
    CapThreshold,
    /// A burst of cap refusals of one key.
    CapRefusals,
    KeyRevoked,
    RunRevoked,
    /// A proxy did not confirm a revocation in time (its leases of the
    /// revoked keys were fenced).
    RevocationUnconfirmed,
    /// A proxy reported a spool of spend events it has not delivered yet.
    SpoolBacklog,
    /// A vendor's credential is older than the vendor's `rotate_after`.
    CredentialRotationDue,
    /// A call was held for a person's approval (docs/approvals.md).
    ApprovalRequested,
    /// A held call was approved or denied.
    ApprovalDecided,
    /// Sent by `keycap webhook test`.
    Test,
}

impl EventType {
    pub const ALL: [EventType; 10] = [
        EventType::CapThreshold,
        EventType::CapRefusals,
        EventType::KeyRevoked,
        EventType::RunRevoked,
        EventType::RevocationUnconfirmed,
        EventType::SpoolBacklog,
        EventType::CredentialRotationDue,
        EventType::ApprovalRequested,
        EventType::ApprovalDecided,
        EventType::Test,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CapThreshold => "cap.threshold",
            EventType::CapRefusals => "cap.refusals",
            EventType::KeyRevoked => "key.revoked",
            EventType::RunRevoked => "run.revoked",
            EventType::RevocationUnconfirmed => "revocation.unconfirmed",
            EventType::SpoolBacklog => "spool.backlog",
            EventType::CredentialRotationDue => "credential.rotation_due",
            EventType::ApprovalRequested => "approval.requested",
            EventType::ApprovalDecided => "approval.decided",
            EventType::Test => "webhook.test",
        }
    }

    pub fn parse(s: &str) -> Result<EventType, InvalidInput> {
        EventType::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = EventType::ALL.iter().map(|e| e.as_str()).collect();
                invalid(
                    "events",
                    format!("unknown event type {s:?}; known: {}", known.join(", ")),
                )
            })
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a payload is shaped for the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadFormat {
    /// keycap's JSON event (`id`, `type`, `created_at`, `data`).
    Keycap,
    /// A Slack incoming-webhook message (`{"text": ...}`).
    Slack,
}

impl PayloadFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadFormat::Keycap => "keycap",
            PayloadFormat::Slack => "slack",
        }
    }

    pub fn parse(s: &str) -> Result<PayloadFormat, InvalidInput> {
        match s {
            "" | "keycap" | "json" => Ok(PayloadFormat::Keycap),
            "slack" => Ok(PayloadFormat::Slack),
            other => Err(invalid(
                "format",
                format!("unknown format {other:?}; use \"keycap\" or \"slack\""),
            )),
        }
    }
}

/// A registered endpoint (its secret is stored sealed, apart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEndpoint {
    pub id: String,
    pub url: String,
    /// Event types it wants; empty: every type.
    pub events: Vec<EventType>,
    /// Cap thresholds in percent, ascending.
    pub thresholds: Vec<u8>,
    /// Only events about this run label (cap thresholds, revocations).
    pub run_label: Option<String>,
    /// Only events about this key.
    pub key_id: Option<String>,
    pub format: PayloadFormat,
    pub description: String,
    pub created_at: DateTime<Utc>,
}

impl WebhookEndpoint {
    /// Whether an event of `kind` about `subject` is for this endpoint.
    /// An endpoint scoped to a run or key takes only events that name it;
    /// events about no run or key (a credential, a proxy's spool) go only
    /// to unscoped endpoints.
    pub fn wants(&self, kind: EventType, subject: &Subject<'_>) -> bool {
        if kind == EventType::Test {
            return false;
        }
        if !self.events.is_empty() && !self.events.contains(&kind) {
            return false;
        }
        if let Some(run) = &self.run_label {
            if subject.run_label != Some(run.as_str()) {
                return false;
            }
        }
        if let Some(key) = &self.key_id {
            if subject.key_id != Some(key.as_str()) {
                return false;
            }
        }
        true
    }

    /// Whether the subject's threshold `percent` is one this endpoint asks for.
    pub fn wants_threshold(&self, percent: u8, subject: &Subject<'_>) -> bool {
        self.thresholds.contains(&percent) && self.wants(EventType::CapThreshold, subject)
    }
}

/// What an event is about, for matching endpoints.
#[derive(Clone, Copy, Debug, Default)]
pub struct Subject<'a> {
    pub run_label: Option<&'a str>,
    pub key_id: Option<&'a str>,
}

/// An endpoint as an admin asked for it, validated; the secret in plain
/// text only until it is sealed.
#[derive(Clone, Debug)]
pub struct NewWebhookEndpoint {
    pub endpoint: WebhookEndpoint,
    pub secret: String,
}

/// Fields of a registration as received from a front end.
#[derive(Clone, Debug, Default)]
pub struct EndpointRequest {
    pub url: String,
    /// Empty: keycap draws one (`whsec_` + 64 hex digits).
    pub secret: String,
    pub events: Vec<String>,
    /// Empty: `DEFAULT_THRESHOLDS`.
    pub thresholds: Vec<u32>,
    pub run_label: String,
    pub key_id: String,
    pub format: String,
    pub description: String,
}

impl NewWebhookEndpoint {
    pub fn new(req: &EndpointRequest, now: DateTime<Utc>) -> Result<Self, InvalidInput> {
        let url = parse_url(&req.url)?;
        let secret = if req.secret.is_empty() {
            generate_secret()
        } else if req.secret.len() < 16 || req.secret.len() > 256 {
            return Err(invalid("secret", "must be 16 to 256 characters"));
        } else if req.secret.chars().any(|c| c.is_control()) {
            return Err(invalid("secret", "must be printable characters"));
        } else {
            req.secret.clone()
        };
        let mut events = Vec::new();
        for e in &req.events {
            let e = EventType::parse(e.trim())?;
            if e == EventType::Test {
                return Err(invalid(
                    "events",
                    "webhook.test is sent by `keycap webhook test` to any endpoint; do not list it",
                ));
            }
            if !events.contains(&e) {
                events.push(e);
            }
        }
        events.sort();
        let mut thresholds = Vec::new();
        for &t in &req.thresholds {
            if !(1..=100).contains(&t) {
                return Err(invalid(
                    "thresholds",
                    format!("{t} is not a percentage from 1 to 100"),
                ));
            }
            thresholds.push(t as u8);
        }
        if thresholds.is_empty() {
            thresholds = DEFAULT_THRESHOLDS.to_vec();
        }
        thresholds.sort_unstable();
        thresholds.dedup();
        if thresholds.len() > 10 {
            return Err(invalid("thresholds", "at most 10 thresholds"));
        }
        let run_label = match req.run_label.as_str() {
            "" => None,
            l => Some(
                crate::domain::parse_run_label(l).map_err(|e| invalid("run_label", e.reason))?,
            ),
        };
        let key_id = match req.key_id.trim() {
            "" => None,
            k if k.len() > 128 || k.chars().any(|c| c.is_control() || c.is_whitespace()) => {
                return Err(invalid("key_id", "not a key id"))
            }
            k => Some(k.to_string()),
        };
        if req.description.len() > 500 || req.description.chars().any(|c| c.is_control()) {
            return Err(invalid("description", "at most 500 printable characters"));
        }
        Ok(NewWebhookEndpoint {
            endpoint: WebhookEndpoint {
                id: format!("wh_{}", uuid::Uuid::new_v4().simple()),
                url,
                events,
                thresholds,
                run_label,
                key_id,
                format: PayloadFormat::parse(req.format.trim())?,
                description: req.description.clone(),
                created_at: now,
            },
            secret,
        })
    }
}

/// The record id an endpoint's secret is sealed under.
pub fn secret_record(endpoint_id: &str) -> String {
    format!("webhook/{endpoint_id}")
}

fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("whsec_{}", hex::encode(bytes))
}

/// An endpoint URL: `http` or `https`, a host, no userinfo, no fragment,
/// at most 2048 bytes. Where the host points is checked when delivering
/// (`delivery::Destinations`), since DNS answers change.
pub fn parse_url(s: &str) -> Result<String, InvalidInput> {
    let s = s.trim();
    if s.is_empty() {
        return Err(invalid("url", "an http(s) URL is required"));
    }
    if s.len() > 2048 {
        return Err(invalid("url", "at most 2048 bytes"));
    }
    let uri: http::Uri = s
        .parse()
        .map_err(|e| invalid("url", format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(invalid("url", "only http and https URLs are accepted")),
    }
    let Some(authority) = uri.authority() else {
        return Err(invalid("url", "the URL names no host"));
    };
    if authority.as_str().contains('@') {
        return Err(invalid(
            "url",
            "user information (user:password@) is not accepted in a webhook URL; \
             receivers authenticate deliveries by their signature",
        ));
    }
    if authority.host().is_empty() {
        return Err(invalid("url", "the URL names no host"));
    }
    if s.contains('#') {
        return Err(invalid("url", "a fragment (#...) is not accepted"));
    }
    Ok(s.to_string())
}

/// An event as stored and delivered: its stable id (the same on every
/// attempt and to every endpoint), type, time and data.
#[derive(Clone, Debug)]
pub struct WebhookEvent {
    pub id: String,
    pub kind: EventType,
    pub created_at: DateTime<Utc>,
    pub data: serde_json::Value,
}

impl WebhookEvent {
    pub fn new(kind: EventType, created_at: DateTime<Utc>, data: serde_json::Value) -> Self {
        WebhookEvent {
            id: format!("evt_{}", uuid::Uuid::new_v4().simple()),
            kind,
            created_at,
            data,
        }
    }

    /// The JSON body receivers get (keycap format).
    pub fn payload(&self) -> String {
        serde_json::json!({
            "id": self.id,
            "type": self.kind.as_str(),
            "created_at": self.created_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            "data": self.data,
        })
        .to_string()
    }
}

/// A Slack incoming-webhook message for a keycap payload: one line of text
/// that says what happened, with the event id.
pub fn slack_body(payload: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
    let d = &v["data"];
    let s = |k: &str| d[k].as_str().unwrap_or("").to_string();
    let kind = v["type"].as_str().unwrap_or("");
    let what = match kind {
        "cap.threshold" => format!(
            "{} {} reached {}% of its {} cap: ${} of ${} spent",
            s("subject"),
            if s("subject") == "run" {
                s("run_label")
            } else {
                s("key_id")
            },
            d["threshold_percent"],
            s("cap"),
            s("spent_usd"),
            s("cap_usd"),
        ),
        "cap.refusals" => format!(
            "key {} was refused at its cap {} times in the minute from {}",
            s("key_id"),
            d["refusals"],
            s("minute")
        ),
        "key.revoked" => format!("key {} was revoked", s("key_id")),
        "run.revoked" => format!(
            "run {} was revoked ({} keys)",
            s("run_label"),
            d["key_ids"].as_array().map_or(0, |a| a.len())
        ),
        "revocation.unconfirmed" => format!(
            "proxies {} did not confirm a revocation; their leases are fenced",
            d["unconfirmed"]
        ),
        "spool.backlog" => format!(
            "proxy {} holds {} undelivered spend events",
            s("node_id"),
            d["spool_depth"]
        ),
        "credential.rotation_due" => format!(
            "the {} credential was set {} and is due for rotation (rotate_after {})",
            s("vendor"),
            s("credential_set_at"),
            s("rotate_after")
        ),
        "webhook.test" => "test delivery from keycap".to_string(),
        other => other.to_string(),
    };
    serde_json::json!({
        "text": format!("keycap: {what} ({})", v["id"].as_str().unwrap_or("")),
    })
    .to_string()
}

/// One delivery of an event to an endpoint, with its attempts.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub seq: i64,
    pub endpoint_id: String,
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    pub attempts: Vec<Attempt>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub payload: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub attempt: i32,
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status; `None` when there was no response.
    pub status: Option<i32>,
    /// Why it failed (empty for a 2xx).
    pub error: String,
    pub duration_ms: i64,
}

/// A delivery claimed by one replica for one attempt.
#[derive(Clone, Debug)]
pub struct ClaimedDelivery {
    pub seq: i64,
    pub endpoint_id: String,
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub url: String,
    pub sealed_secret: Vec<u8>,
    pub format: PayloadFormat,
    /// Attempts made before this one.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

/// What an attempt left a delivery as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    /// Try again at this time.
    Retry(DateTime<Utc>),
    /// Given up: 24 hours of retries failed.
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_http_without_userinfo() {
        for ok in ["https://hooks.example.com/x", "http://127.0.0.1:9/h?a=1"] {
            assert_eq!(parse_url(ok).unwrap(), ok);
        }
        for bad in [
            "",
            "ftp://example.com/",
            "file:///etc/passwd",
            "https://user:pw@example.com/",
            "https://user@example.com/",
            "/relative",
            "https://example.com/#frag",
            "javascript:alert(1)",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn registration_defaults_and_refusals() {
        let now = Utc::now();
        let req = EndpointRequest {
            url: "https://hooks.example.com/k".into(),
            ..Default::default()
        };
        let n = NewWebhookEndpoint::new(&req, now).unwrap();
        assert!(n.secret.starts_with("whsec_") && n.secret.len() == 70);
        assert_eq!(n.endpoint.thresholds, vec![50, 80, 100]);
        assert!(n.endpoint.events.is_empty());
        let bad = |f: &dyn Fn(&mut EndpointRequest)| {
            let mut r = req.clone();
            f(&mut r);
            NewWebhookEndpoint::new(&r, now).unwrap_err().field
        };
        assert_eq!(bad(&|r| r.thresholds = vec![0]), "thresholds");
        assert_eq!(bad(&|r| r.thresholds = vec![101]), "thresholds");
        assert_eq!(bad(&|r| r.events = vec!["cap.nope".into()]), "events");
        assert_eq!(bad(&|r| r.secret = "short".into()), "secret");
        assert_eq!(bad(&|r| r.format = "xml".into()), "format");
    }

    #[test]
    fn scoped_endpoints_take_only_their_subject() {
        let now = Utc::now();
        let mut req = EndpointRequest {
            url: "https://h.example.com/".into(),
            run_label: "run-1".into(),
            events: vec!["cap.threshold".into()],
            thresholds: vec![80],
            ..Default::default()
        };
        let e = NewWebhookEndpoint::new(&req, now).unwrap().endpoint;
        let run1 = Subject {
            run_label: Some("run-1"),
            key_id: Some("k"),
        };
        let run2 = Subject {
            run_label: Some("run-2"),
            key_id: Some("k"),
        };
        assert!(e.wants_threshold(80, &run1));
        assert!(!e.wants_threshold(50, &run1));
        assert!(!e.wants_threshold(80, &run2));
        assert!(!e.wants(EventType::KeyRevoked, &run1));
        req.run_label.clear();
        req.events.clear();
        let all = NewWebhookEndpoint::new(&req, now).unwrap().endpoint;
        assert!(all.wants(EventType::SpoolBacklog, &Subject::default()));
    }

    #[test]
    fn slack_text_names_the_event() {
        let ev = WebhookEvent::new(
            EventType::CapThreshold,
            Utc::now(),
            serde_json::json!({"subject": "run", "run_label": "r1", "threshold_percent": 80,
                               "cap": "daily", "spent_usd": "8", "cap_usd": "10"}),
        );
        let body: serde_json::Value = serde_json::from_str(&slack_body(&ev.payload())).unwrap();
        let text = body["text"].as_str().unwrap();
        assert!(
            text.contains("run r1 reached 80% of its daily cap"),
            "{text}"
        );
        assert!(text.contains(&ev.id));
    }
}
