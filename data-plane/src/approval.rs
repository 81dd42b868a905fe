//! The approval gate in the proxy (docs/approvals.md): the request's
//! fingerprint, and the two control-plane calls that hold a call for
//! approval and use an approval for its retry.
//!
//! The fingerprint binds an approval to the one request a person approved:
//! SHA-256 over a canonical encoding of the key, method, path, query, a
//! digest of the body, the vendor's idempotency key and the headers that
//! change what the vendor does. The encoding is length-prefixed and
//! decodable (`decode` is its inverse), so two requests that differ in any
//! of those never share one. This module never decides whether a call
//! needs approval or fits a cap: the request path does, before and after.

use async_trait::async_trait;
use http::HeaderMap;
use keycap_proto::pb;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::fleet::Fleet;

/// The header an agent repeats a held call with: `Keycap-Approval: apr_...`.
/// Removed before the call is forwarded.
pub const KEYCAP_APPROVAL: http::HeaderName = http::HeaderName::from_static("keycap-approval");

/// Headers that change what a vendor does with the same body (the account
/// acted for, the API version, beta features, how the body is read), in
/// the order they are encoded. Others (user agent, tracing, an SDK's retry
/// count) differ between two sends of one request and are left out.
pub const BOUND_HEADERS: [&str; 9] = [
    "content-type",
    "stripe-account",
    "stripe-context",
    "stripe-version",
    "openai-organization",
    "openai-project",
    "anthropic-version",
    "anthropic-beta",
    "x-twilio-accountsid",
];

/// Marks the encoding's version, so a later change of what is bound never
/// matches an approval fingerprinted before it.
const TAG: &[u8] = b"keycap-approval-v1";

/// What a request's fingerprint is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canonical {
    pub key_id: String,
    pub method: String,
    pub path: String,
    /// `None` without a `?`; `Some("")` for a bare `?`.
    pub query: Option<String>,
    pub body_sha256: [u8; 32],
    pub idempotency_key: Option<String>,
    /// (name, value) of the `BOUND_HEADERS` present, in that order, each
    /// name's values in the order they came.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Canonical {
    #[allow(clippy::too_many_arguments)]
    pub fn of(
        key_id: &str,
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
        idempotency_key: Option<&str>,
    ) -> Self {
        Canonical {
            key_id: key_id.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            query: query.map(str::to_string),
            body_sha256: Sha256::digest(body).into(),
            idempotency_key: idempotency_key.map(str::to_string),
            headers: BOUND_HEADERS
                .iter()
                .flat_map(|name| {
                    headers
                        .get_all(*name)
                        .iter()
                        .map(|v| (name.to_string(), v.as_bytes().to_vec()))
                })
                .collect(),
        }
    }

    /// The canonical bytes: the tag, then each part as a big-endian u64
    /// length and its bytes; an optional part as a presence byte first;
    /// the headers as their count, then name and value of each.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        put(&mut out, TAG);
        put(&mut out, self.key_id.as_bytes());
        put(&mut out, self.method.as_bytes());
        put(&mut out, self.path.as_bytes());
        put_opt(&mut out, self.query.as_deref().map(str::as_bytes));
        put(&mut out, &self.body_sha256);
        put_opt(&mut out, self.idempotency_key.as_deref().map(str::as_bytes));
        out.extend_from_slice(&(self.headers.len() as u64).to_be_bytes());
        for (name, value) in &self.headers {
            put(&mut out, name.as_bytes());
            put(&mut out, value);
        }
        out
    }

    /// The inverse of `encode`: `None` for bytes `encode` never makes.
    /// That it exists is what makes the fingerprint injective.
    pub fn decode(mut b: &[u8]) -> Option<Canonical> {
        if take(&mut b)? != TAG {
            return None;
        }
        let text = |v: &[u8]| String::from_utf8(v.to_vec()).ok();
        let key_id = text(take(&mut b)?)?;
        let method = text(take(&mut b)?)?;
        let path = text(take(&mut b)?)?;
        let query = take_opt(&mut b)?
            .map(text)
            .map_or(Some(None), |t| t.map(Some))?;
        let body_sha256: [u8; 32] = take(&mut b)?.try_into().ok()?;
        let idempotency_key = take_opt(&mut b)?
            .map(text)
            .map_or(Some(None), |t| t.map(Some))?;
        let count = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        b = &b[8..];
        let mut headers = Vec::new();
        for _ in 0..count {
            let name = text(take(&mut b)?)?;
            let value = take(&mut b)?.to_vec();
            headers.push((name, value));
        }
        b.is_empty().then_some(Canonical {
            key_id,
            method,
            path,
            query,
            body_sha256,
            idempotency_key,
            headers,
        })
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(self.encode()).into()
    }
}

fn put(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u64).to_be_bytes());
    out.extend_from_slice(part);
}

fn put_opt(out: &mut Vec<u8>, part: Option<&[u8]>) {
    match part {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            put(out, p);
        }
    }
}

fn take<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(u64::from_be_bytes(b.get(..8)?.try_into().ok()?)).ok()?;
    let rest = &b[8..];
    let part = rest.get(..len)?;
    *b = &rest[len..];
    Some(part)
}

fn take_opt<'a>(b: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
    let (&flag, rest) = b.split_first()?;
    *b = rest;
    match flag {
        0 => Some(None),
        1 => Some(Some(take(b)?)),
        _ => None,
    }
}

/// The `Keycap-Approval` header's value, if the request has one; one that
/// is not text names no approval there is (`approval_unknown`).
pub fn presented(headers: &HeaderMap) -> Result<Option<String>, crate::error::Refusal> {
    match headers.get(KEYCAP_APPROVAL) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim().to_string())).map_err(|_| {
            crate::error::Refusal::ApprovalRefused {
                code: "approval_unknown",
                message: refusal_message("approval_unknown").into(),
                id: String::new(),
            }
        }),
    }
}

/// What a refused use of an approval tells the agent, by code.
pub fn refusal_message(code: &str) -> &'static str {
    match code {
        "approval_unknown" => "no approval with this id exists",
        "approval_pending" => "this approval has not been decided yet; retry once it is approved",
        "approval_denied" => "this approval was denied",
        "approval_expired" => "this approval expired before it was used",
        "approval_used" => "this approval was already used by a forwarded call",
        "approval_request_mismatch" => {
            "this request differs from the one approved (method, path, query, body, \
             idempotency key or a bound header); send the identical request"
        }
        "approval_key_mismatch" => "this approval belongs to another key",
        "approval_amount_exceeded" => "this call would reserve more than the amount approved",
        _ => "this approval cannot be used",
    }
}

/// The known refusal codes, as `&'static str` for `Refusal`.
pub fn refusal_code(code: &str) -> &'static str {
    const CODES: [&str; 8] = [
        "approval_unknown",
        "approval_pending",
        "approval_denied",
        "approval_expired",
        "approval_used",
        "approval_request_mismatch",
        "approval_key_mismatch",
        "approval_amount_exceeded",
    ];
    CODES
        .into_iter()
        .find(|c| *c == code)
        .unwrap_or("approval_unknown")
}

/// Where the proxy holds calls and uses approvals: the control plane; a
/// trait so tests can stand in for it.
#[async_trait]
pub trait ApprovalDesk: Send + Sync + 'static {
    async fn hold(
        &self,
        req: pb::RequestApprovalRequest,
    ) -> Result<pb::RequestApprovalResponse, Status>;
    async fn consume(
        &self,
        req: pb::ConsumeApprovalRequest,
    ) -> Result<pb::ConsumeApprovalResponse, Status>;
}

#[async_trait]
impl ApprovalDesk for Fleet {
    async fn hold(
        &self,
        req: pb::RequestApprovalRequest,
    ) -> Result<pb::RequestApprovalResponse, Status> {
        Fleet::request_approval(self, req).await
    }

    async fn consume(
        &self,
        req: pb::ConsumeApprovalRequest,
    ) -> Result<pb::ConsumeApprovalResponse, Status> {
        Fleet::consume_approval(self, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Canonical {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        h.insert("user-agent", "Stripe/v1 PythonBindings".parse().unwrap());
        Canonical::of(
            "key_a",
            "POST",
            "/v1/payment_intents",
            None,
            &h,
            b"amount=5000&currency=usd",
            Some("idem-1"),
        )
    }

    #[test]
    fn the_encoding_decodes_back_to_what_it_encodes() {
        let c = base();
        assert_eq!(Canonical::decode(&c.encode()), Some(c.clone()));
        assert_eq!(c.headers.len(), 1, "user-agent is not bound");
        let mut trailing = c.encode();
        trailing.push(0);
        assert_eq!(Canonical::decode(&trailing), None);
    }

    #[test]
    fn every_bound_part_changes_the_fingerprint() {
        let c = base();
        let variants = [
            Canonical {
                key_id: "key_b".into(),
                ..c.clone()
            },
            Canonical {
                method: "PUT".into(),
                ..c.clone()
            },
            Canonical {
                path: "/v1/payment_intent".into(),
                ..c.clone()
            },
            Canonical {
                query: Some(String::new()),
                ..c.clone()
            },
            Canonical {
                body_sha256: [0; 32],
                ..c.clone()
            },
            Canonical {
                idempotency_key: None,
                ..c.clone()
            },
            Canonical {
                headers: vec![("stripe-account".into(), b"acct_1".to_vec())],
                ..c.clone()
            },
            // A part moved across a boundary is another request.
            Canonical {
                key_id: "key_aPOST".into(),
                method: String::new(),
                ..c.clone()
            },
        ];
        for v in variants {
            assert_ne!(v.fingerprint(), c.fingerprint(), "{v:?}");
        }
    }
}
