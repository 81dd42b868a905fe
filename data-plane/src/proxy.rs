//! The request path: target, key, allowlist, price, reserve, forward,
//! settle, report. See DESIGN.md "Request path in the proxy".
//!
//! A call moves through typed phases: `Admitted` (steps 1-3) -> `Priced`
//! -> `Reserved` (holds a `budget::Held`) -> `Call` (recorded on disk and
//! forwarded) -> settled. The reservation is a guard resolved exactly
//! once: a `Reserved` call dropped before it leaves releases it; a `Call`
//! resolves it when it settles (from the response, or at the reservation
//! when dropped first) or releases it when nothing reached the vendor. A
//! call that cannot be priced or authenticated is refused before anything
//! leaves. The agent's `Authorization` never leaves; the vendor's credential
//! never reaches the agent.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keycap_proto::network::{self, IpNet};
use keycap_proto::profile::Profile;
use keycap_proto::{pb, Micros};
use serde_json::Value;
use tracing::Instrument as _;

use crate::admission::UnauthenticatedShare;
use crate::body::{self, BodyReadError, ChunkObserver, ObservedBody, ProxyBody};
use crate::budget::{Budget, Held};
use crate::client_addr;
use crate::context;
use crate::envelope::{self, Envelope};
use crate::error::Refusal;
use crate::fleet::{Replica, Replicas};
use crate::idempotency::{Begin, Guard, IdempotencyMemory};
use crate::lookup::KeyLookup;
use crate::metrics::Metrics;
use crate::policy::{KeyPolicy, KeyStanding, PolicyCache, VendorPolicy};
use crate::pricing::{
    self, Looked, Outcome, PriceRequest, PriceResponse, PricingError, Quote, QuoteKind, Settlement,
    StreamSettler,
};
use crate::ratelimit::{RateLimiter, RateStatus};
use crate::refusals::RefusalTally;
use crate::scrub::StreamScrub;
use crate::spend::SpendReporter;
use crate::target;
use crate::tightening::Tightening;
use crate::upstream::{self, PublicResolver};

pub type Connector<R = GaiResolver> = hyper_rustls::HttpsConnector<HttpConnector<R>>;
pub type HttpClient<R = GaiResolver> = Client<Connector<R>, Full<Bytes>>;

/// The clients a serving thread calls vendors with: `public` connects only
/// to public addresses (`upstream::PublicResolver`); `private` to any, for
/// vendors of a control plane run with `--allow-private-upstreams`.
pub struct VendorClients {
    pub public: HttpClient<PublicResolver>,
    pub private: HttpClient,
}

impl VendorClients {
    pub fn new(tls: rustls::ClientConfig) -> Self {
        VendorClients {
            public: http_client_with(tls.clone(), PublicResolver::new()),
            private: http_client(tls),
        }
    }

    /// Sends `req` to `vendor`'s base URL through the client its upstream
    /// policy allows.
    async fn request(
        &self,
        vendor: &VendorPolicy,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        if vendor.allow_private_upstream {
            self.private.request(req).await
        } else {
            self.public.request(req).await
        }
    }
}

/// Builds an HTTP client over `tls`: HTTP/1.1 and HTTP/2 (by ALPN) for
/// `https://` targets, plain HTTP for `http://` ones (loopback test vendors,
/// a plain control plane). Redirects are never followed (the legacy client
/// does not follow them).
pub fn http_client(tls: rustls::ClientConfig) -> HttpClient {
    http_client_with(tls, GaiResolver::new())
}

/// `http_client`, resolving names with `resolver`.
pub fn http_client_with<R>(tls: rustls::ClientConfig, resolver: R) -> HttpClient<R>
where
    R: tower::Service<Name> + Clone + Send + Sync + 'static,
    R::Response: Iterator<Item = SocketAddr>,
    R::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R::Future: Send,
{
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https)
}

pub struct Proxy {
    pub policy: Arc<PolicyCache>,
    /// Asks the control plane about keys the policy does not hold yet.
    pub lookup: Arc<KeyLookup>,
    /// Holds calls for approval and uses approvals (the control plane).
    pub approvals: Arc<dyn crate::approval::ApprovalDesk>,
    /// What `/readyz` (and `/healthz`) answer.
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<Budget>,
    pub spend: SpendReporter,
    /// Calls vendors: the system's roots plus `--upstream-ca`.
    pub vendors: VendorClients,
    /// Relays `/vault/*`: trusts `--control-ca` and presents this node's
    /// client certificate, like the fleet channel.
    pub control_client: HttpClient,
    /// The control-plane replicas, shared with the fleet client so the
    /// relay goes where fleet calls go.
    pub control: Replicas<Replica>,
    pub node_id: String,
    pub max_body_bytes: usize,
    /// How fast a request body must arrive (`--body-read-timeout-secs` and
    /// the minimum rate).
    pub body_pace: body::BodyPace,
    /// The connections requests without a credential may hold while the
    /// `/vault` relay reads their bodies.
    pub unauthenticated: UnauthenticatedShare,
    pub max_response_bytes: usize,
    pub upstream_timeout: Duration,
    /// Idempotency keys this proxy has forwarded, shared by its threads.
    pub idempotency: IdempotencyMemory,
    /// Reservation rules tightened after an overrun, shared by its threads.
    pub tightening: Tightening,
    /// The zone this proxy serves (`--zone`).
    pub zone: Option<String>,
    /// Balancers whose `X-Forwarded-For` is believed (`--trusted-proxies`).
    pub trusted_proxies: Vec<IpNet>,
    /// Per-key rate limits, shared by its threads.
    pub rate_limiter: RateLimiter,
    /// Refused calls of known keys, counted for the ledger, shared by its
    /// threads.
    pub refusals: RefusalTally,
}

/// Headers that describe one connection, not the message: never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
}

/// On every answer to a vendor call: the id of its audit entry.
const KEYCAP_CALL_ID: HeaderName = HeaderName::from_static("keycap-call-id");
/// On an answer whose cost was settled before its head left.
const KEYCAP_COST_USD: HeaderName = HeaderName::from_static("keycap-cost-usd");
const KEYCAP_REMAINING_USD: HeaderName = HeaderName::from_static("keycap-remaining-usd");

/// Where Anthropic's SDKs send the API key, and so where an agent built on
/// them sends its vault key.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The vault key an agent presented: `Authorization: Bearer <key>`, the
/// password of `Authorization: Basic base64(<anything>:<key>)` (where
/// Twilio's SDKs put the auth token), or (when there is no `Authorization`)
/// `x-api-key: <key>`. All are removed before forwarding, whichever carried
/// the key.
pub fn presented_key(h: &HeaderMap) -> Option<Cow<'_, str>> {
    if let Some(v) = h.get(header::AUTHORIZATION) {
        let (scheme, token) = v.to_str().ok()?.trim().split_once(' ')?;
        let token = token.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(Cow::Borrowed(token));
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = String::from_utf8(BASE64.decode(token).ok()?).ok()?;
        let (_user, password) = decoded.split_once(':')?;
        return Some(Cow::Owned(password.to_string()));
    }
    Some(Cow::Borrowed(h.get(X_API_KEY)?.to_str().ok()?.trim()))
}

impl Proxy {
    /// Answers one request from the TCP peer `peer`.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let now = Utc::now();
        let version = req.version();
        if let Err(refusal) = origin_form(&req) {
            self.metrics.request(refusal.code());
            return Ok(refusal.into_response(now, envelope::before_authentication));
        }
        let path = req.uri().path();
        // keycap's own API, and its OpenAPI document, are the control
        // plane's: relayed as they are.
        if path == "/vault" || path.starts_with("/vault/") || path == "/openapi.json" {
            // The control plane checks the token only once it has the
            // whole request, so the body is read first: a request without
            // even the shape of a credential may hold only its share of
            // the connections meanwhile. keycap's own API answers in its
            // flat body, like the control plane's.
            let _share = match self.unauthenticated.admit(req.headers()) {
                Ok(permit) => permit,
                Err(_) => {
                    return Ok(closing_after(
                        Refusal::UnauthenticatedBusy,
                        version,
                        now,
                        envelope::flat,
                    ))
                }
            };
            return Ok(match self.relay_admin(req).await {
                Ok(resp) => resp,
                Err(refusal) => closing_after(refusal, version, now, envelope::flat),
            });
        }
        // Inbound hooks: vendors' webhooks, verified and relayed
        // (`hooks`). They carry no credential, so they hold only the share
        // of connections such requests may.
        if path.starts_with(crate::hooks::PREFIX) {
            let _share = match self.unauthenticated.admit(req.headers()) {
                Ok(permit) => permit,
                Err(_) => {
                    return Ok(closing_after(
                        Refusal::UnauthenticatedBusy,
                        version,
                        now,
                        envelope::flat,
                    ))
                }
            };
            return Ok(self.relay_hook(req).await);
        }
        if path == "/healthz" || path == "/readyz" {
            let (status, body) = health_answer(self.readiness.check());
            let mut resp = Response::new(body::bytes(Bytes::from(body)));
            *resp.status_mut() = status;
            return Ok(resp);
        }
        if path == "/livez" {
            return Ok(Response::new(body::bytes(Bytes::from_static(
                br#"{"status":"ok"}"#,
            ))));
        }
        let mut envelope: Envelope = envelope::before_authentication;
        // The key presented, once known: a refusal of a known key is
        // counted for the ledger.
        let mut known_key: Option<Arc<KeyPolicy>> = None;
        // The id of the call's audit entry, on its answer whatever it is.
        let call_id = self.spend.next_event_id();
        let span = call_span(&req, &call_id);
        let started = Instant::now();
        let mut resp = match self
            .clone()
            .call_vendor(req, now, peer.ip(), &call_id, &mut envelope, &mut known_key)
            .instrument(span.clone())
            .await
        {
            Ok(mut resp) => {
                self.metrics.request("forwarded");
                if let Some(v) = resp.extensions_mut().remove::<VendorTime>() {
                    self.metrics.timed(&v.vendor, started.elapsed(), v.elapsed);
                }
                resp
            }
            Err(refusal) => {
                self.metrics.request(refusal.code());
                span.record("keycap.outcome", refusal.code());
                span.record("error.type", refusal.code());
                if let (Some(key), Some(reason)) = (&known_key, refusal.ledger_reason()) {
                    // Counted in the minute it is refused, not the one the
                    // call arrived in: a minute already reported is closed.
                    self.refusals
                        .record(&key.id, &key.vendor, reason, Utc::now());
                }
                closing_after(refusal, version, now, envelope)
            }
        };
        span.record("http.response.status_code", resp.status().as_u16());
        if let Ok(v) = header::HeaderValue::from_str(&call_id) {
            resp.headers_mut().insert(KEYCAP_CALL_ID, v);
        }
        Ok(resp)
    }

    /// The request path as phases: a call is admitted (steps 1-3),
    /// priced, reserved, recorded and forwarded, then settled (step 6,
    /// in `Call`). Sets `envelope` to the key's vendor's once the key is
    /// known: a refusal before that is worded the same whatever vendor the
    /// path names.
    async fn call_vendor(
        self: Arc<Self>,
        req: Request<Incoming>,
        now: DateTime<Utc>,
        peer: IpAddr,
        call_id: &str,
        envelope: &mut Envelope,
        known_key: &mut Option<Arc<KeyPolicy>>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        // This call's server span (see `call_span`); each phase is a child,
        // opened only when the call is sampled (`phase_spans`).
        let span = tracing::Span::current();
        let phases = keycap_telemetry::phase_spans(&span);
        let phase = |open: fn() -> tracing::Span| {
            if phases {
                open()
            } else {
                tracing::Span::none()
            }
        };
        let admitted = self
            .admit(req, now, peer, &span, envelope, known_key)
            .instrument(phase(|| tracing::info_span!("authenticate")))
            .await?;
        let rate = admitted.rate;
        let priced = self
            .price(admitted, call_id, span, now)
            .instrument(phase(|| tracing::info_span!("price")))
            .await?;
        let reserved = priced
            .reserve_gated()
            .instrument(phase(|| tracing::info_span!("reserve")))
            .await?;
        let (call, up) = reserved.record()?;
        let forward = if phases {
            tracing::info_span!(
                "forward",
                otel.kind = "client",
                http.request.method = %up.method(),
                server.address = up.uri().host().unwrap_or_default(),
                http.response.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let mut resp = call.forward(up).instrument(forward).await?;
        if let Some(rate) = rate {
            rate.insert_headers(resp.headers_mut());
        }
        Ok(resp)
    }

    /// Steps 1-3: the target, the key, its authorisation and rate, and the
    /// body, read once. Sets `envelope` as `call_vendor` says.
    async fn admit(
        &self,
        req: Request<Incoming>,
        now: DateTime<Utc>,
        peer: IpAddr,
        call: &tracing::Span,
        envelope: &mut Envelope,
        known_key: &mut Option<Arc<KeyPolicy>>,
    ) -> Result<Admitted, Refusal> {
        let raw_target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let target =
            target::normalize(raw_target).map_err(|e| Refusal::InvalidTarget(e.to_string()))?;
        if !self.policy.is_ready() {
            return Err(Refusal::PolicyUnavailable);
        }
        // The key is checked before the vendor is named in an error, so a
        // caller without a key cannot probe which vendors exist.
        let presented = presented_key(req.headers());
        let known = {
            let policy = self.policy.load();
            match presented
                .as_deref()
                .map_or(KeyStanding::Unknown, |k| policy.key_standing(k, now))
            {
                KeyStanding::Unknown => None,
                KeyStanding::Revoked(k) | KeyStanding::Expired(k) | KeyStanding::Active(k) => {
                    Some(k.clone())
                }
            }
        };
        let key = match (known, presented.as_deref()) {
            (Some(k), _) => k,
            // Minted a moment ago through a replica this proxy's stream
            // has not caught up with: ask once.
            (None, Some(p)) => self.lookup.find(p).await.ok_or(Refusal::InvalidKey)?,
            (None, None) => return Err(Refusal::InvalidKey),
        };
        drop(presented);
        *known_key = Some(key.clone());
        call.record("keycap.key_id", key.id.as_str());
        call.record("keycap.run_label", key.agent_run_label.as_str());
        let policy = self.policy.load();
        if let Some(profile) = policy
            .vendors
            .get(&key.vendor)
            .and_then(|v| Profile::parse(&v.profile))
        {
            *envelope = pricing::envelope_for(profile);
        }
        // A revoked or expired key learns nothing of which vendors exist
        // either: it is refused before the path's vendor is looked up.
        if key.revoked {
            return Err(Refusal::KeyRevoked);
        }
        if key.expires_at <= now {
            return Err(Refusal::KeyExpired);
        }
        let vendor = policy
            .vendors
            .get(&target.vendor)
            .cloned()
            .ok_or_else(|| Refusal::UnknownVendor(target.vendor.clone()))?;
        drop(policy);
        let route = format!("/{}/*", vendor.name);
        call.record("keycap.vendor", vendor.name.as_str());
        keycap_telemetry::rename(call, format!("{} {route}", req.method()));
        call.record("http.route", route);
        self.check_network(&key, peer, req.headers())?;
        if key.vendor != vendor.name {
            return Err(Refusal::EndpointNotAllowed(format!(
                "this key is for vendor {:?}, not {:?}",
                key.vendor, vendor.name
            )));
        }
        let method = req.method().as_str().to_string();
        let mut would_refuse = None;
        if !key.endpoints.allows(&method, &target.path) {
            observe(
                &key,
                &mut would_refuse,
                Refusal::EndpointNotAllowed(format!(
                    "{method} {} is not in this key's allowed endpoints",
                    target.path
                )),
            )?;
        }
        // Last of the authorisation checks, so a call refused by one of
        // them does not use up the key's rate; one refused later (body,
        // price, cap) has used it.
        let rate = match self.check_rate(&key) {
            Ok(rate) => rate,
            Err(r) => {
                observe(&key, &mut would_refuse, r)?;
                None
            }
        };
        let agent_context = context::read(req.headers())?;
        let approval_id = crate::approval::presented(req.headers())?;
        // The call's own trace when traces are exported; else the agent's.
        let trace_id =
            keycap_telemetry::trace_id(call).or_else(|| context::trace_id(req.headers()));

        // One reading of the body, the vendor's and pricing's alike.
        crate::body_headers::check(req.headers())
            .map_err(|e| Refusal::AmbiguousRequest(e.to_string()))?;
        let (parts, incoming) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(Refusal::BodyTooLarge(self.max_body_bytes));
        }
        let body = self.read_body(incoming).await?;

        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        headers.remove(header::AUTHORIZATION);
        headers.remove(X_API_KEY);
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(context::KEYCAP_CONTEXT);
        // keycap's own: the vendor never sees which approval a call used.
        headers.remove(crate::approval::KEYCAP_APPROVAL);
        // The agent's trace stays keycap's unless the vendor is set to be
        // told of it (`forward_trace_context`).
        if !vendor.forward_trace_context {
            headers.remove(context::TRACEPARENT);
            headers.remove(context::TRACESTATE);
        }
        Ok(Admitted {
            key,
            vendor,
            target,
            method: parts.method,
            headers,
            body,
            rate,
            agent_context,
            trace_id,
            approval_id,
            would_refuse,
        })
    }

    /// Step 4a: the call's price, its idempotency, its per-call cap, and
    /// the request that will leave.
    async fn price(
        self: &Arc<Self>,
        admitted: Admitted,
        call_id: &str,
        span: tracing::Span,
        now: DateTime<Utc>,
    ) -> Result<Priced, Refusal> {
        let Admitted {
            key,
            vendor,
            target,
            method: http_method,
            mut headers,
            body,
            rate: _,
            agent_context,
            trace_id,
            approval_id,
            mut would_refuse,
        } = admitted;
        let method = http_method.as_str().to_string();
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let price_request = PriceRequest {
            method: &method,
            path: &target.path,
            query: target.query.as_deref(),
            content_type,
            headers: &headers,
            body: &body,
        };
        let unpriceable = |e: PricingError| Refusal::Unpriceable {
            code: e.code(),
            message: e.to_string(),
        };
        vendor
            .pricing
            .check_write_query(&price_request)
            .map_err(unpriceable)?;
        let paths = vendor
            .pricing
            .lookups(&price_request)
            .map_err(unpriceable)?;
        let looked = self.look_up(&vendor, &headers, paths).await?;
        let mut quote = vendor
            .pricing
            .quote_with(&price_request, &looked)
            .map_err(unpriceable)?;
        let rule = vendor.pricing.rule_of(&price_request);
        let quoted = quote.reserve;
        if tightens(&quote.kind) {
            let reserve = self.tightening.apply(&vendor.name, &rule, quoted);
            if reserve > quoted {
                // An earlier call under this rule cost more than it quoted.
                quote.detail["tightened_from_micros"] = quoted.0.into();
                quote.reserve = reserve;
            }
        }
        // Every response is read for the credential (and a priced one to
        // settle it): the vendor must not compress it. The agent gets it
        // uncompressed.
        headers.insert(
            header::ACCEPT_ENCODING,
            header::HeaderValue::from_static("identity"),
        );
        let mut idempotency = None;
        let mut rides_on = None;
        if quote.kind != QuoteKind::Free {
            if let Some(k) = vendor.pricing.idempotency_key(&headers) {
                // The vendor replays only the same request under the same
                // key (and account): anything else is a new call.
                let same = request_fingerprint(&method, &target, &headers, &body);
                match self
                    .idempotency
                    .begin(&key.id, &format!("{k}\n{same}"), now)
                {
                    Begin::New(guard) => idempotency = Some(guard),
                    Begin::InFlight => return Err(Refusal::IdempotentRequestInFlight),
                    Begin::Counted(original) => {
                        // The first request was counted: the vendor
                        // answers a repeat with its saved response, or (if
                        // the first never reached it) executes this one
                        // instead. Either way the charge is already counted.
                        quote.reserve = Micros::ZERO;
                        quote.detail["idempotent_retry"] = true.into();
                        rides_on = Some(original);
                    }
                }
            }
        }
        if let Some(cap) = key.per_call_cap {
            if quote.reserve > cap {
                observe(
                    &key,
                    &mut would_refuse,
                    Refusal::PerCallCapExceeded {
                        cost: quote.reserve,
                        cap,
                    },
                )?;
            }
        }
        // Before the credential goes in and the body is rewritten: what
        // the agent sent is what a person approves.
        let gate = (approval_id.is_some() || key.approval_above.is_some()).then(|| {
            let canonical = crate::approval::Canonical::of(
                &key.id,
                &method,
                &target.path,
                target.query.as_deref(),
                &headers,
                &body,
                vendor.pricing.idempotency_key(&headers),
            );
            Gate {
                fingerprint: canonical.fingerprint(),
                presented: approval_id,
            }
        });
        headers.insert(vendor.credential_header.clone(), vendor.credential.clone());
        let uri = target::join(&vendor.base_url, &target)
            .parse()
            .map_err(|_| Refusal::InvalidTarget("target is not a valid URL".into()))?;
        let body = quote.forward_body.take().unwrap_or(body);
        let mut up = Request::new(Full::new(body));
        *up.method_mut() = http_method;
        *up.headers_mut() = headers;
        *up.uri_mut() = uri;
        Ok(Priced {
            ticket: Ticket {
                proxy: self.clone(),
                key,
                vendor,
                method,
                path: target.path,
                quote,
                event_id: call_id.to_string(),
                span,
                trace_id,
                agent_context,
                idempotency,
                rides_on,
                rule,
                quoted,
                at: now,
                would_refuse,
            },
            up,
            gate,
        })
    }

    /// Step 3's network checks: the key's zone is this proxy's, and the
    /// client's address is in the key's networks.
    fn check_network(
        &self,
        key: &KeyPolicy,
        peer: IpAddr,
        headers: &HeaderMap,
    ) -> Result<(), Refusal> {
        if let Some(zone) = &key.zone {
            if self.zone.as_ref() != Some(zone) {
                let here = match &self.zone {
                    Some(z) => format!("zone {z:?}"),
                    None => "no zone".to_string(),
                };
                return Err(Refusal::ZoneMismatch(format!(
                    "this key is bound to zone {zone:?}; this proxy serves {here}"
                )));
            }
        }
        if !key.allowed_cidrs.is_empty() {
            let client = client_addr::client_ip(peer, headers, &self.trusted_proxies);
            if !network::contains(&key.allowed_cidrs, client) {
                return Err(Refusal::IpNotAllowed(client));
            }
        }
        Ok(())
    }

    /// Step 3's rate check: counts the call against the key's limit, if it
    /// has one.
    fn check_rate(&self, key: &KeyPolicy) -> Result<Option<RateStatus>, Refusal> {
        let Some(per_minute) = key.rate_limit_per_minute else {
            return Ok(None);
        };
        self.rate_limiter
            .check(&key.id, per_minute, Instant::now())
            .map(Some)
            .map_err(Refusal::RateLimited)
    }

    /// Reads the vendor objects a request's price depends on (`GET`, with
    /// the vendor's credential and the agent's other headers, such as the
    /// account it acts for). A lookup the vendor refuses is handed to
    /// pricing, which refuses the call with the status.
    async fn look_up(
        &self,
        vendor: &VendorPolicy,
        headers: &HeaderMap,
        paths: Vec<String>,
    ) -> Result<Vec<Looked>, Refusal> {
        let mut looked = Vec::with_capacity(paths.len());
        for path in paths {
            let mut h = headers.clone();
            h.remove(header::CONTENT_TYPE);
            h.remove(header::ACCEPT_ENCODING);
            h.remove("idempotency-key");
            h.insert(vendor.credential_header.clone(), vendor.credential.clone());
            let mut get = Request::new(Full::new(Bytes::new()));
            *get.headers_mut() = h;
            *get.uri_mut() = format!("{}{}", vendor.base_url, path)
                .parse()
                .map_err(|_| Refusal::Internal)?;
            let resp =
                tokio::time::timeout(self.upstream_timeout, self.vendors.request(vendor, get))
                    .await
                    .map_err(|_| Refusal::UpstreamTimeout)?
                    .map_err(|e| {
                        tracing::warn!(vendor = %vendor.name, error = %e, "vendor unreachable for a price lookup");
                        if upstream::is_address_refused(&e) {
                            Refusal::UpstreamAddressRefused
                        } else {
                            Refusal::UpstreamUnreachable
                        }
                    })?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), self.max_response_bytes)
                .collect()
                .await
                .map_err(|_| Refusal::ResponseTooLarge)?
                .to_bytes();
            looked.push(Looked { path, status, body });
        }
        Ok(looked)
    }

    /// The whole request body, at most `max_body_bytes` of it, arriving at
    /// `body_pace`. Only a body over the limit is "too large"; one cut
    /// short or badly chunked is the client's malformed request; one too
    /// slow is cut off, and whatever it sent is dropped.
    async fn read_body(&self, incoming: Incoming) -> Result<Bytes, Refusal> {
        match body::read_paced(incoming, self.max_body_bytes, self.body_pace).await {
            Ok(bytes) => Ok(bytes),
            Err(BodyReadError::TooLarge) => Err(Refusal::BodyTooLarge(self.max_body_bytes)),
            Err(BodyReadError::TooSlow) => Err(Refusal::BodyTimeout),
            Err(BodyReadError::Unreadable(e)) => {
                tracing::debug!(error = %e, "request body unreadable");
                Err(Refusal::BodyUnreadable)
            }
        }
    }

    /// Relays `/vault/*` to the control plane's REST API unchanged (the
    /// admin token travels with it), so a scenario needs one base URL.
    async fn relay_admin(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, Refusal> {
        let (parts, incoming) = req.into_parts();
        let body = self.read_body(incoming).await?;
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        headers.remove(header::CONTENT_LENGTH);
        // Only a replica that could not be connected to is skipped: the
        // call never left, so sending it to the next one cannot apply it
        // twice. Any later failure is the agent's to retry.
        let resp = self
            .control
            .call(
                |replica| {
                    let mut up = Request::new(Full::new(body.clone()));
                    *up.method_mut() = parts.method.clone();
                    *up.headers_mut() = headers.clone();
                    self.relay_to(replica, pq, up)
                },
                |f| matches!(f, RelayFailure::NotConnected),
            )
            .await
            .map_err(|f| match f {
                RelayFailure::NotConnected => Refusal::UpstreamUnreachable,
                RelayFailure::Refused(r) => r,
            })?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed_unsync(),
        ))
    }
}

impl Proxy {
    /// Sends one relayed admin call to `replica`, at `path_and_query`.
    async fn relay_to(
        &self,
        replica: Replica,
        path_and_query: &str,
        mut up: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, RelayFailure> {
        *up.uri_mut() = format!("{}{}", replica.url.trim_end_matches('/'), path_and_query)
            .parse()
            .map_err(|_| {
                RelayFailure::Refused(Refusal::InvalidTarget("target is not a valid URL".into()))
            })?;
        match tokio::time::timeout(self.upstream_timeout, self.control_client.request(up)).await {
            Err(_) => Err(RelayFailure::Refused(Refusal::UpstreamTimeout)),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                tracing::warn!(replica = %replica.url, error = %e, "control plane unreachable for admin relay");
                Err(if e.is_connect() {
                    RelayFailure::NotConnected
                } else {
                    RelayFailure::Refused(Refusal::UpstreamUnreachable)
                })
            }
        }
    }
}

/// Why relaying an admin call to one replica failed.
enum RelayFailure {
    /// No connection to the replica: the call was never sent.
    NotConnected,
    Refused(Refusal),
}

/// The server span of one vendor call, continuing the agent's W3C trace.
/// Its attributes follow the OpenTelemetry HTTP conventions, with the
/// route template (`/{vendor}/*`), never the raw path or query, and
/// keycap's own; the key's secret and the agent's headers never go in.
fn call_span<B>(req: &Request<B>, call_id: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "proxy call",
        otel.name = %format_args!("{} /{{vendor}}/*", req.method()),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %req.method(),
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        network.protocol.version = match req.version() {
            http::Version::HTTP_10 => "1.0",
            http::Version::HTTP_2 => "2",
            _ => "1.1",
        },
        url.scheme = "http",
        error.type = tracing::field::Empty,
        keycap.call_id = call_id,
        keycap.vendor = tracing::field::Empty,
        keycap.key_id = tracing::field::Empty,
        keycap.run_label = tracing::field::Empty,
        keycap.cost_usd = tracing::field::Empty,
        keycap.outcome = tracing::field::Empty,
    );
    keycap_telemetry::continue_trace(&span, req.headers());
    span
}

/// What `/readyz` looks at, on the agents' listener and the metrics one.
#[derive(Clone)]
pub struct Readiness {
    pub policy: Arc<PolicyCache>,
    /// Set once what a previous run left in the spool is delivered and its
    /// leases handed back.
    pub previous_run_settled: tokio::sync::watch::Receiver<bool>,
    /// Whether a control-plane replica's policy stream is open.
    pub control_plane_connected: Arc<dyn Fn() -> bool + Send + Sync>,
    pub budget: Arc<Budget>,
}

impl Readiness {
    /// Whether the proxy can serve calls: it has its policy, what a
    /// previous run left in the spool is delivered (its leases handed
    /// back), and it can get budget: a control plane answers, or its
    /// leases still hold some to serve from. The reason when not.
    pub fn check(&self) -> Result<(), &'static str> {
        readiness(
            self.policy.is_ready(),
            *self.previous_run_settled.borrow(),
            (self.control_plane_connected)(),
            || self.budget.held(Utc::now()).can_serve(),
        )
    }
}

/// `Readiness::check` on its facts; `leases_can_serve` is asked only when
/// no control plane answers.
pub fn readiness(
    policy_loaded: bool,
    previous_run_settled: bool,
    control_plane_connected: bool,
    leases_can_serve: impl FnOnce() -> bool,
) -> Result<(), &'static str> {
    if !policy_loaded {
        return Err("waiting_for_policy");
    }
    if !previous_run_settled {
        return Err("settling_previous_run");
    }
    if !control_plane_connected && !leases_can_serve() {
        return Err("control_plane_unreachable");
    }
    Ok(())
}

/// `/readyz` (and `/healthz`): 200 `{"status":"ok"}`, or 503 with the
/// reason as the status.
pub fn health_answer(ready: Result<(), &'static str>) -> (StatusCode, String) {
    match ready {
        Ok(()) => (StatusCode::OK, r#"{"status":"ok"}"#.to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(r#"{{"status":"{why}"}}"#),
        ),
    }
}

/// Checks that a request's target is in origin form (`/path?query`), the
/// only form a call may take. HTTP/1.1's absolute and authority forms are
/// refused. An HTTP/2 request always names `:scheme` and `:authority`
/// beside `:path`, and hyper puts them in its URI: that is origin form,
/// since only `:path` is ever read (the vendor's base URL alone decides
/// where a call goes, as it does whatever `Host` says), but a `CONNECT`
/// without `:path`, or an authority with userinfo (RFC 9113 forbids it),
/// is refused like its HTTP/1.1 form.
fn origin_form<B>(req: &Request<B>) -> Result<(), Refusal> {
    let uri = req.uri();
    let refused = match req.version() {
        http::Version::HTTP_2 => {
            uri.path_and_query().is_none()
                || uri.authority().is_some_and(|a| a.as_str().contains('@'))
        }
        _ => uri.scheme().is_some() || uri.authority().is_some(),
    };
    if refused {
        return Err(Refusal::InvalidTarget(
            "absolute-form and authority-form request targets are not accepted".into(),
        ));
    }
    Ok(())
}

/// The response for `refusal`. A refusal that leaves the request body
/// unread (too slow, or never read) ends an HTTP/1 connection: the rest of
/// the body is not waited for.
fn closing_after(
    refusal: Refusal,
    version: http::Version,
    now: DateTime<Utc>,
    envelope: Envelope,
) -> Response<ProxyBody> {
    let unread = matches!(refusal, Refusal::BodyTimeout | Refusal::UnauthenticatedBusy);
    let mut resp = refusal.into_response(now, envelope);
    if unread && version < http::Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    resp
}

/// A digest of what makes two requests the same call: method, path, query,
/// the account acted for (every `Stripe-Account` and `Stripe-Context`
/// value: the vendor keeps idempotency keys per account) and body.
fn request_fingerprint(
    method: &str,
    target: &target::Target,
    headers: &HeaderMap,
    body: &[u8],
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let accounts = ["stripe-account", "stripe-context"]
        .into_iter()
        .flat_map(|name| headers.get_all(name).iter().map(|v| v.as_bytes()));
    let parts = [
        method.as_bytes(),
        target.path.as_bytes(),
        target.query.as_deref().unwrap_or("").as_bytes(),
    ];
    for part in parts.into_iter().chain(accounts) {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    // Ends the header parts, so a body cannot pass for one.
    h.update(u64::MAX.to_be_bytes());
    h.update(body);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether an overrun under this kind of quote tightens its rule: not for
/// free calls, and not for Stripe, whose quote is the exact amount the
/// request states (an overrun there means the object changed, not that
/// the rule under-estimates).
fn tightens(kind: &QuoteKind) -> bool {
    !matches!(kind, QuoteKind::Free | QuoteKind::Stripe { .. })
}

/// A call past step 3: its key and vendor known, the call authorised and
/// counted against the key's rate, its body read. Nothing is reserved.
struct Admitted {
    key: Arc<KeyPolicy>,
    vendor: Arc<VendorPolicy>,
    target: target::Target,
    method: http::Method,
    /// The agent's headers, its credential and hop-by-hop headers removed.
    headers: HeaderMap,
    body: Bytes,
    rate: Option<RateStatus>,
    /// The validated `Keycap-Context` (removed from `headers`).
    agent_context: HashMap<String, String>,
    /// The agent's W3C trace id, when it sent one.
    trace_id: Option<String>,
    /// The `Keycap-Approval` it sent (removed from `headers`).
    approval_id: Option<String>,
    /// For a key in observe mode: the refusal enforcement would have
    /// answered so far (`observe`).
    would_refuse: Option<&'static str>,
}

/// A priced call: what its spend event will say, and the request that
/// will leave, carrying the vendor's credential. Nothing is reserved.
struct Priced {
    ticket: Ticket,
    up: Request<Full<Bytes>>,
    /// Set when the key has an approval threshold or the agent presented
    /// an approval.
    gate: Option<Gate>,
}

/// What the approval gate needs of a priced call.
struct Gate {
    fingerprint: [u8; 32],
    /// The `Keycap-Approval` the agent sent, if any.
    presented: Option<String>,
}

/// What a call is from its price on: everything its spend event says.
struct Ticket {
    proxy: Arc<Proxy>,
    key: Arc<KeyPolicy>,
    vendor: Arc<VendorPolicy>,
    method: String,
    path: String,
    quote: Quote,
    /// The id its spend event carries, from its reservation record on:
    /// the call's `Keycap-Call-Id`.
    event_id: String,
    /// The call's server span, open until the call settles.
    span: tracing::Span,
    trace_id: Option<String>,
    agent_context: HashMap<String, String>,
    /// Set when the request carried an idempotency key seen for the first
    /// time: told how the call ended.
    idempotency: Option<Guard>,
    /// Set for a retry of a call already counted: what the original
    /// counted, which this call's cost is counted beyond.
    rides_on: Option<Micros>,
    /// The reservation rule the call was priced by, and what the rule
    /// quoted before any tightening.
    rule: String,
    quoted: Micros,
    at: DateTime<Utc>,
    /// For a key in observe mode: the refusal code enforcement would have
    /// answered with, which its spend event carries.
    would_refuse: Option<&'static str>,
}

impl Priced {
    /// Step 4b: reserves the quote against the key and its ancestors.
    async fn reserve(self) -> Result<Reserved, Refusal> {
        let t = &self.ticket;
        let held = t.proxy.budget.hold(&t.key, t.quote.reserve, t.at).await?;
        Ok(Reserved {
            ticket: self.ticket,
            up: self.up,
            held,
        })
    }

    /// Step 4b with the approval gate (docs/approvals.md). A call that
    /// presents an approval is reserved like any other (it must fit every
    /// cap) and then uses the approval; one above its key's threshold
    /// without one is held for a person and refused, nothing reserved.
    async fn reserve_gated(mut self) -> Result<Reserved, Refusal> {
        let Some(gate) = self.gate.take() else {
            return self.reserve().await;
        };
        match gate.presented {
            Some(id) => {
                let mut reserved = self.reserve().await?;
                // Dropped on a refusal, `reserved` releases its
                // reservation: nothing left.
                reserved.use_approval(&id, &gate.fingerprint).await?;
                Ok(reserved)
            }
            None => match self.ticket.key.approval_above {
                Some(threshold) if self.ticket.quote.reserve > threshold => {
                    Err(self.hold_for_approval(threshold, gate.fingerprint).await)
                }
                _ => self.reserve().await,
            },
        }
    }

    /// Asks the control plane to hold this call for approval; the refusal
    /// carries the approval's id, quote, expiry and where to decide it.
    async fn hold_for_approval(self, threshold: Micros, fingerprint: [u8; 32]) -> Refusal {
        let t = &self.ticket;
        let path = match self.up.uri().query() {
            Some(q) => format!("{}?{q}", t.path),
            None => t.path.clone(),
        };
        let asked = t
            .proxy
            .approvals
            .hold(pb::RequestApprovalRequest {
                node_id: t.proxy.node_id.clone(),
                key_id: t.key.id.clone(),
                method: t.method.clone(),
                path,
                fingerprint: fingerprint.to_vec(),
                quote_micros: t.quote.reserve.0,
            })
            .await;
        match asked {
            Ok(a) => Refusal::ApprovalRequired {
                id: a.approval_id,
                quote: t.quote.reserve,
                threshold,
                expires_at: a
                    .expires_at
                    .as_ref()
                    .and_then(keycap_proto::time::from_proto)
                    .unwrap_or(t.at),
                url: a.approval_url,
            },
            Err(e) => {
                tracing::warn!(code = ?e.code(), error = %e.message(), "cannot hold a call for approval");
                Refusal::ApprovalUnavailable
            }
        }
    }
}

/// A call whose cost is reserved but that has not left: dropped, its
/// reservation is released, since the vendor cannot have charged.
struct Reserved {
    ticket: Ticket,
    up: Request<Full<Bytes>>,
    held: Held,
}

impl Reserved {
    /// Uses approval `id` for this call, through the control plane, before
    /// anything leaves: of every retry carrying it, on any proxy, only the
    /// one whose use the database accepts goes on. The approval's decision
    /// goes into the call's audit detail.
    async fn use_approval(&mut self, id: &str, fingerprint: &[u8; 32]) -> Result<(), Refusal> {
        let t = &self.ticket;
        let answer = t
            .proxy
            .approvals
            .consume(pb::ConsumeApprovalRequest {
                node_id: t.proxy.node_id.clone(),
                approval_id: id.to_string(),
                key_id: t.key.id.clone(),
                fingerprint: fingerprint.to_vec(),
                amount_micros: self.held.amount().0,
                event_id: t.event_id.clone(),
            })
            .await
            .map_err(|e| {
                tracing::warn!(code = ?e.code(), error = %e.message(), "cannot use an approval");
                Refusal::ApprovalUnavailable
            })?;
        if !answer.refusal.is_empty() {
            let code = crate::approval::refusal_code(&answer.refusal);
            return Err(Refusal::ApprovalRefused {
                code,
                message: crate::approval::refusal_message(code).to_string(),
                id: id.to_string(),
            });
        }
        self.ticket.quote.detail["approval"] = serde_json::json!({
            "id": id,
            "decided_by": answer.decided_by,
            "reason": answer.reason,
        });
        Ok(())
    }

    /// Puts the call's reservation record on disk, so a proxy killed while
    /// the vendor answers still reports the call, at its reservation, when
    /// it restarts; from then on the call may leave.
    fn record(self) -> Result<(Call, Request<Full<Bytes>>), Refusal> {
        let at_reservation = self.ticket.event(
            0,
            self.ticket.at_reservation(),
            self.held.lease_id().to_string(),
            self.held.day().to_string(),
            self.held.amount(),
        );
        if let Err(e) = self.ticket.proxy.spend.reserve(&at_reservation) {
            tracing::error!(error = %e, "spend spool not writable; call refused");
            return Err(Refusal::SpendNotRecorded);
        }
        let call = Call {
            ticket: self.ticket,
            held: Some(self.held),
        };
        Ok((call, self.up))
    }
}

/// How long a forwarded call waited on its vendor, carried from `Call` to
/// `handle` in the response's extensions, so keycap's own time is told
/// apart from the vendor's.
#[derive(Clone)]
struct VendorTime {
    vendor: String,
    elapsed: Duration,
}

/// A forwarded call, on its way to the vendor or back, until it settles:
/// its reservation resolves exactly once, in `settle` (or `unsent`, when
/// nothing reached the vendor); dropped before that, it settles at its
/// reservation.
struct Call {
    ticket: Ticket,
    held: Option<Held>,
}

impl Call {
    async fn forward(
        mut self,
        mut up: Request<Full<Bytes>>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        if self.vendor.forward_trace_context {
            // The vendor's spans continue this `forward` span when it is
            // traced; otherwise the agent's own context goes on as it came.
            keycap_telemetry::inject_http(&tracing::Span::current(), up.headers_mut());
        }
        let sent_at = Instant::now();
        let sent = tokio::time::timeout(
            self.proxy.upstream_timeout,
            self.proxy.vendors.request(&self.vendor, up),
        )
        .await;
        let resp = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.is_connect() => {
                // Nothing reached the vendor: release.
                tracing::warn!(vendor = %self.vendor.name, error = %e, "vendor unreachable");
                self.unsent();
                return Err(if upstream::is_address_refused(&e) {
                    Refusal::UpstreamAddressRefused
                } else {
                    Refusal::UpstreamUnreachable
                });
            }
            Ok(Err(e)) => {
                // The request may have reached the vendor: its cost is
                // unknown, so it settles at the reservation.
                tracing::warn!(vendor = %self.vendor.name, error = %e, "vendor connection failed mid-call");
                self.settle(0, self.at_reservation());
                return Err(Refusal::UpstreamUnreachable);
            }
            Err(_) => {
                self.settle(0, self.at_reservation());
                return Err(Refusal::UpstreamTimeout);
            }
        };
        let (mut parts, incoming) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let status = parts.status.as_u16();
        tracing::Span::current().record("http.response.status_code", status);
        self.proxy.metrics.upstream(&self.vendor.name, status);
        let vendor_time = |elapsed| VendorTime {
            vendor: self.vendor.name.clone(),
            elapsed,
        };
        parts.extensions.insert(vendor_time(sent_at.elapsed()));
        // No response carries the credential: masked in headers here and in
        // the body on each path below.
        self.vendor.scrub.headers(&mut parts.headers);
        let bodiless = self.method == "HEAD" || matches!(status, 204 | 304);
        if !bodiless && is_encoded(&parts.headers) {
            // Asked for identity and answered compressed: it cannot be
            // checked for the credential, so the agent does not get it. A
            // priced call may have been billed: settled at its reservation.
            tracing::warn!(vendor = %self.vendor.name, "vendor answered with a content encoding; refused");
            let settlement = if self.quote.kind == QuoteKind::Free {
                Settlement {
                    cost: Micros::ZERO,
                    outcome: Outcome::Released,
                    detail: Value::Null,
                }
            } else {
                self.at_reservation()
            };
            self.settle(status, settlement);
            return Err(Refusal::UpstreamResponseEncoded);
        }
        let is_sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));

        if self.quote.streaming && is_sse && parts.status.is_success() {
            let settler = self
                .vendor
                .pricing
                .stream_settler_for(&self.quote, &parts.headers);
            let observer = StreamObserver {
                settler: Some(settler),
                scrub: StreamScrub::new(self.vendor.scrub.clone()),
                call: Some(self),
                status,
            };
            // The settler may hold back part of the stream.
            parts.headers.remove(header::CONTENT_LENGTH);
            let body = ObservedBody::new(incoming, Box::new(observer));
            return Ok(Response::from_parts(parts, body.boxed_unsync()));
        }
        if self.quote.kind == QuoteKind::Free {
            // A free call: nothing to price from the response, so it streams
            // through unbuffered.
            let outcome = if parts.status.is_success() {
                Outcome::Settled
            } else {
                Outcome::Released
            };
            let cost = self.settle(
                status,
                Settlement {
                    cost: Micros::ZERO,
                    outcome,
                    detail: Value::Null,
                },
            );
            self.cost_headers(cost, &mut parts.headers);
            let scrub = StreamScrub::new(self.vendor.scrub.clone());
            let body = ObservedBody::new(incoming, Box::new(scrub));
            return Ok(Response::from_parts(parts, body.boxed_unsync()));
        }
        let max = self.proxy.max_response_bytes;
        match Limited::new(incoming, max).collect().await {
            Ok(collected) => {
                // The vendor's time includes sending the body keycap waited for.
                parts.extensions.insert(vendor_time(sent_at.elapsed()));
                let bytes = collected.to_bytes();
                let settlement = self.vendor.pricing.settle_response(
                    &self.quote,
                    &PriceResponse {
                        status,
                        headers: &parts.headers,
                        body: &bytes,
                    },
                );
                let cost = self.settle(status, settlement);
                self.cost_headers(cost, &mut parts.headers);
                parts.headers.remove(header::CONTENT_LENGTH);
                let bytes = self.vendor.scrub.bytes(bytes);
                Ok(Response::from_parts(parts, body::bytes(bytes)))
            }
            Err(e) => {
                tracing::warn!(vendor = %self.vendor.name, error = %e, "vendor response unreadable or too large");
                self.settle(status, self.at_reservation());
                Err(Refusal::ResponseTooLarge)
            }
        }
    }

    fn at_reservation(&self) -> Settlement {
        self.ticket.at_reservation()
    }

    /// Nothing reached the vendor: the reservation is released, and its
    /// record must not be reported after a restart.
    fn unsent(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        held.resolve(Micros::ZERO);
        self.ticket
            .span
            .record("keycap.outcome", Outcome::Released.as_str());
        self.proxy.spend.never_sent(&self.ticket.event_id);
    }

    /// Step 6: resolves the reservation and reports the spend event. Runs
    /// once.
    fn settle(&mut self, status: u16, mut s: Settlement) -> Option<Micros> {
        let held = self.held.take()?;
        let t = &mut self.ticket;
        let _settle = keycap_telemetry::phase_spans(&t.span)
            .then(|| tracing::info_span!(parent: &t.span, "settle").entered());
        let reserved = held.amount();
        if let Some(original) = t.rides_on {
            // Whether the vendor replayed the original or executed this
            // retry in its place, it charged for one call, already counted.
            s.cost = s.cost.saturating_sub(original).max(Micros::ZERO);
            if s.cost <= reserved {
                if let Value::Object(d) = &mut s.detail {
                    d.remove("exceeded_reservation");
                }
            }
        }
        let lease_id = held.lease_id().to_string();
        let day = held.day().to_string();
        held.resolve(s.cost);
        if s.cost > reserved
            && tightens(&t.quote.kind)
            && t.proxy
                .tightening
                .record(&t.vendor.name, &t.rule, t.quoted, s.cost)
        {
            tracing::warn!(
                vendor = %t.vendor.name,
                rule = %t.rule,
                reserved = reserved.0,
                cost = s.cost.0,
                "a call cost more than was reserved; later reservations under this rule are raised"
            );
        }
        if let Some(guard) = t.idempotency.take() {
            // A call counted at its reservation (its outcome unknown) may
            // have been charged: its retry rides on that count too.
            let counted = s.outcome != Outcome::Released && s.cost > Micros::ZERO;
            guard.done(counted.then_some(s.cost));
        }
        t.proxy.metrics.settled(&t.vendor.name, s.cost.0);
        let cost = s.cost;
        t.span.record("keycap.cost_usd", cost.to_string());
        t.span.record("keycap.outcome", s.outcome.as_str());
        tracing::debug!(cost_usd = %cost, outcome = s.outcome.as_str(), "call settled");
        let event = t.event(status, s, lease_id, day, reserved);
        t.proxy.spend.send(event);
        Some(cost)
    }

    /// `Keycap-Cost-USD` (what the call was counted at) and
    /// `Keycap-Remaining-USD` (what the key has left as this proxy knows
    /// it, see `Budget::remaining`) on a response settled before its head
    /// leaves.
    fn cost_headers(&self, cost: Option<Micros>, headers: &mut HeaderMap) {
        let Some(cost) = cost else {
            return;
        };
        let usd = |m: Micros| header::HeaderValue::from_str(&m.to_string());
        if let Ok(v) = usd(cost) {
            headers.insert(KEYCAP_COST_USD, v);
        }
        if let Some(Ok(v)) = self.proxy.budget.remaining(&self.key.budget_id).map(usd) {
            headers.insert(KEYCAP_REMAINING_USD, v);
        }
    }
}

impl std::ops::Deref for Call {
    type Target = Ticket;

    fn deref(&self) -> &Ticket {
        &self.ticket
    }
}

impl Ticket {
    fn at_reservation(&self) -> Settlement {
        Settlement {
            cost: self.quote.reserve,
            outcome: Outcome::SettledAtReservation,
            detail: Value::Null,
        }
    }

    /// The spend event of this call settled as `s` from the reservation of
    /// `reserved` on lease `lease_id` for `day`.
    fn event(
        &self,
        status: u16,
        s: Settlement,
        lease_id: String,
        day: String,
        reserved: Micros,
    ) -> pb::SpendEvent {
        let mut detail = self.quote.detail.clone();
        if let (Value::Object(d), Value::Object(extra)) = (&mut detail, s.detail) {
            d.extend(extra);
        }
        pb::SpendEvent {
            event_id: self.event_id.clone(),
            lease_id,
            key_id: self.key.id.clone(),
            vendor: self.vendor.name.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            upstream_status: i32::from(status),
            reserved_micros: reserved.0,
            cost_micros: s.cost.0,
            outcome: s.outcome.as_str().to_string(),
            at: Some(keycap_proto::time::to_proto(self.at)),
            detail_json: if detail.is_null() {
                String::new()
            } else {
                detail.to_string()
            },
            day,
            trace_id: self.trace_id.clone().unwrap_or_default(),
            context: self.agent_context.clone(),
            // The version injected: the call's own `VendorPolicy`.
            credential_version: self.vendor.credential_version,
            would_refuse: self.would_refuse.unwrap_or_default().to_string(),
            // Built inside the `settle` span: the control plane's
            // ingestion of the event continues it.
            traceparent: keycap_telemetry::traceparent(&tracing::Span::current())
                .unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// A call dropped before it settled — the agent hung up while the vendor
/// was answering, or the proxy is stopping — may still have reached the
/// vendor and cost money: it settles at its reservation, with an audit
/// entry, so neither the budget nor the ledger loses track of it.
impl Drop for Call {
    fn drop(&mut self) {
        let settlement = self.at_reservation();
        self.settle(0, settlement);
    }
}

/// Observe mode (docs/observe.md): for a key in observe mode, a refusal of
/// the allowlist, the rate limit or the per-call cap becomes the call's
/// mark (the first one stays) and the call goes on; every other refusal,
/// and every refusal of an enforcing key, stands. The daily and lifetime
/// caps are marked by the control plane, which sees the fleet's spend; the
/// key's observe ceiling is what its budget holds it to here.
fn observe(
    key: &KeyPolicy,
    would_refuse: &mut Option<&'static str>,
    refusal: Refusal,
) -> Result<(), Refusal> {
    match refusal {
        Refusal::EndpointNotAllowed(_)
        | Refusal::RateLimited(_)
        | Refusal::PerCallCapExceeded { .. }
            if key.observe_ceiling.is_some() =>
        {
            would_refuse.get_or_insert(refusal.code());
            Ok(())
        }
        _ => Err(refusal),
    }
}

/// Whether a response names a content coding other than `identity`.
fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|c| {
            let c = c.trim_ascii();
            !c.is_empty() && !c.eq_ignore_ascii_case(b"identity")
        })
}

/// Masks the credential in a body that streams through unpriced.
impl ChunkObserver for StreamScrub {
    fn chunk(&mut self, data: Bytes) -> Bytes {
        self.pass(data)
    }

    fn end_of_stream(&mut self) -> Bytes {
        self.finish()
    }

    fn finish(self: Box<Self>, _complete: bool) {}
}

/// Settles a streamed response from what passed through it, and masks the
/// credential in what the client gets.
struct StreamObserver {
    settler: Option<Box<dyn StreamSettler>>,
    scrub: StreamScrub,
    call: Option<Call>,
    status: u16,
}

impl ChunkObserver for StreamObserver {
    fn chunk(&mut self, data: Bytes) -> Bytes {
        let out = match self.settler.as_mut() {
            Some(s) => s.pass(data),
            None => data,
        };
        self.scrub.pass(out)
    }

    fn end_of_stream(&mut self) -> Bytes {
        let tail = self
            .settler
            .as_mut()
            .map(|s| s.end_of_stream())
            .unwrap_or_default();
        let mut out = self.scrub.pass(tail).to_vec();
        out.extend_from_slice(&self.scrub.finish());
        Bytes::from(out)
    }

    fn finish(mut self: Box<Self>, complete: bool) {
        let (Some(settler), Some(mut call)) = (self.settler.take(), self.call.take()) else {
            return;
        };
        let status = self.status;
        let settlement = settler.finish(status);
        let settlement = if complete || settlement.outcome == Outcome::Settled {
            settlement
        } else {
            call.at_reservation()
        };
        call.settle(status, settlement);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_with_a_control_plane_or_leases_to_serve_from() {
        let never = || -> bool { panic!("leases asked about while the control plane answers") };
        assert_eq!(readiness(true, true, true, never), Ok(()));
        assert_eq!(readiness(true, true, false, || true), Ok(()));
        assert_eq!(
            readiness(true, true, false, || false),
            Err("control_plane_unreachable")
        );
        assert_eq!(
            readiness(false, true, true, never),
            Err("waiting_for_policy")
        );
        assert_eq!(
            readiness(true, false, true, never),
            Err("settling_previous_run")
        );
    }

    fn key_of(headers: &[(&str, &str)]) -> Option<String> {
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        presented_key(&h).map(Cow::into_owned)
    }

    fn basic(user_pass: &str) -> String {
        format!("Basic {}", BASE64.encode(user_pass))
    }

    #[test]
    fn the_key_is_read_from_bearer_basic_password_or_x_api_key() {
        let k = "kc_live_abc";
        assert_eq!(
            key_of(&[("authorization", "Bearer kc_live_abc")]).as_deref(),
            Some(k)
        );
        assert_eq!(
            key_of(&[("authorization", "bearer  kc_live_abc ")]).as_deref(),
            Some(k)
        );
        assert_eq!(key_of(&[("x-api-key", "kc_live_abc")]).as_deref(), Some(k));
        // Twilio's SDKs: ACCOUNT_SID as the user, the vault key as the password.
        let sdk = basic("AC0123456789abcdef0123456789abcdef:kc_live_abc");
        assert_eq!(key_of(&[("authorization", &sdk)]).as_deref(), Some(k));
        let lower = format!("basic {}", BASE64.encode(":kc_live_abc"));
        assert_eq!(key_of(&[("authorization", &lower)]).as_deref(), Some(k));
        // Only the first colon separates the user: the rest is the password.
        assert_eq!(
            key_of(&[("authorization", &basic("AC1:kc:x"))]).as_deref(),
            Some("kc:x")
        );
        // Authorization wins over x-api-key, whatever its scheme.
        assert_eq!(
            key_of(&[("authorization", &sdk), ("x-api-key", "kc_live_other")]).as_deref(),
            Some(k)
        );
    }

    #[test]
    fn the_same_request_for_another_account_is_another_call() {
        let target = target::normalize("/stripe/v1/payment_intents").unwrap();
        let print = |accounts: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in accounts {
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            request_fingerprint("POST", &target, &h, b"amount=100")
        };
        let none = print(&[]);
        let a = print(&[("stripe-account", "acct_a")]);
        assert_ne!(none, a);
        assert_ne!(a, print(&[("stripe-account", "acct_b")]));
        assert_ne!(
            a,
            print(&[("stripe-account", "acct_a"), ("stripe-account", "acct_b")])
        );
        assert_ne!(none, print(&[("stripe-context", "acct_a")]));
        assert_ne!(
            a,
            print(&[("stripe-account", "acct_a"), ("stripe-context", "acct_b")])
        );
        assert_eq!(a, print(&[("stripe-account", "acct_a")]));
    }

    #[test]
    fn unreadable_credentials_present_no_key() {
        for value in [
            "kc_live_abc".to_string(),
            "Token kc_live_abc".to_string(),
            "Basic".to_string(),
            "Basic not*base64".to_string(),
            // The user alone, without a password.
            basic("kc_live_abc"),
            format!("Basic {}", BASE64.encode([0x41, 0x3a, 0xff, 0xfe])),
        ] {
            assert_eq!(key_of(&[("authorization", &value)]), None, "{value}");
        }
        assert_eq!(key_of(&[]), None);
    }
}
