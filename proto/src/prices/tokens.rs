//! Per-token price tables for LLM vendors.
//!
//! Owns the table format every LLM profile shares (prices per million
//! tokens per token class, a model's output limit, an optional default for
//! unknown models), its validation, and model lookup. Each vendor ships its
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

/// A price table, as shipped or loaded from an operator's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPrices {
    as_of: String,
    models: BTreeMap<String, ModelPrice>,
    default: Option<ModelPrice>,
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

impl RawModel {
    fn into_price(self, name: &str) -> Result<ModelPrice, PriceTableError> {
        let price = |field: &str, text: &str| {
            Micros::parse_usd(text)
                .ok()
                .filter(|m| !m.is_negative())
                .ok_or_else(|| {
                    config(format!(
                        "price table: {name}.{field} must be a non-negative decimal, got {:?}",
                        clip(text)
                    ))
                })
        };
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
        Ok(TokenPrices {
            as_of: raw.as_of,
            models,
            default,
        })
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
        if let Some((k, p)) = self.models.get_key_value(model) {
            return Some((k, p));
        }
        let snapshot_base = self
            .models
            .iter()
            .filter(|(k, _)| {
                model
                    .strip_prefix(k.as_str())
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(is_snapshot_suffix)
            })
            .max_by_key(|(k, _)| k.len());
        if let Some((k, p)) = snapshot_base {
            return Some((k, p));
        }
        self.default.as_ref().map(|p| ("default", p))
    }
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
