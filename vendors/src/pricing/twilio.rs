//! Twilio pricing.
//!
//! Owns the cost of messages and calls created through Twilio's REST API
//! (`/2010-04-01/Accounts/{AccountSid}/...`), priced from `prices/twilio.json`
//! (dated) or the operator's table:
//!
//! * `POST .../Messages.json` (form-encoded): an SMS reserves its `Body`'s
//!   segments times the SMS price of the `To` number's longest matching
//!   E.164 prefix; an MMS (`MediaUrl` given, or `SendAsMms=true`) reserves
//!   one MMS price. A message whose text is a content template
//!   (`ContentSid`) reserves the most segments a 1600-character body can
//!   take. A 2xx settles at the `price` Twilio reports when it reports one
//!   (usually not yet when the message is created), else at the quote (for
//!   a template, at the `num_segments` Twilio counted, never below the
//!   destination's MMS price since a template may carry media). Any other
//!   status is released.
//! * `POST .../Calls.json` reserves the table's flat `call_reservation`, and
//!   a 2xx settles at it: a call's price is known only after it ends.
//! * Updating or cancelling a message or call (`POST .../Messages/{Sid}.json`,
//!   `.../Calls/{Sid}.json`) and every GET, HEAD and DELETE are free.
//!
//! It must never forward what it cannot price: any other POST (buying a
//! number, starting a recording), a message to a destination the table does
//! not price, to a non-phone channel (`whatsapp:`), a body over Twilio's 1600
//! characters, parameters it cannot read (in the query, duplicated, in a body
//! that is not a form) are refused before forwarding. Segments are never
//! undercounted: only the GSM 03.38 characters count as GSM-7, anything else
//! makes the body UCS-2, which never takes fewer segments.

use keycap_proto::prices::twilio::{DestinationPrice, DestinationPrices, E164_MAX_DIGITS};
use keycap_proto::prices::TwilioPrices;
use keycap_proto::Micros;
use serde_json::{json, Value};

use super::{
    clip, free_quote, is_success, media_type, settle_fixed, settle_reported, unreadable, Outcome,
    PriceModel, PriceRequest, PricingError, Quote, QuoteKind, Settlement,
};

const BUILTIN_TABLE: &str = include_str!("../../prices/twilio.json");

/// The prices shipped with this build.
pub fn builtin_prices() -> TwilioPrices {
    TwilioPrices::from_json(BUILTIN_TABLE).expect("the built-in Twilio price table is valid")
}

/// The longest `Body` Twilio accepts, in characters.
pub const MAX_BODY_CHARS: usize = 1600;
/// The most media one message may carry.
const MAX_MEDIA: usize = 10;
/// The most segments a body of `MAX_BODY_CHARS` characters can take: every
/// character outside the Basic Multilingual Plane (two UTF-16 units, a pair
/// never split), 33 to a 67-unit segment. What a message whose text keycap
/// cannot read (a content template) reserves.
pub const MAX_SEGMENTS: u64 = 49;

/// Why a template's segment count is a bound, for the audit entry.
const TEMPLATE_BOUND: &str =
    "the template's text is not in the request: reserved at the most segments a 1600-character body takes";

/// The GSM 03.38 default alphabet: one septet each (0x1B, the escape to the
/// extension table, is not a character).
const GSM7_BASIC: &str = concat!(
    "@£$¥èéùìòÇ\nØø\rÅå",
    "\u{394}_\u{3a6}\u{393}\u{39b}\u{3a9}\u{3a0}\u{3a8}\u{3a3}\u{398}\u{39e}ÆæßÉ",
    " !\"#¤%&'()*+,-./",
    "0123456789:;<=>?",
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§",
    "¿abcdefghijklmnopqrstuvwxyzäöñüà",
);
/// The GSM 03.38 extension table: an escape plus a septet, two each.
const GSM7_EXTENSION: &str = "\u{c}^{}\\[~]|€";

/// GSM-7: at most 160 septets in one message, else 153 per segment (the
/// rest of each holds the concatenation header).
const GSM7_SINGLE: u32 = 160;
const GSM7_PART: u32 = 153;
/// UCS-2: at most 70 UTF-16 units in one message, else 67 per segment.
const UCS2_SINGLE: u32 = 70;
const UCS2_PART: u32 = 67;

/// How a message body is encoded on the air.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "gsm7",
            Encoding::Ucs2 => "ucs2",
        }
    }
}

/// Septets each ASCII character takes in GSM-7 (0: none), from the tables
/// once, so the common case is a lookup rather than a scan per character.
static GSM7_ASCII: std::sync::LazyLock<[u8; 128]> = std::sync::LazyLock::new(|| {
    let mut t = [0u8; 128];
    for (c, n) in (0u8..128).map(|b| (char::from(b), b)) {
        t[usize::from(n)] = if GSM7_BASIC.contains(c) {
            1
        } else if GSM7_EXTENSION.contains(c) {
            2
        } else {
            0
        };
    }
    t
});

/// Septets a character takes in GSM-7, `None` if it has no GSM-7 form.
fn gsm7_septets(c: char) -> Option<u32> {
    if c.is_ascii() {
        return match GSM7_ASCII[c as usize] {
            0 => None,
            n => Some(u32::from(n)),
        };
    }
    if GSM7_BASIC.contains(c) {
        Some(1)
    } else if GSM7_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Segments for characters of the given sizes: one if they fit in
/// `single` units, else as many `part`-unit segments as it takes when no
/// character (an escape pair, a surrogate pair) is split across two.
fn pack(sizes: impl Iterator<Item = u32> + Clone, single: u32, part: u32) -> u64 {
    let total: u64 = sizes.clone().map(u64::from).sum();
    if total == 0 {
        return 0;
    }
    if total <= u64::from(single) {
        return 1;
    }
    let (mut segments, mut used) = (1, 0);
    for size in sizes {
        if used + size > part {
            segments += 1;
            used = 0;
        }
        used += size;
    }
    segments
}

/// The encoding and number of segments Twilio sends `body` as: GSM-7 when
/// every character has a GSM-7 form, else UCS-2. An empty body is 0.
pub fn segments(body: &str) -> (Encoding, u64) {
    if body.chars().all(|c| gsm7_septets(c).is_some()) {
        let sizes = body.chars().filter_map(gsm7_septets);
        (Encoding::Gsm7, pack(sizes, GSM7_SINGLE, GSM7_PART))
    } else {
        let sizes = body.chars().map(|c| c.len_utf16() as u32);
        (Encoding::Ucs2, pack(sizes, UCS2_SINGLE, UCS2_PART))
    }
}

/// What settlement needs to know about a Twilio quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwilioCharge {
    /// A message; `bound` is set when its segment count was not known.
    Message { bound: Option<SegmentBound> },
    /// A call, reserved and settled at the flat `call_reservation`.
    Call,
}

/// A message reserved at the most segments it could take (a content
/// template), so that the `num_segments` Twilio reports can settle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentBound {
    pub max_segments: u64,
    pub per_segment: Micros,
    /// The destination's MMS price, or 0: a template may carry media, and
    /// an MMS reports one segment.
    pub at_least: Micros,
}

impl SegmentBound {
    /// What `segments` reported segments cost; `None` past the bound.
    fn cost(&self, segments: u64) -> Option<Micros> {
        if segments > self.max_segments {
            return None;
        }
        let n = i64::try_from(segments).ok()?;
        self.per_segment
            .0
            .checked_mul(n)
            .map(|c| Micros(c).max(self.at_least))
    }
}

/// The Twilio price model.
#[derive(Debug, Clone)]
pub struct TwilioPricing {
    prices: TwilioPrices,
}

impl TwilioPricing {
    pub fn new(prices: TwilioPrices) -> Self {
        TwilioPricing { prices }
    }
}

/// What a POST is, by its path under `/2010-04-01/Accounts/{AccountSid}/`.
#[derive(Debug, PartialEq, Eq)]
enum Post {
    CreateMessage,
    CreateCall,
    /// Updating, cancelling or redacting an existing message or call.
    UpdateExisting,
    Other,
}

fn post_kind(path: &str) -> Post {
    let Some((account, resource)) = path
        .strip_prefix("/2010-04-01/Accounts/")
        .and_then(|rest| rest.split_once('/'))
    else {
        return Post::Other;
    };
    if account.is_empty() {
        return Post::Other;
    }
    let existing = |r: &str| {
        r.strip_suffix(".json")
            .is_some_and(|sid| !sid.is_empty() && !sid.contains('/'))
    };
    match resource {
        "Messages.json" => Post::CreateMessage,
        "Calls.json" => Post::CreateCall,
        r if r.strip_prefix("Messages/").is_some_and(existing)
            || r.strip_prefix("Calls/").is_some_and(existing) =>
        {
            Post::UpdateExisting
        }
        _ => Post::Other,
    }
}

/// The message parameters that decide its price, from the form body.
#[derive(Default)]
struct MessageParams {
    to: Option<String>,
    body: Option<String>,
    content_sid: Option<String>,
    send_as_mms: Option<String>,
    media: usize,
}

/// Parameter names that price a message, as Twilio spells them.
const PRICED_PARAMS: [&str; 5] = ["To", "Body", "ContentSid", "MediaUrl", "SendAsMms"];

impl MessageParams {
    fn from_form(body: &[u8]) -> Result<Self, PricingError> {
        let mut p = MessageParams::default();
        for (k, v) in form_urlencoded::parse(body) {
            let slot = match &*k {
                "To" => &mut p.to,
                "Body" => &mut p.body,
                "ContentSid" => &mut p.content_sid,
                "SendAsMms" => &mut p.send_as_mms,
                "MediaUrl" => {
                    p.media += 1;
                    continue;
                }
                other => {
                    // A differently cased name might be read by Twilio as
                    // the real one; a price must not depend on a guess.
                    if let Some(name) = PRICED_PARAMS.iter().find(|n| n.eq_ignore_ascii_case(other))
                    {
                        return Err(unreadable(format!(
                            "parameter {:?} must be spelled {name}",
                            clip(other)
                        )));
                    }
                    continue;
                }
            };
            if slot.replace(v.into_owned()).is_some() {
                return Err(unreadable(format!("parameter {k} is given more than once")));
            }
        }
        if p.media > MAX_MEDIA {
            return Err(unreadable(format!(
                "a message carries at most {MAX_MEDIA} MediaUrl"
            )));
        }
        Ok(p)
    }
}

/// "+" then 1 to 15 digits, the first not 0.
fn is_e164(number: &str) -> bool {
    number.strip_prefix('+').is_some_and(|digits| {
        (1..=E164_MAX_DIGITS).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

/// The price of `to` in `table` (`what`: "SMS" or "MMS").
fn destination_price<'a>(
    table: &'a DestinationPrices,
    to: &str,
    what: &str,
) -> Result<DestinationPrice<'a>, PricingError> {
    table.for_number(to).ok_or_else(|| {
        PricingError::UnknownDestination(format!(
            "the Twilio price table has no {what} price for {}; an operator can add its prefix",
            clip(to)
        ))
    })
}

impl TwilioPricing {
    fn quote_message(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        if req.query.is_some_and(|q| !q.is_empty()) {
            return Err(unreadable(
                "keycap prices a Twilio message from its form body; send its parameters in the body, not the query string",
            ));
        }
        match media_type(req.content_type).as_deref() {
            None | Some("application/x-www-form-urlencoded") => {}
            Some(other) => {
                return Err(unreadable(format!(
                    "Twilio takes a message as application/x-www-form-urlencoded, not {}",
                    clip(other)
                )))
            }
        }
        let p = MessageParams::from_form(req.body)?;
        let to =
            p.to.as_deref()
                .ok_or_else(|| unreadable("a message needs To"))?
                .trim();
        if let Some((channel, _)) = to.split_once(':') {
            return Err(unreadable(format!(
                "keycap prices SMS and MMS to phone numbers; {}: addresses are not priced",
                clip(channel)
            )));
        }
        if !is_e164(to) {
            return Err(unreadable(
                "To must be an E.164 phone number such as +14155552671",
            ));
        }
        let body = p.body.as_deref().unwrap_or("");
        if body.chars().count() > MAX_BODY_CHARS {
            return Err(unreadable(format!(
                "Body is longer than Twilio's {MAX_BODY_CHARS} characters"
            )));
        }
        let mms = p.media > 0
            || p.send_as_mms
                .as_deref()
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if mms {
            let table = self.prices.mms.as_ref().ok_or_else(|| {
                PricingError::UnknownDestination(
                    "the Twilio price table prices no MMS; send the message without MediaUrl"
                        .into(),
                )
            })?;
            let price = destination_price(table, to, "MMS")?;
            return Ok(Quote {
                reserve: price.price,
                detail: json!({
                    "channel": "mms",
                    "destination_prefix": price.matched,
                    "media": p.media,
                    "unit_price_micros": price.price.0,
                }),
                streaming: false,
                kind: QuoteKind::Twilio(TwilioCharge::Message { bound: None }),
                forward_body: None,
            });
        }
        let price = destination_price(&self.prices.sms, to, "SMS")?;
        // A template's text is not in the request: it is bounded, even
        // beside a Body (which Twilio ignores for a template).
        let (encoding, segments, bound) = if p.content_sid.is_some() {
            let bound = SegmentBound {
                max_segments: MAX_SEGMENTS,
                per_segment: price.price,
                at_least: self
                    .prices
                    .mms
                    .as_ref()
                    .and_then(|t| t.for_number(to))
                    .map_or(Micros::ZERO, |m| m.price),
            };
            (Encoding::Ucs2, MAX_SEGMENTS, Some(bound))
        } else if body.is_empty() {
            return Err(unreadable("a message needs a Body, MediaUrl or ContentSid"));
        } else {
            let (encoding, segments) = segments(body);
            (encoding, segments, None)
        };
        let reserve = match bound {
            Some(b) => b.cost(segments),
            None => i64::try_from(segments)
                .ok()
                .and_then(|n| price.price.0.checked_mul(n))
                .map(Micros),
        }
        .ok_or_else(|| unreadable("message is too long to price"))?;
        let mut detail = json!({
            "channel": "sms",
            "destination_prefix": price.matched,
            "encoding": encoding.as_str(),
            "segments": segments,
            "unit_price_micros": price.price.0,
            "media": 0,
        });
        if bound.is_some() {
            detail["segments_bound"] = TEMPLATE_BOUND.into();
        }
        Ok(Quote {
            reserve,
            detail,
            streaming: false,
            kind: QuoteKind::Twilio(TwilioCharge::Message { bound }),
            forward_body: None,
        })
    }

    fn quote_call(&self) -> Result<Quote, PricingError> {
        let reserve = self.prices.call_reservation.ok_or_else(|| {
            unreadable("the Twilio price table has no call_reservation, so calls cannot be priced")
        })?;
        Ok(Quote {
            reserve,
            detail: json!({ "channel": "call", "call_reservation_micros": reserve.0 }),
            streaming: false,
            kind: QuoteKind::Twilio(TwilioCharge::Call),
            forward_body: None,
        })
    }
}

/// A decimal price as Twilio reports it ("-0.00750"), as its absolute
/// value in micro-dollars, rounded up past the sixth decimal.
fn reported_micros(text: &str) -> Option<Micros> {
    let t = text.trim();
    let t = t.strip_prefix('-').unwrap_or(t);
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || (t.contains('.') && frac.is_empty()) {
        return None;
    }
    let (kept, rest) = frac.split_at(frac.len().min(6));
    let exact = Micros::parse_usd(&format!("{int}.{kept}0")).ok()?;
    let round_up = i64::from(rest.bytes().any(|b| b != b'0'));
    exact.checked_add(Micros(round_up))
}

/// What a created message's JSON says it cost: `Ok(None)` when Twilio has
/// not priced it yet (`price` null or absent), `Err` when the price is
/// there but unusable.
fn reported_price(message: &Value) -> Result<Option<Micros>, &'static str> {
    let price = match message.get("price") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s,
        Some(_) => return Err("Twilio reported a price that is not a decimal string"),
    };
    let usd = message
        .get("price_unit")
        .and_then(Value::as_str)
        .is_some_and(|u| u.eq_ignore_ascii_case("usd"));
    if !usd {
        return Err("Twilio reported a price in a currency other than USD");
    }
    reported_micros(price)
        .map(Some)
        .ok_or("Twilio reported a price that is not a decimal")
}

/// `num_segments` of a message resource (Twilio sends it as a string), when
/// it is a positive integer.
fn reported_segments(message: &Value) -> Option<u64> {
    match message.get("num_segments")? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
    .filter(|&n| n > 0)
}

/// How a message settles: a failure is released; a success at the price
/// Twilio reports, else (not priced yet) at what its reported segments cost
/// when the quote was only a bound (never below the destination's MMS
/// price, as the template may have carried media), else at the quote.
fn settle_message(
    quote: &Quote,
    bound: Option<SegmentBound>,
    status: u16,
    body: &[u8],
) -> Settlement {
    if !is_success(status) {
        return Settlement::released(quote, status);
    }
    let Ok(message) = serde_json::from_slice::<Value>(body) else {
        return Settlement::at_reservation(quote, status, "response is not a Twilio message");
    };
    let reported = match reported_price(&message) {
        Ok(r) => r,
        Err(why) => return Settlement::at_reservation(quote, status, why),
    };
    let counted = bound.and_then(|b| b.cost(reported_segments(&message)?));
    let (cost, source) = match (reported, counted) {
        (Some(price), _) => (price, "response"),
        (None, Some(cost)) => (cost, "num_segments"),
        (None, None) => (quote.reserve, "quote"),
    };
    settle_reported(quote, status, Some(cost), |cost| {
        (
            Some(cost),
            json!({ "price_source": source, "price_micros": cost.0 }),
        )
    })
}

impl PriceModel for TwilioPricing {
    fn quote(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        match req.method {
            "GET" | "HEAD" | "DELETE" => return Ok(free_quote(false)),
            "POST" => {}
            other => {
                return Err(unreadable(format!(
                    "keycap cannot price {} {} for profile twilio",
                    clip(other),
                    clip(req.path)
                )))
            }
        }
        match post_kind(req.path) {
            Post::CreateMessage => self.quote_message(req),
            Post::CreateCall => self.quote_call(),
            Post::UpdateExisting => Ok(free_quote(false)),
            Post::Other => Err(unreadable(format!(
                "keycap prices Twilio messages and calls only; it cannot price POST {}",
                clip(req.path)
            ))),
        }
    }

    fn settle(&self, quote: &Quote, status: u16, body: &[u8]) -> Settlement {
        match &quote.kind {
            QuoteKind::Twilio(TwilioCharge::Message { bound }) => {
                settle_message(quote, *bound, status, body)
            }
            QuoteKind::Twilio(TwilioCharge::Call) if is_success(status) => Settlement {
                cost: quote.reserve,
                outcome: Outcome::Settled,
                detail: json!({
                    "status": status,
                    "price_source": "call_reservation",
                    "price_micros": quote.reserve.0,
                    "price_note": "a call's price is known only after it ends; it settles at the flat call_reservation",
                }),
            },
            _ => settle_fixed(quote, status),
        }
    }
}

/// Twilio's refusal envelope: `{"code", "message", "status", "more_info"}`,
/// with keycap's fields in `details`, plus keycap's `error` object.
/// twilio-python raises `TwilioRestException` with the status as `status`,
/// keycap's code as `code` and its fields as `details`. It has no
/// `title`, so the SDK never reads it as an RFC 9457 problem.
pub fn refusal_envelope(r: &crate::envelope::Refused<'_>) -> crate::envelope::Wire {
    let error = crate::envelope::keycap_error(r);
    crate::envelope::Wire::body(json!({
        "code": r.code,
        "message": r.message,
        "status": r.status.as_u16(),
        "more_info": "refused by keycap before the call reached Twilio; see `code`",
        "details": error.clone(),
        "error": error,
    }))
}

#[cfg(test)]
mod envelope_tests {
    use super::*;
    use crate::envelope::Refused;

    #[test]
    fn refusals_are_twilio_errors_with_keycaps_code() {
        let fields = json!({"remaining_usd": 5}).as_object().unwrap().clone();
        let wire = refusal_envelope(&Refused {
            status: http::StatusCode::TOO_MANY_REQUESTS,
            code: "daily_cap_exceeded",
            message: "over",
            fields: &fields,
            retry_is_futile: true,
        });
        let keycap = json!({"code": "daily_cap_exceeded", "message": "over", "remaining_usd": 5});
        assert_eq!(wire.body["code"], "daily_cap_exceeded");
        assert_eq!(wire.body["status"], 429);
        assert_eq!(wire.body["message"], "over");
        assert_eq!(wire.body["details"], keycap);
        assert_eq!(wire.body["error"], keycap);
        assert!(wire.body.get("title").is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");
    const MESSAGES: &str = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json";
    const CALLS: &str = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Calls.json";

    fn pricing() -> TwilioPricing {
        TwilioPricing::new(builtin_prices())
    }

    fn table(json: &str) -> TwilioPricing {
        TwilioPricing::new(TwilioPrices::from_json(json).unwrap())
    }

    fn req<'a>(method: &'a str, path: &'a str, body: &'a str) -> PriceRequest<'a> {
        PriceRequest {
            headers: crate::pricing::no_headers(),
            method,
            path,
            query: None,
            content_type: FORM,
            body: body.as_bytes(),
        }
    }

    /// A form body from decoded pairs.
    fn form(pairs: &[(&str, &str)]) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    }

    fn message(p: &TwilioPricing, pairs: &[(&str, &str)]) -> Result<Quote, PricingError> {
        p.quote(&req("POST", MESSAGES, &form(pairs)))
    }

    #[test]
    fn builtin_prices_load() {
        let t = builtin_prices();
        assert!(!t.as_of.is_empty());
        assert_eq!(
            t.sms.for_number("+14155552671").unwrap().price,
            Micros(8_300)
        );
        assert_eq!(t.call_reservation, Some(Micros(500_000)));
        assert!(t.mms.is_some());
    }

    #[test]
    fn the_alphabet_tables_are_gsm_03_38() {
        // 128 positions, one of them the escape.
        assert_eq!(GSM7_BASIC.chars().count(), 127);
        assert_eq!(GSM7_EXTENSION.chars().count(), 10);
        assert!(GSM7_BASIC.chars().all(|c| !GSM7_EXTENSION.contains(c)));
        for c in ['@', '$', '£', '_', 'Δ', 'Ω', 'Ç', 'ü', 'à', '\n', '\r', ' '] {
            assert_eq!(gsm7_septets(c), Some(1), "{c:?}");
        }
        for c in ['^', '{', '}', '\\', '[', '~', ']', '|', '€', '\u{c}'] {
            assert_eq!(gsm7_septets(c), Some(2), "{c:?}");
        }
        // Look-alikes are not GSM-7: the Latin O and the ohm sign, a
        // backtick, a lowercase c cedilla, a curly quote.
        for c in ['\u{2126}', '`', 'ç', '\u{2019}', '\t'] {
            assert_eq!(gsm7_septets(c), None, "{c:?}");
        }
    }

    #[test]
    fn gsm7_segments_at_160_and_153() {
        let a = |n: usize| "a".repeat(n);
        assert_eq!(segments(""), (Encoding::Gsm7, 0));
        assert_eq!(segments("hi"), (Encoding::Gsm7, 1));
        assert_eq!(segments(&a(160)), (Encoding::Gsm7, 1));
        assert_eq!(segments(&a(161)), (Encoding::Gsm7, 2));
        assert_eq!(segments(&a(306)), (Encoding::Gsm7, 2));
        assert_eq!(segments(&a(307)), (Encoding::Gsm7, 3));
        assert_eq!(segments(&a(1600)), (Encoding::Gsm7, 11));
        // Extension characters cost two septets...
        assert_eq!(segments(&format!("{}€", a(158))), (Encoding::Gsm7, 1));
        assert_eq!(segments(&format!("{}€", a(159))), (Encoding::Gsm7, 2));
        assert_eq!(segments(&"{".repeat(80)), (Encoding::Gsm7, 1));
        assert_eq!(segments(&"{".repeat(81)), (Encoding::Gsm7, 2));
        // ...and an escape pair is never split: 152 + 2 does not fit in the
        // first 153-septet segment, so 306 septets take three segments.
        let straddle = format!("{}€{}", a(152), "b".repeat(152));
        assert_eq!(
            straddle
                .chars()
                .map(|c| gsm7_septets(c).unwrap())
                .sum::<u32>(),
            306
        );
        assert_eq!(segments(&straddle), (Encoding::Gsm7, 3));
        let fits = format!("{}€{}", a(151), "b".repeat(153));
        assert_eq!(segments(&fits), (Encoding::Gsm7, 2));
    }

    #[test]
    fn ucs2_segments_at_70_and_67() {
        let zh = |n: usize| "\u{436}".repeat(n); // Cyrillic zhe: one UTF-16 unit
        assert_eq!(segments(&zh(70)), (Encoding::Ucs2, 1));
        assert_eq!(segments(&zh(71)), (Encoding::Ucs2, 2));
        assert_eq!(segments(&zh(134)), (Encoding::Ucs2, 2));
        assert_eq!(segments(&zh(135)), (Encoding::Ucs2, 3));
        // An emoji is a surrogate pair: two units.
        assert_eq!(segments(&"😀".repeat(35)), (Encoding::Ucs2, 1));
        assert_eq!(segments(&"😀".repeat(36)), (Encoding::Ucs2, 2));
        // A pair is never split: 66 + 2 does not fit in the first 67-unit
        // segment, so 134 units take three segments.
        let straddle = format!("{}😀{}", zh(66), zh(66));
        assert_eq!(straddle.encode_utf16().count(), 134);
        assert_eq!(segments(&straddle), (Encoding::Ucs2, 3));
        assert_eq!(
            segments(&format!("{}😀{}", zh(65), zh(65))),
            (Encoding::Ucs2, 2)
        );
        // One character without a GSM-7 form makes the whole body UCS-2.
        let mixed = format!("{}ç", "a".repeat(69));
        assert_eq!(segments(&mixed), (Encoding::Ucs2, 1));
        let mixed = format!("{}😀", "a".repeat(69));
        assert_eq!(segments(&mixed), (Encoding::Ucs2, 2));
        // The bound a template reserves is the worst 1600-character body.
        assert_eq!(
            segments(&"😀".repeat(MAX_BODY_CHARS)),
            (Encoding::Ucs2, MAX_SEGMENTS)
        );
        assert!(segments(&zh(MAX_BODY_CHARS)).1 <= MAX_SEGMENTS);
    }

    #[test]
    fn an_sms_costs_its_segments_at_the_destination_price() {
        let p = pricing();
        let body = "a".repeat(200);
        let q = message(
            &p,
            &[
                ("To", "+447700900123"),
                ("From", "+15017122661"),
                ("Body", &body),
            ],
        )
        .unwrap();
        assert_eq!(q.reserve, Micros(2 * 52_400));
        assert_eq!(
            q.detail,
            json!({"channel": "sms", "destination_prefix": "+44", "encoding": "gsm7",
                   "segments": 2, "unit_price_micros": 52_400, "media": 0})
        );
        assert_eq!(
            q.kind,
            QuoteKind::Twilio(TwilioCharge::Message { bound: None })
        );
        let q = message(&p, &[("To", "+14155552671"), ("Body", "Grüße 👋")]).unwrap();
        assert_eq!(q.reserve, Micros(8_300));
        assert_eq!(q.detail["encoding"], "ucs2");
        // Exactly Twilio's limit is priced; one more is refused.
        let longest = "a".repeat(MAX_BODY_CHARS);
        let q = message(&p, &[("To", "+14155552671"), ("Body", &longest)]).unwrap();
        assert_eq!(q.reserve, Micros(11 * 8_300));
        let over = "a".repeat(MAX_BODY_CHARS + 1);
        let err = message(&p, &[("To", "+14155552671"), ("Body", &over)]).unwrap_err();
        assert_eq!(err.code(), "unpriceable_request");
        assert!(err.to_string().contains("1600"), "{err}");
    }

    #[test]
    fn the_longest_prefix_prices_and_an_unpriced_destination_is_refused() {
        let p = table(
            r#"{"as_of":"x","currency":"usd",
                "sms":{"prefixes":{"+1":"0.0083","+1876":"0.12","+44":"0.05"}},
                "mms":{"prefixes":{"+1":"0.02"}}}"#,
        );
        let q = message(&p, &[("To", "+18765550100"), ("Body", "hi")]).unwrap();
        assert_eq!(
            (q.reserve, &q.detail["destination_prefix"]),
            (Micros(120_000), &json!("+1876"))
        );
        let q = message(&p, &[("To", "+18775550100"), ("Body", "hi")]).unwrap();
        assert_eq!(
            (q.reserve, &q.detail["destination_prefix"]),
            (Micros(8_300), &json!("+1"))
        );
        let err = message(&p, &[("To", "+4915112345678"), ("Body", "hi")]).unwrap_err();
        assert_eq!(err.code(), "unknown_destination");
        // MMS prices only where the mms table does.
        let err = message(
            &p,
            &[
                ("To", "+447700900123"),
                ("MediaUrl", "https://x.test/a.png"),
            ],
        )
        .unwrap_err();
        assert_eq!(err.code(), "unknown_destination");
        assert!(err.to_string().contains("MMS"), "{err}");
        // A default catches every other destination.
        let p = table(
            r#"{"as_of":"x","currency":"usd","sms":{"default":"0.2","prefixes":{"+1":"0.01"}}}"#,
        );
        let q = message(&p, &[("To", "+4915112345678"), ("Body", "hi")]).unwrap();
        assert_eq!(
            (q.reserve, &q.detail["destination_prefix"]),
            (Micros(200_000), &json!("default"))
        );
        // No mms table at all: every MMS is refused.
        let err = message(
            &p,
            &[("To", "+15005550006"), ("SendAsMms", "true"), ("Body", "x")],
        )
        .unwrap_err();
        assert_eq!(err.code(), "unknown_destination");
    }

    #[test]
    fn an_mms_costs_one_message_whatever_its_text() {
        let p = pricing();
        let long = "😀".repeat(1000);
        let q = message(
            &p,
            &[
                ("To", "+14155552671"),
                ("Body", &long),
                ("MediaUrl", "https://demo.twilio.com/owl.png"),
                ("MediaUrl", "https://demo.twilio.com/logo.png"),
            ],
        )
        .unwrap();
        assert_eq!(q.reserve, Micros(22_000));
        assert_eq!(
            q.detail,
            json!({"channel": "mms", "destination_prefix": "+1", "media": 2,
                   "unit_price_micros": 22_000})
        );
        let q = message(
            &p,
            &[
                ("To", "+14155552671"),
                ("Body", "hi"),
                ("SendAsMms", "True"),
            ],
        )
        .unwrap();
        assert_eq!((q.reserve, &q.detail["media"]), (Micros(22_000), &json!(0)));
        let q = message(
            &p,
            &[
                ("To", "+14155552671"),
                ("Body", "hi"),
                ("SendAsMms", "false"),
            ],
        )
        .unwrap();
        assert_eq!(q.detail["channel"], "sms");
        let eleven: Vec<(&str, &str)> = std::iter::once(("To", "+14155552671"))
            .chain(std::iter::repeat_n(
                ("MediaUrl", "https://x.test/a.png"),
                11,
            ))
            .collect();
        assert_eq!(
            message(&p, &eleven).unwrap_err().code(),
            "unpriceable_request"
        );
    }

    #[test]
    fn a_template_reserves_the_most_a_body_can_take() {
        let p = pricing();
        let q = message(
            &p,
            &[
                ("To", "+14155552671"),
                ("ContentSid", "HXb5b62575e6e4ff6129ad7c8efe1f983e"),
                ("ContentVariables", r#"{"1":"Ada"}"#),
                ("Body", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(q.reserve, Micros(MAX_SEGMENTS as i64 * 8_300));
        assert_eq!(q.detail["segments"], MAX_SEGMENTS);
        assert!(q.detail["segments_bound"].is_string());
        assert_eq!(
            q.kind,
            QuoteKind::Twilio(TwilioCharge::Message {
                bound: Some(SegmentBound {
                    max_segments: MAX_SEGMENTS,
                    per_segment: Micros(8_300),
                    at_least: Micros(22_000),
                })
            })
        );
    }

    #[test]
    fn unreadable_messages_are_refused() {
        let p = pricing();
        let to = ("To", "+14155552671");
        for pairs in [
            vec![("Body", "no destination")],
            vec![to],
            vec![to, ("Body", "")],
            vec![("To", "whatsapp:+14155552671"), ("Body", "hi")],
            vec![("To", "messenger:123456"), ("Body", "hi")],
            vec![("To", "14155552671"), ("Body", "hi")],
            vec![("To", "+0155552671"), ("Body", "hi")],
            vec![("To", "+1415555267112345"), ("Body", "hi")],
            vec![("To", "+1 415 555 2671"), ("Body", "hi")],
            vec![("To", "+"), ("Body", "hi")],
            vec![to, ("To", "+447700900123"), ("Body", "hi")],
            vec![to, ("Body", "a"), ("Body", "b")],
            vec![to, ("body", &"😀".repeat(1000)), ("Body", "a")],
            vec![("to", "+447700900123"), to, ("Body", "a")],
            vec![to, ("mediaurl", "https://x.test/a.png"), ("Body", "a")],
        ] {
            let err = message(&p, &pairs).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{pairs:?}: {err}");
        }
        let whatsapp = message(&p, &[("To", "whatsapp:+14155552671"), ("Body", "hi")]).unwrap_err();
        assert!(whatsapp.to_string().contains("whatsapp"), "{whatsapp}");
        let body = form(&[to, ("Body", "hi")]);
        for ct in [
            "application/json",
            "multipart/form-data; boundary=x",
            "text/plain",
        ] {
            let r = PriceRequest {
                content_type: Some(ct),
                ..req("POST", MESSAGES, &body)
            };
            assert_eq!(
                p.quote(&r).unwrap_err().code(),
                "unpriceable_request",
                "{ct}"
            );
        }
        let json = PriceRequest {
            content_type: Some("application/json"),
            ..req("POST", MESSAGES, r#"{"To":"+14155552671","Body":"hi"}"#)
        };
        assert!(p
            .quote(&json)
            .unwrap_err()
            .to_string()
            .contains("x-www-form-urlencoded"));
        // No content type is read as the form Twilio's clients send.
        let bare = PriceRequest {
            content_type: None,
            ..req("POST", MESSAGES, &body)
        };
        assert_eq!(p.quote(&bare).unwrap().reserve, Micros(8_300));
        let in_query = PriceRequest {
            query: Some("Body=x"),
            ..req("POST", MESSAGES, &body)
        };
        assert_eq!(
            p.quote(&in_query).unwrap_err().code(),
            "unpriceable_request"
        );
    }

    #[test]
    fn reads_are_free_updates_are_free_other_posts_are_refused() {
        let p = pricing();
        let acct = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef";
        for (method, path) in [
            ("GET", format!("{acct}/Messages.json")),
            ("GET", format!("{acct}/Messages/SM1.json")),
            ("HEAD", format!("{acct}/Calls.json")),
            ("DELETE", format!("{acct}/Messages/SM1.json")),
            ("POST", format!("{acct}/Messages/SM1.json")),
            ("POST", format!("{acct}/Calls/CA1.json")),
        ] {
            let q = p
                .quote(&req(method, &path, "Body=x&To=%2B14155552671"))
                .unwrap();
            assert_eq!(
                (q.reserve, &q.kind),
                (Micros::ZERO, &QuoteKind::Free),
                "{method} {path}"
            );
        }
        for (method, path) in [
            ("POST", format!("{acct}/IncomingPhoneNumbers.json")),
            ("POST", format!("{acct}/Calls/CA1/Recordings.json")),
            ("POST", format!("{acct}/Messages")),
            ("POST", format!("{acct}/Messages.xml")),
            ("POST", format!("{acct}/messages.json")),
            ("POST", format!("{acct}/Messages/.json")),
            ("POST", "/2010-04-01/Accounts//Messages.json".to_string()),
            ("POST", "/2010-04-01/Accounts.json".to_string()),
            ("POST", "/v1/Services".to_string()),
            ("PUT", format!("{acct}/Messages.json")),
            ("PATCH", format!("{acct}/Messages/SM1.json")),
        ] {
            let err = p.quote(&req(method, &path, "")).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{method} {path}");
        }
    }

    #[test]
    fn a_message_settles_at_the_reported_price_else_the_quote() {
        let p = pricing();
        let q = message(&p, &[("To", "+447700900123"), ("Body", &"a".repeat(200))]).unwrap();
        assert_eq!(q.reserve, Micros(104_800));
        // Priced: its absolute value, in micro-dollars.
        let s = p.settle(
            &q,
            201,
            br#"{"sid":"SM1","price":"-0.10480","price_unit":"USD","num_segments":"2"}"#,
        );
        assert_eq!((s.cost, s.outcome), (Micros(104_800), Outcome::Settled));
        assert_eq!(s.detail["price_source"], "response");
        assert!(s.detail.get("exceeded_reservation").is_none());
        let s = p.settle(&q, 200, br#"{"price":"-0.05","price_unit":"usd"}"#);
        assert_eq!(
            (s.cost, s.detail["price_micros"].clone()),
            (Micros(50_000), json!(50_000))
        );
        // Not priced yet (Twilio's usual answer on creation): the quote.
        let s = p.settle(&q, 201, br#"{"sid":"SM1","status":"queued","price":null,"price_unit":"USD","num_segments":"1"}"#);
        assert_eq!((s.cost, s.outcome), (Micros(104_800), Outcome::Settled));
        assert_eq!(s.detail["price_source"], "quote");
        let s = p.settle(&q, 201, br#"{"sid":"SM1"}"#);
        assert_eq!(
            (s.cost, &s.detail["price_source"]),
            (Micros(104_800), &json!("quote"))
        );
        // More than reserved: recorded as reported, and flagged.
        let s = p.settle(&q, 201, br#"{"price":"-0.30000","price_unit":"USD"}"#);
        assert_eq!((s.cost, s.outcome), (Micros(300_000), Outcome::Settled));
        assert_eq!(s.detail["exceeded_reservation"], true);
        // Failures are not billed.
        for status in [400, 401, 404, 429, 500, 503] {
            let s = p.settle(
                &q,
                status,
                br#"{"code":21211,"message":"Invalid 'To' Phone Number","status":400}"#,
            );
            assert_eq!(
                (s.cost, s.outcome),
                (Micros::ZERO, Outcome::Released),
                "{status}"
            );
            assert_eq!(
                s.detail["destination_prefix"], "+44",
                "the audit still says what it was"
            );
        }
    }

    #[test]
    fn an_unusable_reported_price_settles_at_the_reservation() {
        let p = pricing();
        let q = message(&p, &[("To", "+14155552671"), ("Body", "hi")]).unwrap();
        for body in [
            &br#"{"price":"-0.0075","price_unit":"EUR"}"#[..],
            br#"{"price":"-0.0075"}"#,
            br#"{"price":-0.0075,"price_unit":"USD"}"#,
            br#"{"price":"cheap","price_unit":"USD"}"#,
            br#"<Response/>"#,
            b"",
        ] {
            let s = p.settle(&q, 201, body);
            assert_eq!(
                (s.cost, s.outcome),
                (Micros(8_300), Outcome::SettledAtReservation),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(s.detail["reason"].is_string());
        }
    }

    #[test]
    fn a_template_settles_from_the_segments_twilio_counted() {
        let p = pricing();
        let q = message(&p, &[("To", "+14155552671"), ("ContentSid", "HX1")]).unwrap();
        let s = p.settle(&q, 201, br#"{"price":null,"num_segments":"3"}"#);
        assert_eq!(
            (s.cost, &s.detail["price_source"]),
            (Micros(3 * 8_300), &json!("num_segments"))
        );
        // Never below the MMS price: the template may have carried media.
        let s = p.settle(&q, 201, br#"{"price":null,"num_segments":"1"}"#);
        assert_eq!(
            (s.cost, &s.detail["price_source"]),
            (Micros(22_000), &json!("num_segments"))
        );
        // Where the table prices no MMS there is no floor.
        let uk = message(&p, &[("To", "+447700900123"), ("ContentSid", "HX1")]).unwrap();
        assert_eq!(uk.reserve, Micros(MAX_SEGMENTS as i64 * 52_400));
        let s = p.settle(&uk, 201, br#"{"price":null,"num_segments":"1"}"#);
        assert_eq!(s.cost, Micros(52_400));
        // A count Twilio has not made yet, or one past the bound: the quote.
        for body in [
            &br#"{"price":null,"num_segments":"0"}"#[..],
            br#"{"price":null,"num_segments":"50"}"#,
            br#"{"price":null,"num_segments":"two"}"#,
            br#"{"price":null}"#,
        ] {
            let s = p.settle(&q, 201, body);
            assert_eq!(
                (s.cost, &s.detail["price_source"]),
                (q.reserve, &json!("quote"))
            );
        }
        let s = p.settle(
            &q,
            201,
            br#"{"price":"-0.0166","price_unit":"USD","num_segments":"9"}"#,
        );
        assert_eq!(
            (s.cost, &s.detail["price_source"]),
            (Micros(16_600), &json!("response"))
        );
        // Only a bounded quote reads num_segments.
        let plain = message(&p, &[("To", "+14155552671"), ("Body", "hi")]).unwrap();
        let s = p.settle(&plain, 201, br#"{"price":null,"num_segments":"1"}"#);
        assert_eq!(s.detail["price_source"], "quote");
    }

    #[test]
    fn a_call_reserves_and_settles_the_flat_reservation() {
        let p = pricing();
        let q = p.quote(&req("POST", CALLS, "To=%2B14155551212&From=%2B15017122661&Url=https%3A%2F%2Fdemo.twilio.com%2Fdocs%2Fvoice.xml")).unwrap();
        assert_eq!(q.reserve, Micros(500_000));
        assert_eq!(q.kind, QuoteKind::Twilio(TwilioCharge::Call));
        let s = p.settle(&q, 201, br#"{"sid":"CA1","status":"queued","price":null}"#);
        assert_eq!((s.cost, s.outcome), (Micros(500_000), Outcome::Settled));
        assert_eq!(s.detail["price_source"], "call_reservation");
        assert!(s.detail["price_note"]
            .as_str()
            .unwrap()
            .contains("after it ends"));
        let s = p.settle(&q, 400, br#"{"code":21205}"#);
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Released));
        let no_calls = table(r#"{"as_of":"x","currency":"usd","sms":{"default":"0.01"}}"#);
        let err = no_calls.quote(&req("POST", CALLS, "")).unwrap_err();
        assert!(err.to_string().contains("call_reservation"), "{err}");
    }

    #[test]
    fn reported_prices_are_read_exactly_and_rounded_up() {
        assert_eq!(reported_micros("-0.00750"), Some(Micros(7_500)));
        assert_eq!(reported_micros("0.0075"), Some(Micros(7_500)));
        assert_eq!(reported_micros("-1"), Some(Micros(1_000_000)));
        assert_eq!(reported_micros("-0.00750001"), Some(Micros(7_501)));
        assert_eq!(reported_micros("-0.007500000"), Some(Micros(7_500)));
        assert_eq!(reported_micros("0"), Some(Micros::ZERO));
        for bad in [
            "",
            "-",
            "--1",
            "1.",
            ".5",
            "1e-3",
            "0,5",
            "- 1",
            "abc",
            "99999999999999999",
        ] {
            assert_eq!(reported_micros(bad), None, "{bad:?}");
        }
    }
}
