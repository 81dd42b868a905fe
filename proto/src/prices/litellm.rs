//! LiteLLM's model price file, converted into keycap's token price tables.
//!
//! Owns the one converter both the CLI (`keycap prices import`) and the
//! control plane (the admin API's price import) use. It reads LiteLLM's
//! published `model_prices_and_context_window_backup.json` (MIT licensed),
//! takes the entries of one vendor (`litellm_provider` `openai` or
//! `anthropic`) and writes a dated `TokenPrices` table — chat and responses
//! models, embeddings, image models — with a report of every entry it
//! skipped and every kind of price it left out, and why.
//!
//! It must never guess a price. Numbers are read from their JSON text,
//! exactly (a float never holds one). A price that is not a whole number of
//! micro-dollars per million tokens, a price field it does not know, or a
//! price shape keycap's table cannot bound skips the entry: nothing is
//! rounded or approximated. Prices that apply only to calls the proxy
//! refuses (the Batch API, priority processing, built-in tools, audio) are
//! left out and listed. No I/O: callers read and write files.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::tokens::{is_snapshot_suffix, LongContext, Uplift, Uplifts};
use super::{clip, EmbeddingPrice, ImagePrice, ModelPrice, PriceTableError, TokenPrices};
use crate::Micros;

/// The LLM vendors whose prices the file carries for keycap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmVendor {
    Openai,
    Anthropic,
}

impl LlmVendor {
    pub fn parse(s: &str) -> Option<LlmVendor> {
        match s {
            "openai" => Some(LlmVendor::Openai),
            "anthropic" => Some(LlmVendor::Anthropic),
            _ => None,
        }
    }

    /// keycap's profile name, which is also LiteLLM's `litellm_provider`.
    pub fn as_str(self) -> &'static str {
        match self {
            LlmVendor::Openai => "openai",
            LlmVendor::Anthropic => "anthropic",
        }
    }
}

/// What the converter needs besides the file.
#[derive(Debug, Clone, Copy)]
pub struct ImportOptions<'a> {
    /// The table's date (`YYYY-MM-DD`).
    pub as_of: &'a str,
    /// The table's `source` note; a default naming LiteLLM's file if `None`.
    pub source: Option<&'a str>,
    /// The table being replaced: it lends the facts LiteLLM does not carry
    /// (how many input tokens an image can cost a chat model, how many
    /// output tokens each image option of a token-billed image model makes).
    pub base: Option<&'a TokenPrices>,
}

/// A converted table and what was left out of it.
#[derive(Debug, Clone)]
pub struct Import {
    pub table: TokenPrices,
    pub report: ImportReport,
}

/// What an import priced, skipped and left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub vendor: String,
    pub as_of: String,
    /// Entries of this vendor in the file.
    pub entries: usize,
    pub models: Vec<String>,
    pub embeddings: Vec<String>,
    pub images: Vec<String>,
    /// Entries not in the table, each with the reason.
    pub skipped: Vec<Skipped>,
    /// Kinds of price present in the file that the table leaves out.
    pub unused_prices: Vec<UnusedPrice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnusedPrice {
    pub kind: String,
    pub reason: String,
    /// How many of the priced entries carried such prices.
    pub entries: usize,
}

const DEFAULT_SOURCE: &str = "LiteLLM model_prices_and_context_window_backup.json (MIT)";

/// Converts LiteLLM's file into `vendor`'s table. The whole file is refused
/// (naming what is wrong) when it is not a JSON object of entries, names an
/// entry twice, or prices no chat or responses model of the vendor.
pub fn import(
    text: &str,
    vendor: LlmVendor,
    opts: &ImportOptions<'_>,
) -> Result<Import, PriceTableError> {
    if opts.source.is_some_and(|s| s.is_empty()) {
        return Err(err("the table's source note must not be empty".into()));
    }
    let entries = vendor_entries_of(text, vendor)?;
    let mut run = Run {
        vendor,
        base: opts.base,
        as_of: opts.as_of,
        skipped: Vec::new(),
        unused: BTreeMap::new(),
    };
    let mut models = BTreeMap::new();
    let mut embeddings = BTreeMap::new();
    let mut token_images = BTreeMap::new();
    // Image models billed in tokens, priced or not: their per-image list
    // prices are never the price.
    let mut token_billed = BTreeSet::new();
    let mut per_image: BTreeMap<String, BTreeMap<String, Micros>> = BTreeMap::new();
    let mut per_image_entries: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, fields) in &entries {
        let fields = match fields {
            Ok(f) => f,
            Err(why) => {
                run.skip(name, why.clone());
                continue;
            }
        };
        let mode = match fields.get("mode").map(|r| string(r)) {
            Some(Some(m)) => m,
            _ => {
                run.skip(name, "no \"mode\": what the model is for is not stated");
                continue;
            }
        };
        match mode.as_str() {
            "chat" | "responses" => match run.model(name, fields) {
                Ok(price) => {
                    models.insert(name.clone(), price);
                }
                Err(why) => run.skip(name, why),
            },
            "embedding" => match run.embedding(name, fields) {
                Ok(price) => {
                    embeddings.insert(name.clone(), price);
                }
                Err(why) => run.skip(name, why),
            },
            "image_generation" => match image_option(name) {
                Some((model, option)) => match run.per_image(fields) {
                    Ok(p) => {
                        per_image
                            .entry(model.clone())
                            .or_default()
                            .insert(option, p);
                        per_image_entries
                            .entry(model)
                            .or_default()
                            .push(name.clone());
                    }
                    Err(why) => run.skip(name, why),
                },
                None if name.contains('/') => run.skip(
                    name,
                    "per-image price without a quality: keycap prices images by \
                     \"<quality>/<size>\"",
                ),
                None => {
                    token_billed.insert(name.clone());
                    match run.token_image(name, fields) {
                        Ok(price) => {
                            token_images.insert(name.clone(), price);
                        }
                        Err(why) => run.skip(name, why),
                    }
                }
            },
            other => run.skip(
                name,
                format!(
                    "mode {:?}: keycap does not price this endpoint for {}",
                    clip(other),
                    vendor.as_str()
                ),
            ),
        }
    }

    // Per-image list prices of a model billed in tokens are OpenAI's
    // rounded summaries of its token prices; the tokens are what it bills.
    let mut images: BTreeMap<String, ImagePrice> = BTreeMap::new();
    for (model, options) in per_image {
        if token_billed.contains(&model) {
            for name in &per_image_entries[&model] {
                run.skip(
                    name,
                    format!(
                        "per-image list price of {model:?}, which is billed in tokens and \
                         priced by them"
                    ),
                );
            }
        } else {
            images.insert(model, ImagePrice::PerImage(options));
        }
    }
    images.extend(token_images);

    drop_aliases(&mut models, &mut run);
    drop_aliases(&mut images, &mut run);
    drop_aliases(&mut embeddings, &mut run);
    for name in models.keys() {
        if embeddings.remove(name).is_some() || images.remove(name).is_some() {
            run.skip(
                name,
                "listed again in another section: priced as a chat model",
            );
        }
    }
    let names: Vec<String> = embeddings.keys().cloned().collect();
    for name in names {
        if images.remove(&name).is_some() {
            run.skip(
                &name,
                "listed again in another section: priced as an embedding",
            );
        }
    }
    if models.is_empty() {
        return Err(err(format!(
            "LiteLLM file: no {} chat or responses model could be priced ({} entries of \
             litellm_provider {:?})",
            vendor.as_str(),
            entries.len(),
            vendor.as_str()
        )));
    }
    let report = ImportReport {
        vendor: vendor.as_str().to_string(),
        as_of: opts.as_of.to_string(),
        entries: entries.len(),
        models: models.keys().cloned().collect(),
        embeddings: embeddings.keys().cloned().collect(),
        images: images.keys().cloned().collect(),
        skipped: {
            let mut s = run.skipped;
            s.sort_by(|a, b| a.name.cmp(&b.name));
            s
        },
        unused_prices: run
            .unused
            .into_iter()
            .map(|(kind, (reason, names))| UnusedPrice {
                kind: kind.to_string(),
                reason: reason.to_string(),
                entries: names.len(),
            })
            .collect(),
    };
    let table = TokenPrices::new(
        opts.as_of,
        Some(opts.source.unwrap_or(DEFAULT_SOURCE)),
        models,
        embeddings,
        images,
    )?;
    Ok(Import { table, report })
}

/// The file reduced to the entries of `vendors`, each as written: what
/// the CLI sends to the admin API, which converts it with `import`.
pub fn vendor_entries(text: &str, vendors: &[LlmVendor]) -> Result<String, PriceTableError> {
    let all = Members::parse(text).map_err(|e| err(format!("LiteLLM file: {e}")))?;
    let mut out = String::from("{");
    for (name, raw) in all.0 {
        let provider = provider_of(&raw);
        if vendors
            .iter()
            .any(|v| provider.as_deref() == Some(v.as_str()))
        {
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(&name).map_err(|e| err(e.to_string()))?);
            out.push(':');
            out.push_str(raw.get());
        }
    }
    out.push('}');
    Ok(out)
}

fn err(msg: String) -> PriceTableError {
    PriceTableError(msg)
}

/// An entry's fields by name, values as written.
type Fields = BTreeMap<String, Box<RawValue>>;

/// An entry's name and its fields, or why they could not be read.
type Entry = (String, Result<Fields, String>);

/// The vendor's entries in file order, each with its fields read.
fn vendor_entries_of(text: &str, vendor: LlmVendor) -> Result<Vec<Entry>, PriceTableError> {
    let all = Members::parse(text).map_err(|e| err(format!("LiteLLM file: {e}")))?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (name, raw) in all.0 {
        if !seen.insert(name.clone()) {
            return Err(err(format!(
                "LiteLLM file: entry {:?} appears twice",
                clip(&name)
            )));
        }
        if provider_of(&raw).as_deref() != Some(vendor.as_str()) {
            continue;
        }
        let fields = Members::parse(raw.get())
            .map_err(|e| format!("entry is not an object of fields: {e}"))
            .and_then(|m| {
                let mut fields = Fields::new();
                for (k, v) in m.0 {
                    if fields.contains_key(&k) {
                        return Err(format!("field {:?} appears twice", clip(&k)));
                    }
                    fields.insert(k, v);
                }
                Ok(fields)
            });
        out.push((name, fields));
    }
    Ok(out)
}

/// An entry's `litellm_provider`, if it is an object that has one.
fn provider_of(raw: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct Provider {
        litellm_provider: Option<String>,
    }
    serde_json::from_str::<Provider>(raw.get())
        .ok()
        .and_then(|p| p.litellm_provider)
}

/// A JSON object's members in order, duplicates kept, values as written.
struct Members(Vec<(String, Box<RawValue>)>);

impl Members {
    fn parse(text: &str) -> Result<Members, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn string(raw: &RawValue) -> Option<String> {
    serde_json::from_str(raw.get()).ok()
}

/// A non-negative JSON number exactly as written: `digits * 10^exp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exact {
    digits: u128,
    exp: i32,
}

impl Exact {
    /// Reads a JSON number's text; `None` for anything else, a negative
    /// number, or more significant digits than fit.
    fn parse(text: &str) -> Option<Exact> {
        let t = text.trim();
        let (mantissa, exp) = match t.find(['e', 'E']) {
            Some(i) => (&t[..i], t[i + 1..].parse::<i32>().ok()?),
            None => (t, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digit_run = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digit_run(int) || (mantissa.contains('.') && !digit_run(frac)) {
            return None;
        }
        let all = format!("{int}{frac}");
        let mut exp = exp.checked_sub(i32::try_from(frac.len()).ok()?)?;
        let trimmed = all.trim_end_matches('0');
        exp = exp.checked_add(i32::try_from(all.len() - trimmed.len()).ok()?)?;
        let significant = trimmed.trim_start_matches('0');
        if significant.is_empty() {
            return Some(Exact { digits: 0, exp: 0 });
        }
        if significant.len() > 38 {
            return None;
        }
        Some(Exact {
            digits: significant.parse().ok()?,
            exp,
        })
    }

    /// The number times `10^pow10`, if that is a whole number that fits.
    fn scaled(self, pow10: i32) -> Option<i64> {
        if self.digits == 0 {
            return Some(0);
        }
        let e = self.exp.checked_add(pow10)?;
        if e < 0 {
            // Trailing zeros were trimmed: a negative power leaves a fraction.
            return None;
        }
        let factor = 10u128.checked_pow(u32::try_from(e).ok()?)?;
        i64::try_from(self.digits.checked_mul(factor)?).ok()
    }
}

/// A field's number, scaled by `10^pow10` to a whole number, or why not.
fn number(key: &str, raw: &RawValue, pow10: i32, unit: &str) -> Result<i64, String> {
    let exact =
        Exact::parse(raw.get()).ok_or_else(|| format!("{key} is not a non-negative number"))?;
    exact.scaled(pow10).ok_or_else(|| {
        format!(
            "{key} = {} is not a whole number of {unit}: keycap will not round a price",
            clip(raw.get())
        )
    })
}

/// A per-token USD price as micro-dollars per million tokens.
fn per_token(key: &str, raw: &RawValue) -> Result<Micros, String> {
    number(key, raw, 12, "micro-dollars per million tokens").map(Micros)
}

/// A token price class of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Input,
    CacheRead,
    CacheWrite,
    CacheWriteLong,
    Output,
}

/// Variants of a price that apply only to calls keycap refuses, or (flex)
/// that cost less than the standard price keycap records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Batches,
    Priority,
    Flex,
    Fast,
    Decisions,
}

impl Variant {
    const SUFFIXES: [(&'static str, Variant); 5] = [
        ("_batches", Variant::Batches),
        ("_priority", Variant::Priority),
        ("_flex", Variant::Flex),
        ("_ultrafast", Variant::Fast),
        ("_decisions", Variant::Decisions),
    ];

    fn unused(self) -> (&'static str, &'static str) {
        match self {
            Variant::Batches => ("batch", "Batch API prices: keycap does not forward batches"),
            Variant::Priority => (
                "priority",
                "priority processing: keycap refuses service_tier \"priority\"",
            ),
            Variant::Flex => (
                "flex",
                "flex processing costs less than standard: keycap reserves and records \
                 flex calls at the standard price",
            ),
            Variant::Fast => (
                "fast",
                "fast processing: keycap refuses service tiers other than auto, default \
                 and flex",
            ),
            Variant::Decisions => (
                "decisions",
                "Decisions API prices: keycap does not forward /v1/decisions",
            ),
        }
    }
}

/// Fields that are price data keycap leaves out, by kind and reason.
const UNUSED_FIELDS: [(&str, &str, &str); 12] = [
    (
        "search_context_cost_per_query",
        "web search",
        "web search fees: keycap refuses web search tools and web_search_options",
    ),
    (
        "code_interpreter_cost_per_session",
        "built-in tools",
        "built-in tool fees: keycap refuses built-in and server tools",
    ),
    (
        "file_search_cost_per_1k_calls",
        "built-in tools",
        "built-in tool fees: keycap refuses built-in and server tools",
    ),
    (
        "file_search_cost_per_gb_per_day",
        "built-in tools",
        "built-in tool fees: keycap refuses built-in and server tools",
    ),
    (
        "vector_store_cost_per_gb_per_day",
        "built-in tools",
        "built-in tool fees: keycap refuses built-in and server tools",
    ),
    (
        "computer_use_input_cost_per_1k_tokens",
        "built-in tools",
        "built-in tool fees: keycap refuses built-in and server tools",
    ),
    (
        "computer_use_output_cost_per_1k_tokens",
        "built-in tools",
        "built-in tool fees: keycap refuses built-in and server tools",
    ),
    (
        "input_cost_per_audio_token",
        "audio",
        "audio tokens: keycap refuses audio input and output",
    ),
    (
        "output_cost_per_audio_token",
        "audio",
        "audio tokens: keycap refuses audio input and output",
    ),
    (
        "cache_read_input_audio_token_cost",
        "audio",
        "audio tokens: keycap refuses audio input and output",
    ),
    (
        "cache_creation_input_audio_token_cost",
        "audio",
        "audio tokens: keycap refuses audio input and output",
    ),
    (
        "fedramp_uplift_multiplier",
        "fedramp",
        "FedRAMP deployments: keycap's tables hold commercial prices; import with those \
         prices written in for such a vendor",
    ),
];

/// Whether a field name carries price data (so an unknown one must not be
/// passed over).
fn is_price_field(key: &str) -> bool {
    ["cost", "price", "multiplier", "uplift", "provider_specific"]
        .iter()
        .any(|w| key.contains(w))
}

/// `input_cost_per_token_above_272k_tokens_flex` -> the class, the
/// long-context threshold (272 000) and the variant; `None` if the name is
/// not a token price keycap knows.
fn token_field(key: &str) -> Option<(Class, Option<u64>, Option<Variant>)> {
    let mut rest = key;
    let mut variant = None;
    for (suffix, v) in Variant::SUFFIXES {
        if let Some(r) = rest.strip_suffix(suffix) {
            rest = r;
            variant = Some(v);
            break;
        }
    }
    let mut threshold = None;
    if let Some(r) = rest.strip_suffix("k_tokens") {
        let at = r.rfind("_above_")?;
        let thousands: u64 = r[at + "_above_".len()..].parse().ok()?;
        threshold = Some(thousands.checked_mul(1000)?);
        rest = &r[..at];
    }
    let class = match rest {
        "input_cost_per_token" => Class::Input,
        "output_cost_per_token" => Class::Output,
        "cache_read_input_token_cost" => Class::CacheRead,
        "cache_creation_input_token_cost" => Class::CacheWrite,
        // Anthropic's one-hour writes; OpenAI's writes kept over twelve hours.
        "cache_creation_input_token_cost_above_1hr"
        | "cache_creation_input_token_cost_above_12hr" => Class::CacheWriteLong,
        _ => return None,
    };
    Some((class, threshold, variant))
}

/// One model's token prices as read, by class, for the base prices and for
/// one long-context tier.
#[derive(Default)]
struct TokenFields {
    base: BTreeMap<Class, Micros>,
    long: BTreeMap<Class, Micros>,
    threshold: Option<u64>,
    flex: Vec<(String, Class, Option<u64>, Micros)>,
}

impl TokenFields {
    fn set(&mut self, key: &str, class: Class, tier: Option<u64>, p: Micros) -> Result<(), String> {
        let slot = match tier {
            None => &mut self.base,
            Some(t) => {
                if self.threshold.is_some_and(|x| x != t) {
                    return Err(
                        "long-context prices at two thresholds: keycap's table holds one".into(),
                    );
                }
                self.threshold = Some(t);
                &mut self.long
            }
        };
        if slot.insert(class, p).is_some() {
            return Err(format!(
                "two prices for the same token class ({key}): keycap will not pick one"
            ));
        }
        Ok(())
    }
}

/// One conversion: where skips and left-out prices are collected.
struct Run<'a> {
    vendor: LlmVendor,
    base: Option<&'a TokenPrices>,
    as_of: &'a str,
    skipped: Vec<Skipped>,
    unused: BTreeMap<&'static str, (&'static str, BTreeSet<String>)>,
}

impl Run<'_> {
    fn skip(&mut self, name: &str, reason: impl Into<String>) {
        self.skipped.push(Skipped {
            name: name.to_string(),
            reason: reason.into(),
        });
    }

    fn note(&mut self, name: &str, (kind, reason): (&'static str, &'static str)) {
        self.unused
            .entry(kind)
            .or_insert((reason, BTreeSet::new()))
            .1
            .insert(name.to_string());
    }

    /// A chat or responses model's prices.
    fn model(&mut self, name: &str, fields: &Fields) -> Result<ModelPrice, String> {
        if name.starts_with("ft:") {
            return Err("fine-tuned base price: requests name the fine-tuned model \
                        (ft:<base>:<org>::<id>), which keycap's lookup does not match"
                .into());
        }
        if name.contains('/') {
            return Err("not a model name the vendor's API takes".into());
        }
        let searches = fields.contains_key("search_context_cost_per_query")
            && name.split('-').any(|part| part == "search");
        if searches {
            return Err(
                "searches the web on every call, billed per search: keycap's table has no \
                 per-call fee"
                    .into(),
            );
        }
        let mut tokens = TokenFields::default();
        let mut uplifts = Uplifts::default();
        let mut notes = Vec::new();
        let mut max_output = None;
        for (key, raw) in fields {
            if key == "max_output_tokens" {
                max_output = Some(number(key, raw, 0, "tokens")?);
                continue;
            }
            if !is_price_field(key) {
                continue;
            }
            if let Some((class, tier, variant)) = token_field(key) {
                let p = per_token(key, raw)?;
                match variant {
                    None => tokens.set(key, class, tier, p)?,
                    Some(Variant::Flex) => {
                        tokens.flex.push((key.clone(), class, tier, p));
                        notes.push(Variant::Flex.unused());
                    }
                    Some(v) => notes.push(v.unused()),
                }
                continue;
            }
            if let Some((_, kind, reason)) = UNUSED_FIELDS.iter().find(|(f, _, _)| f == key) {
                notes.push((*kind, *reason));
                continue;
            }
            match (self.vendor, key.as_str()) {
                (
                    LlmVendor::Openai,
                    "regional_processing_uplift_multiplier_eu"
                    | "regional_processing_uplift_multiplier_us",
                ) => {
                    let u = multiplier(key, raw)?;
                    // One surcharge for every region: the dearest of them.
                    uplifts.regional_processing = uplifts.regional_processing.max(Some(u));
                }
                (LlmVendor::Anthropic, "provider_specific_entry") => {
                    let m =
                        Members::parse(raw.get()).map_err(|_| format!("{key} is not an object"))?;
                    for (k, v) in m.0 {
                        match k.as_str() {
                            "us" => uplifts.inference_geo_us = Some(multiplier("us", &v)?),
                            "fast" => notes
                                .push(("fast mode", "fast mode: keycap refuses speed \"fast\"")),
                            other => {
                                return Err(format!(
                                    "unknown price field {key}.{}: keycap will not guess how \
                                     it is billed",
                                    clip(other)
                                ))
                            }
                        }
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown price field {}: keycap will not guess how it is billed",
                        clip(key)
                    ))
                }
            }
        }
        let max_output_tokens = match max_output {
            Some(n) if n > 0 => u64::try_from(n).map_err(|_| "max_output_tokens is too large")?,
            _ => {
                return Err(
                    "no output limit (max_output_tokens): keycap bounds a call without one \
                     by it"
                        .into(),
                )
            }
        };
        for (key, class, tier, p) in &tokens.flex {
            let standard = match tier {
                None => tokens.base.get(class),
                Some(_) => tokens.long.get(class),
            };
            if standard.is_none_or(|s| p > s) {
                return Err(format!(
                    "{key} is above the standard price: keycap records flex calls at the \
                     standard price"
                ));
            }
        }
        let base = &tokens.base;
        let input = *base.get(&Class::Input).ok_or("no input price")?;
        let output = *base.get(&Class::Output).ok_or("no output price")?;
        let long_context = match tokens.threshold {
            None => None,
            Some(above_input_tokens) => {
                let l = &tokens.long;
                let need = |c: Class, what: &str| {
                    l.get(&c).copied().ok_or_else(|| {
                        format!(
                            "long-context prices above {above_input_tokens} input tokens lack \
                             a price for {what}: keycap will not guess it"
                        )
                    })
                };
                // A class priced at the base but not above the threshold has
                // no known long-context price.
                for (c, what) in [
                    (Class::CacheRead, "cached input"),
                    (Class::CacheWrite, "cache write"),
                    (Class::CacheWriteLong, "long cache write"),
                ] {
                    if base.contains_key(&c) {
                        need(c, what)?;
                    }
                }
                Some(LongContext {
                    above_input_tokens,
                    input: need(Class::Input, "input")?,
                    cached_input: l.get(&Class::CacheRead).copied(),
                    output: need(Class::Output, "output")?,
                    cache_write: l.get(&Class::CacheWrite).copied(),
                    cache_write_1h: l.get(&Class::CacheWriteLong).copied(),
                })
            }
        };
        let image_input_tokens_max = self
            .base
            .and_then(|b| b.lookup_listed(name))
            .and_then(|(_, p)| p.image_input_tokens_max);
        let price = ModelPrice {
            input,
            cached_input: base.get(&Class::CacheRead).copied(),
            output,
            cache_write: base.get(&Class::CacheWrite).copied(),
            cache_write_1h: base.get(&Class::CacheWriteLong).copied(),
            max_output_tokens,
            image_input_tokens_max,
            long_context,
            uplifts,
        };
        // The table's own checks (cached input not above input, long-context
        // prices not below the base ones), as a reason to skip.
        TokenPrices::new(
            self.as_of,
            None,
            [(name.to_string(), price.clone())].into(),
            BTreeMap::new(),
            BTreeMap::new(),
        )
        .map_err(|e| e.0)?;
        for n in notes {
            self.note(name, n);
        }
        Ok(price)
    }

    /// An embedding model: input tokens only.
    fn embedding(&mut self, name: &str, fields: &Fields) -> Result<EmbeddingPrice, String> {
        let mut input = None;
        let mut notes = Vec::new();
        for (key, raw) in fields {
            if !is_price_field(key) {
                continue;
            }
            match token_field(key) {
                Some((Class::Input, None, None)) => input = Some(per_token(key, raw)?),
                Some((Class::Output, None, None)) => {
                    if per_token(key, raw)? != Micros::ZERO {
                        return Err("an embedding model with an output price".into());
                    }
                }
                Some((_, None, Some(v @ Variant::Batches))) => notes.push(v.unused()),
                _ => {
                    return Err(format!(
                        "unknown price field {} for an embedding model",
                        clip(key)
                    ))
                }
            }
        }
        let input = input.ok_or("no input price")?;
        for n in notes {
            self.note(name, n);
        }
        Ok(EmbeddingPrice { input })
    }

    /// One `<quality>/<size>` option of a model priced per image.
    fn per_image(&mut self, fields: &Fields) -> Result<Micros, String> {
        let mut price = None;
        for (key, raw) in fields {
            if !is_price_field(key) {
                continue;
            }
            match key.as_str() {
                "input_cost_per_image" | "output_cost_per_image" => {
                    let p = Micros(number(key, raw, 6, "micro-dollars")?);
                    if price.is_some_and(|q| q != p) {
                        return Err("two different prices per image".into());
                    }
                    price = Some(p);
                }
                // Derived from the per-image price; the image is what is billed.
                "input_cost_per_pixel" | "output_cost_per_pixel" => {}
                _ => {
                    return Err(format!(
                        "unknown price field {} for an image option",
                        clip(key)
                    ))
                }
            }
        }
        price.ok_or_else(|| "no price per image (priced per pixel only)".into())
    }

    /// A model billed in tokens that generates images: its prompt at the
    /// text input price, each image at a fixed count of image output tokens,
    /// which LiteLLM does not list and the base table must.
    fn token_image(&mut self, name: &str, fields: &Fields) -> Result<ImagePrice, String> {
        let mut input = None;
        let mut image_output = None;
        let mut text_output = None;
        let mut notes = Vec::new();
        for (key, raw) in fields {
            if !is_price_field(key) {
                continue;
            }
            if key.ends_with("_batches") {
                notes.push(Variant::Batches.unused());
                continue;
            }
            match key.as_str() {
                "input_cost_per_token" => input = Some(per_token(key, raw)?),
                "output_cost_per_image_token" => image_output = Some(per_token(key, raw)?),
                "output_cost_per_token" => text_output = Some(per_token(key, raw)?),
                "input_cost_per_image_token" => notes.push((
                    "image input",
                    "image input tokens: keycap refuses image edits",
                )),
                "cache_read_input_token_cost" | "cache_read_input_image_token_cost" => {
                    notes.push((
                        "image cache reads",
                        "cheaper cache reads: keycap records image prompts at the uncached price",
                    ))
                }
                _ => {
                    return Err(format!(
                        "unknown price field {} for an image model",
                        clip(key)
                    ))
                }
            }
        }
        let input = input.ok_or("no input price for the prompt")?;
        let output = image_output.ok_or("no price per image output token")?;
        if text_output.is_some_and(|t| t > output) {
            return Err(
                "text output priced above image output: keycap records all output at the \
                 image price"
                    .into(),
            );
        }
        let Some((
            _,
            ImagePrice::Tokens {
                output_tokens_per_image,
                ..
            },
        )) = self.base.and_then(|b| b.lookup_image(name))
        else {
            return Err(
                "billed in tokens, and LiteLLM does not list how many output tokens \
                        each image makes: keycap needs them to bound the call (give them in \
                        the base table)"
                    .into(),
            );
        };
        for n in notes {
            self.note(name, n);
        }
        Ok(ImagePrice::Tokens {
            input,
            output,
            output_tokens_per_image: output_tokens_per_image.clone(),
        })
    }
}

/// A decimal surcharge multiplier (`1.1`).
fn multiplier(key: &str, raw: &RawValue) -> Result<Uplift, String> {
    let m = number(key, raw, 6, "millionths")?;
    Uplift::from_millionths(m).ok_or_else(|| format!("{key} is not a multiplier from 1 to 10"))
}

/// `hd/1024-x-1792/dall-e-3` -> (`dall-e-3`, `hd/1024x1792`).
fn image_option(name: &str) -> Option<(String, String)> {
    let mut parts = name.splitn(3, '/');
    let (quality, size, model) = (parts.next()?, parts.next()?, parts.next()?);
    let (w, h) = size.split_once("-x-")?;
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if quality.is_empty() || model.is_empty() || model.contains('/') || !number(w) || !number(h) {
        return None;
    }
    Some((model.to_string(), format!("{quality}/{w}x{h}")))
}

/// Removes dated snapshots priced exactly as the entry they extend: the
/// table's lookup prices them by it.
fn drop_aliases<T: PartialEq>(section: &mut BTreeMap<String, T>, run: &mut Run<'_>) {
    let aliases: Vec<(String, String)> = section
        .iter()
        .filter_map(|(name, price)| {
            section
                .iter()
                .filter(|(base, _)| {
                    name.strip_prefix(base.as_str())
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(is_snapshot_suffix)
                })
                .max_by_key(|(base, _)| base.len())
                .filter(|(_, base_price)| *base_price == price)
                .map(|(base, _)| (name.clone(), base.clone()))
        })
        .collect();
    for (name, base) in aliases {
        section.remove(&name);
        run.skip(
            &name,
            format!("duplicate alias: priced as {base:?}, which has the same prices"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reduced sample of LiteLLM's file (see the README beside it).
    const SAMPLE: &str = include_str!("../../tests/fixtures/litellm/model_prices_sample.json");

    /// The facts LiteLLM does not carry, as a table being replaced holds
    /// them.
    const BASE: &str = r#"{"as_of": "2025-08-01", "currency": "usd", "unit": "per_million_tokens",
        "models": {"gpt-4o": {"input": "2.5", "output": "10", "max_output_tokens": 16384,
                              "image_input_tokens_max": 1445}},
        "images": {"gpt-image-1": {"input": "5", "output": "40",
            "output_tokens_per_image": {"low/1024x1024": 272, "high/1024x1536": 6240}}}}"#;

    fn convert(vendor: LlmVendor) -> Import {
        let base = TokenPrices::from_json(BASE).unwrap();
        import(
            SAMPLE,
            vendor,
            &ImportOptions {
                as_of: "2026-12-06",
                source: Some("litellm 1.110.2 sample"),
                base: Some(&base),
            },
        )
        .unwrap()
    }

    fn reason<'a>(r: &'a ImportReport, name: &str) -> &'a str {
        r.skipped
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.reason.as_str())
            .unwrap_or_else(|| panic!("{name} not skipped: {:?}", r.skipped))
    }

    #[test]
    fn openai_prices_convert_to_exact_micros_per_million_tokens() {
        let Import { table, report } = convert(LlmVendor::Openai);
        assert_eq!(table.as_of(), "2026-12-06");
        assert_eq!(table.source(), Some("litellm 1.110.2 sample"));
        let (_, mini) = table.lookup("gpt-5-mini").unwrap();
        assert_eq!(
            (mini.input, mini.cached_input, mini.output),
            (Micros(250_000), Some(Micros(25_000)), Micros(2_000_000))
        );
        assert_eq!(mini.max_output_tokens, 128_000);
        // LiteLLM does not say what an image costs a chat model: images
        // are refused for it unless the base table knew.
        assert_eq!(mini.image_input_tokens_max, None);
        assert_eq!(
            table.lookup("gpt-4o").unwrap().1.image_input_tokens_max,
            Some(1445)
        );
        assert_eq!(table.lookup("gpt-5-nano").unwrap().1.input, Micros(50_000));
        // The dated snapshot is priced by its base entry.
        assert_eq!(table.lookup("gpt-5-2025-08-07").unwrap().0, "gpt-5");
        // A snapshot priced apart keeps its own entry.
        let (own, old) = table.lookup("gpt-4o-2024-05-13").unwrap();
        assert_eq!((own, old.input), ("gpt-4o-2024-05-13", Micros(5_000_000)));

        // Cache writes, long-context prices and the regional surcharge.
        let (_, sol) = table.lookup("gpt-5.6-sol").unwrap();
        assert_eq!(sol.input, Micros(4_000_000));
        assert_eq!(sol.cache_write, Some(Micros(5_000_000)));
        assert_eq!(sol.cache_write_1h, Some(Micros(10_000_000)));
        let long = sol.long_context.as_ref().unwrap();
        assert_eq!(long.above_input_tokens, 272_000);
        assert_eq!(
            (long.input, long.output),
            (Micros(8_000_000), Micros(30_000_000))
        );
        assert_eq!(long.cache_write_1h, Some(Micros(20_000_000)));
        assert_eq!(
            sol.uplifts.regional_processing.map(Uplift::millionths),
            Some(1_100_000)
        );
        assert_eq!(sol.uplifts.inference_geo_us, None);

        assert_eq!(
            table
                .lookup_embedding("text-embedding-3-small")
                .unwrap()
                .1
                .input,
            Micros(20_000)
        );
        let (_, image) = table.lookup_image("gpt-image-1").unwrap();
        assert_eq!(
            image,
            &ImagePrice::Tokens {
                input: Micros(5_000_000),
                output: Micros(40_000_000),
                output_tokens_per_image: [
                    ("low/1024x1024".to_string(), 272),
                    ("high/1024x1536".to_string(), 6240)
                ]
                .into(),
            }
        );
        assert!(report.models.contains(&"gpt-5-mini".to_string()));
        assert_eq!(report.images, ["gpt-image-1"]);
        // Only the vendor's own entries count; other providers' are not
        // even reported.
        assert!(report.skipped.iter().all(|s| !s.name.starts_with("azure/")));
        let listed = report.models.len()
            + report.embeddings.len()
            + report.images.len()
            + report.skipped.len();
        assert_eq!(listed, report.entries, "every entry is priced or skipped");
    }

    #[test]
    fn every_skip_says_why() {
        let r = convert(LlmVendor::Openai).report;
        for (name, says) in [
            ("gpt-5-2025-08-07", "duplicate alias: priced as \"gpt-5\""),
            ("gpt-5.5-cyber", "no output limit"),
            ("gpt-5.6-cyber", "long-context prices above 272000"),
            ("gpt-4o-search-preview", "searches the web on every call"),
            ("ft:gpt-4o-2024-08-06", "fine-tuned"),
            ("openai/container", "not a model name"),
            ("gpt-realtime", "mode \"realtime\""),
            ("gpt-image-1.5", "output tokens each image makes"),
            ("low/1024-x-1024/gpt-image-1", "billed in tokens"),
            ("low/1024-x-1024/gpt-image-1.5", "billed in tokens"),
            ("1024-x-1024/gpt-image-1.5", "without a quality"),
        ] {
            assert!(
                reason(&r, name).contains(says),
                "{name}: {}",
                reason(&r, name)
            );
        }
        let kinds: Vec<&str> = r.unused_prices.iter().map(|u| u.kind.as_str()).collect();
        for kind in [
            "audio",
            "batch",
            "decisions",
            "fedramp",
            "flex",
            "priority",
            "web search",
        ] {
            assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
        }
    }

    #[test]
    fn anthropic_prices_carry_the_us_surcharge_and_long_context() {
        let Import { table, report } = convert(LlmVendor::Anthropic);
        let (_, opus) = table.lookup("claude-opus-4-6").unwrap();
        assert_eq!(
            (
                opus.input,
                opus.cache_write,
                opus.cache_write_1h,
                opus.output
            ),
            (
                Micros(5_000_000),
                Some(Micros(6_250_000)),
                Some(Micros(10_000_000)),
                Micros(25_000_000)
            )
        );
        assert_eq!(
            opus.uplifts.inference_geo_us.map(Uplift::millionths),
            Some(1_100_000)
        );
        let (_, haiku) = table.lookup("claude-haiku-5-5").unwrap();
        let long = haiku.long_context.as_ref().unwrap();
        assert_eq!(long.above_input_tokens, 100_000);
        assert_eq!(long.cache_write_1h, Some(Micros(1_000_000)));
        assert_eq!(
            table.lookup("claude-haiku-4-5-20251001").unwrap().0,
            "claude-haiku-4-5"
        );
        assert!(reason(&report, "claude-haiku-4-5-20251001").contains("duplicate alias"));
        assert!(report.unused_prices.iter().any(|u| u.kind == "fast mode"));
        // No OpenAI entry leaks into the Anthropic table.
        assert!(table.lookup("gpt-5").is_none());
    }

    #[test]
    fn numbers_are_read_from_their_text_never_through_a_float() {
        let per = |text: &str| {
            let raw = RawValue::from_string(text.to_string()).unwrap();
            per_token("p", &raw)
        };
        assert_eq!(per("1.25e-06"), Ok(Micros(1_250_000)));
        // As an f64, 1.1e-06 * 1e12 is 1100000.0000000002.
        assert_eq!(per("1.1e-06"), Ok(Micros(1_100_000)));
        assert_eq!(per("1.38e-07"), Ok(Micros(138_000)));
        assert_eq!(per("1E-6"), Ok(Micros(1_000_000)));
        assert_eq!(per("0.000168"), Ok(Micros(168_000_000)));
        assert_eq!(per("0.0"), Ok(Micros(0)));
        assert_eq!(per("15"), Ok(Micros(15_000_000_000_000)));
        for not_exact in ["0.000283333333333", "2.0751953125e-09", "1e-13"] {
            let err = per(not_exact).unwrap_err();
            assert!(err.contains("will not round"), "{not_exact}: {err}");
        }
        for bad in ["-1e-06", "\"1e-06\"", "null", "1e99999"] {
            assert!(per(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Exact::parse("12.500e2"),
            Some(Exact {
                digits: 125,
                exp: 1
            })
        );
        assert_eq!(Exact::parse("1.5.5"), None);
        assert_eq!(Exact::parse(".5"), None);
        assert_eq!(
            Exact::parse(&format!("1{}", "0".repeat(60)))
                .unwrap()
                .scaled(0),
            None
        );
    }

    /// One OpenAI chat entry, `"name": {...}`, with `fields` added.
    fn entry(name: &str, fields: &str) -> String {
        format!(
            r#""{name}": {{"litellm_provider": "openai", "mode": "chat", "max_output_tokens": 100,
                 "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06{fields}}}"#
        )
    }

    fn file(entries: &[String]) -> String {
        format!("{{{}}}", entries.join(", "))
    }

    fn one(text: &str) -> Result<Import, PriceTableError> {
        import(
            text,
            LlmVendor::Openai,
            &ImportOptions {
                as_of: "2026-12-06",
                source: None,
                base: None,
            },
        )
    }

    #[test]
    fn a_price_keycap_does_not_know_skips_the_entry_rather_than_guess() {
        for (fields, says) in [
            (
                r#", "output_cost_per_reasoning_token": 9e-06"#,
                "unknown price field output_cost_per_reasoning_token",
            ),
            (
                r#", "input_cost_per_token_flex": 2e-06"#,
                "above the standard price",
            ),
            (
                r#", "cache_read_input_token_cost": 3e-06"#,
                "cached_input must not exceed input",
            ),
            (
                r#", "input_cost_per_token_above_100k_tokens": 2e-06,
                   "output_cost_per_token_above_200k_tokens": 4e-06"#,
                "two thresholds",
            ),
            (
                r#", "input_cost_per_token_above_100k_tokens": 2e-06"#,
                "lack a price for output",
            ),
            (
                r#", "input_cost_per_token_above_100k_tokens": 5e-07,
                   "output_cost_per_token_above_100k_tokens": 4e-06"#,
                "must not be below",
            ),
            (
                r#", "provider_specific_entry": {"us": 1.1}"#,
                "unknown price field",
            ),
            (
                r#", "regional_processing_uplift_multiplier_us": 0.9"#,
                "multiplier from 1 to 10",
            ),
            (r#", "input_cost_per_token": 9e-06"#, "appears twice"),
            (r#", "input_cost_per_token_priority": "x""#, ""),
        ] {
            // Alone, the file prices nothing: refused whole.
            let err = one(&file(&[entry("m", fields)])).unwrap_err();
            assert!(err.0.contains("no openai chat or responses model"), "{err}");
            // Beside a model it prices, only the entry is skipped.
            let r = one(&file(&[entry("ok", ""), entry("m", fields)]))
                .unwrap_or_else(|e| panic!("{fields}: {e}"))
                .report;
            assert_eq!(r.models, ["ok"], "{fields}");
            assert!(
                reason(&r, "m").contains(says),
                "{fields}: {}",
                reason(&r, "m")
            );
        }
        // Prices of calls keycap refuses are left out, not a reason to skip.
        let r = one(&file(&[entry(
            "m",
            r#", "input_cost_per_token_priority": 9e-06"#,
        )]))
        .unwrap()
        .report;
        assert_eq!(r.models, ["m"]);
        assert_eq!(r.unused_prices[0].kind, "priority");
    }

    #[test]
    fn a_file_it_cannot_read_is_refused_whole_naming_what_is_wrong() {
        for (text, says) in [
            ("not json", "LiteLLM file"),
            ("[1, 2]", "LiteLLM file"),
            (
                r#"{"a": {"litellm_provider": "openai"}, "a": {}}"#,
                "entry \"a\" appears twice",
            ),
            (
                r#"{"sample_spec": {"litellm_provider": "x"}}"#,
                "no openai chat",
            ),
        ] {
            let err = one(text).unwrap_err();
            assert!(err.0.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn the_table_written_reads_back_unchanged() {
        let Import { table, .. } = convert(LlmVendor::Openai);
        let text = table.to_json();
        assert_eq!(TokenPrices::from_json(&text).unwrap(), table);
        // Prices are written as decimal strings.
        assert!(text.contains(r#""input": "0.25""#), "{text}");
    }

    #[test]
    fn vendor_entries_keep_the_entries_as_written() {
        let reduced = vendor_entries(SAMPLE, &[LlmVendor::Anthropic]).unwrap();
        assert!(reduced.contains("claude-opus-4-6"));
        assert!(!reduced.contains("gpt-5"));
        assert!(reduced.contains("1.25e-06"), "numbers keep their text");
        let whole = convert(LlmVendor::Anthropic);
        let again = import(
            &reduced,
            LlmVendor::Anthropic,
            &ImportOptions {
                as_of: "2026-12-06",
                source: Some("litellm 1.110.2 sample"),
                base: Some(&TokenPrices::from_json(BASE).unwrap()),
            },
        )
        .unwrap();
        assert_eq!(again.table, whole.table);
        assert_eq!(again.report, whole.report);
    }
}
