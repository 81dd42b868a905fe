//! What a call costs.
//!
//! Owns the one pricing trait (`PriceModel`) and the rules every vendor
//! profile shares: a call is quoted before it is forwarded (exact where the
//! request states its cost, an upper bound where it does not), then settled
//! from the response. Each vendor profile lives in its own module.
//!
//! It must never let a call through unpriced: a request whose cost cannot be
//! read is an error, never a zero quote. It must never settle a successful
//! response it cannot price at 0 (that settles at the reservation), and money
//! is integer micro-dollars throughout; a float never holds a price. Pricing
//! is pure: no I/O on the request path, no clocks, no budgets (those belong to
//! the caller).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;

use keycap_proto::profile::Profile;
use keycap_proto::Micros;

pub mod anthropic;
pub mod check;
pub mod generic;
pub mod openai;
pub mod resend;
pub mod stripe;
pub mod twilio;

pub(crate) use keycap_proto::prices::mul_div_ceil;
pub use keycap_proto::prices::{
    EmbeddingPrice, ModelPrice, TokenPrices, TokenUse, TwilioPrices, Uplift, VendorPrices,
};

/// The parts of a request pricing may look at.
#[derive(Debug, Clone, Copy)]
pub struct PriceRequest<'a> {
    pub method: &'a str,
    /// The vendor path as forwarded (see `target::Target::path`).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// The agent's request headers (its credential already removed).
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// The parts of a response settlement may look at.
#[derive(Debug, Clone, Copy)]
pub struct PriceResponse<'a> {
    pub status: u16,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// An object the proxy read from the vendor before pricing a request
/// (`PriceModel::lookups`): a payment intent to confirm, an invoice to pay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Looked {
    /// The vendor path that was read (`GET`).
    pub path: String,
    pub status: u16,
    pub body: Bytes,
}

/// An empty header map, for requests built without headers.
pub fn no_headers() -> &'static HeaderMap {
    static EMPTY: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);
    &EMPTY
}

/// A priced request: what to reserve before forwarding it.
#[derive(Debug, Clone, PartialEq)]
pub struct Quote {
    pub reserve: Micros,
    /// The priced quantities, for the audit record.
    pub detail: serde_json::Value,
    /// The client asked for a streamed (SSE) response.
    pub streaming: bool,
    pub kind: QuoteKind,
    /// The request body to forward in place of the agent's, when pricing
    /// must change the request (asking for a usage report, say).
    pub forward_body: Option<Bytes>,
}

/// What settlement needs to know about the quoted call.
#[derive(Debug, Clone, PartialEq)]
pub enum QuoteKind {
    /// A call the vendor does not bill.
    Free,
    /// A Stripe call that moves `amount` minor units of `currency`.
    Stripe {
        amount: i64,
        currency: String,
        op: stripe::StripeOp,
    },
    /// An OpenAI chat completion. The price is copied into the quote so a
    /// price table reloaded mid-call cannot change how this call settles.
    /// `hide_usage`: keycap asked for the stream's usage chunk, so the
    /// client is not shown it.
    OpenAiChat {
        model: String,
        price: ModelPrice,
        hide_usage: bool,
        billing: TokenBilling,
    },
    /// An OpenAI Responses API call, its price copied in likewise.
    OpenAiResponses {
        model: String,
        price: ModelPrice,
        billing: TokenBilling,
    },
    /// OpenAI embeddings, priced per input token.
    OpenAiEmbeddings {
        model: String,
        price: EmbeddingPrice,
    },
    /// OpenAI image generation: `images` images; `tokens` is the price of a
    /// model billed in tokens (settled from usage), `None` for a fixed
    /// price per image (settled at the quote).
    OpenAiImages {
        model: String,
        images: u64,
        tokens: Option<ModelPrice>,
    },
    /// An Anthropic message, with its price copied in for the same reason.
    AnthropicMessages {
        model: String,
        price: ModelPrice,
        billing: TokenBilling,
    },
    /// Resend emails to this many recipients.
    Resend { recipients: u64 },
    /// A generic vendor's call, priced by its rule at this index.
    Generic { rule: usize },
    /// A Twilio message or call.
    Twilio(twilio::TwilioCharge),
}

/// What a token-billed call's quote decided about its price beyond the
/// token counts, so it settles by the same rules it was reserved by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenBilling {
    /// The surcharge the call is reserved with (a regional endpoint, US-only
    /// inference), and settled with unless the response says where it ran.
    pub uplift: Option<Uplift>,
    /// The request asked for a longer cache retention: its cache writes
    /// are priced as long-lived writes.
    pub long_cache_writes: bool,
}

/// How a reservation was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Settled at the real cost read from the response.
    Settled,
    /// The vendor did not bill the call; nothing is spent.
    Released,
    /// The vendor may have billed but the cost could not be read, so the
    /// whole reservation is spent (never 0).
    SettledAtReservation,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Settled => "settled",
            Outcome::Released => "released",
            Outcome::SettledAtReservation => "settled_at_reservation",
        }
    }
}

/// The resolution of one reservation.
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    pub cost: Micros,
    pub outcome: Outcome,
    pub detail: serde_json::Value,
}

impl Settlement {
    /// The vendor did not bill this response.
    pub fn released(quote: &Quote, status: u16) -> Self {
        Settlement {
            cost: Micros::ZERO,
            outcome: Outcome::Released,
            detail: quote_detail_with(quote, status, None),
        }
    }

    /// The response may have been billed but its cost is unknown.
    pub fn at_reservation(quote: &Quote, status: u16, why: &str) -> Self {
        Settlement {
            cost: quote.reserve,
            outcome: Outcome::SettledAtReservation,
            detail: quote_detail_with(quote, status, Some(why)),
        }
    }
}

/// The quote's detail (what was priced) plus the response status and, when
/// the cost could not be read, why; so the audit record of any outcome says
/// what the call was.
fn quote_detail_with(quote: &Quote, status: u16, reason: Option<&str>) -> serde_json::Value {
    let mut detail = match &quote.detail {
        serde_json::Value::Object(m) => m.clone(),
        serde_json::Value::Null => serde_json::Map::new(),
        other => {
            let mut m = serde_json::Map::new();
            m.insert("quote".into(), other.clone());
            m
        }
    };
    detail.insert("status".into(), status.into());
    if let Some(why) = reason {
        detail.insert("reason".into(), why.into());
    }
    serde_json::Value::Object(detail)
}

/// Why a request could not be priced. Messages are safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// The request does not state its cost in a form keycap can read.
    #[error("{0}")]
    Unreadable(String),
    /// The request is in a currency with no configured rate.
    #[error("{0}")]
    Currency(String),
    /// The model is not in the price table.
    #[error("{0}")]
    UnknownModel(String),
    /// The destination (a phone number's prefix) is not in the price table.
    #[error("{0}")]
    UnknownDestination(String),
    /// The vendor's pricing configuration (profile, rates, price table) is
    /// invalid. Raised when a vendor or table is loaded, not per request.
    #[error("{0}")]
    Config(String),
}

impl From<keycap_proto::prices::PriceTableError> for PricingError {
    fn from(e: keycap_proto::prices::PriceTableError) -> Self {
        PricingError::Config(e.0)
    }
}

/// Reads an operator's price table file (`--openai-prices`, ...).
pub fn load_table<T>(
    path: &std::path::Path,
    parse: impl FnOnce(&str) -> Result<T, keycap_proto::prices::PriceTableError>,
) -> Result<T, PricingError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        PricingError::Config(format!("cannot read price table {}: {e}", path.display()))
    })?;
    Ok(parse(&text)?)
}

impl PricingError {
    /// The stable error code for the client (`{"error": code}`).
    pub fn code(&self) -> &'static str {
        match self {
            PricingError::Unreadable(_) => "unpriceable_request",
            PricingError::Currency(_) => "currency_not_supported",
            PricingError::UnknownModel(_) => "unknown_model",
            PricingError::UnknownDestination(_) => "unknown_destination",
            PricingError::Config(_) => "pricing_misconfigured",
        }
    }
}

/// A vendor profile's pricing rules.
///
/// The settlement defaults suit profiles whose request fixes the cost (a
/// charge's amount, an email's recipients): a 2xx spends exactly the quote,
/// anything else releases it. Profiles that learn the cost from the
/// response body override `settle` and `stream_settler`; those that also
/// read response headers override `settle_response` and
/// `stream_settler_for`, which the proxy calls.
pub trait PriceModel: Send + Sync {
    /// Prices a request before it is forwarded.
    fn quote(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError>;
    /// Vendor paths the proxy must read (`GET`, with the vendor's
    /// credential) before this request can be priced: the amount of a
    /// payment intent being confirmed is in Stripe, not in the request.
    fn lookups(&self, _req: &PriceRequest<'_>) -> Result<Vec<String>, PricingError> {
        Ok(Vec::new())
    }
    /// Checks the query string of a call that is not a read (GET, HEAD),
    /// before anything else is done with it. A profile's vendor reads a
    /// write's parameters from its body, and pricing reads only the body; a
    /// query string could carry parameters the vendor also reads, so it is
    /// refused unless every parameter in it is one the profile knows to be
    /// harmless. A profile whose pricing reads the query itself (Stripe)
    /// overrides this.
    fn check_write_query(&self, req: &PriceRequest<'_>) -> Result<(), PricingError> {
        write_query_within(req, |_, _| false)
    }
    /// Prices a request given the objects `lookups` asked for.
    fn quote_with(
        &self,
        req: &PriceRequest<'_>,
        _looked: &[Looked],
    ) -> Result<Quote, PricingError> {
        self.quote(req)
    }
    /// The request's idempotency key, for vendors that replay a repeated
    /// request instead of executing it again (the proxy then reserves it
    /// once, not per attempt).
    fn idempotency_key<'h>(&self, _headers: &'h HeaderMap) -> Option<&'h str> {
        None
    }
    /// The reservation rule a request is priced by, as a stable name
    /// ("POST /v1/jobs/*"): when a call costs more than was reserved, the
    /// proxy tightens later reservations under the same name.
    fn rule_of(&self, req: &PriceRequest<'_>) -> String {
        format!("{} {}", req.method, req.path)
    }
    /// Non-streamed response: status and full body.
    fn settle(&self, quote: &Quote, status: u16, _body: &[u8]) -> Settlement {
        settle_fixed(quote, status)
    }
    /// Non-streamed response with its headers.
    fn settle_response(&self, quote: &Quote, resp: &PriceResponse<'_>) -> Settlement {
        self.settle(quote, resp.status, resp.body)
    }
    /// Streamed (SSE) response: a settler fed the body chunks as they pass.
    fn stream_settler(&self, quote: &Quote) -> Box<dyn StreamSettler> {
        Box::new(StatusSettler {
            quote: quote.clone(),
        })
    }
    /// Streamed response, given its headers.
    fn stream_settler_for(&self, quote: &Quote, _headers: &HeaderMap) -> Box<dyn StreamSettler> {
        self.stream_settler(quote)
    }
}

/// Settles a streamed response from the chunks the client is sent.
pub trait StreamSettler: Send {
    fn feed(&mut self, chunk: &[u8]);
    /// What the client is sent for `chunk`. The default passes it through
    /// unchanged after `feed`; a settler that must hide part of the stream
    /// (a usage report the client did not ask for) returns less, holding
    /// back bytes until it can tell.
    fn pass(&mut self, chunk: Bytes) -> Bytes {
        self.feed(&chunk);
        chunk
    }
    /// Bytes still held back when the upstream stream ends, sent last.
    fn end_of_stream(&mut self) -> Bytes {
        Bytes::new()
    }
    fn finish(self: Box<Self>, status: u16) -> Settlement;
}

/// The price tables the profiles read (per-token for the LLM vendors, a
/// unit price for Resend, per destination for Twilio), as shipped or
/// replaced by the operator's files.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub openai: Arc<TokenPrices>,
    pub anthropic: Arc<TokenPrices>,
    pub resend: keycap_proto::prices::ResendPrices,
    pub twilio: keycap_proto::prices::TwilioPrices,
}

impl Catalog {
    /// The tables shipped with this build.
    pub fn builtin() -> Self {
        Catalog {
            openai: Arc::new(openai::builtin_prices()),
            anthropic: Arc::new(anthropic::builtin_prices()),
            resend: resend::builtin_prices(),
            twilio: twilio::builtin_prices(),
        }
    }
}

/// The price model for a vendor profile.
///
/// `currency_rates` maps a lowercase currency code to decimal USD per major
/// unit ("1.08"); it is read by profiles that charge in other currencies.
/// `prices_json`, when not empty, is the operator's price table for this
/// vendor and replaces the catalog's table for its profile. `base_url` is
/// where the vendor's calls go: some endpoints bill more (OpenAI's
/// data-residency hosts).
pub fn model_for(
    profile: &str,
    currency_rates: &BTreeMap<String, String>,
    catalog: &Catalog,
    prices_json: &str,
    base_url: &str,
) -> Result<Arc<dyn PriceModel>, PricingError> {
    let Some(profile) = Profile::parse(profile) else {
        return Err(PricingError::Config(format!(
            "unknown pricing profile {:?} (known: {})",
            clip(profile),
            Profile::names()
        )));
    };
    let own = if prices_json.trim().is_empty() {
        None
    } else {
        Some(VendorPrices::parse(profile, prices_json)?)
    };
    let tokens = |shipped: &Arc<TokenPrices>| match &own {
        Some(VendorPrices::Tokens(t)) => Arc::new(t.clone()),
        _ => Arc::clone(shipped),
    };
    Ok(match profile {
        Profile::Stripe => Arc::new(stripe::StripePricing::new(currency_rates)?),
        Profile::Openai => Arc::new(
            openai::OpenAiPricing::new(tokens(&catalog.openai))
                .regional(openai::is_regional_endpoint(base_url)),
        ),
        Profile::Anthropic => {
            Arc::new(anthropic::AnthropicPricing::new(tokens(&catalog.anthropic)))
        }
        Profile::Resend => Arc::new(resend::ResendPricing::new(match own {
            Some(VendorPrices::Resend(r)) => r,
            _ => catalog.resend.clone(),
        })),
        Profile::Generic => match own {
            Some(VendorPrices::Generic(rules)) => Arc::new(generic::GenericPricing::new(rules)),
            _ => {
                return Err(PricingError::Config(
                    "a generic vendor is priced only by its own rules (prices)".into(),
                ))
            }
        },
        Profile::Twilio => Arc::new(twilio::TwilioPricing::new(match own {
            Some(VendorPrices::Twilio(t)) => t,
            _ => catalog.twilio.clone(),
        })),
    })
}

/// How a vendor profile words keycap's refusals once the key is known (see
/// `envelope`): each profile's own function, so that profile's official
/// SDK raises its own exception for them.
pub fn envelope_for(profile: Profile) -> crate::envelope::Envelope {
    match profile {
        Profile::Stripe => stripe::refusal_envelope,
        Profile::Openai => openai::refusal_envelope,
        Profile::Anthropic => anthropic::refusal_envelope,
        Profile::Resend => resend::refusal_envelope,
        Profile::Generic => generic::refusal_envelope,
        Profile::Twilio => twilio::refusal_envelope,
    }
}

pub(crate) fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

/// The media type of a Content-Type header, lowercased, without parameters.
pub(crate) fn media_type(content_type: Option<&str>) -> Option<String> {
    content_type.map(|ct| {
        ct.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    })
}

/// Refuses the query string of a write unless `harmless` accepts each of its
/// parameters (decoded name and value). Reads pass: their query is what
/// they read, and they move no money.
pub(crate) fn write_query_within(
    req: &PriceRequest<'_>,
    harmless: impl Fn(&str, &str) -> bool,
) -> Result<(), PricingError> {
    let Some(query) = req.query.filter(|q| !q.is_empty()) else {
        return Ok(());
    };
    if matches!(req.method, "GET" | "HEAD") {
        return Ok(());
    }
    let refused = |what: String| {
        unreadable(format!(
            "{what} in the query string of {} {}: keycap prices this call from its body, so it \
             refuses query parameters the vendor could read that pricing does not; send them \
             in the body",
            clip(req.method),
            clip(req.path)
        ))
    };
    // Some servers also split a query string at ';'.
    if query.contains(';') {
        return Err(refused("';'".into()));
    }
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if !harmless(&name, &value) {
            return Err(refused(format!("parameter {:?}", clip(&name))));
        }
    }
    Ok(())
}

/// Shortens client-controlled text before it goes into an error message.
pub(crate) fn clip(s: &str) -> String {
    keycap_proto::clip(s, 64)
}

pub(crate) fn unreadable(msg: impl Into<String>) -> PricingError {
    PricingError::Unreadable(msg.into())
}

/// An optional positive integer field; null counts as absent (the API treats
/// it as unset). Floats, strings, zero and negatives are refused.
pub(crate) fn positive_int(
    obj: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<Option<u64>, PricingError> {
    match obj.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(unreadable(format!(
                "\"{field}\" must be a positive integer"
            ))),
        },
    }
}

/// A JSON request body (`application/json`, or no content type), for
/// `what` ("messages", "emails") in the error.
pub(crate) fn json_body(
    req: &PriceRequest<'_>,
    what: &str,
) -> Result<serde_json::Value, PricingError> {
    match media_type(req.content_type).as_deref() {
        None | Some("application/json") => {}
        Some(other) => {
            return Err(unreadable(format!(
                "{what} must be sent as application/json, not {}",
                clip(other)
            )))
        }
    }
    parse_json(req.body)
}

/// The one parser for JSON that prices a call (request bodies, and the
/// responses a cost is read from). It refuses an object that names a key
/// twice, at any depth, naming the key: serde_json keeps the last value,
/// a vendor's parser may keep the first, and keycap must read a body as the
/// vendor will. Nesting is limited as serde_json limits it (128 levels).
pub fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, PricingError> {
    match serde_json::from_slice::<ExactJson>(bytes) {
        Ok(ExactJson(v)) => Ok(v),
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            // Only the duplicate-key check raises a data error here.
            Err(unreadable(format!(
                "request body names a JSON key twice ({e}); keycap refuses a body \
                 the vendor could read differently"
            )))
        }
        Err(_) => Err(unreadable("request body is not valid JSON")),
    }
}

/// A JSON value read by `parse_json`: as serde_json reads one, but an
/// object with a repeated key is an error.
struct ExactJson(serde_json::Value);

impl<'de> serde::Deserialize<'de> for ExactJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ExactJsonVisitor).map(ExactJson)
    }
}

struct ExactJsonVisitor;

impl<'de> serde::de::Visitor<'de> for ExactJsonVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(b.into())
    }
    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(n.into())
    }
    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(n.into())
    }
    fn visit_f64<E>(self, n: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(s.into())
    }
    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(s.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(ExactJson(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(serde_json::Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key {:?}",
                    clip(&key)
                )));
            }
            let ExactJson(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(serde_json::Value::Object(object))
    }
}

/// Settles a call priced from the usage the vendor reported. A failure
/// status releases the reservation; a success without readable usage, or
/// with usage too large to price, settles at the reservation (never 0);
/// otherwise `price` gives the cost and the priced quantities for the audit
/// entry, and a cost above the reservation is recorded as it is and flagged.
pub(crate) fn settle_reported<U>(
    quote: &Quote,
    status: u16,
    usage: Option<U>,
    price: impl FnOnce(U) -> (Option<Micros>, serde_json::Value),
) -> Settlement {
    if !is_success(status) {
        return Settlement::released(quote, status);
    }
    let Some(u) = usage else {
        return Settlement::at_reservation(quote, status, "response reported no usage");
    };
    let (cost, mut detail) = price(u);
    let Some(cost) = cost else {
        return Settlement::at_reservation(quote, status, "reported usage is too large to price");
    };
    detail["status"] = status.into();
    if cost > quote.reserve {
        // Possible only if the vendor counted more than the request bounds
        // allow; recorded at the true cost, and flagged for the audit trail.
        detail["exceeded_reservation"] = true.into();
    }
    Settlement {
        cost,
        outcome: Outcome::Settled,
        detail,
    }
}

/// Settles by status alone, for calls whose cost is fixed at quote time.
pub(crate) struct StatusSettler {
    pub quote: Quote,
}

impl StreamSettler for StatusSettler {
    fn feed(&mut self, _chunk: &[u8]) {}
    fn finish(self: Box<Self>, status: u16) -> Settlement {
        settle_fixed(&self.quote, status)
    }
}

/// A 2xx spends exactly what was quoted; anything else is released.
pub(crate) fn settle_fixed(quote: &Quote, status: u16) -> Settlement {
    if !is_success(status) {
        return Settlement::released(quote, status);
    }
    Settlement {
        cost: quote.reserve,
        outcome: Outcome::Settled,
        detail: quote_detail_with(quote, status, None),
    }
}

/// A free quote: reserve 0, no per-vendor data.
pub(crate) fn free_quote(streaming: bool) -> Quote {
    Quote {
        reserve: Micros::ZERO,
        detail: serde_json::json!({ "billed": false }),
        streaming,
        kind: QuoteKind::Free,
        forward_body: None,
    }
}

/// `ceil(tokens * per_million / 1e6)` term by term: the reference the
/// pricing tests check token costs against.
#[cfg(test)]
pub(crate) fn ceil_cost(tokens: u64, per_million: i64) -> i64 {
    let n = i128::from(tokens) * i128::from(per_million);
    i64::try_from((n + 999_999) / 1_000_000).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices() -> Catalog {
        Catalog::builtin()
    }

    #[test]
    fn outcome_strings_are_stable() {
        assert_eq!(Outcome::Settled.as_str(), "settled");
        assert_eq!(Outcome::Released.as_str(), "released");
        assert_eq!(
            Outcome::SettledAtReservation.as_str(),
            "settled_at_reservation"
        );
    }

    #[test]
    fn error_codes_are_stable() {
        let s = || "m".to_string();
        assert_eq!(PricingError::Unreadable(s()).code(), "unpriceable_request");
        assert_eq!(PricingError::Currency(s()).code(), "currency_not_supported");
        assert_eq!(PricingError::UnknownModel(s()).code(), "unknown_model");
        assert_eq!(
            PricingError::UnknownDestination(s()).code(),
            "unknown_destination"
        );
        assert_eq!(PricingError::Config(s()).code(), "pricing_misconfigured");
        assert_eq!(PricingError::Unreadable("why".into()).to_string(), "why");
    }

    #[test]
    fn model_for_known_profiles() {
        let rates = BTreeMap::new();
        let stripe = model_for("stripe", &rates, &prices(), "", "").unwrap();
        let q = stripe
            .quote(&PriceRequest {
                headers: no_headers(),
                method: "POST",
                path: "/v1/charges",
                query: None,
                content_type: Some("application/x-www-form-urlencoded"),
                body: b"amount=100&currency=usd",
            })
            .unwrap();
        assert_eq!(q.reserve, Micros(1_000_000));
        let openai = model_for("openai", &rates, &prices(), "", "").unwrap();
        let q = openai
            .quote(&PriceRequest {
                headers: no_headers(),
                method: "GET",
                path: "/v1/models",
                query: None,
                content_type: None,
                body: b"",
            })
            .unwrap();
        assert_eq!(q.reserve, Micros::ZERO);
    }

    #[test]
    fn an_operator_table_replaces_the_shipped_one() {
        let rates = BTreeMap::new();
        let table = r#"{"as_of":"2026-11-20","currency":"usd","unit":"per_million_tokens",
            "models":{"house-model":{"input":"1","output":"2","max_output_tokens":1000}}}"#;
        let req = PriceRequest {
            method: "POST",
            path: "/v1/chat/completions",
            query: None,
            content_type: Some("application/json"),
            headers: no_headers(),
            body: br#"{"model":"house-model","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":10}"#,
        };
        let shipped = model_for("openai", &rates, &prices(), "", "").unwrap();
        assert_eq!(shipped.quote(&req).unwrap_err().code(), "unknown_model");
        let own = model_for("openai", &rates, &prices(), table, "").unwrap();
        let q = own.quote(&req).unwrap();
        assert!(
            q.reserve > Micros::ZERO && q.reserve < Micros(1_000),
            "{q:?}"
        );
        // The operator's table is the whole table: shipped models are gone.
        let gpt = PriceRequest {
            body: br#"{"model":"gpt-4o","messages":[],"max_completion_tokens":10}"#,
            ..req
        };
        assert_eq!(own.quote(&gpt).unwrap_err().code(), "unknown_model");
        let err = model_for("openai", &rates, &prices(), "{}", "")
            .err()
            .unwrap();
        assert_eq!(err.code(), "pricing_misconfigured");
        let err = model_for("stripe", &rates, &prices(), table, "")
            .err()
            .unwrap();
        assert_eq!(err.code(), "pricing_misconfigured");
    }

    #[test]
    fn model_for_refuses_unknown_profile_and_bad_rates() {
        let rates = BTreeMap::new();
        let err = model_for("paypal", &rates, &prices(), "", "")
            .err()
            .unwrap();
        assert_eq!(err.code(), "pricing_misconfigured");
        assert!(err.to_string().contains("paypal"));
        let huge = "x".repeat(10_000);
        let err = model_for(&huge, &rates, &prices(), "", "").err().unwrap();
        assert!(err.to_string().len() < 200);
        let bad: BTreeMap<String, String> = [("eur".to_string(), "1,08".to_string())].into();
        assert!(model_for("stripe", &bad, &prices(), "", "").is_err());
    }

    #[test]
    fn a_write_query_is_refused_unless_its_profile_knows_it_harmless() {
        let rates = BTreeMap::new();
        let generic = r#"{"currency":"usd","rules":[
            {"endpoint":"POST /v1/renders","cost":{"fixed":"0.05"},"query_params":["format"]},
            {"endpoint":"POST /v1/jobs","cost":{"fixed":"0.10"}}]}"#;
        let model = |profile: &str| {
            let own = if profile == "generic" { generic } else { "" };
            model_for(profile, &rates, &prices(), own, "").unwrap()
        };
        let req = |method: &'static str, path: &'static str, query: &'static str| PriceRequest {
            method,
            path,
            query: Some(query),
            content_type: Some("application/json"),
            headers: no_headers(),
            body: b"{}",
        };
        let ok = |profile: &str, r: PriceRequest<'_>| model(profile).check_write_query(&r);
        // What the official SDKs send passes.
        assert!(ok("anthropic", req("POST", "/v1/messages", "beta=true")).is_ok());
        assert!(ok(
            "anthropic",
            req("POST", "/v1/messages/count_tokens", "beta=true")
        )
        .is_ok());
        assert!(ok("openai", req("POST", "/v1/responses", "beta=true")).is_ok());
        assert!(ok(
            "generic",
            req("POST", "/v1/renders", "format=png&format=jpg")
        )
        .is_ok());
        // Reads read their query; an empty query is none.
        for profile in [
            "openai",
            "anthropic",
            "resend",
            "twilio",
            "generic",
            "stripe",
        ] {
            assert!(
                ok(profile, req("GET", "/v1/anything", "limit=5")).is_ok(),
                "{profile}"
            );
            assert!(
                ok(profile, req("POST", "/v1/anything", "")).is_ok(),
                "{profile}"
            );
        }
        // Stripe reads a write's query with its body (see stripe.rs).
        assert!(ok("stripe", req("POST", "/v1/charges", "amount=1")).is_ok());
        for (profile, method, path, query) in [
            ("anthropic", "POST", "/v1/messages", "beta=false"),
            (
                "anthropic",
                "POST",
                "/v1/messages",
                "beta=true&max_tokens=99999",
            ),
            ("anthropic", "POST", "/v1/messages", "beta=true;x=1"),
            ("openai", "POST", "/v1/chat/completions", "model=gpt-4o"),
            ("openai", "DELETE", "/v1/files/f_1", "x=1"),
            ("resend", "POST", "/emails", "to=a@b.c"),
            (
                "twilio",
                "POST",
                "/2010-04-01/Accounts/AC1/Messages/SM1.json",
                "Body=x",
            ),
            ("generic", "POST", "/v1/jobs", "format=png"),
            ("generic", "POST", "/v1/renders", "size=large"),
            ("generic", "POST", "/v1/unknown", "format=png"),
        ] {
            let err = ok(profile, req(method, path, query)).unwrap_err();
            assert_eq!(
                err.code(),
                "unpriceable_request",
                "{profile} {method} {path}?{query}"
            );
            assert!(err.to_string().contains("query"), "{err}");
        }
    }

    #[test]
    fn fixed_settlement_by_status() {
        let q = Quote {
            reserve: Micros(42),
            detail: serde_json::json!({"amount": 1}),
            streaming: false,
            kind: QuoteKind::Free,
            forward_body: None,
        };
        let s = settle_fixed(&q, 201);
        assert_eq!((s.cost, s.outcome), (Micros(42), Outcome::Settled));
        assert_eq!(s.detail["status"], 201);
        for status in [199, 302, 400, 402, 404, 429, 500, 503] {
            let s = settle_fixed(&q, status);
            assert_eq!(
                (s.cost, s.outcome),
                (Micros::ZERO, Outcome::Released),
                "{status}"
            );
            assert_eq!(s.detail, serde_json::json!({"amount": 1, "status": status}));
        }
        let mut settler: Box<dyn StreamSettler> = Box::new(StatusSettler { quote: q });
        settler.feed(b"data: anything\n\n");
        assert_eq!(settler.finish(200).cost, Micros(42));
    }

    #[test]
    fn at_reservation_is_never_zero_for_priced_calls() {
        let q = Quote {
            reserve: Micros(9),
            detail: serde_json::Value::Null,
            streaming: true,
            kind: QuoteKind::Free,
            forward_body: None,
        };
        let s = Settlement::at_reservation(&q, 200, "no usage");
        assert_eq!(s.cost, Micros(9));
        assert_eq!(s.outcome, Outcome::SettledAtReservation);
        assert_eq!(
            s.detail,
            serde_json::json!({"status": 200, "reason": "no usage"})
        );
        let released = Settlement::released(&q, 503);
        assert_eq!(
            (released.cost, released.outcome),
            (Micros::ZERO, Outcome::Released)
        );
    }

    #[test]
    fn json_is_read_exactly_and_a_key_named_twice_is_refused_at_any_depth() {
        for (text, key) in [
            (r#"{"model":"a","model":"b"}"#, "model"),
            (r#"{"x":{"amount":1,"amount":2}}"#, "amount"),
            (r#"[{"ok":1},{"n":1,"n":1}]"#, "n"),
            (r#"{"a":[[{"deep":{"k":1,"k":1}}]]}"#, "k"),
            (r#"{"\u006dodel":"a","model":"b"}"#, "model"),
        ] {
            let err = parse_json(text.as_bytes()).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{text}");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("duplicate key \"{key}\"")),
                "{text}: {msg}"
            );
        }
        // The same key in sibling objects is no duplicate.
        let v = parse_json(
            br#"{"a":{"k":1},"b":{"k":2.5},"c":[null,true,"s",-3,18446744073709551615]}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a":{"k":1},"b":{"k":2.5},"c":[null,true,"s",-3,18446744073709551615u64]})
        );
        for bad in [&b"not json"[..], b"{\"a\":1", b"", b"{} {}"] {
            let err = parse_json(bad).unwrap_err();
            assert_eq!(err.to_string(), "request body is not valid JSON");
        }
        // Nesting is bounded as serde_json bounds it.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse_json(deep.as_bytes()).is_err());
        let fine = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(parse_json(fine.as_bytes()).is_ok());
    }

    #[test]
    fn every_json_priced_profile_refuses_a_key_named_twice() {
        let rates = BTreeMap::new();
        for (profile, path, body) in [
            (
                "openai",
                "/v1/chat/completions",
                r#"{"model":"gpt-4o-mini","max_tokens":5,"max_tokens":100000,"messages":[]}"#,
            ),
            (
                "openai",
                "/v1/responses",
                r#"{"model":"gpt-4o","input":"hi","tools":[{"type":"function","type":"web_search"}]}"#,
            ),
            (
                "openai",
                "/v1/embeddings",
                r#"{"model":"text-embedding-3-small","input":"a","input":["b","c"]}"#,
            ),
            (
                "openai",
                "/v1/images/generations",
                r#"{"model":"gpt-image-1","prompt":"x","n":1,"n":10}"#,
            ),
            (
                "anthropic",
                "/v1/messages",
                r#"{"model":"claude-haiku-4-5","max_tokens":1,"max_tokens":64000,"messages":[]}"#,
            ),
            (
                "resend",
                "/emails",
                r#"{"from":"a@example.com","to":"b@example.com","to":["c@example.com","d@example.com"]}"#,
            ),
            (
                "stripe",
                "/v1/payment_intents",
                r#"{"amount":100,"amount":100000,"currency":"usd"}"#,
            ),
        ] {
            let model = model_for(profile, &rates, &prices(), "", "").unwrap();
            let err = model
                .quote(&PriceRequest {
                    headers: no_headers(),
                    method: "POST",
                    path,
                    query: None,
                    content_type: Some("application/json"),
                    body: body.as_bytes(),
                })
                .unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{profile} {path}");
            assert!(
                err.to_string().contains("duplicate key"),
                "{profile}: {err}"
            );
        }
    }

    #[test]
    fn media_type_strips_parameters() {
        assert_eq!(
            media_type(Some("Application/JSON; charset=utf-8")).as_deref(),
            Some("application/json")
        );
        assert_eq!(media_type(None), None);
    }
}
