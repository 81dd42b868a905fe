//! The inbound hook relay: `POST /hooks/{id}` on the agent port. A vendor
//! (Stripe, Twilio, Resend) calls it with an event; the proxy verifies the
//! signature as the vendor documents it (`keycap_vendors::webhooks`),
//! claims the event id fleet-wide through the control plane (so a replay,
//! here or at another proxy, is refused), and relays the event to the
//! hook's destination signed with keycap's `Keycap-Signature`. The vendor
//! gets a 2xx only when the destination took the event, so it retries
//! otherwise. Every relayed or refused event is reported for the audit
//! (cost 0, no key).
//!
//! It must never forward an event that did not verify, never answer an
//! unknown hook differently from a deleted one, and never read more than
//! `MAX_BODY_BYTES` of a body.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use keycap_proto::pb;
use keycap_vendors::webhooks::{self, keycap as signer, HookVendor, Inbound, MAX_BODY_BYTES};

use crate::body::{self, BodyReadError, ProxyBody};
use crate::fleet::replica_unavailable;
use crate::proxy::Proxy;

/// The path prefix of inbound hooks on the agent port.
pub const PREFIX: &str = "/hooks/";

/// How long the destination gets to take an event; vendors themselves wait
/// about this long (Stripe, Twilio: 10-15 s) before counting a failure.
const DESTINATION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the fleet-wide claim may take.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(3);

/// Headers that travel with the event to the destination.
const KEYCAP_HOOK_ID: &str = "keycap-hook-id";
const KEYCAP_EVENT_ID: &str = "keycap-event-id";

/// An inbound hook as the policy stream gave it.
pub struct HookPolicy {
    pub id: String,
    pub vendor: HookVendor,
    pub signing_secrets: Vec<String>,
    pub destination_url: String,
    pub public_url: String,
    pub tolerance_secs: i64,
    pub relay_secret: String,
    pub allow_private_destination: bool,
}

impl std::fmt::Debug for HookPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookPolicy")
            .field("id", &self.id)
            .field("vendor", &self.vendor)
            .finish_non_exhaustive()
    }
}

/// Applies hooks from a snapshot or delta: a hook the proxy cannot read
/// (an unknown vendor from a newer control plane) is dropped, so its
/// events meet a 404 rather than a relay without verification.
pub fn apply(
    hooks: &mut HashMap<String, Arc<HookPolicy>>,
    upsert: Vec<pb::FleetHook>,
    removed: Vec<String>,
) {
    for id in removed {
        hooks.remove(&id);
    }
    for h in upsert {
        match h.vendor.parse::<HookVendor>() {
            Ok(vendor) if !h.signing_secrets.is_empty() => {
                hooks.insert(
                    h.id.clone(),
                    Arc::new(HookPolicy {
                        id: h.id,
                        vendor,
                        signing_secrets: h.signing_secrets,
                        destination_url: h.destination_url,
                        public_url: h.public_url,
                        tolerance_secs: h.tolerance_secs,
                        relay_secret: h.relay_secret,
                        allow_private_destination: h.allow_private_destination,
                    }),
                );
            }
            _ => {
                tracing::error!(hook = %h.id, vendor = %h.vendor, "inbound hook cannot be served");
                hooks.remove(&h.id);
            }
        }
    }
}

/// Why an event was not relayed: its answer to the vendor and its reason
/// in the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Unknown or deleted hook; not audited (it names no hook).
    NotFound,
    TooLarge,
    Unverified(webhooks::Refusal),
    Replayed,
    /// The claim could not be made: the control plane is away. Fail
    /// closed; the vendor retries.
    ClaimUnavailable,
    DestinationFailed,
}

impl Refused {
    fn status(self) -> StatusCode {
        match self {
            Refused::NotFound => StatusCode::NOT_FOUND,
            Refused::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refused::Unverified(_) => StatusCode::UNAUTHORIZED,
            Refused::Replayed => StatusCode::CONFLICT,
            Refused::ClaimUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refused::DestinationFailed => StatusCode::BAD_GATEWAY,
        }
    }

    /// The code answered. Every verification failure answers alike: a
    /// forger learns nothing from the difference.
    fn code(self) -> &'static str {
        match self {
            Refused::NotFound => "not_found",
            Refused::TooLarge => "body_too_large",
            Refused::Unverified(_) => "hook_signature_invalid",
            Refused::Replayed => "hook_replayed",
            Refused::ClaimUnavailable => "control_plane_unavailable",
            Refused::DestinationFailed => "hook_destination_failed",
        }
    }

    /// The reason recorded in the audit (more precise than the answer).
    fn audit_reason(self) -> String {
        match self {
            Refused::Unverified(r) => format!("hook_{}", r.as_str()),
            other => other.code().to_string(),
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refused::NotFound => "no such hook",
            Refused::TooLarge => "the event is larger than 1 MB",
            Refused::Unverified(_) => "the event's signature does not verify",
            Refused::Replayed => "this event was already received",
            Refused::ClaimUnavailable => "keycap cannot take events now; retry later",
            Refused::DestinationFailed => "the destination did not take the event; retry later",
        }
    }

    fn response(self) -> Response<ProxyBody> {
        let body = serde_json::json!({"error": self.code(), "message": self.message()});
        let mut resp = Response::new(body::bytes(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

impl Proxy {
    /// Answers `POST /hooks/{id}`.
    pub async fn relay_hook(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let now = Utc::now();
        let id = req.uri().path()[PREFIX.len()..].to_string();
        let hook = self.policy.load().hooks.get(&id).cloned();
        // A hook only answers POST; anything else is as unknown as an
        // unknown id.
        let Some(hook) = hook.filter(|_| req.method() == Method::POST) else {
            return Refused::NotFound.response();
        };
        match self.relay_verified(&hook, req, now).await {
            Ok(event_id) => {
                self.report_hook(&hook, &event_id, None, now);
                let mut resp = Response::new(body::bytes(Bytes::from(
                    serde_json::json!({"relayed": true, "event_id": event_id}).to_string(),
                )));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                resp
            }
            Err((refused, event_id)) => {
                tracing::info!(hook = %hook.id, reason = %refused.audit_reason(), "inbound hook event refused");
                self.report_hook(&hook, event_id.as_deref().unwrap_or(""), Some(refused), now);
                refused.response()
            }
        }
    }

    /// Reads, verifies, claims and relays one event; its id when relayed.
    async fn relay_verified(
        &self,
        hook: &HookPolicy,
        req: Request<Incoming>,
        now: DateTime<Utc>,
    ) -> Result<String, (Refused, Option<String>)> {
        let (parts, incoming) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err((Refused::TooLarge, None));
        }
        let limit = MAX_BODY_BYTES.min(self.max_body_bytes.max(MAX_BODY_BYTES));
        let body = match body::read_paced(incoming, limit, self.body_pace).await {
            Ok(b) => b,
            Err(BodyReadError::TooLarge) => return Err((Refused::TooLarge, None)),
            Err(_) => return Err((Refused::Unverified(webhooks::Refusal::Malformed), None)),
        };
        let url = match parts.uri.query() {
            Some(q) => format!("{}?{q}", hook.public_url),
            None => hook.public_url.clone(),
        };
        let secrets: Vec<&str> = hook.signing_secrets.iter().map(String::as_str).collect();
        let event = Inbound {
            headers: &parts.headers,
            body: &body,
            url: &url,
        };
        let verified = webhooks::verify(
            hook.vendor,
            &secrets,
            &event,
            now.timestamp(),
            hook.tolerance_secs,
        )
        .map_err(|r| (Refused::Unverified(r), None))?;
        let event_id = verified.event_id;
        let failed = |r: Refused| (r, Some(event_id.clone()));
        match self.claim_hook_event(&hook.id, &event_id).await {
            Ok(true) => {}
            Ok(false) => return Err(failed(Refused::Replayed)),
            Err(e) => {
                tracing::warn!(hook = %hook.id, error = %e, "inbound hook event cannot be claimed");
                return Err(failed(Refused::ClaimUnavailable));
            }
        }
        let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
        let relayed = self
            .send_to_destination(hook, &event_id, content_type, body)
            .await;
        if let Err(e) = self.settle_hook_event(&hook.id, &event_id, relayed).await {
            // The claim lapses by itself (`CLAIM_HOLD_SECS` on the control
            // plane): a relayed event is then remembered for less long, an
            // unrelayed one refused as a replay until then.
            tracing::warn!(hook = %hook.id, error = %e, "inbound hook claim not settled");
        }
        if relayed {
            Ok(event_id)
        } else {
            Err(failed(Refused::DestinationFailed))
        }
    }

    /// POSTs the event to the destination, same body and content type,
    /// signed with keycap's relay secret. Whether it answered 2xx.
    async fn send_to_destination(
        &self,
        hook: &HookPolicy,
        event_id: &str,
        content_type: Option<HeaderValue>,
        body: Bytes,
    ) -> bool {
        let t = Utc::now().timestamp();
        let signature = signer::signature(hook.relay_secret.as_bytes(), t, &body);
        let mut builder = Request::post(hook.destination_url.as_str())
            .header(signer::SIGNATURE_HEADER, signature)
            .header(KEYCAP_HOOK_ID, hook.id.as_str())
            .header(header::USER_AGENT, "keycap-hooks");
        if let Ok(v) = HeaderValue::from_str(event_id) {
            builder = builder.header(KEYCAP_EVENT_ID, v);
        }
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        let Ok(req) = builder.body(Full::new(body)) else {
            return false;
        };
        let sent = if hook.allow_private_destination {
            tokio::time::timeout(DESTINATION_TIMEOUT, self.vendors.private.request(req)).await
        } else {
            tokio::time::timeout(DESTINATION_TIMEOUT, self.vendors.public.request(req)).await
        };
        match sent {
            Ok(Ok(resp)) => {
                let ok = resp.status().is_success();
                if !ok {
                    tracing::warn!(hook = %hook.id, status = %resp.status(), "inbound hook destination refused the event");
                }
                ok
            }
            Ok(Err(e)) => {
                tracing::warn!(hook = %hook.id, error = %e, "inbound hook destination unreachable");
                false
            }
            Err(_) => {
                tracing::warn!(hook = %hook.id, "inbound hook destination timed out");
                false
            }
        }
    }

    async fn claim_hook_event(&self, hook_id: &str, event_id: &str) -> Result<bool, tonic::Status> {
        self.control
            .call(
                |replica| {
                    let mut client = replica.hook_client();
                    let mut r = tonic::Request::new(pb::ClaimHookEventRequest {
                        node_id: self.node_id.clone(),
                        hook_id: hook_id.to_string(),
                        event_id: event_id.to_string(),
                    });
                    r.set_timeout(CLAIM_TIMEOUT);
                    async move { Ok(client.claim_hook_event(r).await?.into_inner().claimed) }
                },
                replica_unavailable,
            )
            .await
    }

    async fn settle_hook_event(
        &self,
        hook_id: &str,
        event_id: &str,
        relayed: bool,
    ) -> Result<(), tonic::Status> {
        self.control
            .call(
                |replica| {
                    let mut client = replica.hook_client();
                    let mut r = tonic::Request::new(pb::SettleHookEventRequest {
                        node_id: self.node_id.clone(),
                        hook_id: hook_id.to_string(),
                        event_id: event_id.to_string(),
                        relayed,
                    });
                    r.set_timeout(CLAIM_TIMEOUT);
                    async move {
                        client.settle_hook_event(r).await?;
                        Ok(())
                    }
                },
                replica_unavailable,
            )
            .await
    }

    /// Reports the event for the audit: `relayed`, or `refused` with the
    /// reason; cost 0, no key. Unknown hooks are not reported.
    fn report_hook(
        &self,
        hook: &HookPolicy,
        event_id: &str,
        refused: Option<Refused>,
        at: DateTime<Utc>,
    ) {
        if refused == Some(Refused::NotFound) {
            return;
        }
        let detail = serde_json::json!({
            "hook_id": hook.id,
            "hook_event_id": keycap_proto::clip(event_id, 256),
        });
        let (outcome, reason, calls, status) = match refused {
            None => ("relayed", String::new(), 0, 200),
            Some(r) => (
                "refused",
                r.audit_reason(),
                1,
                i32::from(r.status().as_u16()),
            ),
        };
        self.spend.send(pb::SpendEvent {
            event_id: self.spend.next_event_id(),
            vendor: hook.vendor.as_str().to_string(),
            method: "POST".into(),
            path: format!("{PREFIX}{}", hook.id),
            upstream_status: status,
            outcome: outcome.into(),
            at: Some(keycap_proto::time::to_proto(at)),
            day: at.format("%Y-%m-%d").to_string(),
            detail_json: detail.to_string(),
            refusal_reason: reason,
            refused_calls: calls,
            ..Default::default()
        });
    }
}
