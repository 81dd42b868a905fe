//! Image generation (`POST /v1/images/generations`).
//!
//! Priced from the table's `images` section by model, quality and size,
//! with OpenAI's documented defaults for what the request leaves out
//! (model `dall-e-2`; quality `standard` and size `1024x1024` for the DALL·E
//! models, `auto` for the others). `auto` is the dearest option it could
//! pick. A model with a fixed price per image reserves `n` times that price
//! and settles at it on success; a model billed in tokens (gpt-image-1)
//! reserves the prompt (the body's byte length) at its input price plus `n`
//! times the image's output tokens at its output price, and settles from
//! the `usage` the response reports. Streamed generation (partial images)
//! is refused.

use serde_json::{json, Value};

use super::{request_object, stream_flag};
use crate::pricing::{
    clip, positive_int, settle_fixed, settle_reported, unreadable, ModelPrice, PriceRequest,
    PricingError, Quote, QuoteKind, Settlement,
};
use keycap_proto::prices::{ImagePrice, TokenPrices};
use keycap_proto::Micros;

/// OpenAI generates at most this many images (`n`) per request.
const MAX_IMAGES: u64 = 10;

/// Quality and size a model uses when the request leaves them out, where
/// OpenAI documents one; any other model defaults both to `auto`.
const DOCUMENTED_DEFAULTS: [(&str, &str, &str); 2] = [
    ("dall-e-2", "standard", "1024x1024"),
    ("dall-e-3", "standard", "1024x1024"),
];

/// Parameters only gpt-image models take: with one of them and no
/// `model`, OpenAI does not use its default model.
const GPT_IMAGE_PARAMETERS: [&str; 5] = [
    "background",
    "moderation",
    "output_compression",
    "output_format",
    "partial_images",
];

pub(super) fn quote(prices: &TokenPrices, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
    let obj = request_object(req, "image generations")?;
    if stream_flag(&obj)? {
        return Err(unreadable(
            "keycap cannot price streamed image generation (partial images)",
        ));
    }
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.as_str(),
        None | Some(Value::Null) => {
            if GPT_IMAGE_PARAMETERS
                .iter()
                .any(|p| obj.get(*p).is_some_and(|v| !v.is_null()))
            {
                return Err(unreadable(
                    "name the \"model\": without one, OpenAI picks it from the other parameters",
                ));
            }
            "dall-e-2"
        }
        _ => return Err(unreadable("\"model\" must be a string")),
    };
    let (priced_as, price) = prices.lookup_image(model).ok_or_else(|| {
        PricingError::UnknownModel(format!(
            "image model {:?} is not in keycap's price table (as of {}); the operator must add a price for it",
            clip(model),
            prices.as_of()
        ))
    })?;
    let images = positive_int(&obj, "n")?.unwrap_or(1);
    if images > MAX_IMAGES {
        return Err(unreadable(format!("\"n\" must be at most {MAX_IMAGES}")));
    }
    let (default_quality, default_size) = DOCUMENTED_DEFAULTS
        .iter()
        .find(|(m, _, _)| *m == priced_as)
        .map_or(("auto", "auto"), |(_, q, s)| (*q, *s));
    let quality = text_param(&obj, "quality")?.unwrap_or(default_quality);
    let size = text_param(&obj, "size")?.unwrap_or(default_size);
    let matches = |option: &str| {
        option.split_once('/').is_some_and(|(q, s)| {
            (quality == "auto" || q == quality) && (size == "auto" || s == size)
        })
    };
    let no_price = || {
        unreadable(format!(
            "keycap has no price for {:?} images of quality {:?} and size {:?} (priced: {})",
            clip(model),
            clip(quality),
            clip(size),
            price.options().collect::<Vec<_>>().join(", ")
        ))
    };
    let too_large = || unreadable("request is too large to price");

    let mut detail = json!({
        "model": model,
        "priced_as": priced_as,
        "images": images,
        "quality": quality,
        "size": size,
    });
    let (reserve, tokens) = match price {
        ImagePrice::PerImage(per_image) => {
            let (option, unit) = per_image
                .iter()
                .filter(|(o, _)| matches(o))
                .max_by_key(|(_, p)| **p)
                .ok_or_else(no_price)?;
            detail["priced_option"] = option.as_str().into();
            detail["per_image_micros"] = unit.0.into();
            let reserve = i64::try_from(images)
                .ok()
                .and_then(|n| unit.0.checked_mul(n))
                .ok_or_else(too_large)?;
            (Micros(reserve), None)
        }
        ImagePrice::Tokens {
            input,
            output,
            output_tokens_per_image,
        } => {
            let (option, per_image) = output_tokens_per_image
                .iter()
                .filter(|(o, _)| matches(o))
                .max_by_key(|(_, t)| **t)
                .ok_or_else(no_price)?;
            let output_max = per_image.saturating_mul(images);
            let input_max = u64::try_from(req.body.len()).unwrap_or(u64::MAX);
            let tokens = ModelPrice {
                input: *input,
                output: *output,
                max_output_tokens: output_max,
                ..ModelPrice::default()
            };
            detail["priced_option"] = option.as_str().into();
            detail["input_tokens_max"] = input_max.into();
            detail["output_tokens_max"] = output_max.into();
            let reserve = tokens
                .cost(input_max, 0, output_max)
                .ok_or_else(too_large)?;
            (reserve, Some(tokens))
        }
    };
    Ok(Quote {
        reserve,
        detail,
        streaming: false,
        kind: QuoteKind::OpenAiImages {
            model: model.to_string(),
            images,
            tokens,
        },
        forward_body: None,
    })
}

/// An optional string parameter; null counts as absent.
fn text_param<'a>(
    obj: &'a super::JsonObject,
    field: &str,
) -> Result<Option<&'a str>, PricingError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(unreadable(format!("\"{field}\" must be a string"))),
    }
}

/// Token counts a gpt-image response reports.
struct ImageUsage {
    input: u64,
    /// Input tokens that were images (none for a generation).
    image_input: u64,
    output: u64,
}

pub(super) fn settle(quote: &Quote, status: u16, body: &[u8]) -> Settlement {
    let QuoteKind::OpenAiImages {
        model,
        tokens: Some(price),
        ..
    } = &quote.kind
    else {
        return settle_fixed(quote, status);
    };
    let usage = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let u = v.get("usage")?;
        Some(ImageUsage {
            input: u.get("input_tokens")?.as_u64()?,
            image_input: u
                .pointer("/input_tokens_details/image_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            output: u.get("output_tokens")?.as_u64()?,
        })
    });
    if usage.as_ref().is_some_and(|u| u.image_input > 0) && (200..300).contains(&status) {
        // A generation takes no image input; image tokens are priced
        // differently, so a count of them cannot be settled from the table.
        return Settlement::at_reservation(quote, status, "response reported image input tokens");
    }
    settle_reported(quote, status, usage, |u| {
        (
            price.cost(u.input, 0, u.output),
            json!({"model": model, "input_tokens": u.input, "output_tokens": u.output}),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::post;
    use super::super::OpenAiPricing;
    use super::*;
    use crate::pricing::{ceil_cost, Outcome, PriceModel};

    /// An operator's table with both kinds of image model: DALL·E's fixed
    /// prices per image (no longer in the shipped table) and gpt-image-1's
    /// tokens.
    const TABLE: &str = r#"{"as_of": "2026-01-01", "currency": "usd", "unit": "per_million_tokens",
        "models": {"gpt-4o": {"input": "2.5", "output": "10", "max_output_tokens": 16384}},
        "embeddings": {"text-embedding-3-small": {"input": "0.02"}},
        "images": {
            "dall-e-2": {"per_image": {"standard/256x256": "0.016",
                "standard/512x512": "0.018", "standard/1024x1024": "0.02"}},
            "dall-e-3": {"per_image": {"standard/1024x1024": "0.04",
                "standard/1024x1792": "0.08", "standard/1792x1024": "0.08",
                "hd/1024x1024": "0.08", "hd/1024x1792": "0.12", "hd/1792x1024": "0.12"}},
            "gpt-image-1": {"input": "5", "output": "40", "output_tokens_per_image": {
                "low/1024x1024": 272, "low/1024x1536": 408, "low/1536x1024": 400,
                "medium/1024x1024": 1056, "medium/1024x1536": 1584, "medium/1536x1024": 1568,
                "high/1024x1024": 4160, "high/1024x1536": 6240, "high/1536x1024": 6208}}}}"#;

    fn pricing() -> OpenAiPricing {
        OpenAiPricing::new(std::sync::Arc::new(TokenPrices::from_json(TABLE).unwrap()))
    }

    fn quote(body: &str) -> Result<Quote, PricingError> {
        pricing().quote(&post("/v1/images/generations", body))
    }

    #[test]
    fn the_shipped_table_prices_gpt_image_1_by_tokens() {
        let shipped = super::super::test_support::pricing();
        let q = shipped
            .quote(&post(
                "/v1/images/generations",
                r#"{"model":"gpt-image-1","prompt":"x","quality":"low","size":"1024x1024"}"#,
            ))
            .unwrap();
        assert_eq!(q.detail["output_tokens_max"], 272);
        // DALL·E is no longer listed, so a request naming no model (which
        // OpenAI sends to dall-e-2) is not priced.
        let err = shipped
            .quote(&post("/v1/images/generations", r#"{"prompt":"x"}"#))
            .unwrap_err();
        assert_eq!(err.code(), "unknown_model");
    }

    fn reserve(body: &str) -> i64 {
        quote(body).unwrap().reserve.0
    }

    #[test]
    fn fixed_price_models_reserve_n_times_the_unit_price() {
        let q =
            quote(r#"{"model":"dall-e-3","prompt":"a red fox","size":"1024x1792","quality":"hd"}"#)
                .unwrap();
        assert_eq!(q.reserve, Micros(120_000));
        assert_eq!(q.detail["priced_option"], "hd/1024x1792");
        assert_eq!(q.detail["images"], 1);
        assert!(matches!(
            q.kind,
            QuoteKind::OpenAiImages {
                images: 1,
                tokens: None,
                ..
            }
        ));
        assert_eq!(
            reserve(r#"{"model":"dall-e-2","prompt":"x","n":3,"size":"256x256"}"#),
            3 * 16_000
        );
        // Documented defaults: dall-e-2 when no model is named, standard
        // quality and 1024x1024.
        let q = quote(r#"{"prompt":"x","n":2}"#).unwrap();
        assert_eq!(q.detail["model"], "dall-e-2");
        assert_eq!(q.detail["priced_option"], "standard/1024x1024");
        assert_eq!(q.reserve, Micros(2 * 20_000));
        assert_eq!(reserve(r#"{"model":"dall-e-3","prompt":"x"}"#), 40_000);
        assert_eq!(
            reserve(r#"{"model":"dall-e-3","prompt":"x","quality":null,"size":null}"#),
            40_000
        );
        // `auto` is the dearest option it could stand for.
        assert_eq!(
            reserve(r#"{"model":"dall-e-3","prompt":"x","quality":"auto"}"#),
            80_000
        );
        assert_eq!(
            reserve(r#"{"model":"dall-e-3","prompt":"x","quality":"auto","size":"auto"}"#),
            120_000
        );
        assert_eq!(
            reserve(r#"{"model":"dall-e-2","prompt":"x","quality":"auto"}"#),
            20_000
        );
    }

    #[test]
    fn fixed_prices_settle_at_the_quote_or_release() {
        let p = pricing();
        let q = quote(r#"{"model":"dall-e-3","prompt":"x","quality":"hd"}"#).unwrap();
        let ok = br#"{"created":1713833628,"data":[{"url":"https://example.com/a.png","revised_prompt":"x"}]}"#;
        let s = p.settle(&q, 200, ok);
        assert_eq!((s.cost, s.outcome), (Micros(80_000), Outcome::Settled));
        let s = p.settle(&q, 400, br#"{"error":{"code":"content_policy_violation"}}"#);
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Released));
    }

    #[test]
    fn token_billed_models_reserve_prompt_and_image_tokens() {
        let body = r#"{"model":"gpt-image-1","prompt":"a lighthouse","quality":"medium","size":"1024x1536","n":2}"#;
        let q = quote(body).unwrap();
        let input = body.len() as u64;
        assert_eq!(q.detail["input_tokens_max"], input);
        assert_eq!(q.detail["output_tokens_max"], 2 * 1584);
        assert_eq!(
            q.reserve,
            Micros(ceil_cost(input, 5_000_000) + ceil_cost(2 * 1584, 40_000_000))
        );
        // Left out, quality and size are `auto`: the dearest image.
        let body = r#"{"model":"gpt-image-1","prompt":"x"}"#;
        let q = quote(body).unwrap();
        assert_eq!(q.detail["priced_option"], "high/1024x1536");
        assert_eq!(q.detail["output_tokens_max"], 6240);
        let low = r#"{"model":"gpt-image-1","prompt":"x","quality":"low"}"#;
        assert_eq!(quote(low).unwrap().detail["output_tokens_max"], 408);
    }

    #[test]
    fn token_billed_models_settle_from_usage_within_the_reservation() {
        let p = pricing();
        let body = r#"{"model":"gpt-image-1","prompt":"a lighthouse at dusk","n":2}"#;
        let q = quote(body).unwrap();
        let resp = br#"{"created":1713833628,"data":[{"b64_json":"AA=="},{"b64_json":"AA=="}],
            "usage":{"total_tokens":2122,"input_tokens":10,"output_tokens":2112,
                     "input_tokens_details":{"text_tokens":10,"image_tokens":0}}}"#;
        let s = p.settle(&q, 200, resp);
        assert_eq!(s.outcome, Outcome::Settled);
        assert_eq!(
            s.cost,
            Micros(ceil_cost(10, 5_000_000) + ceil_cost(2112, 40_000_000))
        );
        assert_eq!(s.detail["output_tokens"], 2112);
        // Every count within the request's bounds settles within the
        // reservation.
        let input_max = body.len() as u64;
        for input in [0, 1, input_max] {
            for output in [0, 272, 2 * 6240] {
                let resp =
                    format!(r#"{{"usage":{{"input_tokens":{input},"output_tokens":{output}}}}}"#);
                let s = p.settle(&q, 200, resp.as_bytes());
                assert!(s.cost <= q.reserve, "{input} {output}");
            }
        }
        let s = p.settle(&q, 200, br#"{"data":[]}"#);
        assert_eq!(
            (s.cost, s.outcome),
            (q.reserve, Outcome::SettledAtReservation)
        );
        let with_images = br#"{"usage":{"input_tokens":10,"output_tokens":5,
            "input_tokens_details":{"text_tokens":5,"image_tokens":5}}}"#;
        let s = p.settle(&q, 200, with_images);
        assert_eq!(
            (s.cost, s.outcome),
            (q.reserve, Outcome::SettledAtReservation)
        );
        let s = p.settle(&q, 500, resp);
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Released));
    }

    #[test]
    fn what_has_no_price_is_refused() {
        for body in [
            r#"{"model":"dall-e-3","prompt":"x","size":"512x512"}"#,
            r#"{"model":"dall-e-3","prompt":"x","quality":"high"}"#,
            r#"{"model":"dall-e-2","prompt":"x","quality":"hd"}"#,
            r#"{"model":"gpt-image-1","prompt":"x","size":"1792x1024"}"#,
            r#"{"model":"gpt-image-1","prompt":"x","quality":"standard"}"#,
            r#"{"prompt":"x","quality":"high"}"#,
            r#"{"prompt":"x","output_format":"webp"}"#,
            r#"{"prompt":"x","background":"transparent"}"#,
            r#"{"model":"gpt-image-1","prompt":"x","stream":true,"partial_images":2}"#,
            r#"{"model":"dall-e-2","prompt":"x","n":11}"#,
            r#"{"model":"dall-e-2","prompt":"x","n":0}"#,
            r#"{"model":"dall-e-2","prompt":"x","size":1024}"#,
            r#"{"model":5,"prompt":"x"}"#,
            r#"["x"]"#,
        ] {
            let err = quote(body).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{body}: {err}");
        }
        let err = quote(r#"{"model":"dall-e-3","prompt":"x","size":"512x512"}"#).unwrap_err();
        assert!(err.to_string().contains("hd/1024x1792"), "{err}");
        for model in ["dall-e-4", "gpt-4o", "text-embedding-3-small"] {
            let err = quote(&format!(r#"{{"model":"{model}","prompt":"x"}}"#)).unwrap_err();
            assert_eq!(err.code(), "unknown_model", "{model}");
        }
    }
}
