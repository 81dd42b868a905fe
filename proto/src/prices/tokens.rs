//! Per-token price tables for LLM vendors.
//!
//! Owns the table format every LLM profile shares (prices per million
//! tokens per token class, a model's output limit, an optional default for
//! unknown models), its validation, and model lookup. A table may also price
//! models that are not billed by input and output text: `embeddings` (input
//! tokens only) and `images` (per generated image, or per token with a fixed
//! token count per image). Each vendor ships its
//! own dated table under `prices/`, replaceable by an operator's file or
//! the vendor's `prices` set through the admin API.
//! Prices are decimal strings in the file and integer micro-dollars here; a
//! float never holds one.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{clip, mul_div_ceil, PriceTableError};
use crate::Micros;

/// Token prices are quoted per this many tokens.
pub const TOKENS_PER_UNIT: i128 = 1_000_000;

/// One model's prices. Token prices are micro-dollars per million tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    pub input: Micros,
    /// Price of prompt tokens served from the cache; `input` when absent.
    pub cached_input: Option<Micros>,
    pub output: Micros,
    /// Price of input tokens written to a five-minute prompt cache
    /// (Anthropic); absent where the vendor does not bill cache writes.
    pub cache_write: Option<Micros>,
    /// Price of input tokens written to a one-hour prompt cache.
    pub cache_write_1h: Option<Micros>,
    /// The model's output limit: the bound used when a request sets none.
    pub max_output_tokens: u64,
    /// Most input tokens one image can cost; `None` means image input is
    /// refused for this model because its cost cannot be bounded.
    pub image_input_tokens_max: Option<u64>,
}

impl ModelPrice {
    /// The dearest price any one input token can have: what an input bound
    /// is reserved at.
    pub fn max_input_price(&self) -> Micros {
        [self.cache_write, self.cache_write_1h]
            .into_iter()
            .flatten()
            .fold(self.input, Micros::max)
    }

    /// Cost of a call, each of input and output rounded up. The same function
    /// prices the reservation and the settlement, and it is monotone in every
    /// count, so usage within the reserved bounds never settles above the
    /// reservation.
    pub fn cost(
        &self,
        input_tokens: u64,
        cached_tokens: u64,
        output_tokens: u64,
    ) -> Option<Micros> {
        let cached = cached_tokens.min(input_tokens);
        let uncached = input_tokens - cached;
        let cached_price = self.cached_input.unwrap_or(self.input);
        // One rounding for all input: cached tokens are never priced above
        // uncached ones, so the sum stays at or under the all-uncached bound.
        let input_numer = i128::from(uncached)
            .checked_mul(i128::from(self.input.0))?
            .checked_add(i128::from(cached).checked_mul(i128::from(cached_price.0))?)?;
        let input_cost = mul_div_ceil(input_numer, 1, TOKENS_PER_UNIT)?;
        let output_cost = mul_div_ceil(
            i128::from(output_tokens),
            i128::from(self.output.0),
            TOKENS_PER_UNIT,
        )?;
        Micros(input_cost).checked_add(Micros(output_cost))
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
    models: BTreeMap<String, ModelPrice>,
    default: Option<ModelPrice>,
    embeddings: BTreeMap<String, EmbeddingPrice>,
    images: BTreeMap<String, ImagePrice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    as_of: String,
    currency: String,
    unit: String,
    models: BTreeMap<String, RawModel>,
    #[serde(default)]
    default: Option<RawModel>,
    #[serde(default)]
    embeddings: BTreeMap<String, RawEmbedding>,
    #[serde(default)]
    images: BTreeMap<String, RawImage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbedding {
    input: String,
}

/// Either `per_image`, or `input`, `output` and `output_tokens_per_image`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    #[serde(default)]
    per_image: Option<BTreeMap<String, String>>,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    output_tokens_per_image: Option<BTreeMap<String, u64>>,
}

/// Prices are decimal strings, not JSON numbers, so they never pass through
/// a float on the way in.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    input: String,
    #[serde(default)]
    cached_input: Option<String>,
    output: String,
    #[serde(default)]
    cache_write: Option<String>,
    #[serde(default)]
    cache_write_1h: Option<String>,
    max_output_tokens: u64,
    #[serde(default)]
    image_input_tokens_max: Option<u64>,
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

impl RawModel {
    fn into_price(self, name: &str) -> Result<ModelPrice, PriceTableError> {
        let price = |field: &str, text: &str| decimal_price(name, field, text);
        let input = price("input", &self.input)?;
        let output = price("output", &self.output)?;
        let cached_input = self
            .cached_input
            .as_deref()
            .map(|t| price("cached_input", t))
            .transpose()?;
        let cache_write = self
            .cache_write
            .as_deref()
            .map(|t| price("cache_write", t))
            .transpose()?;
        let cache_write_1h = self
            .cache_write_1h
            .as_deref()
            .map(|t| price("cache_write_1h", t))
            .transpose()?;
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
        Ok(ModelPrice {
            input,
            cached_input,
            output,
            cache_write,
            cache_write_1h,
            max_output_tokens: self.max_output_tokens,
            image_input_tokens_max: self.image_input_tokens_max,
        })
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
}

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
        Ok(TokenPrices {
            as_of: raw.as_of,
            models,
            default,
            embeddings,
            images,
        })
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
fn is_snapshot_suffix(s: &str) -> bool {
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
}
