//! Stripe pricing.
//!
//! Owns the cost of Stripe calls. Every write is one operation of Stripe's
//! published v1 API (`operations`, a checked-in table of every POST and
//! DELETE): priced by a rule — a Charge or a new PaymentIntent reserves the
//! `amount` it states, a confirmation or an invoice payment what Stripe says
//! the object holds, a Checkout Session its line items, tax and shipping
//! (`checkout`) — free, or refused. Reads under `/v1/` are free. A 2xx
//! settles at what the response says moved, anything else is released.
//!
//! It must never forward a write it could not read as Stripe reads it: the
//! query string and the body are one set of parameters; a missing,
//! duplicated, negative or non-integer `amount`, a missing `currency`, a
//! parameter name form parsers read differently, a parameter the operation
//! does not have, a money parameter the operation does not handle, a body
//! format it does not parse, and any path the table does not classify are
//! errors, not zero quotes. A currency other than USD is priced only
//! through a configured rate, converted with exact integer arithmetic and
//! rounded up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use http::HeaderMap;
use keycap_proto::prices::CurrencyRates;
use keycap_proto::{Micros, MICROS_PER_USD};
use serde_json::{json, Value};

use super::{
    clip, free_quote, media_type, mul_div_ceil, settle_fixed, Looked, PriceModel, PriceRequest,
    PriceResponse, PricingError, Quote, QuoteKind, Settlement,
};
use operations::{Class, FreeRule, Operation, PricedRule};

mod checkout;
mod operations;

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
        // A build whose operation table does not load prices no Stripe call.
        operations::table()?;
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

/// Most objects one request may need read from Stripe before it is priced.
const MAX_LOOKUPS: usize = 20;

/// Whether a method only reads: reads move no money.
fn is_read_method(method: &str) -> bool {
    matches!(method, "GET" | "HEAD")
}

/// The operation of the table a write is, or why it is refused. A read
/// (`GET`, `HEAD`) under `/v1/` is `None`: it moves nothing.
fn operation(method: &str, path: &str) -> Result<Option<&'static Operation>, PricingError> {
    if !path.starts_with("/v1/") {
        return Err(unreadable(
            "keycap prices Stripe's v1 API only; /v2/ and every other path are refused",
        ));
    }
    if is_read_method(method) {
        return Ok(None);
    }
    let table = operations::table()?;
    let op = table.find(method, path).ok_or_else(|| {
        unreadable(format!(
            "{} {} is not an operation of Stripe's API version {} that keycap knows; it is refused",
            clip(method),
            clip(path),
            table.api_version
        ))
    })?;
    match op.class {
        Class::Refused(why) if op.legacy => Err(unreadable(format!(
            "{} (this is a legacy path Stripe no longer publishes)",
            why.message()
        ))),
        Class::Refused(why) => Err(unreadable(why.message())),
        Class::Unclassified => Err(unreadable(format!(
            "keycap has not classified {} {} yet; it is refused until it is",
            op.method, op.path
        ))),
        Class::Priced(_) | Class::Free(_) => Ok(Some(op)),
    }
}

/// The object id in segment `i` of a path (`/v1/invoices/{id}/pay`: 2),
/// checked before it goes into a lookup path.
fn path_id(path: &str, i: usize) -> Result<&str, PricingError> {
    let id = path.trim_start_matches('/').split('/').nth(i).unwrap_or("");
    if !is_object_id(id) {
        return Err(unreadable(format!(
            "{:?} in the path is not a Stripe id",
            clip(id)
        )));
    }
    Ok(id)
}

/// A Stripe object id: `pi_...`, `in_...`, `price_...`. Checked before it
/// goes into a lookup path.
fn is_object_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A request's parameters as Stripe reads them: the query string and the
/// body as one set (Stripe merges a write's query parameters into its body's),
/// form fields by their bracketed names (`line_items[0][quantity]`), or a JSON
/// body flattened to the same names. A parameter pricing reads given twice,
/// and a top-level name in both the query and the body, are refused: which
/// duplicate Stripe honours is not something to guess when money depends on
/// it. So is a name that is not `name[key]...`, since form parsers disagree
/// on how to read one.
/// Each value remembers whether it was a JSON string: an amount must be a
/// JSON integer, since "10" could be read differently by different parsers.
#[derive(Default)]
struct Params {
    /// The values of the parameters pricing reads (`is_read`).
    values: BTreeMap<String, (String, bool)>,
    /// Every top-level name the request carries, read or not.
    names: BTreeSet<String>,
}

impl Params {
    fn parse(req: &PriceRequest<'_>) -> Result<Params, PricingError> {
        let mut p = match req.query.filter(|q| !q.is_empty()) {
            // Some servers also split a query string at ';'.
            Some(q) if q.contains(';') => return Err(unreadable(
                "the query string contains ';', which servers split differently; encode it as %3B",
            )),
            Some(q) => Self::from_form(q.as_bytes())?,
            None => Params::default(),
        };
        if req.body.is_empty() {
            return Ok(p);
        }
        let body = match media_type(req.content_type).as_deref() {
            None | Some("application/x-www-form-urlencoded") => Self::from_form(req.body)?,
            Some("application/json") => Self::from_json(req.body)?,
            Some(other) => {
                return Err(unreadable(format!(
                    "cannot read the amount from a {} body; use application/x-www-form-urlencoded",
                    clip(other)
                )))
            }
        };
        if let Some(both) = p.names.intersection(&body.names).next() {
            return Err(unreadable(format!(
                "parameter {} is given both in the query string and in the body",
                clip(both)
            )));
        }
        p.names.extend(body.names);
        p.values.extend(body.values);
        Ok(p)
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
        if self.values.contains_key(&name) {
            return Err(unreadable(format!(
                "parameter {} is given more than once",
                clip(&name)
            )));
        }
        self.values.insert(name, (value, json_string));
        Ok(())
    }

    fn from_form(body: &[u8]) -> Result<Params, PricingError> {
        let mut p = Params::default();
        // Names are decoded first and values only for parameters pricing
        // reads: a body is mostly descriptions and metadata.
        for pair in body.split(|&b| b == b'&') {
            if pair.is_empty() {
                continue;
            }
            let name_end = pair.iter().position(|&b| b == b'=').unwrap_or(pair.len());
            let name = form_urlencoded::parse(&pair[..name_end])
                .next()
                .map(|(n, _)| n)
                .unwrap_or_default();
            let Some(top) = top_level_name(&name) else {
                return Err(unreadable(format!(
                    "parameter name {:?} is not of the form name[key]...",
                    clip(&name)
                )));
            };
            if !p.names.contains(top) {
                p.names.insert(top.to_string());
            }
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
        let mut p = Params::default();
        if let Value::Object(m) = &v {
            for (k, v) in m {
                p.names.insert(k.clone());
                if is_read(k) {
                    p.flatten(k.clone(), v)?;
                }
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
        self.values.get(name).map(|(v, _)| v.as_str())
    }

    /// Whether the request carries a parameter of this top-level name, in
    /// any form (`balance`, `balance[x]`).
    fn has(&self, top: &str) -> bool {
        self.names.contains(top)
    }

    /// Every top-level parameter name the request carries.
    fn names(&self) -> impl Iterator<Item = &String> {
        self.names.iter()
    }

    /// A required non-negative integer (an amount in minor units, a
    /// quantity).
    fn int(&self, name: &str, what: &str) -> Result<i64, PricingError> {
        match self.values.get(name) {
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

    /// The indices of a list parameter (`line_items[i][...]`), in the
    /// order Stripe numbers them.
    fn indices(&self, list: &str) -> Vec<String> {
        let prefix = format!("{list}[");
        let mut out: Vec<String> = Vec::new();
        for k in self.values.keys() {
            let idx = k
                .strip_prefix(&prefix)
                .and_then(|r| r.split_once(']'))
                .map(|(i, _)| i.to_string());
            if let Some(i) = idx {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out.sort_by_key(|i| (i.len(), i.clone()));
        out
    }

    /// Whether any parameter under `prefix` (`line_items[0][tax_rates]`)
    /// is given.
    fn any_under(&self, prefix: &str) -> bool {
        self.values
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }
}

/// The top-level name of a parameter name of the form `name[key][key]...`
/// (keys may be empty, `name` is letters, digits and `_`); `None` for any
/// other form, which form parsers read in different ways.
fn top_level_name(name: &str) -> Option<&str> {
    let end = name.find('[').unwrap_or(name.len());
    let (top, mut rest) = name.split_at(end);
    if top.is_empty() || !top.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    while !rest.is_empty() {
        let close = rest.find(']')?;
        if !rest.starts_with('[') || rest[1..close].contains('[') {
            return None;
        }
        rest = &rest[close + 1..];
    }
    Some(top)
}

/// The top-level parameters pricing reads, besides the money parameters
/// and the guarded ones (`operations`); the rest are never decoded.
const READ: [&str; 8] = [
    "currency",
    "mode",
    "line_items",
    "paid_out_of_band",
    "invoice",
    "shipping_options",
    "automatic_tax",
    "optional_items",
];

/// Every top-level parameter pricing reads: `READ`, the money parameters
/// and the guarded ones.
static READ_ALL: LazyLock<BTreeSet<&'static str>> = LazyLock::new(|| {
    READ.iter()
        .copied()
        .chain(operations::MONEY_PARAMS.iter().map(|(n, _)| *n))
        .chain(operations::GUARDED.iter().copied())
        .collect()
});

/// Whether a parameter (`line_items[0][quantity]` by its top-level name)
/// is one pricing reads.
fn is_read(name: &str) -> bool {
    let top = name.split('[').next().unwrap_or(name);
    READ_ALL.contains(top)
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
            StripeOp::Checkout => match own_amount("amount_total") {
                None => Spent::Unknown,
                // The customer picks a shipping option after the session is
                // made; its total holds the first one, and the dearest may
                // still be charged: the reservation bounds it.
                Some(m) if quote.detail["customer_chooses_shipping"] == true => {
                    Spent::Amount(m.max(quote.reserve))
                }
                Some(m) => Spent::Amount(m),
            },
        }
    }
}

/// `POST /v1/invoices`: free only for an invoice Stripe will not finalize
/// and charge on its own (`auto_advance=false`, or sent for the customer to
/// pay). Stated explicitly, since the default differs between API versions.
fn invoice_create_check(p: &Params) -> Result<(), PricingError> {
    let manual = p.get("auto_advance") == Some("false")
        || p.get("collection_method") == Some("send_invoice");
    if !manual {
        return Err(unreadable(
            "an invoice Stripe advances itself is charged out of keycap's sight; \
             set auto_advance=false and pay it with POST /v1/invoices/{id}/pay",
        ));
    }
    Ok(())
}

/// The draft invoice an invoice item names, which `invoice_item_check`
/// reads from Stripe.
fn invoice_item_target(p: &Params) -> Result<String, PricingError> {
    let Some(invoice) = p.get("invoice") else {
        return Err(unreadable(
            "an invoice item without an invoice waits for the customer's next invoice, which \
             Stripe may charge on its own (a subscription's renewal, say); name a draft \
             invoice created with auto_advance=false and pay it with POST /v1/invoices/{id}/pay",
        ));
    };
    if !is_object_id(invoice) {
        return Err(unreadable(format!(
            "invoice {:?} is not a Stripe id",
            clip(invoice)
        )));
    }
    Ok(format!("/v1/invoices/{invoice}"))
}

/// `POST /v1/invoiceitems`: free only onto a draft invoice Stripe will not
/// finalize on its own, so what it adds is charged only through `/pay`.
fn invoice_item_check(p: &Params, looked: &[Looked]) -> Result<(), PricingError> {
    let path = invoice_item_target(p)?;
    let inv = looked_object(looked, &path, "the invoice")?;
    let draft = inv.get("status").and_then(Value::as_str) == Some("draft");
    let manual = inv.get("auto_advance") == Some(&Value::Bool(false));
    if !(draft && manual) {
        return Err(unreadable(
            "an invoice item may only go on a draft invoice with auto_advance=false: Stripe \
             charges any other invoice out of keycap's sight",
        ));
    }
    Ok(())
}

enum Spent {
    Amount(Micros),
    /// An amount, and the object's status for the audit entry.
    AmountWith(Micros, String),
    Nothing(&'static str),
    Unknown,
}

/// The headers that name the account a call acts for. Given twice, which
/// one Stripe honours (and so which account's idempotency keys a retry is
/// matched against) is not something to guess.
const ACCOUNT_HEADERS: [&str; 2] = ["stripe-account", "stripe-context"];

fn one_account(headers: &HeaderMap) -> Result<(), PricingError> {
    for name in ACCOUNT_HEADERS {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(unreadable(format!(
                "the {name} header is given more than once"
            )));
        }
    }
    Ok(())
}

/// Stripe marks a response it replays for a repeated Idempotency-Key.
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

impl PriceModel for StripePricing {
    fn quote(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        self.quote_with(req, &[])
    }

    /// Stripe reads a write's query with its body, and so does `Params`.
    fn check_write_query(&self, _req: &PriceRequest<'_>) -> Result<(), PricingError> {
        Ok(())
    }

    fn lookups(&self, req: &PriceRequest<'_>) -> Result<Vec<String>, PricingError> {
        one_account(req.headers)?;
        let Some(op) = operation(req.method, req.path)? else {
            return Ok(Vec::new());
        };
        let reads_first = matches!(
            op.class,
            Class::Priced(
                PricedRule::PaymentIntentConfirm
                    | PricedRule::InvoicePay
                    | PricedRule::CheckoutSession
            ) | Class::Free(Some(FreeRule::ItemOnDraft))
        );
        if !reads_first {
            // Checked once, when it is quoted.
            return Ok(Vec::new());
        }
        // Checked before anything is read from Stripe for it.
        let p = Params::parse(req)?;
        op.check(&p, operations::table()?.api_version)?;
        Ok(match op.class {
            Class::Priced(PricedRule::PaymentIntentConfirm) => {
                vec![format!("/v1/payment_intents/{}", path_id(req.path, 2)?)]
            }
            Class::Priced(PricedRule::InvoicePay) => {
                vec![format!("/v1/invoices/{}", path_id(req.path, 2)?)]
            }
            Class::Priced(PricedRule::CheckoutSession) => checkout::lookups(&p)?,
            Class::Free(Some(FreeRule::ItemOnDraft)) => vec![invoice_item_target(&p)?],
            _ => Vec::new(),
        })
    }

    fn quote_with(&self, req: &PriceRequest<'_>, looked: &[Looked]) -> Result<Quote, PricingError> {
        one_account(req.headers)?;
        let Some(op) = operation(req.method, req.path)? else {
            return Ok(free_quote(false));
        };
        let p = Params::parse(req)?;
        op.check(&p, operations::table()?.api_version)?;
        let what = || format!("{} {}", op.method, op.path);
        match op.class {
            Class::Free(None) => Ok(free_quote(false)),
            Class::Free(Some(FreeRule::ManualInvoice)) => {
                invoice_create_check(&p)?;
                Ok(free_quote(false))
            }
            Class::Free(Some(FreeRule::ItemOnDraft)) => {
                invoice_item_check(&p, looked)?;
                Ok(free_quote(false))
            }
            Class::Free(Some(FreeRule::ManualFinalize)) => {
                if p.get("auto_advance") != Some("false") {
                    return Err(unreadable(
                        "an invoice is finalized only with auto_advance=false: Stripe would \
                         otherwise collect it later, out of keycap's sight; pay it with \
                         POST /v1/invoices/{id}/pay, which keycap prices",
                    ));
                }
                Ok(free_quote(false))
            }
            Class::Priced(rule @ (PricedRule::Charge | PricedRule::PaymentIntent)) => {
                let amount = p.int("amount", &what())?;
                let currency = p.currency("currency", &what())?;
                let op = if rule == PricedRule::Charge {
                    StripeOp::Charge
                } else {
                    StripeOp::Intent
                };
                self.charge_quote(op, amount, currency, json!({}))
            }
            Class::Priced(PricedRule::CheckoutSession) => self.checkout_quote(&p, looked),
            Class::Priced(PricedRule::PaymentIntentConfirm) => {
                let pi = path_id(req.path, 2)?;
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
            Class::Priced(PricedRule::InvoicePay) => {
                if p.get("paid_out_of_band") == Some("true") {
                    // Marked paid by other means: Stripe charges nothing.
                    return Ok(free_quote(false));
                }
                let inv = path_id(req.path, 2)?;
                let obj = looked_object(looked, &format!("/v1/invoices/{inv}"), "the invoice")?;
                // Only a finalized invoice's lines are fixed: a draft could
                // gain lines between this read and Stripe's payment, which
                // would charge them unpriced.
                let status = obj.get("status").and_then(Value::as_str);
                if status != Some("open") {
                    return Err(unreadable(format!(
                        "only an open invoice is paid through keycap (this one is {}): \
                         finalize it with auto_advance=false first, so its amount cannot change",
                        clip(status.unwrap_or("of unknown status"))
                    )));
                }
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
            Class::Refused(_) | Class::Unclassified => unreachable!("refused by operation()"),
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
    fn a_rate_the_shared_rule_refuses_is_a_configuration_error() {
        // The rule itself is `keycap_proto::prices::currency`'s (tested
        // there); the Stripe model only reports what it says.
        let map = [("usd".to_string(), "2".to_string())].into();
        let err = StripePricing::new(&map).unwrap_err();
        assert_eq!(err.code(), "pricing_misconfigured");
        assert!(StripePricing::new(&[("usd".into(), "1.000".into())].into()).is_ok());
    }

    #[test]
    fn calls_that_move_no_money_are_free_and_unknown_writes_refused() {
        let p = pricing(&[]);
        for (m, path, body) in [
            ("GET", "/v1/payment_intents", ""),
            ("GET", "/v1/charges", ""),
            ("HEAD", "/v1/charges", ""),
            ("POST", "/v1/customers", "description=x"),
            ("POST", "/v1/customers/cus_1", "description=x"),
            ("POST", "/v1/refunds", "metadata[x]=1"),
            ("POST", "/v1/payment_intents/pi_1", "description=x"),
            ("POST", "/v1/payment_intents/pi_1/capture", "metadata[x]=1"),
            ("POST", "/v1/payment_intents/pi_1/cancel", "expand[0]=x"),
            ("POST", "/v1/charges/ch_1/capture", "receipt_email=a%40b.c"),
            ("POST", "/v1/invoices/in_1/void", ""),
            ("POST", "/v1/invoices/create_preview", "customer=cus_1"),
            ("POST", "/v1/checkout/sessions/cs_1/expire", ""),
            ("DELETE", "/v1/customers/cus_1", ""),
            ("DELETE", "/v1/invoiceitems/ii_1", ""),
        ] {
            let q = p.quote(&req(m, path, FORM, body.as_bytes())).unwrap();
            assert_eq!(q.reserve, Micros::ZERO, "{m} {path}");
            assert_eq!(q.kind, QuoteKind::Free, "{m} {path}");
        }
        for (m, path) in [
            ("POST", "/v1/transfers"),
            ("POST", "/v1/payouts"),
            ("POST", "/v1/subscriptions"),
            ("POST", "/v1/payment_links"),
            ("POST", "/v1/invoices/in_1/finalize"),
            ("POST", "/v1/payment_intents/pi_1/increment_authorization"),
            ("POST", "/v1/charges/"),
            ("POST", "/v1/payment_intents/pi..1/confirm"),
            ("POST", "/v1/no_such_resource"),
            ("POST", "/v2/core/events"),
            ("GET", "/v2/core/events"),
            ("DELETE", "/v2/core/vault/us_bank_accounts/x"),
            ("GET", "/v3/anything"),
            ("PUT", "/v1/charges"),
            ("PATCH", "/v1/customers/cus_1"),
        ] {
            let err = p.quote(&req(m, path, FORM, b"")).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{m} {path}");
        }
    }

    #[test]
    fn free_writes_that_would_move_money_later_are_refused() {
        let p = pricing(&[]);
        let refused = [
            ("DELETE", "/v1/subscriptions/sub_1", ""),
            ("DELETE", "/v1/subscription_items/si_1", ""),
            ("DELETE", "/v1/customers/cus_1/discount", ""),
            ("POST", "/v1/invoices", "customer=cus_1"),
            ("POST", "/v1/invoices", "customer=cus_1&auto_advance=true"),
            (
                "POST",
                "/v1/invoices",
                "customer=cus_1&auto_advance=false&subscription=sub_1",
            ),
            ("POST", "/v1/invoices/in_1", "auto_advance=true"),
            ("POST", "/v1/invoices/in_1", "auto_advance="),
            ("POST", "/v1/invoices/in_1", "auto_advance[x]=false"),
            (
                "POST",
                "/v1/invoices/in_1",
                "automatically_finalizes_at=1700000000",
            ),
            (
                "POST",
                "/v1/invoices/in_1",
                "collection_method=charge_automatically",
            ),
            ("POST", "/v1/invoices/in_1/add_lines", "lines[0][amount]=5"),
            ("POST", "/v1/payment_intents/pi_1", "amount=999999"),
            ("POST", "/v1/payment_intents/pi_1", "currency=eur"),
            ("POST", "/v1/customers", "balance=5000"),
            ("POST", "/v1/customers/cus_1", "balance=5000"),
            (
                "POST",
                "/v1/customers/cus_1/balance_transactions",
                "amount=5000&currency=usd",
            ),
            ("POST", "/v1/invoiceitems/ii_1", "amount=5000"),
            ("POST", "/v1/invoiceitems/ii_1", "quantity=50"),
            (
                "POST",
                "/v1/invoiceitems",
                "customer=cus_1&amount=5000&currency=usd",
            ),
            (
                "POST",
                "/v1/invoiceitems",
                "customer=cus_1&amount=5000&currency=usd&subscription=sub_1",
            ),
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
            ("POST", "/v1/invoices/in_1", "auto_advance=false"),
            (
                "POST",
                "/v1/invoiceitems/ii_1",
                "description=x&metadata[k]=v",
            ),
            (
                "POST",
                "/v1/payment_intents/pi_1",
                "description=x&metadata[order]=7",
            ),
            ("POST", "/v1/setup_intents", "customer=cus_1&confirm=true"),
            ("POST", "/v1/refunds", "payment_intent=pi_1&amount=500"),
        ];
        for (m, path, body) in free {
            let q = p.quote(&req(m, path, FORM, body.as_bytes())).unwrap();
            assert_eq!(q.kind, QuoteKind::Free, "{m} {path} {body}");
        }
    }

    fn with_query<'a>(r: PriceRequest<'a>, query: &'a str) -> PriceRequest<'a> {
        PriceRequest {
            query: Some(query),
            ..r
        }
    }

    #[test]
    fn the_query_string_is_read_with_the_body_as_stripe_reads_it() {
        let p = pricing(&[]);
        // Parameters in the query are parameters: priced like the body's.
        let r = with_query(
            req("POST", "/v1/charges", FORM, b""),
            "amount=250&currency=usd",
        );
        assert_eq!(p.quote(&r).unwrap().reserve, Micros(2_500_000));
        let r = with_query(
            req("POST", "/v1/charges", FORM, b"currency=usd"),
            "amount=250",
        );
        assert_eq!(p.quote(&r).unwrap().reserve, Micros(2_500_000));
        // And guarded like the body's, on writes that are otherwise free.
        for (m, path, query) in [
            ("POST", "/v1/invoices/in_1", "auto_advance=true"),
            ("POST", "/v1/payment_intents/pi_1", "amount=99999999"),
            ("POST", "/v1/customers/cus_1", "balance=100000"),
            ("DELETE", "/v1/subscriptions/sub_1", "invoice_now=true"),
            (
                "POST",
                "/v1/invoices",
                "auto_advance=true&customer=cus_1&collection_method=send_invoice",
            ),
        ] {
            let r = with_query(req(m, path, FORM, b""), query);
            let err = p.quote(&r).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{m} {path}?{query}");
        }
        let r = with_query(
            req("POST", "/v1/invoices", FORM, b"customer=cus_1"),
            "auto_advance=false",
        );
        assert_eq!(p.quote(&r).unwrap().kind, QuoteKind::Free);
        // A name in both, or a query split differently by different
        // servers, is refused.
        for (query, body) in [
            ("amount=1", "amount=100000&currency=usd"),
            ("currency=usd", "amount=1&currency=usd"),
            ("metadata[a]=1", "amount=1&currency=usd&metadata[b]=2"),
            ("amount=1;currency=usd", ""),
            ("description=x;amount=5", "amount=1&currency=usd"),
        ] {
            let r = with_query(req("POST", "/v1/charges", FORM, body.as_bytes()), query);
            assert_eq!(
                p.quote(&r).unwrap_err().code(),
                "unpriceable_request",
                "{query}"
            );
        }
        let r = with_query(
            req("POST", "/v1/charges", FORM, b"amount=1&currency=usd"),
            "",
        );
        assert_eq!(p.quote(&r).unwrap().reserve, Micros(10_000));
        let json = with_query(
            req(
                "POST",
                "/v1/charges",
                Some("application/json"),
                br#"{"currency":"usd"}"#,
            ),
            "amount=7",
        );
        assert_eq!(p.quote(&json).unwrap().reserve, Micros(70_000));
        let json = with_query(
            req(
                "POST",
                "/v1/charges",
                Some("application/json"),
                br#"{"amount":1,"currency":"usd"}"#,
            ),
            "amount=7",
        );
        assert!(p.quote(&json).is_err());
    }

    #[test]
    fn parameters_are_only_those_the_operation_has_in_one_reading() {
        let p = pricing(&[]);
        for body in [
            // Read as `amount` by some form parsers, as another name by others.
            "amount]=500000&amount=1&currency=usd",
            "[amount]=500000&currency=usd",
            "amount=1&currency=usd&%20amount=500000",
            "amount=1&currency=usd&=5",
            "amount=1&currency=usd&amount[=5",
            "amount=1&currency=usd&amount[a[b]]=5",
            // Not a parameter of this operation (in this API version).
            "amount=1&currency=usd&_method=delete",
            "amount=1&currency=usd&plan=gold",
        ] {
            let err = quote_form(&p, body).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{body}");
        }
        let err = p
            .quote(&req(
                "POST",
                "/v1/customers",
                FORM,
                b"plan=gold&email=a%40b.c",
            ))
            .unwrap_err();
        assert!(err.to_string().contains("\"plan\""), "{err}");
        let err = p
            .quote(&req(
                "POST",
                "/v1/customers",
                Some("application/json"),
                br#"{"plan":"gold"}"#,
            ))
            .unwrap_err();
        assert!(err.to_string().contains("plan"), "{err}");
        // Nested, repeated and empty keys of known parameters are fine.
        let body = "amount=1&currency=usd&metadata[order id]=7&metadata[]=x&expand[0]=customer\
                    &allowed_payment_method_types[0]=card&&";
        assert!(quote_form(&p, body).is_ok());
        assert_eq!(
            top_level_name("line_items[0][price_data][currency]"),
            Some("line_items")
        );
        assert_eq!(top_level_name("expand[]"), Some("expand"));
        for bad in [
            "", "a]", "[a]", "a[", "a[b", "a[b]c", "a[[b]]", "a b", "a-b", "a[b]]",
        ] {
            assert_eq!(top_level_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn subscriptions_are_refused_whatever_path_reaches_them() {
        let p = pricing(&[]);
        for (m, path, query) in [
            ("POST", "/v1/customers/cus_1/subscriptions", ""),
            (
                "POST",
                "/v1/customers/cus_1/subscriptions/sub_1",
                "proration_behavior=always_invoice",
            ),
            (
                "DELETE",
                "/v1/customers/cus_1/subscriptions/sub_1",
                "invoice_now=true",
            ),
            (
                "DELETE",
                "/v1/customers/cus_1/subscriptions/sub_1/discount",
                "",
            ),
            (
                "POST",
                "/v1/subscriptions/sub_1",
                "proration_behavior=always_invoice",
            ),
            ("DELETE", "/v1/subscriptions/sub_1", ""),
        ] {
            let r = with_query(req(m, path, FORM, b"items[0][price]=price_1"), query);
            let err = p.quote(&r).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{m} {path}");
            assert!(err.to_string().contains("subscription"), "{err}");
        }
    }

    #[test]
    fn an_invoice_item_goes_only_on_a_draft_stripe_will_not_charge_on_its_own() {
        let p = pricing(&[]);
        let r = req(
            "POST",
            "/v1/invoiceitems",
            FORM,
            b"customer=cus_1&invoice=in_7&amount=5000&currency=usd",
        );
        assert_eq!(p.lookups(&r).unwrap(), vec!["/v1/invoices/in_7"]);
        let invoice = |status: &str, auto: bool| {
            looked(
                "/v1/invoices/in_7",
                200,
                json!({"id": "in_7", "status": status, "auto_advance": auto}),
            )
        };
        let q = p.quote_with(&r, &[invoice("draft", false)]).unwrap();
        assert_eq!(q.kind, QuoteKind::Free);
        for bad in [invoice("draft", true), invoice("open", false)] {
            assert!(p.quote_with(&r, &[bad]).is_err());
        }
        assert!(p.quote_with(&r, &[]).is_err(), "not read: not forwarded");
        let pending = req(
            "POST",
            "/v1/invoiceitems",
            FORM,
            b"customer=cus_1&amount=5000&currency=usd",
        );
        assert!(p.lookups(&pending).is_err());
        let bad_id = req(
            "POST",
            "/v1/invoiceitems",
            FORM,
            b"invoice=../x&amount=1&currency=usd",
        );
        assert!(p.lookups(&bad_id).is_err());
    }

    #[test]
    fn a_confirmation_of_another_amount_is_refused() {
        let p = pricing(&[]);
        let r = req(
            "POST",
            "/v1/payment_intents/pi_1/confirm",
            FORM,
            b"amount_to_confirm=99999999",
        );
        assert_eq!(p.lookups(&r).unwrap_err().code(), "unpriceable_request");
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

    const ONE_DOLLAR_ITEM: &str = "mode=payment&line_items[0][price_data][currency]=usd\
        &line_items[0][price_data][unit_amount]=100\
        &line_items[0][price_data][product_data][name]=Pen&line_items[0][quantity]=1";

    #[test]
    fn a_checkout_session_reserves_its_dearest_shipping_option() {
        let p = pricing(&[]);
        let body = format!(
            "{ONE_DOLLAR_ITEM}\
             &shipping_options[0][shipping_rate_data][type]=fixed_amount\
             &shipping_options[0][shipping_rate_data][display_name]=Post\
             &shipping_options[0][shipping_rate_data][fixed_amount][amount]=500\
             &shipping_options[0][shipping_rate_data][fixed_amount][currency]=usd\
             &shipping_options[1][shipping_rate]=shr_courier"
        );
        let r = req("POST", "/v1/checkout/sessions", FORM, body.as_bytes());
        assert_eq!(
            p.lookups(&r).unwrap(),
            vec!["/v1/shipping_rates/shr_courier"]
        );
        let courier = |amount: i64, currency: &str| {
            looked(
                "/v1/shipping_rates/shr_courier",
                200,
                json!({"id": "shr_courier", "type": "fixed_amount",
                       "fixed_amount": {"amount": amount, "currency": currency}}),
            )
        };
        // 1.00 + the dearer of 5.00 and 999,999.99.
        let q = p.quote_with(&r, &[courier(99_999_999, "usd")]).unwrap();
        assert_eq!(q.reserve, Micros(1_000_000_990_000));
        assert_eq!(q.detail["shipping_amount"], 99_999_999);
        assert_eq!(q.detail["customer_chooses_shipping"], true);
        let q = p.quote_with(&r, &[courier(200, "usd")]).unwrap();
        assert_eq!(q.reserve, Micros(6_000_000));
        // Stripe's total holds the first option; the customer may pick the
        // dearest, so a session with a choice settles at the bound.
        let h = HeaderMap::new();
        let s = p.settle_response(
            &q,
            &resp(200, &h, r#"{"amount_total":600,"currency":"usd"}"#),
        );
        assert_eq!(s.cost, Micros(6_000_000));
        let p_eur = pricing(&[("eur", "1.08")]);
        assert!(
            p_eur.quote_with(&r, &[courier(200, "eur")]).is_err(),
            "one currency"
        );
        let tiered = looked(
            "/v1/shipping_rates/shr_courier",
            200,
            json!({"id": "shr_courier", "type": "delivery_estimate"}),
        );
        assert!(p.quote_with(&r, &[tiered]).is_err());
        assert!(
            p.quote_with(&r, &[]).is_err(),
            "a rate not read is not priced"
        );

        // One inline option: its amount is what the customer pays.
        let one = format!(
            "{ONE_DOLLAR_ITEM}\
             &shipping_options[0][shipping_rate_data][display_name]=Post\
             &shipping_options[0][shipping_rate_data][fixed_amount][amount]=99999999\
             &shipping_options[0][shipping_rate_data][fixed_amount][currency]=usd"
        );
        let q = p
            .quote(&req("POST", "/v1/checkout/sessions", FORM, one.as_bytes()))
            .unwrap();
        assert_eq!(q.reserve, Micros(1_000_000_990_000));
        assert!(q.detail.get("customer_chooses_shipping").is_none());
        let s = p.settle_response(
            &q,
            &resp(200, &h, r#"{"amount_total":100000099,"currency":"usd"}"#),
        );
        assert_eq!(s.cost, Micros(1_000_000_990_000));
        for refused in [
            one.replace("[amount]=99999999", "[amount]=x"),
            one.replace("[fixed_amount][currency]=usd", "[fixed_amount][currency]=eur"),
            format!("{one}&shipping_options[0][shipping_rate_data][fixed_amount][currency_options][eur][amount]=1"),
            format!("{ONE_DOLLAR_ITEM}&shipping_options[0][shipping_rate_data][display_name]=Post"),
        ] {
            let r = req("POST", "/v1/checkout/sessions", FORM, refused.as_bytes());
            assert!(p_eur.quote(&r).is_err(), "{refused}");
        }
    }

    #[test]
    fn a_checkout_session_reserves_its_exclusive_tax_and_refuses_what_it_cannot_bound() {
        let p = pricing(&[]);
        let body = "mode=payment&line_items[0][price_data][currency]=usd\
            &line_items[0][price_data][unit_amount]=1000&line_items[0][quantity]=3\
            &line_items[0][price_data][product_data][name]=Mug\
            &line_items[0][tax_rates][0]=txr_state&line_items[0][tax_rates][1]=txr_city\
            &line_items[0][tax_rates][2]=txr_vat";
        let r = req("POST", "/v1/checkout/sessions", FORM, body.as_bytes());
        assert_eq!(
            p.lookups(&r).unwrap(),
            vec![
                "/v1/tax_rates/txr_state",
                "/v1/tax_rates/txr_city",
                "/v1/tax_rates/txr_vat"
            ]
        );
        let rate = |id: &str, pct: serde_json::Value, inclusive: bool| {
            looked(
                &format!("/v1/tax_rates/{id}"),
                200,
                json!({"id": id, "percentage": pct, "inclusive": inclusive}),
            )
        };
        let rates = [
            rate("txr_state", json!(8.25), false),
            rate("txr_city", json!(0.333), false),
            rate("txr_vat", json!(20), true),
        ];
        let q = p.quote_with(&r, &rates).unwrap();
        // 30.00 + 8.25% (2.475, up to 2.48) + 0.333% (0.0999, up to 0.10);
        // inclusive tax is in the unit amount already.
        assert_eq!(q.detail["tax_amount"], 248 + 10);
        assert_eq!(q.reserve, Micros(32_580_000));
        let no_pct = rate("txr_state", json!(null), false);
        assert!(p
            .quote_with(&r, &[no_pct, rates[1].clone(), rates[2].clone()])
            .is_err());

        for (extra, why) in [
            ("&automatic_tax[enabled]=true", "tax"),
            (
                "&optional_items[0][price]=price_1&optional_items[0][quantity]=1",
                "optional",
            ),
            (
                "&line_items[0][adjustable_quantity][enabled]=true",
                "quantity",
            ),
            (
                "&line_items[0][price_data][recurring][interval]=month",
                "recurring",
            ),
            ("&currency=eur", "currency"),
        ] {
            let body = format!("{ONE_DOLLAR_ITEM}{extra}");
            let r = req("POST", "/v1/checkout/sessions", FORM, body.as_bytes());
            let err = pricing(&[("eur", "1.08")]).quote(&r).unwrap_err();
            assert!(err.to_string().contains(why), "{extra}: {err}");
        }
        let ok = format!("{ONE_DOLLAR_ITEM}&automatic_tax[enabled]=false&currency=usd");
        let q = p
            .quote(&req("POST", "/v1/checkout/sessions", FORM, ok.as_bytes()))
            .unwrap();
        assert_eq!(q.reserve, Micros(1_000_000));
        let recurring = looked(
            "/v1/prices/price_m",
            200,
            json!({"id": "price_m", "unit_amount": 500, "currency": "usd",
                   "recurring": {"interval": "month"}}),
        );
        let r = req(
            "POST",
            "/v1/checkout/sessions",
            FORM,
            b"mode=payment&line_items[0][price]=price_m",
        );
        assert!(p.quote_with(&r, &[recurring]).is_err());
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
