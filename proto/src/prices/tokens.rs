//! Per-token price tables for LLM vendors.
//!
//! Owns the table format every LLM profile shares (prices per million
//! tokens per token class, long-context prices, surcharge multipliers, a
//! model's output limit, an optional default for unknown models), its
//! validation, writing a table back out, model lookup, and the one cost
//! function both the reservation (`ModelPrice::bound`) and the settlement
//! (`ModelPrice::charge`) use. A table may also price models that are not
//! billed by input and output text: `embeddings` (input tokens only) and
//! `images` (per generated image, or per token with a fixed token count per
//! image). Each vendor ships its own dated table under `prices/`,
//! replaceable by an operator's file or the vendor's `prices` set through
//! the admin API.
//!
//! It must never let a settlement within a reservation's bounds cost more
//! than the reservation: long-context prices are refused below the base
//! ones, and the cost is monotone in every count. Prices are decimal
//! strings in the file and integer micro-dollars here; a float never holds
//! one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{clip, mul_div_ceil, PriceTableError};
use crate::Micros;

/// Token prices are quoted per this many tokens.
pub const TOKENS_PER_UNIT: i128 = 1_000_000;

/// A price multiplier in millionths (`1.1` is 1_100_000): a surcharge the
/// vendor adds to every token of a call in some condition (US-only
/// inference, a regional endpoint). Never below 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Uplift(i64);

impl Uplift {
    const ONE: i64 = 1_000_000;

    /// The multiplier in millionths.
    pub fn millionths(self) -> i64 {
        self.0
    }

    /// An uplift from millionths, between 1 and 10.
    pub fn from_millionths(m: i64) -> Option<Uplift> {
        (Self::ONE..=10 * Self::ONE)
            .contains(&m)
            .then_some(Uplift(m))
    }
}

/// The surcharges a model's calls may carry, each applied by the profile
/// that can tell when it applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Uplifts {
    /// Anthropic: inference run only in the US (`inference_geo: "us"`, per
    /// request or as the workspace's default).
    pub inference_geo_us: Option<Uplift>,
    /// OpenAI: calls through a data-residency endpoint (`eu.api.openai.com`).
    pub regional_processing: Option<Uplift>,
}

/// Token counts of one call by price class. `input` is the plain input:
/// cache reads and writes are counted apart from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUse {
    pub input: u64,
    pub cache_read: u64,
    /// Writes to the short-lived prompt cache.
    pub cache_write: u64,
    /// Writes to the long-lived prompt cache (one hour for Anthropic), and
    /// writes whose duration the vendor does not report.
    pub cache_write_long: u64,
    pub output: u64,
}

impl TokenUse {
    /// Every input token of the call, whatever its class: what decides
    /// whether long-context prices apply.
    pub fn total_input(&self) -> u64 {
        self.input
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_write)
            .saturating_add(self.cache_write_long)
    }
}

/// The price of each token class that applies to one call, per million
/// tokens, with every optional price resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    pub input: Micros,
    pub cache_read: Micros,
    pub cache_write: Micros,
    pub cache_write_long: Micros,
    pub output: Micros,
}

impl Rates {
    /// The dearest price any one input token can have.
    pub fn max_input(&self) -> Micros {
        self.input
            .max(self.cache_read)
            .max(self.cache_write)
            .max(self.cache_write_long)
    }
}

/// Prices for a call whose input is larger than `above_input_tokens`: the
/// whole call (every token, input and output) is billed at these instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongContext {
    pub above_input_tokens: u64,
    pub input: Micros,
    pub cached_input: Option<Micros>,
    pub output: Micros,
    pub cache_write: Option<Micros>,
    pub cache_write_1h: Option<Micros>,
}

/// One model's prices. Token prices are micro-dollars per million tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelPrice {
    pub input: Micros,
    /// Price of prompt tokens served from the cache; `input` when absent.
    pub cached_input: Option<Micros>,
    pub output: Micros,
    /// Price of input tokens written to a short-lived prompt cache
    /// (Anthropic's five minutes); absent where writes cost plain input.
    pub cache_write: Option<Micros>,
    /// Price of input tokens written to a long-lived prompt cache
    /// (Anthropic's one hour).
    pub cache_write_1h: Option<Micros>,
    /// The model's output limit: the bound used when a request sets none.
    pub max_output_tokens: u64,
    /// Most input tokens one image can cost; `None` means image input is
    /// refused for this model because its cost cannot be bounded.
    pub image_input_tokens_max: Option<u64>,
    /// Dearer prices for calls with very large inputs.
    pub long_context: Option<LongContext>,
    pub uplifts: Uplifts,
}

/// Resolves optional cache prices: a read or a write without its own price
/// costs plain input; a long write never costs less than a short one.
fn resolve(
    input: Micros,
    cached_input: Option<Micros>,
    output: Micros,
    cache_write: Option<Micros>,
    cache_write_1h: Option<Micros>,
) -> Rates {
    let cache_write = cache_write.unwrap_or(input);
    Rates {
        input,
        cache_read: cached_input.unwrap_or(input),
        cache_write,
        cache_write_long: cache_write_1h.unwrap_or(cache_write).max(cache_write),
        output,
    }
}

impl ModelPrice {
    /// The prices of a call with `total_input` input tokens (all classes):
    /// the long-context prices above their threshold, else the base ones.
    pub fn rates(&self, total_input: u64) -> Rates {
        match &self.long_context {
            Some(l) if total_input > l.above_input_tokens => resolve(
                l.input,
                l.cached_input,
                l.output,
                l.cache_write,
                l.cache_write_1h,
            ),
            _ => self.base_rates(),
        }
    }

    fn base_rates(&self) -> Rates {
        resolve(
            self.input,
            self.cached_input,
            self.output,
            self.cache_write,
            self.cache_write_1h,
        )
    }

    /// The dearest price any one input token can have at the base prices.
    pub fn max_input_price(&self) -> Micros {
        self.base_rates().max_input()
    }

    /// What a call that used `usage` costs, times `uplift` when one
    /// applies; input and output each rounded up once.
    ///
    /// The same prices bound the reservation (`bound`), and the cost is
    /// monotone in every count and the long-context prices are never below
    /// the base ones (the table refuses it), so usage within the reserved
    /// bounds never costs more than the reservation.
    pub fn charge(&self, usage: &TokenUse, uplift: Option<Uplift>) -> Option<Micros> {
        let r = self.rates(usage.total_input());
        let mut input: i128 = 0;
        for (tokens, price) in [
            (usage.input, r.input),
            (usage.cache_read, r.cache_read),
            (usage.cache_write, r.cache_write),
            (usage.cache_write_long, r.cache_write_long),
        ] {
            input = input.checked_add(i128::from(tokens).checked_mul(i128::from(price.0))?)?;
        }
        let output = i128::from(usage.output).checked_mul(i128::from(r.output.0))?;
        Micros(scaled(input, uplift)?).checked_add(Micros(scaled(output, uplift)?))
    }

    /// The most a call with at most `input_max` input and `output_max`
    /// output tokens can cost: every input token at the dearest input price
    /// of the prices that apply to that much input.
    pub fn bound(&self, input_max: u64, output_max: u64, uplift: Option<Uplift>) -> Option<Micros> {
        let r = self.rates(input_max);
        let input = i128::from(input_max).checked_mul(i128::from(r.max_input().0))?;
        let output = i128::from(output_max).checked_mul(i128::from(r.output.0))?;
        Micros(scaled(input, uplift)?).checked_add(Micros(scaled(output, uplift)?))
    }

    /// Cost of a call with `input_tokens` input tokens of which
    /// `cached_tokens` were read from the cache, and `output_tokens`
    /// output; no uplift.
    pub fn cost(
        &self,
        input_tokens: u64,
        cached_tokens: u64,
        output_tokens: u64,
    ) -> Option<Micros> {
        let cached = cached_tokens.min(input_tokens);
        self.charge(
            &TokenUse {
                input: input_tokens - cached,
                cache_read: cached,
                output: output_tokens,
                ..TokenUse::default()
            },
            None,
        )
    }
}

/// `ceil(numer * uplift / 1e6)`, in micro-dollars, for a numerator of
/// tokens times micro-dollars per million tokens.
fn scaled(numer: i128, uplift: Option<Uplift>) -> Option<i64> {
    match uplift {
        None => mul_div_ceil(numer, 1, TOKENS_PER_UNIT),
        Some(u) => mul_div_ceil(
            numer,
            i128::from(u.millionths()),
            TOKENS_PER_UNIT * i128::from(Uplift::ONE),
        ),
    }
}

/// An embedding model's price: input tokens only, per million.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingPrice {
    pub input: Micros,
}

impl EmbeddingPrice {
    /// Cost of `tokens` input tokens, rounded up; monotone in the count.
    pub fn cost(&self, tokens: u64) -> Option<Micros> {
        mul_div_ceil(
            i128::from(tokens),
            i128::from(self.input.0),
            TOKENS_PER_UNIT,
        )
        .map(Micros)
    }
}

/// An image model's price. Options are keyed `"<quality>/<size>"`
/// (`"hd/1024x1792"`); a request's `auto` is resolved by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePrice {
    /// A fixed price for each image.
    PerImage(BTreeMap<String, Micros>),
    /// Billed in tokens: the prompt's text tokens at `input`, and each
    /// image's output tokens, a fixed count per option, at `output` (both
    /// per million).
    Tokens {
        input: Micros,
        output: Micros,
        output_tokens_per_image: BTreeMap<String, u64>,
    },
}

impl ImagePrice {
    /// The `"<quality>/<size>"` options this model is priced for.
    pub fn options(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            ImagePrice::PerImage(m) => Box::new(m.keys().map(String::as_str)),
            ImagePrice::Tokens {
                output_tokens_per_image,
                ..
            } => Box::new(output_tokens_per_image.keys().map(String::as_str)),
        }
    }
}

/// A price table, as shipped or loaded from an operator's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPrices {
    as_of: String,
    source: Option<String>,
    models: BTreeMap<String, ModelPrice>,
    default: Option<ModelPrice>,
    embeddings: BTreeMap<String, EmbeddingPrice>,
    images: BTreeMap<String, ImagePrice>,
}

/// The table as written: serialised in this field order, so a table
/// keycap writes reads top to bottom.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    as_of: String,
    /// Where the prices came from (free text, for people).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    currency: String,
    unit: String,
    models: BTreeMap<String, RawModel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default: Option<RawModel>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    embeddings: BTreeMap<String, RawEmbedding>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    images: BTreeMap<String, RawImage>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawEmbedding {
    input: String,
}

/// Either `per_image`, or `input`, `output` and `output_tokens_per_image`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    per_image: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_tokens_per_image: Option<BTreeMap<String, u64>>,
}

/// Prices are decimal strings, not JSON numbers, so they never pass through
/// a float on the way in.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    input: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cached_input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_write: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_write_1h: Option<String>,
    output: String,
    max_output_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_input_tokens_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    long_context: Option<RawLongContext>,
    #[serde(default, skip_serializing_if = "RawUplifts::is_empty")]
    uplifts: RawUplifts,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLongContext {
    above_input_tokens: u64,
    input: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cached_input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_write: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_write_1h: Option<String>,
    output: String,
}

#[derive(Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawUplifts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inference_geo_us: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regional_processing: Option<String>,
}

impl RawUplifts {
    fn is_empty(&self) -> bool {
        self.inference_geo_us.is_none() && self.regional_processing.is_none()
    }
}

/// A non-negative decimal price; the error names `{name}.{field}`.
fn decimal_price(name: &str, field: &str, text: &str) -> Result<Micros, PriceTableError> {
    Micros::parse_usd(text)
        .ok()
        .filter(|m| !m.is_negative())
        .ok_or_else(|| {
            config(format!(
                "price table: {name}.{field} must be a non-negative decimal, got {:?}",
                clip(text)
            ))
        })
}

fn optional_price(
    name: &str,
    field: &str,
    text: Option<&str>,
) -> Result<Option<Micros>, PriceTableError> {
    text.map(|t| decimal_price(name, field, t)).transpose()
}

fn uplift(name: &str, field: &str, text: Option<&str>) -> Result<Option<Uplift>, PriceTableError> {
    text.map(|t| {
        Micros::parse_usd(t)
            .ok()
            .and_then(|m| Uplift::from_millionths(m.0))
            .ok_or_else(|| {
                config(format!(
                    "price table: {name}.uplifts.{field} must be a decimal from 1 to 10, got {:?}",
                    clip(t)
                ))
            })
    })
    .transpose()
}

impl RawModel {
    fn into_price(self, name: &str) -> Result<ModelPrice, PriceTableError> {
        let input = decimal_price(name, "input", &self.input)?;
        let output = decimal_price(name, "output", &self.output)?;
        let cached_input = optional_price(name, "cached_input", self.cached_input.as_deref())?;
        let cache_write = optional_price(name, "cache_write", self.cache_write.as_deref())?;
        let cache_write_1h =
            optional_price(name, "cache_write_1h", self.cache_write_1h.as_deref())?;
        if cached_input.is_some_and(|c| c > input) {
            return Err(config(format!(
                "price table: {name}.cached_input must not exceed input"
            )));
        }
        if self.max_output_tokens == 0 {
            return Err(config(format!(
                "price table: {name}.max_output_tokens must be positive"
            )));
        }
        let mut price = ModelPrice {
            input,
            cached_input,
            output,
            cache_write,
            cache_write_1h,
            max_output_tokens: self.max_output_tokens,
            image_input_tokens_max: self.image_input_tokens_max,
            long_context: None,
            uplifts: Uplifts {
                inference_geo_us: uplift(
                    name,
                    "inference_geo_us",
                    self.uplifts.inference_geo_us.as_deref(),
                )?,
                regional_processing: uplift(
                    name,
                    "regional_processing",
                    self.uplifts.regional_processing.as_deref(),
                )?,
            },
        };
        if let Some(l) = self.long_context {
            price.long_context = Some(l.into_long(name, &price)?);
        }
        Ok(price)
    }

    fn from_price(p: &ModelPrice) -> RawModel {
        let text = |m: Micros| m.to_string();
        let uplift = |u: Option<Uplift>| u.map(|u| Micros(u.millionths()).to_string());
        RawModel {
            input: text(p.input),
            cached_input: p.cached_input.map(text),
            cache_write: p.cache_write.map(text),
            cache_write_1h: p.cache_write_1h.map(text),
            output: text(p.output),
            max_output_tokens: p.max_output_tokens,
            image_input_tokens_max: p.image_input_tokens_max,
            long_context: p.long_context.as_ref().map(|l| RawLongContext {
                above_input_tokens: l.above_input_tokens,
                input: text(l.input),
                cached_input: l.cached_input.map(text),
                cache_write: l.cache_write.map(text),
                cache_write_1h: l.cache_write_1h.map(text),
                output: text(l.output),
            }),
            uplifts: RawUplifts {
                inference_geo_us: uplift(p.uplifts.inference_geo_us),
                regional_processing: uplift(p.uplifts.regional_processing),
            },
        }
    }
}

impl RawLongContext {
    /// The long-context prices of `base`; none of them below its base
    /// price, so a call reserved at them never settles above its quote.
    fn into_long(self, name: &str, base: &ModelPrice) -> Result<LongContext, PriceTableError> {
        let name = format!("{name}.long_context");
        let long = LongContext {
            above_input_tokens: self.above_input_tokens,
            input: decimal_price(&name, "input", &self.input)?,
            cached_input: optional_price(&name, "cached_input", self.cached_input.as_deref())?,
            output: decimal_price(&name, "output", &self.output)?,
            cache_write: optional_price(&name, "cache_write", self.cache_write.as_deref())?,
            cache_write_1h: optional_price(
                &name,
                "cache_write_1h",
                self.cache_write_1h.as_deref(),
            )?,
        };
        if long.above_input_tokens == 0 {
            return Err(config(format!(
                "price table: {name}.above_input_tokens must be positive"
            )));
        }
        if long.cached_input.is_some_and(|c| c > long.input) {
            return Err(config(format!(
                "price table: {name}.cached_input must not exceed input"
            )));
        }
        let b = base.base_rates();
        let l = resolve(
            long.input,
            long.cached_input,
            long.output,
            long.cache_write,
            long.cache_write_1h,
        );
        for (field, lp, bp) in [
            ("input", l.input, b.input),
            ("cached_input", l.cache_read, b.cache_read),
            ("cache_write", l.cache_write, b.cache_write),
            ("cache_write_1h", l.cache_write_long, b.cache_write_long),
            ("output", l.output, b.output),
        ] {
            if lp < bp {
                return Err(config(format!(
                    "price table: {name}.{field} must not be below the base {field} price"
                )));
            }
        }
        Ok(long)
    }
}

impl RawImage {
    fn into_price(self, model: &str) -> Result<ImagePrice, PriceTableError> {
        let name = format!("images.{model}");
        let check_option = |option: &str| {
            let valid = option.split_once('/').is_some_and(|(q, s)| {
                !q.is_empty() && !s.is_empty() && !s.contains('/') && q != "auto" && s != "auto"
            });
            if valid {
                Ok(())
            } else {
                Err(config(format!(
                    "price table: {name} option {:?} must be \"<quality>/<size>\" \
                     (neither of them \"auto\")",
                    clip(option)
                )))
            }
        };
        let nonempty = |field: &str, empty: bool| {
            if empty {
                Err(config(format!(
                    "price table: {name}.{field} must not be empty"
                )))
            } else {
                Ok(())
            }
        };
        match self {
            RawImage {
                per_image: Some(per_image),
                input: None,
                output: None,
                output_tokens_per_image: None,
            } => {
                nonempty("per_image", per_image.is_empty())?;
                let mut out = BTreeMap::new();
                for (option, text) in per_image {
                    check_option(&option)?;
                    let p = decimal_price(&name, &format!("per_image.{option}"), &text)?;
                    out.insert(option, p);
                }
                Ok(ImagePrice::PerImage(out))
            }
            RawImage {
                per_image: None,
                input: Some(input),
                output: Some(output),
                output_tokens_per_image: Some(tokens),
            } => {
                nonempty("output_tokens_per_image", tokens.is_empty())?;
                for (option, n) in &tokens {
                    check_option(option)?;
                    if *n == 0 {
                        return Err(config(format!(
                            "price table: {name}.output_tokens_per_image.{option} must be positive"
                        )));
                    }
                }
                Ok(ImagePrice::Tokens {
                    input: decimal_price(&name, "input", &input)?,
                    output: decimal_price(&name, "output", &output)?,
                    output_tokens_per_image: tokens,
                })
            }
            _ => Err(config(format!(
                "price table: {name} needs either \"per_image\", or \"input\", \"output\" \
                 and \"output_tokens_per_image\""
            ))),
        }
    }

    fn from_price(p: &ImagePrice) -> RawImage {
        match p {
            ImagePrice::PerImage(m) => RawImage {
                per_image: Some(m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()),
                input: None,
                output: None,
                output_tokens_per_image: None,
            },
            ImagePrice::Tokens {
                input,
                output,
                output_tokens_per_image,
            } => RawImage {
                per_image: None,
                input: Some(input.to_string()),
                output: Some(output.to_string()),
                output_tokens_per_image: Some(output_tokens_per_image.clone()),
            },
        }
    }
}

/// The longest `source` note a table may carry.
const MAX_SOURCE_LEN: usize = 256;

fn config(msg: String) -> PriceTableError {
    PriceTableError(msg)
}

impl TokenPrices {
    pub fn from_json(text: &str) -> Result<Self, PriceTableError> {
        let raw: RawTable = serde_json::from_str(text)
            .map_err(|e| config(format!("price table is not valid: {e}")))?;
        if raw.currency != "usd" || raw.unit != "per_million_tokens" {
            return Err(config(
                "price table must have \"currency\": \"usd\" and \"unit\": \"per_million_tokens\""
                    .into(),
            ));
        }
        let mut models = BTreeMap::new();
        for (name, m) in raw.models {
            if name.is_empty() || name == "default" {
                return Err(config(format!(
                    "price table: model name {name:?} is reserved; use the top-level \"default\""
                )));
            }
            let price = m.into_price(&name)?;
            models.insert(name, price);
        }
        let default = raw.default.map(|m| m.into_price("default")).transpose()?;
        let mut embeddings = BTreeMap::new();
        for (name, e) in raw.embeddings {
            check_section_name("embeddings", &name, &models)?;
            let input = decimal_price(&format!("embeddings.{name}"), "input", &e.input)?;
            embeddings.insert(name, EmbeddingPrice { input });
        }
        let mut images = BTreeMap::new();
        for (name, i) in raw.images {
            check_section_name("images", &name, &models)?;
            if embeddings.contains_key(&name) {
                return Err(config(format!(
                    "price table: {name:?} is in both \"embeddings\" and \"images\""
                )));
            }
            let price = i.into_price(&name)?;
            images.insert(name, price);
        }
        if raw
            .source
            .as_ref()
            .is_some_and(|s| s.len() > MAX_SOURCE_LEN)
        {
            return Err(config(format!(
                "price table: \"source\" must be at most {MAX_SOURCE_LEN} bytes"
            )));
        }
        Ok(TokenPrices {
            as_of: raw.as_of,
            source: raw.source,
            models,
            default,
            embeddings,
            images,
        })
    }

    /// A table of these sections, checked as `from_json` checks one (the
    /// importer builds tables this way).
    pub fn new(
        as_of: &str,
        source: Option<&str>,
        models: BTreeMap<String, ModelPrice>,
        embeddings: BTreeMap<String, EmbeddingPrice>,
        images: BTreeMap<String, ImagePrice>,
    ) -> Result<Self, PriceTableError> {
        let table = TokenPrices {
            as_of: as_of.to_string(),
            source: source.map(str::to_string),
            models,
            default: None,
            embeddings,
            images,
        };
        // One validation path: what keycap writes, it reads back.
        TokenPrices::from_json(&table.to_json())
    }

    /// The table in its JSON format, fields in a fixed order and models by
    /// name, so a regenerated table diffs cleanly against the last one.
    pub fn to_json(&self) -> String {
        let raw = RawTable {
            as_of: self.as_of.clone(),
            source: self.source.clone(),
            currency: "usd".into(),
            unit: "per_million_tokens".into(),
            models: self
                .models
                .iter()
                .map(|(k, p)| (k.clone(), RawModel::from_price(p)))
                .collect(),
            default: self.default.as_ref().map(RawModel::from_price),
            embeddings: self
                .embeddings
                .iter()
                .map(|(k, e)| {
                    (
                        k.clone(),
                        RawEmbedding {
                            input: e.input.to_string(),
                        },
                    )
                })
                .collect(),
            images: self
                .images
                .iter()
                .map(|(k, i)| (k.clone(), RawImage::from_price(i)))
                .collect(),
        };
        let mut text = serde_json::to_string_pretty(&raw).expect("a price table serialises");
        text.push('\n');
        text
    }

    /// Where the prices came from, if the table says.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The token-priced models, by name.
    pub fn models(&self) -> &BTreeMap<String, ModelPrice> {
        &self.models
    }

    /// The embedding models, by name.
    pub fn embeddings(&self) -> &BTreeMap<String, EmbeddingPrice> {
        &self.embeddings
    }

    /// The image models, by name.
    pub fn images(&self) -> &BTreeMap<String, ImagePrice> {
        &self.images
    }

    /// An embedding model's price: the exact name, else the entry it extends
    /// with a snapshot suffix. Never the `default` (the caller decides).
    pub fn lookup_embedding(&self, model: &str) -> Option<(&str, &EmbeddingPrice)> {
        lookup_in(&self.embeddings, model)
    }

    /// An image model's price, found as `lookup_embedding` finds one.
    pub fn lookup_image(&self, model: &str) -> Option<(&str, &ImagePrice)> {
        lookup_in(&self.images, model)
    }

    /// The table's price for models it does not list, if it has one.
    pub fn default_price(&self) -> Option<&ModelPrice> {
        self.default.as_ref()
    }

    /// Whether unknown models are priced (by the table's `default`).
    pub fn has_default(&self) -> bool {
        self.default.is_some()
    }

    /// The date the table's prices were checked.
    pub fn as_of(&self) -> &str {
        &self.as_of
    }

    /// The model's own entry, or the entry it is a dated snapshot of;
    /// never the `default`.
    pub fn lookup_listed(&self, model: &str) -> Option<(&str, &ModelPrice)> {
        lookup_in(&self.models, model)
    }

    /// The price for a model and the table entry it was priced as: the exact
    /// name; else the longest entry the name extends with a dated snapshot
    /// suffix (`gpt-4o-2024-08-06` -> `gpt-4o`, `gpt-4-0613` -> `gpt-4`,
    /// `claude-sonnet-4-20250514` -> `claude-sonnet-4`); else
    /// the table's `default` if it has one.
    ///
    /// Only snapshot suffixes fall back to their base model. A variant such as
    /// `gpt-4o-search-preview` or `o3-pro` is priced differently from its base
    /// (per-call fees, ten times the token price), so pricing it as the base
    /// could reserve far less than it costs; it needs its own entry.
    pub fn lookup(&self, model: &str) -> Option<(&str, &ModelPrice)> {
        lookup_in(&self.models, model).or_else(|| self.default.as_ref().map(|p| ("default", p)))
    }
}

/// A model name is listed in one section only, and never as "default".
fn check_section_name<T>(
    section: &str,
    name: &str,
    models: &BTreeMap<String, T>,
) -> Result<(), PriceTableError> {
    if name.is_empty() || name == "default" {
        return Err(config(format!(
            "price table: {section} name {name:?} is reserved"
        )));
    }
    if models.contains_key(name) {
        return Err(config(format!(
            "price table: {name:?} is in both \"models\" and \"{section}\""
        )));
    }
    Ok(())
}

/// The exact entry, else the longest entry `model` extends with a snapshot
/// suffix.
fn lookup_in<'a, T>(map: &'a BTreeMap<String, T>, model: &str) -> Option<(&'a str, &'a T)> {
    if let Some((k, p)) = map.get_key_value(model) {
        return Some((k, p));
    }
    map.iter()
        .filter(|(k, _)| {
            model
                .strip_prefix(k.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(is_snapshot_suffix)
        })
        .max_by_key(|(k, _)| k.len())
        .map(|(k, p)| (k.as_str(), p))
}

/// `2024-08-06`, `20241022` or `0613`.
pub(super) fn is_snapshot_suffix(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    match b.len() {
        4 => digits(0..4),
        8 => digits(0..8),
        10 => digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"as_of": "2026-01-01", "currency": "usd", "unit": "per_million_tokens",
        "models": {"m": {"input": "1", "output": "2", "max_output_tokens": 10}}"#;

    fn table(extra: &str) -> Result<TokenPrices, PriceTableError> {
        TokenPrices::from_json(&format!("{BASE}{extra}}}"))
    }

    #[test]
    fn tables_without_the_optional_sections_stay_valid() {
        let t = table("").unwrap();
        assert!(t.lookup_embedding("m").is_none());
        assert!(t.lookup_image("m").is_none());
        assert!(t.default_price().is_none());
    }

    #[test]
    fn embeddings_are_input_only_and_found_like_models() {
        let t = table(r#", "embeddings": {"e": {"input": "0.02"}, "e-large": {"input": "0.13"}}"#)
            .unwrap();
        assert_eq!(t.lookup_embedding("e").unwrap().1.input, Micros(20_000));
        assert_eq!(t.lookup_embedding("e-large").unwrap().0, "e-large");
        assert_eq!(t.lookup_embedding("e-2025-01-01").unwrap().0, "e");
        assert!(t.lookup_embedding("e-larger").is_none());
        // Embedding models are not chat models.
        assert!(t.lookup("e").is_none());
        let p = t.lookup_embedding("e").unwrap().1;
        assert_eq!(p.cost(0), Some(Micros(0)));
        assert_eq!(p.cost(1), Some(Micros(1)));
        assert_eq!(p.cost(1_000_000), Some(Micros(20_000)));
        assert_eq!(p.cost(50_000_001), Some(Micros(1_000_001)));
    }

    #[test]
    fn images_are_per_image_or_per_token() {
        let t = table(
            r#", "images": {
                "fixed": {"per_image": {"standard/1024x1024": "0.04", "hd/1024x1792": "0.12"}},
                "tokens": {"input": "5", "output": "40",
                           "output_tokens_per_image": {"low/1024x1024": 272}}}"#,
        )
        .unwrap();
        let (_, fixed) = t.lookup_image("fixed").unwrap();
        let ImagePrice::PerImage(m) = fixed else {
            panic!("{fixed:?}")
        };
        assert_eq!(m["standard/1024x1024"], Micros(40_000));
        assert_eq!(
            fixed.options().collect::<Vec<_>>(),
            ["hd/1024x1792", "standard/1024x1024"]
        );
        let (_, tokens) = t.lookup_image("tokens").unwrap();
        assert_eq!(
            tokens,
            &ImagePrice::Tokens {
                input: Micros(5_000_000),
                output: Micros(40_000_000),
                output_tokens_per_image: [("low/1024x1024".to_string(), 272)].into(),
            }
        );
        assert!(t.lookup("fixed").is_none());
    }

    #[test]
    fn bad_sections_are_refused_naming_the_field() {
        for (extra, says) in [
            (
                r#", "embeddings": {"e": {"input": "-1"}}"#,
                "embeddings.e.input",
            ),
            (
                r#", "embeddings": {"e": {"input": "1", "output": "2"}}"#,
                "output",
            ),
            (r#", "embeddings": {"e": {}}"#, "input"),
            (r#", "embeddings": {"m": {"input": "1"}}"#, "\"models\""),
            (r#", "embeddings": {"default": {"input": "1"}}"#, "reserved"),
            (
                r#", "images": {"i": {"per_image": {}}}"#,
                "images.i.per_image",
            ),
            (
                r#", "images": {"i": {"per_image": {"1024x1024": "0.04"}}}"#,
                "<quality>/<size>",
            ),
            (
                r#", "images": {"i": {"per_image": {"auto/1024x1024": "0.04"}}}"#,
                "auto",
            ),
            (
                r#", "images": {"i": {"per_image": {"hd/1024x1024": "x"}}}"#,
                "images.i.per_image.hd/1024x1024",
            ),
            (
                r#", "images": {"i": {"input": "5", "output": "40"}}"#,
                "output_tokens_per_image",
            ),
            (
                r#", "images": {"i": {"input": "5", "output": "40",
                    "output_tokens_per_image": {"low/1024x1024": 0}}}"#,
                "images.i.output_tokens_per_image.low/1024x1024",
            ),
            (
                r#", "images": {"i": {"per_image": {"a/b": "1"}, "input": "5"}}"#,
                "either",
            ),
            (r#", "images": {"i": {"price": "1"}}"#, "price"),
            (
                r#", "embeddings": {"x": {"input": "1"}},
                   "images": {"x": {"per_image": {"a/b": "1"}}}"#,
                "both",
            ),
        ] {
            let err = table(extra).unwrap_err();
            assert!(err.0.contains(says), "{extra}: {err}");
        }
    }

    const LONG: &str = r#"{"as_of": "2026-01-01", "currency": "usd", "unit": "per_million_tokens",
        "source": "hand-written",
        "models": {"m": {"input": "2", "cached_input": "0.2", "cache_write": "2.5",
            "cache_write_1h": "4", "output": "10", "max_output_tokens": 1000,
            "long_context": {"above_input_tokens": 100, "input": "4", "cached_input": "0.4",
                "cache_write": "5", "cache_write_1h": "8", "output": "15"},
            "uplifts": {"inference_geo_us": "1.1", "regional_processing": "1.25"}}}}"#;

    #[test]
    fn long_context_prices_apply_to_the_whole_call_past_their_threshold() {
        let t = TokenPrices::from_json(LONG).unwrap();
        let (_, p) = t.lookup("m").unwrap();
        assert_eq!(t.source(), Some("hand-written"));
        // 100 input tokens: base prices; 101: every token at the long ones.
        let at = |input: u64, output: u64| TokenUse {
            input,
            output,
            ..TokenUse::default()
        };
        assert_eq!(p.charge(&at(100, 10), None), Some(Micros(200 + 100)));
        assert_eq!(p.charge(&at(101, 10), None), Some(Micros(404 + 150)));
        // Cache reads and writes count towards the threshold.
        let mixed = TokenUse {
            input: 50,
            cache_read: 30,
            cache_write: 10,
            cache_write_long: 11,
            output: 0,
        };
        assert_eq!(mixed.total_input(), 101);
        assert_eq!(
            p.charge(&mixed, None),
            Some(Micros(
                (50 * 4_000_000 + 30 * 400_000 + 10 * 5_000_000 + 11 * 8_000_000) / 1_000_000
            ))
        );
        // The bound prices every input token at the dearest input price of
        // the prices its input bound falls under.
        assert_eq!(p.bound(100, 10, None), Some(Micros(400 + 100)));
        assert_eq!(p.bound(101, 10, None), Some(Micros(808 + 150)));
        assert_eq!(p.max_input_price(), Micros(4_000_000));
    }

    #[test]
    fn an_uplift_scales_input_and_output_each_rounded_up_once() {
        let t = TokenPrices::from_json(LONG).unwrap();
        let (_, p) = t.lookup("m").unwrap();
        let us = p.uplifts.inference_geo_us;
        assert_eq!(us.map(Uplift::millionths), Some(1_100_000));
        assert_eq!(
            p.uplifts.regional_processing.map(Uplift::millionths),
            Some(1_250_000)
        );
        let u = TokenUse {
            input: 7,
            output: 3,
            ..TokenUse::default()
        };
        // 7 * 2.0 * 1.1 = 15.4 -> 16; 3 * 10 * 1.1 = 33.
        assert_eq!(p.charge(&u, us), Some(Micros(16 + 33)));
        assert_eq!(p.charge(&u, None), Some(Micros(14 + 30)));
        assert_eq!(p.bound(7, 3, us), Some(Micros(31 + 33)));
    }

    #[test]
    fn usage_within_the_bound_never_costs_more_than_it() {
        let t = TokenPrices::from_json(LONG).unwrap();
        let (_, p) = t.lookup("m").unwrap();
        for uplift in [None, p.uplifts.inference_geo_us] {
            for input_max in [0u64, 1, 99, 100, 101, 150] {
                let bound = p.bound(input_max, 7, uplift).unwrap();
                for input in 0..=input_max {
                    for split in [0, input / 3, input / 2, input] {
                        let u = TokenUse {
                            input: input - split,
                            cache_read: split / 2,
                            cache_write: split / 4,
                            cache_write_long: split - split / 2 - split / 4,
                            output: 7,
                        };
                        assert!(p.charge(&u, uplift).unwrap() <= bound, "{u:?} {input_max}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_table_written_out_reads_back_the_same() {
        let t = TokenPrices::from_json(LONG).unwrap();
        assert_eq!(TokenPrices::from_json(&t.to_json()).unwrap(), t);
        let with_sections = table(
            r#", "embeddings": {"e": {"input": "0.02"}},
            "images": {"i": {"per_image": {"hd/1024x1024": "0.08"}},
                       "j": {"input": "5", "output": "40",
                             "output_tokens_per_image": {"low/1024x1024": 272}}}"#,
        )
        .unwrap();
        let text = with_sections.to_json();
        assert_eq!(TokenPrices::from_json(&text).unwrap(), with_sections);
        // Decimal strings, never JSON numbers.
        assert!(text.contains(r#""input": "0.02""#), "{text}");
    }

    #[test]
    fn long_context_and_uplifts_are_checked_naming_the_field() {
        for (from, to, says) in [
            (r#""input": "4""#, r#""input": "1""#, "m.long_context.input"),
            (
                r#""output": "15""#,
                r#""output": "9""#,
                "m.long_context.output",
            ),
            (
                r#""cache_write": "5""#,
                r#""cache_write": "2""#,
                "m.long_context.cache_write",
            ),
            (
                r#""cached_input": "0.4""#,
                r#""cached_input": "5""#,
                "cached_input must not exceed",
            ),
            (
                r#""above_input_tokens": 100"#,
                r#""above_input_tokens": 0"#,
                "above_input_tokens",
            ),
            (
                r#""inference_geo_us": "1.1""#,
                r#""inference_geo_us": "0.9""#,
                "inference_geo_us",
            ),
            (
                r#""regional_processing": "1.25""#,
                r#""regional_processing": "11""#,
                "regional_processing",
            ),
            (r#""inference_geo_us": "1.1""#, r#""fast": "2""#, "fast"),
            (
                r#""source": "hand-written""#,
                r#""source": 3"#,
                "expected a string",
            ),
        ] {
            let text = LONG.replacen(from, to, 1);
            assert_ne!(text, LONG, "{from}");
            let err = TokenPrices::from_json(&text).unwrap_err();
            assert!(err.0.contains(says), "{to}: {err}");
        }
        let long_source = LONG.replace("hand-written", &"x".repeat(300));
        assert!(TokenPrices::from_json(&long_source).is_err());
    }
}
