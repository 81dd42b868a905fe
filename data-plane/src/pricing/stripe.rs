//! Stripe pricing.
//!
//! Owns the cost of Stripe calls: creating a PaymentIntent or a Charge
//! (`POST /v1/payment_intents`, `POST /v1/charges`) reserves exactly the
//! `amount` the request states, converted to micro-dollars; every other call
//! is free. A 2xx settles at that amount, anything else is released.
//!
//! It must never forward a charge it could not read: a missing, duplicated,
//! negative or non-integer `amount`, a missing `currency`, parameters it cannot
//! see (in the query, or in a body format it does not parse) are errors, not
//! zero quotes. A currency other than USD is priced only through a configured
//! rate, converted with exact integer arithmetic and rounded up.

use std::collections::BTreeMap;

use http::HeaderMap;
use keycap_proto::prices::CurrencyRates;
use keycap_proto::{Micros, MICROS_PER_USD};
use serde_json::{json, Value};

use super::{
    clip, free_quote, media_type, mul_div_ceil, settle_fixed, Looked, PriceModel, PriceRequest,
    PriceResponse, PricingError, Quote, QuoteKind, Settlement,
};

/// Currencies whose Stripe amounts are whole units (no minor unit).
const ZERO_DECIMAL: [&str; 16] = [
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
    "xaf", "xof", "xpf",
];
/// Currencies whose Stripe amounts are thousandths of a unit.
const THREE_DECIMAL: [&str; 5] = ["bhd", "jod", "kwd", "omr", "tnd"];

/// The Stripe price model, with the vendor's configured currency rates.
#[derive(Debug, Clone)]
pub struct StripePricing {
    rates: CurrencyRates,
}

impl StripePricing {
    /// `currency_rates`: lowercase currency code -> decimal USD per major
    /// unit, checked by the rule the control plane checks them with. A
    /// malformed entry is a configuration error, raised here rather than on
    /// the first charge in that currency.
    pub fn new(currency_rates: &BTreeMap<String, String>) -> Result<Self, PricingError> {
        let rates = CurrencyRates::parse(currency_rates).map_err(|e| PricingError::Config(e.0))?;
        Ok(StripePricing { rates })
    }

    /// Micro-dollars for `amount` minor units of `currency`, rounded up.
    fn to_micros(
        &self,
        amount: i64,
        currency: &str,
    ) -> Result<(Micros, Option<&str>), PricingError> {
        let exponent = minor_unit_exponent(currency);
        let too_large = || PricingError::Unreadable("amount is too large to price".into());
        if currency == "usd" {
            let micros = mul_div_ceil(i128::from(amount), i128::from(MICROS_PER_USD), 100)
                .ok_or_else(too_large)?;
            return Ok((Micros(micros), None));
        }
        let rate = self.rates.get(currency).ok_or_else(|| {
            PricingError::Currency(format!(
                "currency {currency:?} is not supported: a USD rate for it must be configured on the vendor"
            ))
        })?;
        // amount / 10^exponent units * num / 10^scale USD/unit * 10^6 micros/USD
        let divisor = 10i128.pow(exponent + rate.scale);
        let micros = mul_div_ceil(
            i128::from(amount),
            rate.num * i128::from(MICROS_PER_USD),
            divisor,
        )
        .ok_or_else(too_large)?;
        Ok((Micros(micros), Some(rate.text.as_str())))
    }
}

/// How many decimal places Stripe's minor unit has for a currency.
fn minor_unit_exponent(currency: &str) -> u32 {
    if ZERO_DECIMAL.contains(&currency) {
        0
    } else if THREE_DECIMAL.contains(&currency) {
        3
    } else {
        2
    }
}

fn unreadable(msg: impl Into<String>) -> PricingError {
    PricingError::Unreadable(msg.into())
}

/// What a priced Stripe call does with money, as settlement needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeOp {
    /// `POST /v1/charges`: the charge is made (or authorized) by the call.
    Charge,
    /// Creating or confirming a PaymentIntent: money moves only if the
    /// response says the intent succeeded, is processing, or holds an
    /// authorization.
    Intent,
    /// `POST /v1/invoices/{id}/pay`.
    InvoicePay,
    /// `POST /v1/checkout/sessions`: the line items the customer is asked
    /// to pay.
    Checkout,
}

/// What a request is, by method and path.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Priced(StripeOp),
    /// Confirming an existing PaymentIntent: its amount is read from Stripe.
    Confirm(&'a str),
    /// Paying an existing invoice: the amount due is read from Stripe.
    Pay(&'a str),
    /// Moves no money (reads, customers, refunds, captures of what was
    /// counted when it was authorized, ...).
    Free,
    /// Moves money in a way keycap does not price.
    Refused(&'static str),
}

/// Resources whose writes move no money.
const FREE_RESOURCES: [&str; 12] = [
    "customers",
    "payment_methods",
    "setup_intents",
    "products",
    "prices",
    "invoiceitems",
    "coupons",
    "promotion_codes",
    "tax_rates",
    "webhook_endpoints",
    "tokens",
    "refunds",
];

/// Most objects one request may need read from Stripe before it is priced.
const MAX_LOOKUPS: usize = 20;

fn route<'a>(method: &str, path: &'a str) -> Route<'a> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if method != "POST" {
        return match (method, segs.as_slice()) {
            // Canceling a subscription can invoice and charge at once
            // (invoice_now, prorations).
            ("DELETE", ["v1", "subscriptions" | "subscription_items", ..]) => Route::Refused(
                "canceling a subscription can charge at once; keycap does not price it",
            ),
            // Reads move nothing; other deletes only cancel or detach.
            _ => Route::Free,
        };
    }
    let id = |s: &'a str| is_object_id(s).then_some(s);
    match segs.as_slice() {
        ["v1", "charges"] => Route::Priced(StripeOp::Charge),
        // Counted when the charge was created, authorized or not.
        ["v1", "charges", c] | ["v1", "charges", c, "capture"] if id(c).is_some() => Route::Free,
        ["v1", "payment_intents"] => Route::Priced(StripeOp::Intent),
        ["v1", "payment_intents", pi, "confirm"] => match id(pi) {
            Some(pi) => Route::Confirm(pi),
            None => Route::Refused("the PaymentIntent id in the path is not a Stripe id"),
        },
        // An update changes an intent before it is confirmed (counted then);
        // a capture takes what its confirmation authorized (counted then).
        ["v1", "payment_intents", pi] | ["v1", "payment_intents", pi, "capture" | "cancel"]
            if id(pi).is_some() =>
        {
            Route::Free
        }
        ["v1", "invoices"] => Route::Free,
        ["v1", "invoices", inv, "pay"] => match id(inv) {
            Some(inv) => Route::Pay(inv),
            None => Route::Refused("the invoice id in the path is not a Stripe id"),
        },
        ["v1", "invoices", inv, "finalize"] if id(inv).is_some() => Route::Refused(
            "finalizing an invoice lets Stripe charge it later, out of keycap's sight; \
             pay it with POST /v1/invoices/{id}/pay, which keycap prices",
        ),
        ["v1", "invoices", inv]
        | ["v1", "invoices", inv, "void" | "send" | "mark_uncollectible"]
            if id(inv).is_some() =>
        {
            Route::Free
        }
        ["v1", "checkout", "sessions"] => Route::Priced(StripeOp::Checkout),
        ["v1", "checkout", "sessions", cs, "expire"] if id(cs).is_some() => Route::Free,
        ["v1", resource, ..] if FREE_RESOURCES.contains(resource) => Route::Free,
        _ => Route::Refused(
            "keycap does not price this Stripe call (it prices charges, payment intents, \
             invoice payments and checkout sessions; other writes that move money are refused)",
        ),
    }
}

/// A Stripe object id: `pi_...`, `in_...`, `price_...`. Checked before it
/// goes into a lookup path.
fn is_object_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A request's parameters as Stripe reads them: form fields by their
/// bracketed names (`line_items[0][quantity]`), or a JSON body flattened to
/// the same names. A name given twice is refused: which duplicate Stripe
/// honours is not something to guess when money depends on it.
/// Each value remembers whether it was a JSON string: an amount must be a
/// JSON integer, since "10" could be read differently by different parsers.
struct Params(BTreeMap<String, (String, bool)>);

impl Params {
    fn parse(req: &PriceRequest<'_>) -> Result<Params, PricingError> {
        match media_type(req.content_type).as_deref() {
            None | Some("application/x-www-form-urlencoded") => Self::from_form(req.body),
            Some("application/json") => Self::from_json(req.body),
            Some(other) => Err(unreadable(format!(
                "cannot read the amount from a {} body; use application/x-www-form-urlencoded",
                clip(other)
            ))),
        }
    }

    fn insert(&mut self, name: String, value: String) -> Result<(), PricingError> {
        self.insert_as(name, value, false)
    }

    fn insert_as(
        &mut self,
        name: String,
        value: String,
        json_string: bool,
    ) -> Result<(), PricingError> {
        if self.0.contains_key(&name) {
            return Err(unreadable(format!(
                "parameter {} is given more than once",
                clip(&name)
            )));
        }
        self.0.insert(name, (value, json_string));
        Ok(())
    }

    fn from_form(body: &[u8]) -> Result<Params, PricingError> {
        let mut p = Params(BTreeMap::new());
        // Names are decoded first and values only for parameters pricing
        // reads: a body is mostly descriptions and metadata.
        for pair in body.split(|&b| b == b'&') {
            let name_end = pair.iter().position(|&b| b == b'=').unwrap_or(pair.len());
            let Some((name, _)) = form_urlencoded::parse(&pair[..name_end]).next() else {
                continue;
            };
            if !is_read(&name) {
                continue;
            }
            let value = form_urlencoded::parse(pair)
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            p.insert(name.into_owned(), value)?;
        }
        Ok(p)
    }

    fn from_json(body: &[u8]) -> Result<Params, PricingError> {
        let v: Value = super::parse_json(body)?;
        if !v.is_object() {
            return Err(unreadable("request body must be a JSON object"));
        }
        let mut p = Params(BTreeMap::new());
        if let Value::Object(m) = &v {
            for (k, v) in m.iter().filter(|(k, _)| is_read(k)) {
                p.flatten(k.clone(), v)?;
            }
        }
        Ok(p)
    }

    fn flatten(&mut self, name: String, v: &Value) -> Result<(), PricingError> {
        let child = |k: &str| {
            if name.is_empty() {
                k.to_string()
            } else {
                format!("{name}[{k}]")
            }
        };
        match v {
            Value::Null => Ok(()),
            Value::Object(m) => m.iter().try_for_each(|(k, v)| self.flatten(child(k), v)),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| self.flatten(child(&i.to_string()), v)),
            Value::String(s) => self.insert_as(name, s.clone(), true),
            Value::Bool(b) => self.insert(name, b.to_string()),
            // Only a JSON integer is an amount: 10.0 would be read
            // differently by different parsers, so it is kept as text that
            // no amount parses.
            Value::Number(n) if n.is_u64() || n.is_i64() => self.insert(name, n.to_string()),
            Value::Number(n) => self.insert(name, format!("{n}.float")),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|(v, _)| v.as_str())
    }

    /// A required non-negative integer (an amount in minor units, a
    /// quantity).
    fn int(&self, name: &str, what: &str) -> Result<i64, PricingError> {
        match self.0.get(name) {
            None => Err(unreadable(format!("{what} needs {name}"))),
            Some((_, true)) => Err(bad_amount()),
            Some((text, false)) => parse_amount(text),
        }
    }

    fn currency(&self, name: &str, what: &str) -> Result<String, PricingError> {
        let text = self
            .get(name)
            .ok_or_else(|| unreadable(format!("{what} needs {name}")))?;
        currency_code(text)
    }

    /// The indices of `line_items[i][...]` parameters, in order.
    fn line_items(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for k in self.0.keys() {
            let idx = k
                .strip_prefix("line_items[")
                .and_then(|r| r.split_once(']'))
                .map(|(i, _)| i.to_string());
            if let Some(i) = idx {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out
    }
}

/// The top-level parameters pricing reads; the rest are never decoded.
const READ: [&str; 8] = [
    "amount",
    "currency",
    "mode",
    "line_items",
    "paid_out_of_band",
    "auto_advance",
    "collection_method",
    "automatically_finalizes_at",
];

/// Whether a parameter (`line_items[0][quantity]` by its top-level name)
/// is one pricing reads.
fn is_read(name: &str) -> bool {
    let top = name.split('[').next().unwrap_or(name);
    READ.contains(&top)
}

fn parse_amount(text: &str) -> Result<i64, PricingError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_amount());
    }
    text.parse()
        .map_err(|_| unreadable("amount is too large to price"))
}

fn currency_code(text: &str) -> Result<String, PricingError> {
    let c = text.to_ascii_lowercase();
    if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(unreadable(format!(
            "currency {:?} is not a three-letter currency code",
            clip(&c)
        )));
    }
    Ok(c)
}

fn bad_amount() -> PricingError {
    unreadable("amount must be a non-negative integer number of the currency's minor unit")
}

/// The object Stripe returned for a lookup, as JSON.
fn looked_object(
    looked: &[Looked],
    path: &str,
    what: &str,
) -> Result<serde_json::Map<String, Value>, PricingError> {
    let l = looked
        .iter()
        .find(|l| l.path == path)
        .ok_or_else(|| unreadable(format!("{what} could not be read from Stripe")))?;
    if !(200..300).contains(&l.status) {
        return Err(unreadable(format!(
            "{what} could not be read from Stripe (status {})",
            l.status
        )));
    }
    match serde_json::from_slice(&l.body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(unreadable(format!(
            "Stripe's answer for {what} is not an object"
        ))),
    }
}

/// An integer field of a Stripe object.
fn object_int(obj: &serde_json::Map<String, Value>, field: &str) -> Option<i64> {
    obj.get(field).and_then(Value::as_i64).filter(|n| *n >= 0)
}

impl StripePricing {
    fn charge_quote(
        &self,
        op: StripeOp,
        amount: i64,
        currency: String,
        mut detail: Value,
    ) -> Result<Quote, PricingError> {
        let (reserve, rate) = self.to_micros(amount, &currency)?;
        detail["amount"] = amount.into();
        detail["currency"] = currency.clone().into();
        if let Some(rate) = rate {
            detail["usd_rate"] = rate.into();
        }
        Ok(Quote {
            reserve,
            detail,
            streaming: false,
            kind: QuoteKind::Stripe {
                amount,
                currency,
                op,
            },
            forward_body: None,
        })
    }

    /// A checkout session's total: each line item's unit amount (from
    /// `price_data`, or from the Price object read from Stripe) times its
    /// quantity, all in one currency.
    fn checkout_quote(&self, p: &Params, looked: &[Looked]) -> Result<Quote, PricingError> {
        let mode = p.get("mode").unwrap_or("payment");
        match mode {
            // A setup session saves a payment method; nothing is charged.
            "setup" => return Ok(free_quote(false)),
            "payment" => {}
            "subscription" => {
                return Err(unreadable(
                    "a subscription charges again every period; keycap does not price it",
                ))
            }
            other => {
                return Err(unreadable(format!(
                    "checkout mode {:?} is not one keycap prices",
                    clip(other)
                )))
            }
        }
        let items = p.line_items();
        if items.is_empty() {
            return Err(unreadable(
                "a checkout session is priced from its line_items; none were given",
            ));
        }
        let mut total: i64 = 0;
        let mut currency: Option<String> = None;
        for i in &items {
            // `field("price_data][currency")` is line_items[i][price_data][currency].
            let field = |f: &str| format!("line_items[{i}][{f}]");
            if p.get(&field("adjustable_quantity][enabled")) == Some("true") {
                return Err(unreadable(
                    "an adjustable quantity lets the customer pay more than the session states",
                ));
            }
            let quantity = match p.get(&field("quantity")) {
                None => 1,
                Some(q) => parse_amount(q)?,
            };
            let (unit, cur) = if let Some(price) = p.get(&field("price")) {
                let obj = looked_object(looked, &price_path(price)?, "the line item's price")?;
                let unit = object_int(&obj, "unit_amount").ok_or_else(|| {
                    unreadable(format!(
                        "price {} has no fixed unit_amount (tiered or customer-chosen prices are not priced)",
                        clip(price)
                    ))
                })?;
                let cur = obj
                    .get("currency")
                    .and_then(Value::as_str)
                    .ok_or_else(|| unreadable("the line item's price has no currency"))?;
                (unit, currency_code(cur)?)
            } else {
                if p.get(&field("price_data][unit_amount_decimal")).is_some() {
                    return Err(unreadable(
                        "unit_amount_decimal is not priced; give unit_amount in minor units",
                    ));
                }
                (
                    p.int(&field("price_data][unit_amount"), "a line item")?,
                    p.currency(&field("price_data][currency"), "a line item")?,
                )
            };
            match &currency {
                None => currency = Some(cur),
                Some(c) if *c == cur => {}
                Some(_) => {
                    return Err(unreadable(
                        "the line items of one checkout session must share a currency",
                    ))
                }
            }
            total = unit
                .checked_mul(quantity)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| unreadable("amount is too large to price"))?;
        }
        let currency = currency.expect("at least one line item");
        self.charge_quote(
            StripeOp::Checkout,
            total,
            currency,
            json!({"mode": mode, "line_items": items.len()}),
        )
    }

    /// What a successful response spent: its own amount where it reports
    /// one (in micro-dollars), `None` when money did not move.
    fn spent(&self, op: StripeOp, quote: &Quote, obj: &serde_json::Map<String, Value>) -> Spent {
        let status = obj.get("status").and_then(Value::as_str);
        let own_amount = |field: &str| -> Option<Micros> {
            let amount = object_int(obj, field)?;
            let cur = currency_code(obj.get("currency")?.as_str()?).ok()?;
            self.to_micros(amount, &cur).ok().map(|(m, _)| m)
        };
        match op {
            StripeOp::Charge => match status {
                Some("failed") => Spent::Nothing("failed"),
                Some(_) => own_amount("amount").map_or(Spent::Unknown, Spent::Amount),
                None => Spent::Unknown,
            },
            StripeOp::Intent => match status {
                // requires_action: the customer's authentication completes
                // it out of keycap's sight, so it counts now.
                Some(s @ ("succeeded" | "processing" | "requires_capture" | "requires_action")) => {
                    own_amount("amount")
                        .map_or(Spent::Unknown, |m| Spent::AmountWith(m, s.to_string()))
                }
                // Created but not confirmed, declined, waiting on the
                // customer, or canceled: nothing moved on this call.
                Some(s) => Spent::Nothing(match s {
                    "requires_payment_method" => "requires_payment_method",
                    "requires_confirmation" => "requires_confirmation",
                    "canceled" => "canceled",
                    _ => "not_confirmed",
                }),
                None => Spent::Unknown,
            },
            StripeOp::InvoicePay => match status {
                // What this call paid: the invoice's amount_paid now, less
                // what it had paid when it was read before the call.
                Some("paid") => {
                    let before = quote.detail["amount_paid_before"].as_i64().unwrap_or(0);
                    match (
                        object_int(obj, "amount_paid"),
                        obj.get("currency").and_then(Value::as_str),
                    ) {
                        (Some(paid), Some(cur)) if paid >= before => currency_code(cur)
                            .ok()
                            .and_then(|c| self.to_micros(paid - before, &c).ok())
                            .map_or(Spent::Unknown, |(m, _)| Spent::Amount(m)),
                        _ => Spent::Unknown,
                    }
                }
                Some(_) => Spent::Nothing("not_paid"),
                None => Spent::Unknown,
            },
            StripeOp::Checkout => own_amount("amount_total").map_or(Spent::Unknown, Spent::Amount),
        }
    }
}

/// Writes that move no money by themselves, unless their parameters ask
/// Stripe to move it later, out of keycap's sight.
fn free_write_check(path: &str, p: &Params) -> Result<(), PricingError> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        ["v1", "invoices"] | ["v1", "invoices", _] => {
            // Stripe finalizes and charges an auto-advancing invoice itself.
            let manual = p.get("auto_advance") == Some("false")
                || p.get("collection_method") == Some("send_invoice");
            let creating = segs.len() == 2;
            if p.get("auto_advance") == Some("true")
                || p.get("automatically_finalizes_at").is_some()
                || (creating && !manual)
            {
                return Err(unreadable(
                    "an invoice Stripe advances itself is charged out of keycap's sight; \
                     set auto_advance=false and pay it with POST /v1/invoices/{id}/pay",
                ));
            }
        }
        // The amount is read when the intent is confirmed; changing it
        // between that read and the confirmation would move more.
        ["v1", "payment_intents", _]
            if p.get("amount").is_some() || p.get("currency").is_some() =>
        {
            return Err(unreadable(
                "changing a payment intent's amount is not priced; create a new intent",
            ));
        }
        _ => {}
    }
    Ok(())
}

/// The lookup path of a Price object named by a line item.
fn price_path(price: &str) -> Result<String, PricingError> {
    if !is_object_id(price) {
        return Err(unreadable(format!(
            "line item price {:?} is not a Stripe id",
            clip(price)
        )));
    }
    Ok(format!("/v1/prices/{price}"))
}

enum Spent {
    Amount(Micros),
    /// An amount, and the object's status for the audit entry.
    AmountWith(Micros, String),
    Nothing(&'static str),
    Unknown,
}

/// Stripe marks a response it replays for a repeated Idempotency-Key.
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

impl PriceModel for StripePricing {
    fn quote(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        self.quote_with(req, &[])
    }

    fn lookups(&self, req: &PriceRequest<'_>) -> Result<Vec<String>, PricingError> {
        match route(req.method, req.path) {
            Route::Confirm(pi) => Ok(vec![format!("/v1/payment_intents/{pi}")]),
            Route::Pay(inv) => Ok(vec![format!("/v1/invoices/{inv}")]),
            Route::Priced(StripeOp::Checkout) => {
                let p = Params::parse(req)?;
                let mut paths: Vec<String> = Vec::new();
                for i in p.line_items() {
                    if let Some(price) = p.get(&format!("line_items[{i}][price]")) {
                        let path = price_path(price)?;
                        if !paths.contains(&path) {
                            paths.push(path);
                        }
                    }
                }
                if paths.len() > MAX_LOOKUPS {
                    return Err(unreadable(format!(
                        "a checkout session may name at most {MAX_LOOKUPS} distinct prices"
                    )));
                }
                Ok(paths)
            }
            _ => Ok(Vec::new()),
        }
    }

    fn quote_with(&self, req: &PriceRequest<'_>, looked: &[Looked]) -> Result<Quote, PricingError> {
        let route = route(req.method, req.path);
        match route {
            Route::Free if req.method == "POST" => {
                free_write_check(req.path, &Params::parse(req)?)?;
                return Ok(free_quote(false));
            }
            Route::Free => return Ok(free_quote(false)),
            Route::Refused(why) => return Err(unreadable(why)),
            _ => {}
        }
        if req.query.is_some_and(|q| !q.is_empty()) {
            return Err(unreadable(format!(
                "keycap prices POST {} from the request body; send its parameters in the body, not the query string",
                clip(req.path)
            )));
        }
        let p = Params::parse(req)?;
        let what = || format!("POST {}", clip(req.path));
        match route {
            Route::Priced(op @ (StripeOp::Charge | StripeOp::Intent)) => {
                let amount = p.int("amount", &what())?;
                let currency = p.currency("currency", &what())?;
                self.charge_quote(op, amount, currency, json!({}))
            }
            Route::Priced(StripeOp::Checkout) => self.checkout_quote(&p, looked),
            Route::Confirm(pi) => {
                let path = format!("/v1/payment_intents/{pi}");
                let obj = looked_object(looked, &path, "the payment intent")?;
                let amount = object_int(&obj, "amount")
                    .ok_or_else(|| unreadable("the payment intent has no amount"))?;
                let cur = obj
                    .get("currency")
                    .and_then(Value::as_str)
                    .ok_or_else(|| unreadable("the payment intent has no currency"))?;
                let detail = json!({"payment_intent": pi});
                self.charge_quote(StripeOp::Intent, amount, currency_code(cur)?, detail)
            }
            Route::Pay(inv) => {
                if p.get("paid_out_of_band") == Some("true") {
                    // Marked paid by other means: Stripe charges nothing.
                    return Ok(free_quote(false));
                }
                let obj = looked_object(looked, &format!("/v1/invoices/{inv}"), "the invoice")?;
                let due = object_int(&obj, "amount_remaining")
                    .ok_or_else(|| unreadable("the invoice has no amount_remaining"))?;
                let cur = obj
                    .get("currency")
                    .and_then(Value::as_str)
                    .ok_or_else(|| unreadable("the invoice has no currency"))?;
                let paid_before = object_int(&obj, "amount_paid").unwrap_or(0);
                let detail = json!({"invoice": inv, "amount_paid_before": paid_before});
                self.charge_quote(StripeOp::InvoicePay, due, currency_code(cur)?, detail)
            }
            Route::Priced(_) | Route::Free | Route::Refused(_) => unreachable!("handled above"),
        }
    }

    fn settle(&self, quote: &Quote, status: u16, body: &[u8]) -> Settlement {
        let headers = super::no_headers();
        self.settle_response(
            quote,
            &PriceResponse {
                status,
                headers,
                body,
            },
        )
    }

    fn settle_response(&self, quote: &Quote, resp: &PriceResponse<'_>) -> Settlement {
        let QuoteKind::Stripe { op, .. } = &quote.kind else {
            return settle_fixed(quote, resp.status);
        };
        if !super::is_success(resp.status) {
            return Settlement::released(quote, resp.status);
        }
        let replayed = resp
            .headers
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let mut settled = settle_fixed(quote, resp.status);
        if replayed {
            // Stripe answered a repeated Idempotency-Key with the saved
            // response of the first request: nothing is charged again.
            settled.cost = Micros::ZERO;
            settled.detail["idempotent_replay"] = true.into();
            return settled;
        }
        let obj = match serde_json::from_slice::<Value>(resp.body) {
            Ok(Value::Object(m)) => m,
            _ => {
                return Settlement::at_reservation(
                    quote,
                    resp.status,
                    "response is not a Stripe object",
                )
            }
        };
        match self.spent(*op, quote, &obj) {
            Spent::Amount(m) => settled.cost = m,
            Spent::AmountWith(m, status) => {
                settled.cost = m;
                settled.detail["object_status"] = status.into();
            }
            Spent::Nothing(status) => {
                settled.cost = Micros::ZERO;
                settled.detail["object_status"] = status.into();
            }
            Spent::Unknown => {
                return Settlement::at_reservation(
                    quote,
                    resp.status,
                    "response does not say what was charged",
                )
            }
        }
        if settled.cost > quote.reserve {
            settled.detail["exceeded_reservation"] = true.into();
        }
        settled
    }

    fn rule_of(&self, req: &PriceRequest<'_>) -> String {
        // Object ids name one call's object, not the rule that priced it.
        let path: Vec<&str> = req
            .path
            .split('/')
            .enumerate()
            .map(|(i, s)| {
                if i > 2 && s.contains('_') && is_object_id(s) {
                    "*"
                } else {
                    s
                }
            })
            .collect();
        format!("{} {}", req.method, path.join("/"))
    }

    fn idempotency_key<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        // Two keys, or one longer than Stripe accepts: not one Stripe would
        // replay by, so the call is reserved as any other.
        let mut keys = headers.get_all("idempotency-key").iter();
        let key = keys.next()?.to_str().ok()?;
        (keys.next().is_none() && !key.is_empty() && key.len() <= 255).then_some(key)
    }
}

/// Stripe's refusal envelope: `{"error": {"type", "code", "message", ...}}`.
/// stripe-python picks its exception by status (`RateLimitError` for 429,
/// `AuthenticationError` for 401, `PermissionError` for 403,
/// `InvalidRequestError` for 400 and 404, `APIError` otherwise) and keeps
/// the object as `e.error`, so keycap's code is `e.error.code` and its
/// fields `e.error.remaining_usd`, .... `Stripe-Should-Retry: false` stops
/// its automatic retries where a retry would be refused the same way.
pub fn refusal_envelope(r: &crate::envelope::Refused<'_>) -> crate::envelope::Wire {
    let mut error = crate::envelope::keycap_error(r);
    let kind = if r.status.is_server_error() {
        "api_error"
    } else {
        "invalid_request_error"
    };
    error.insert("type".into(), kind.into());
    let mut wire = crate::envelope::Wire::body(json!({ "error": error }));
    if r.retry_is_futile {
        wire.headers.push((
            http::HeaderName::from_static("stripe-should-retry"),
            http::HeaderValue::from_static("false"),
        ));
    }
    wire
}

#[cfg(test)]
mod envelope_tests {
    use super::*;
    use crate::envelope::Refused;

    #[test]
    fn refusals_are_stripe_errors_that_stop_its_retries_at_a_cap() {
        let fields = json!({"cap_usd": 30, "remaining_usd": 5})
            .as_object()
            .unwrap()
            .clone();
        let cap = Refused {
            status: http::StatusCode::TOO_MANY_REQUESTS,
            code: "daily_cap_exceeded",
            message: "over the cap",
            fields: &fields,
            retry_is_futile: true,
        };
        let wire = refusal_envelope(&cap);
        assert_eq!(
            wire.body,
            json!({"error": {"type": "invalid_request_error", "code": "daily_cap_exceeded",
                             "message": "over the cap", "cap_usd": 30, "remaining_usd": 5}})
        );
        assert_eq!(wire.headers.len(), 1);
        assert_eq!(wire.headers[0].0, "stripe-should-retry");
        assert_eq!(wire.headers[0].1, "false");
        let no_fields = serde_json::Map::new();
        let timeout = Refused {
            status: http::StatusCode::GATEWAY_TIMEOUT,
            code: "upstream_timeout",
            message: "late",
            fields: &no_fields,
            retry_is_futile: false,
        };
        let wire = refusal_envelope(&timeout);
        assert_eq!(wire.body["error"]["type"], "api_error");
        // Stripe's SDK retries a 5xx with the same Idempotency-Key.
        assert!(wire.headers.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::*;

    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

    fn pricing(rates: &[(&str, &str)]) -> StripePricing {
        let map = rates
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        StripePricing::new(&map).unwrap()
    }

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        ct: Option<&'a str>,
        body: &'a [u8],
    ) -> PriceRequest<'a> {
        PriceRequest {
            headers: crate::pricing::no_headers(),
            method,
            path,
            query: None,
            content_type: ct,
            body,
        }
    }

    fn quote_form(p: &StripePricing, body: &str) -> Result<Quote, PricingError> {
        p.quote(&req("POST", "/v1/payment_intents", FORM, body.as_bytes()))
    }

    #[test]
    fn usd_reserves_exact_amount() {
        let p = pricing(&[]);
        let q = quote_form(&p, "amount=1999&currency=usd&description=x").unwrap();
        assert_eq!(q.reserve, Micros(19_990_000));
        assert_eq!(q.detail, json!({"amount": 1999, "currency": "usd"}));
        assert_eq!(
            q.kind,
            QuoteKind::Stripe {
                amount: 1999,
                currency: "usd".into(),
                op: StripeOp::Intent,
            }
        );
        assert!(!q.streaming);
        let q = p
            .quote(&req("POST", "/v1/charges", FORM, b"currency=USD&amount=1"))
            .unwrap();
        assert_eq!(q.reserve, Micros(10_000));
        assert_eq!(
            quote_form(&p, "amount=0&currency=usd").unwrap().reserve,
            Micros(0)
        );
    }

    #[test]
    fn form_decoding_matches_stripes() {
        let p = pricing(&[]);
        // Encoded keys and values decode before matching, as Stripe does.
        let q = quote_form(&p, "%61mount=%35%30&currency=us%64").unwrap();
        assert_eq!(q.reserve, Micros(500_000));
        // Nested parameters are not the top-level amount.
        assert!(quote_form(&p, "amount_details[tip][amount]=5&currency=usd").is_err());
        // Leading zeros are still an integer.
        assert_eq!(
            quote_form(&p, "amount=007&currency=usd").unwrap().reserve,
            Micros(70_000)
        );
    }

    #[test]
    fn unreadable_amounts_are_refused() {
        let p = pricing(&[]);
        for body in [
            "currency=usd",
            "amount=&currency=usd",
            "amount=-5&currency=usd",
            "amount=%2D5&currency=usd",
            "amount=+5&currency=usd",
            "amount=5.00&currency=usd",
            "amount=1e3&currency=usd",
            "amount=%205&currency=usd",
            "amount=five&currency=usd",
            "amount=99999999999999999999&currency=usd",
            "amount=5&amount=500000&currency=usd",
            "amount=5&currency=usd&currency=jpy",
            "amount=5",
            "amount=5&currency=",
            "amount=5&currency=dollars",
        ] {
            let err = quote_form(&p, body).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{body}: {err}");
        }
    }

    #[test]
    fn overflowing_amounts_are_refused_not_wrapped() {
        let p = pricing(&[("eur", "1000000")]);
        let max = i64::MAX.to_string();
        let err = quote_form(&p, &format!("amount={max}&currency=usd")).unwrap_err();
        assert_eq!(err.code(), "unpriceable_request");
        let err = quote_form(&p, &format!("amount={max}&currency=eur")).unwrap_err();
        assert_eq!(err.code(), "unpriceable_request");
    }

    #[test]
    fn json_bodies() {
        let p = pricing(&[]);
        let json_ct = Some("application/json; charset=utf-8");
        let q = p
            .quote(&req(
                "POST",
                "/v1/charges",
                json_ct,
                br#"{"amount":250,"currency":"usd"}"#,
            ))
            .unwrap();
        assert_eq!(q.reserve, Micros(2_500_000));
        for body in [
            r#"{"amount":2.5,"currency":"usd"}"#,
            r#"{"amount":250.0,"currency":"usd"}"#,
            r#"{"amount":"250","currency":"usd"}"#,
            r#"{"amount":-1,"currency":"usd"}"#,
            r#"{"amount":250}"#,
            r#"{"amount":250,"currency":5}"#,
            r#"{"currency":"usd"}"#,
            r#"[250]"#,
            r#"amount=250&currency=usd"#,
        ] {
            let r = p.quote(&req("POST", "/v1/charges", json_ct, body.as_bytes()));
            assert_eq!(r.unwrap_err().code(), "unpriceable_request", "{body}");
        }
    }

    #[test]
    fn missing_content_type_is_read_as_form_other_types_refused() {
        let p = pricing(&[]);
        let q = p
            .quote(&req("POST", "/v1/charges", None, b"amount=3&currency=usd"))
            .unwrap();
        assert_eq!(q.reserve, Micros(30_000));
        let err = p
            .quote(&req(
                "POST",
                "/v1/charges",
                Some("multipart/form-data; boundary=x"),
                b"--x\r\n",
            ))
            .unwrap_err();
        assert_eq!(err.code(), "unpriceable_request");
    }

    #[test]
    fn parameters_in_query_are_refused() {
        let p = pricing(&[]);
        let r = PriceRequest {
            headers: crate::pricing::no_headers(),
            query: Some("amount=1"),
            ..req(
                "POST",
                "/v1/payment_intents",
                FORM,
                b"amount=100000&currency=usd",
            )
        };
        assert_eq!(p.quote(&r).unwrap_err().code(), "unpriceable_request");
        let r = PriceRequest {
            headers: crate::pricing::no_headers(),
            query: Some(""),
            ..req(
                "POST",
                "/v1/payment_intents",
                FORM,
                b"amount=1&currency=usd",
            )
        };
        assert_eq!(p.quote(&r).unwrap().reserve, Micros(10_000));
    }

    #[test]
    fn other_currencies_need_a_rate() {
        let p = pricing(&[]);
        let err = quote_form(&p, "amount=100&currency=eur").unwrap_err();
        assert_eq!(err.code(), "currency_not_supported");
        assert!(err.to_string().contains("eur"), "{err}");
        assert!(err.to_string().contains("rate"), "{err}");
    }

    #[test]
    fn converts_with_minor_unit_exponents_rounding_up() {
        let p = pricing(&[
            ("eur", "1.08"),
            ("jpy", "0.0067"),
            ("kwd", "3.25"),
            ("gbp", "1.2700001"),
            ("vnd", "0.00003937"),
        ]);
        let r = |body: &str| quote_form(&p, body).unwrap().reserve;
        // 1.00 EUR = 1.08 USD.
        assert_eq!(r("amount=100&currency=eur"), Micros(1_080_000));
        // 0.01 EUR = 0.0108 USD.
        assert_eq!(r("amount=1&currency=eur"), Micros(10_800));
        // JPY has no minor unit: 1000 means 1000 yen = 6.70 USD.
        assert_eq!(r("amount=1000&currency=jpy"), Micros(6_700_000));
        // KWD has three: 1500 means 1.500 KWD = 4.875 USD.
        assert_eq!(r("amount=1500&currency=kwd"), Micros(4_875_000));
        // 0.01 GBP = 0.012700001 USD = 12700.001 micros, rounded up.
        assert_eq!(r("amount=1&currency=gbp"), Micros(12_701));
        // 1 VND = 39.37 micros, rounded up; never 0 for a non-zero charge.
        assert_eq!(r("amount=1&currency=vnd"), Micros(40));
        let q = quote_form(&p, "amount=100&currency=EUR").unwrap();
        assert_eq!(
            q.detail,
            json!({"amount": 100, "currency": "eur", "usd_rate": "1.08"})
        );
    }

    #[test]
    fn exponent_tables() {
        assert_eq!(minor_unit_exponent("jpy"), 0);
        assert_eq!(minor_unit_exponent("krw"), 0);
        assert_eq!(minor_unit_exponent("xpf"), 0);
        assert_eq!(minor_unit_exponent("bhd"), 3);
        assert_eq!(minor_unit_exponent("tnd"), 3);
        assert_eq!(minor_unit_exponent("usd"), 2);
        assert_eq!(minor_unit_exponent("eur"), 2);
    }

    #[test]
    fn rate_configuration_is_validated() {
        for (code, rate) in [
            ("eur", "1,08"),
            ("eur", "-1.08"),
            ("eur", "0"),
            ("eur", "0.000"),
            ("eur", "1."),
            ("eur", ".5"),
            ("eur", "1e2"),
            ("eur", " 1.08"),
            ("eur", "0.0000000000000000001"),
            ("EUR", "1.08"),
            ("euro", "1.08"),
            ("usd", "2"),
        ] {
            let map = [(code.to_string(), rate.to_string())].into();
            let err = StripePricing::new(&map).unwrap_err();
            assert_eq!(err.code(), "pricing_misconfigured", "{code}={rate}");
        }
        assert!(StripePricing::new(&[("usd".into(), "1.000".into())].into()).is_ok());
    }

    #[test]
    fn calls_that_move_no_money_are_free_and_unknown_writes_refused() {
        let p = pricing(&[]);
        for (m, path) in [
            ("GET", "/v1/payment_intents"),
            ("GET", "/v1/charges"),
            ("POST", "/v1/customers"),
            ("POST", "/v1/customers/cus_1"),
            ("POST", "/v1/refunds"),
            ("POST", "/v1/payment_intents/pi_1"),
            ("POST", "/v1/payment_intents/pi_1/capture"),
            ("POST", "/v1/payment_intents/pi_1/cancel"),
            ("POST", "/v1/charges/ch_1/capture"),
            ("POST", "/v1/invoices/in_1/void"),
            ("POST", "/v1/checkout/sessions/cs_1/expire"),
            ("DELETE", "/v1/customers/cus_1"),
        ] {
            let q = p.quote(&req(m, path, FORM, b"description=x")).unwrap();
            assert_eq!(q.reserve, Micros::ZERO, "{m} {path}");
            assert_eq!(q.kind, QuoteKind::Free, "{m} {path}");
        }
        for path in [
            "/v1/transfers",
            "/v1/payouts",
            "/v1/subscriptions",
            "/v1/payment_links",
            "/v1/invoices/in_1/finalize",
            "/v1/payment_intents/pi_1/increment_authorization",
            "/v1/charges/",
            "/v1/payment_intents/pi..1/confirm",
            "/v2/core/events",
        ] {
            let err = p.quote(&req("POST", path, FORM, b"")).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{path}");
        }
    }

    #[test]
    fn free_writes_that_would_move_money_later_are_refused() {
        let p = pricing(&[]);
        let refused = [
            ("DELETE", "/v1/subscriptions/sub_1", ""),
            ("DELETE", "/v1/subscription_items/si_1", ""),
            ("POST", "/v1/invoices", "customer=cus_1"),
            ("POST", "/v1/invoices", "customer=cus_1&auto_advance=true"),
            ("POST", "/v1/invoices/in_1", "auto_advance=true"),
            (
                "POST",
                "/v1/invoices/in_1",
                "automatically_finalizes_at=1700000000",
            ),
            ("POST", "/v1/payment_intents/pi_1", "amount=999999"),
            ("POST", "/v1/payment_intents/pi_1", "currency=eur"),
        ];
        for (m, path, body) in refused {
            let err = p.quote(&req(m, path, FORM, body.as_bytes())).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{m} {path} {body}");
        }
        let free = [
            ("DELETE", "/v1/customers/cus_1", ""),
            ("POST", "/v1/invoices", "customer=cus_1&auto_advance=false"),
            (
                "POST",
                "/v1/invoices",
                "customer=cus_1&collection_method=send_invoice",
            ),
            ("POST", "/v1/invoices/in_1", "description=x"),
            (
                "POST",
                "/v1/payment_intents/pi_1",
                "description=x&metadata[order]=7",
            ),
        ];
        for (m, path, body) in free {
            let q = p.quote(&req(m, path, FORM, body.as_bytes())).unwrap();
            assert_eq!(q.kind, QuoteKind::Free, "{m} {path} {body}");
        }
    }

    fn looked(path: &str, status: u16, body: serde_json::Value) -> Looked {
        Looked {
            path: path.into(),
            status,
            body: body.to_string().into(),
        }
    }

    fn resp<'a>(status: u16, headers: &'a HeaderMap, body: &'a str) -> PriceResponse<'a> {
        PriceResponse {
            status,
            headers,
            body: body.as_bytes(),
        }
    }

    #[test]
    fn a_payment_intent_counts_only_when_money_moves() {
        let p = pricing(&[("eur", "1.08")]);
        let h = HeaderMap::new();
        let q = quote_form(&p, "amount=1999&currency=usd").unwrap();
        assert_eq!(q.reserve, Micros(19_990_000));
        for (status, cost) in [
            ("succeeded", 19_990_000),
            ("processing", 19_990_000),
            ("requires_capture", 19_990_000),
            ("requires_action", 19_990_000),
            ("requires_payment_method", 0),
            ("requires_confirmation", 0),
            ("canceled", 0),
        ] {
            let body = json!({"object": "payment_intent", "amount": 1999, "currency": "usd", "status": status});
            let s = p.settle_response(&q, &resp(200, &h, &body.to_string()));
            assert_eq!(
                (s.cost, s.outcome),
                (Micros(cost), Outcome::Settled),
                "{status}"
            );
            assert_eq!(s.detail["object_status"], status);
        }
        // The response's own amount is what moved; above the reservation it
        // is recorded as it is, and flagged.
        let body = json!({"amount": 2500, "currency": "usd", "status": "succeeded"});
        let s = p.settle_response(&q, &resp(200, &h, &body.to_string()));
        assert_eq!(s.cost, Micros(25_000_000));
        assert_eq!(s.detail["exceeded_reservation"], true);
        // A 2xx that does not say what happened settles at the reservation.
        for body in ["{}", "not json", r#"{"status":"succeeded"}"#] {
            let s = p.settle_response(&q, &resp(200, &h, body));
            assert_eq!(s.outcome, Outcome::SettledAtReservation, "{body}");
            assert_eq!(s.cost, q.reserve);
        }
        let s = p.settle_response(&q, &resp(402, &h, r#"{"error":{}}"#));
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Released));
    }

    #[test]
    fn confirming_an_existing_intent_is_priced_from_stripe() {
        let p = pricing(&[("eur", "1.08")]);
        let r = req(
            "POST",
            "/v1/payment_intents/pi_123/confirm",
            FORM,
            b"payment_method=pm_card_visa",
        );
        assert_eq!(p.lookups(&r).unwrap(), vec!["/v1/payment_intents/pi_123"]);
        let intent = json!({"id": "pi_123", "amount": 5000, "currency": "eur", "status": "requires_confirmation"});
        let q = p
            .quote_with(&r, &[looked("/v1/payment_intents/pi_123", 200, intent)])
            .unwrap();
        assert_eq!(q.reserve, Micros(54_000_000));
        assert_eq!(q.detail["payment_intent"], "pi_123");
        assert_eq!(q.detail["usd_rate"], "1.08");
        // Without the lookup, or with Stripe refusing it, nothing is priced.
        assert_eq!(p.quote(&r).unwrap_err().code(), "unpriceable_request");
        let gone = looked("/v1/payment_intents/pi_123", 404, json!({"error": {}}));
        let err = p.quote_with(&r, &[gone]).unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
        let no_amount = looked(
            "/v1/payment_intents/pi_123",
            200,
            json!({"currency": "usd"}),
        );
        assert!(p.quote_with(&r, &[no_amount]).is_err());
        // Confirming an intent that already succeeded is refused by Stripe:
        // released, so it is never counted twice.
        let s = p.settle_response(&q, &resp(400, &HeaderMap::new(), r#"{"error":{}}"#));
        assert_eq!(s.cost, Micros::ZERO);
    }

    #[test]
    fn paying_an_invoice_reserves_what_remains_due() {
        let p = pricing(&[]);
        let r = req("POST", "/v1/invoices/in_9/pay", FORM, b"");
        assert_eq!(p.lookups(&r).unwrap(), vec!["/v1/invoices/in_9"]);
        let inv = json!({"id": "in_9", "amount_due": 3000, "amount_paid": 1800, "amount_remaining": 1200, "currency": "usd", "status": "open"});
        let q = p
            .quote_with(&r, &[looked("/v1/invoices/in_9", 200, inv)])
            .unwrap();
        assert_eq!(q.reserve, Micros(12_000_000));
        let h = HeaderMap::new();
        // What this call paid: amount_paid now less what was paid before.
        let paid = r#"{"status":"paid","amount_paid":3000,"currency":"usd"}"#;
        let s = p.settle_response(&q, &resp(200, &h, paid));
        assert_eq!(s.cost, Micros(12_000_000));
        let s = p.settle_response(&q, &resp(200, &h, r#"{"status":"paid"}"#));
        assert_eq!(s.outcome, Outcome::SettledAtReservation);
        let s = p.settle_response(&q, &resp(200, &h, r#"{"status":"open"}"#));
        assert_eq!(s.cost, Micros::ZERO);
        // Marked paid outside Stripe: nothing is charged.
        let oob = req(
            "POST",
            "/v1/invoices/in_9/pay",
            FORM,
            b"paid_out_of_band=true",
        );
        assert_eq!(p.quote_with(&oob, &[]).unwrap().kind, QuoteKind::Free);
    }

    #[test]
    fn a_checkout_session_costs_its_line_items_times_quantities() {
        let p = pricing(&[]);
        let body = "mode=payment&success_url=https%3A%2F%2Fexample.com\
            &line_items[0][price_data][currency]=usd&line_items[0][price_data][unit_amount]=1500\
            &line_items[0][price_data][product_data][name]=T-shirt&line_items[0][quantity]=3\
            &line_items[1][price]=price_abc&line_items[1][quantity]=2";
        let r = req("POST", "/v1/checkout/sessions", FORM, body.as_bytes());
        assert_eq!(p.lookups(&r).unwrap(), vec!["/v1/prices/price_abc"]);
        let price = looked(
            "/v1/prices/price_abc",
            200,
            json!({"id": "price_abc", "unit_amount": 250, "currency": "usd"}),
        );
        let q = p.quote_with(&r, std::slice::from_ref(&price)).unwrap();
        // 3 x 15.00 + 2 x 2.50
        assert_eq!(q.reserve, Micros(50_000_000));
        assert_eq!(q.detail["line_items"], 2);
        let h = HeaderMap::new();
        let s = p.settle_response(
            &q,
            &resp(200, &h, r#"{"amount_total":4800,"currency":"usd"}"#),
        );
        assert_eq!(s.cost, Micros(48_000_000));

        let tiered = looked(
            "/v1/prices/price_abc",
            200,
            json!({"id": "price_abc", "unit_amount": null, "currency": "usd"}),
        );
        assert!(p.quote_with(&r, &[tiered]).is_err());
        let mixed = body.replace(
            "[0][price_data][currency]=usd",
            "[0][price_data][currency]=eur",
        );
        let p_eur = pricing(&[("eur", "1.08")]);
        let r = req("POST", "/v1/checkout/sessions", FORM, mixed.as_bytes());
        assert!(
            p_eur.quote_with(&r, &[price]).is_err(),
            "one currency per session"
        );
        let subscription = body.replace("mode=payment", "mode=subscription");
        let r = req(
            "POST",
            "/v1/checkout/sessions",
            FORM,
            subscription.as_bytes(),
        );
        assert!(p.quote(&r).is_err(), "subscriptions charge every period");
        let adjustable = format!("{body}&line_items[0][adjustable_quantity][enabled]=true");
        let r = req("POST", "/v1/checkout/sessions", FORM, adjustable.as_bytes());
        assert!(p.quote(&r).is_err(), "the customer could pay more");
        let setup = req(
            "POST",
            "/v1/checkout/sessions",
            FORM,
            b"mode=setup&currency=usd",
        );
        assert_eq!(p.quote(&setup).unwrap().kind, QuoteKind::Free);
        let empty = req("POST", "/v1/checkout/sessions", FORM, b"mode=payment");
        assert!(p.quote(&empty).is_err());
        let bad_id = req(
            "POST",
            "/v1/checkout/sessions",
            FORM,
            b"line_items[0][price]=../x",
        );
        assert!(p.lookups(&bad_id).is_err());
    }

    #[test]
    fn a_replayed_response_is_never_counted_again() {
        let p = pricing(&[]);
        let q = quote_form(&p, "amount=1999&currency=usd").unwrap();
        let mut h = HeaderMap::new();
        h.insert("idempotent-replayed", "true".parse().unwrap());
        let body = json!({"amount": 1999, "currency": "usd", "status": "succeeded"}).to_string();
        let s = p.settle_response(&q, &resp(200, &h, &body));
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Settled));
        assert_eq!(s.detail["idempotent_replay"], true);
        let mut hk = HeaderMap::new();
        hk.insert("idempotency-key", "retry-1".parse().unwrap());
        assert_eq!(p.idempotency_key(&hk), Some("retry-1"));
        assert_eq!(p.idempotency_key(&HeaderMap::new()), None);
        hk.append("idempotency-key", "retry-2".parse().unwrap());
        assert_eq!(p.idempotency_key(&hk), None, "two keys: reserved as usual");
        let mut long = HeaderMap::new();
        long.insert("idempotency-key", "k".repeat(256).parse().unwrap());
        assert_eq!(p.idempotency_key(&long), None);
    }

    #[test]
    fn settles_at_amount_on_success_else_releases() {
        let p = pricing(&[]);
        let q = quote_form(&p, "amount=1999&currency=usd").unwrap();
        let ok = json!({"amount": 1999, "currency": "usd", "status": "succeeded"}).to_string();
        let s = p.settle(&q, 200, ok.as_bytes());
        assert_eq!((s.cost, s.outcome), (Micros(19_990_000), Outcome::Settled));
        assert_eq!(s.detail["amount"], 1999);
        assert_eq!(s.detail["currency"], "usd");
        for status in [400, 402, 404, 409, 429, 500, 502] {
            let s = p.settle(&q, status, b"{\"error\":{}}");
            assert_eq!(
                (s.cost, s.outcome),
                (Micros::ZERO, Outcome::Released),
                "{status}"
            );
            assert_eq!(
                s.detail["amount"], 1999,
                "the audit still says what was refused"
            );
            assert_eq!(s.detail["status"], status);
        }
        let free = p.quote(&req("GET", "/v1/customers", None, b"")).unwrap();
        let s = p.settle(&free, 200, b"{}");
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Settled));
    }
}
