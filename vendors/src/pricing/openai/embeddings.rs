//! Embeddings (`POST /v1/embeddings`): input tokens only.
//!
//! The bound is the UTF-8 byte length of each input string (a token is at
//! least one byte), or the number of token ids when the input is given as
//! tokens, at the model's price from the table's `embeddings` section (or
//! its `default`, for a model it does not list). Settled from
//! `usage.prompt_tokens`.

use serde_json::{json, Value};

use super::{model_name, request_object, unknown_model};
use crate::pricing::{
    clip, settle_fixed, settle_reported, unreadable, EmbeddingPrice, PriceRequest, PricingError,
    Quote, QuoteKind, Settlement,
};
use keycap_proto::prices::TokenPrices;

pub(super) fn quote(prices: &TokenPrices, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
    let obj = request_object(req, "embeddings")?;
    let model = model_name(&obj)?;
    let (priced_as, price) = embedding_model(prices, model)?;
    let (tokens_max, inputs) = input_bound(obj.get("input"))?;
    let reserve = price
        .cost(tokens_max)
        .ok_or_else(|| unreadable("request is too large to price"))?;
    Ok(Quote {
        reserve,
        detail: json!({
            "model": model,
            "priced_as": priced_as,
            "inputs": inputs,
            "input_tokens_max": tokens_max,
        }),
        streaming: false,
        kind: QuoteKind::OpenAiEmbeddings {
            model: model.to_string(),
            price,
        },
        forward_body: None,
    })
}

/// The table's price for an embedding model; a model it lists as a chat
/// or image model is refused, an unlisted one takes the table's default.
fn embedding_model<'a>(
    prices: &'a TokenPrices,
    model: &str,
) -> Result<(&'a str, EmbeddingPrice), PricingError> {
    if let Some((name, price)) = prices.lookup_embedding(model) {
        return Ok((name, *price));
    }
    let listed_elsewhere = prices.lookup_image(model).is_some()
        || prices
            .lookup(model)
            .is_some_and(|(name, _)| name != "default");
    if listed_elsewhere {
        return Err(unreadable(format!(
            "model {:?} is not an embedding model in keycap's price table",
            clip(model)
        )));
    }
    match prices.default_price() {
        Some(d) => Ok(("default", EmbeddingPrice { input: d.input })),
        None => Err(unknown_model(prices, model)),
    }
}

/// Most input tokens `input` can be, and how many inputs it holds.
fn input_bound(input: Option<&Value>) -> Result<(u64, u64), PricingError> {
    let shape = || {
        unreadable(
            "\"input\" must be a string, an array of strings, an array of token ids \
             or an array of arrays of token ids",
        )
    };
    let len = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let token_ids = |v: &Value| -> Result<u64, PricingError> {
        let ids = v.as_array().ok_or_else(shape)?;
        if !ids.iter().all(|t| t.as_u64().is_some()) {
            return Err(shape());
        }
        Ok(len(ids.len()))
    };
    let (tokens, inputs) = match input {
        Some(Value::String(s)) => (len(s.len()), 1),
        Some(Value::Array(items)) => match items.first() {
            None => return Err(unreadable("\"input\" must not be empty")),
            Some(Value::String(_)) => {
                let mut bytes = 0u64;
                for item in items {
                    let s = item.as_str().ok_or_else(shape)?;
                    bytes = bytes.saturating_add(len(s.len()));
                }
                (bytes, len(items.len()))
            }
            Some(Value::Number(_)) => (token_ids(&Value::Array(items.clone()))?, 1),
            Some(Value::Array(_)) => {
                let mut count = 0u64;
                for item in items {
                    count = count.saturating_add(token_ids(item)?);
                }
                (count, len(items.len()))
            }
            Some(_) => return Err(shape()),
        },
        None | Some(Value::Null) => return Err(unreadable("request needs an \"input\"")),
        Some(_) => return Err(shape()),
    };
    if tokens == 0 {
        return Err(unreadable("\"input\" must not be empty"));
    }
    Ok((tokens, inputs))
}

pub(super) fn settle(quote: &Quote, status: u16, body: &[u8]) -> Settlement {
    let QuoteKind::OpenAiEmbeddings { model, price } = &quote.kind else {
        return settle_fixed(quote, status);
    };
    let tokens = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/usage/prompt_tokens").and_then(Value::as_u64));
    settle_reported(quote, status, tokens, |t| {
        (price.cost(t), json!({"model": model, "input_tokens": t}))
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::OpenAiPricing;
    use super::*;
    use crate::pricing::{ceil_cost, Outcome, PriceModel};
    use keycap_proto::Micros;
    use std::sync::Arc;

    fn quote(body: &str) -> Result<Quote, PricingError> {
        pricing().quote(&post("/v1/embeddings", body))
    }

    #[test]
    fn reserve_is_input_bytes_or_token_ids_at_the_input_price() {
        for (input, tokens, inputs) in [
            (r#""The food was delicious""#, 22, 1),
            (r#"["héllo","world"]"#, 11, 2),
            (r#"[1212, 318, 257, 1332, 13]"#, 5, 1),
            (r#"[[1212, 318], [257], [1332, 13, 99]]"#, 6, 3),
        ] {
            let body = format!(r#"{{"model":"text-embedding-3-large","input":{input}}}"#);
            let q = quote(&body).unwrap();
            assert_eq!(q.detail["input_tokens_max"], tokens, "{input}");
            assert_eq!(q.detail["inputs"], inputs, "{input}");
            assert_eq!(q.reserve, Micros(ceil_cost(tokens, 130_000)), "{input}");
            assert!(!q.streaming);
        }
        // Escapes count as the bytes they stand for.
        let q = quote(r#"{"model":"text-embedding-3-small","input":"\u00e9"}"#).unwrap();
        assert_eq!(q.detail["input_tokens_max"], 2);
        // A large input at a low price still rounds up, never to 0.
        let big = format!(
            r#"{{"model":"text-embedding-3-small","input":"{}"}}"#,
            "a".repeat(1_000_001)
        );
        assert_eq!(quote(&big).unwrap().reserve, Micros(20_001));
    }

    #[test]
    fn malformed_inputs_and_other_models_are_refused() {
        for input in [
            "null",
            "[]",
            r#""""#,
            r#"[""]"#,
            "5",
            r#"{"text":"x"}"#,
            r#"["a", 1]"#,
            r#"[1, "a"]"#,
            "[-1]",
            "[1.5]",
            "[[]]",
            r#"[[1], "a"]"#,
            "[[1], [-2]]",
            "[true]",
        ] {
            let body = format!(r#"{{"model":"text-embedding-3-small","input":{input}}}"#);
            assert_eq!(
                quote(&body).unwrap_err().code(),
                "unpriceable_request",
                "{input}"
            );
        }
        assert_eq!(
            quote(r#"{"model":"text-embedding-3-small"}"#)
                .unwrap_err()
                .code(),
            "unpriceable_request"
        );
        for model in ["gpt-4o", "gpt-image-1"] {
            let err = quote(&format!(r#"{{"model":"{model}","input":"x"}}"#)).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request");
            assert!(err.to_string().contains("not an embedding model"), "{err}");
        }
        let err = quote(r#"{"model":"text-embedding-4","input":"x"}"#).unwrap_err();
        assert_eq!(err.code(), "unknown_model");
    }

    #[test]
    fn an_unlisted_model_takes_the_default_input_price() {
        let table = r#"{"as_of": "2026-01-01", "currency": "usd", "unit": "per_million_tokens",
            "default": {"input": "3", "output": "9", "max_output_tokens": 10},
            "models": {"m": {"input": "1", "output": "2", "max_output_tokens": 10}},
            "embeddings": {"e": {"input": "0.5"}}}"#;
        let p = OpenAiPricing::new(Arc::new(TokenPrices::from_json(table).unwrap()));
        let q = |model: &str| {
            p.quote(&post(
                "/v1/embeddings",
                &format!(r#"{{"model":"{model}","input":"abcd"}}"#),
            ))
        };
        let house = q("house-embedder").unwrap();
        assert_eq!(house.detail["priced_as"], "default");
        assert_eq!(house.reserve, Micros(ceil_cost(4, 3_000_000)));
        assert_eq!(q("e").unwrap().reserve, Micros(ceil_cost(4, 500_000)));
        assert_eq!(q("m").unwrap_err().code(), "unpriceable_request");
    }

    #[test]
    fn settles_from_prompt_tokens() {
        let p = pricing();
        let q =
            quote(r#"{"model":"text-embedding-ada-002","input":["first text","second"]}"#).unwrap();
        let resp = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]},
            {"object":"embedding","index":1,"embedding":[0.2]}],"model":"text-embedding-ada-002",
            "usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        let s = p.settle(&q, 200, resp);
        assert_eq!((s.cost, s.outcome), (Micros(1), Outcome::Settled));
        assert_eq!(s.detail["input_tokens"], 4);
        assert!(s.cost <= q.reserve);
        let many = br#"{"usage":{"prompt_tokens":3000000,"total_tokens":3000000}}"#;
        assert_eq!(p.settle(&q, 200, many).cost, Micros(300_000));
        for body in [&b"{}"[..], br#"{"usage":{"total_tokens":4}}"#, b"nope"] {
            let s = p.settle(&q, 200, body);
            assert_eq!(
                (s.cost, s.outcome),
                (q.reserve, Outcome::SettledAtReservation)
            );
        }
        let s = p.settle(&q, 400, resp);
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Released));
    }

    #[test]
    fn settlement_within_the_bound_never_exceeds_the_reservation() {
        let p = pricing();
        for model in [
            "text-embedding-3-small",
            "text-embedding-3-large",
            "text-embedding-ada-002",
        ] {
            for n in [1usize, 7, 49_999, 50_001, 1_000_000] {
                let body = format!(r#"{{"model":"{model}","input":"{}"}}"#, "z".repeat(n));
                let q = quote(&body).unwrap();
                for used in [0, 1, n / 2, n] {
                    let resp = format!(r#"{{"usage":{{"prompt_tokens":{used}}}}}"#);
                    let s = p.settle(&q, 200, resp.as_bytes());
                    assert!(s.cost <= q.reserve, "{model} {n} {used}");
                }
            }
        }
    }
}
