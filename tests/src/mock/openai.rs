//! The mock's OpenAI calls beyond chat completions: the Responses API,
//! embeddings and image generation, shaped like OpenAI's answers, with usage
//! numbers a test can compute costs from (the functions below give the
//! usage the mock reports for a request body).

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{authorized, MockState, RecordedCall, CHAT_CREATED, CHAT_STREAM_PIECES};
use std::sync::atomic::Ordering;

/// Input tokens the mock reports for every response.
pub const RESPONSES_INPUT_TOKENS: u64 = 57;
/// Of those, the tokens reported as read from the prompt cache.
pub const RESPONSES_CACHED_TOKENS: u64 = 32;
/// Output tokens the mock reports, unless `max_output_tokens` is smaller
/// (then it reports that limit, as a response cut short does).
pub const RESPONSES_OUTPUT_TOKENS: u64 = 240;
/// Tokens reported per input of an embeddings request.
pub const EMBEDDING_TOKENS_PER_INPUT: u64 = 5;
/// Input (prompt text) tokens reported for a gpt-image generation.
pub const IMAGE_PROMPT_TOKENS: u64 = 20;
/// Output tokens reported per image of a gpt-image generation.
pub const IMAGE_OUTPUT_TOKENS: u64 = 1056;

fn openai_error(status: StatusCode, message: &str, code: Option<&str>) -> Response {
    (
        status,
        Json(json!({"error": {
            "message": message,
            "type": "invalid_request_error",
            "param": null,
            "code": code,
        }})),
    )
        .into_response()
}

/// The JSON body of an authorized call, or the error OpenAI would send.
fn request(state: &MockState, call: &RecordedCall) -> Result<Value, Box<Response>> {
    if !authorized(state, call) {
        return Err(Box::new(openai_error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            Some("invalid_api_key"),
        )));
    }
    serde_json::from_slice(&call.body).map_err(|_| {
        Box::new(openai_error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            None,
        ))
    })
}

/// `(input, cached input, output)` tokens the mock reports for a response.
pub fn responses_usage(request: &Value) -> (u64, u64, u64) {
    let output = request
        .get("max_output_tokens")
        .and_then(Value::as_u64)
        .map_or(RESPONSES_OUTPUT_TOKENS, |l| l.min(RESPONSES_OUTPUT_TOKENS));
    (RESPONSES_INPUT_TOKENS, RESPONSES_CACHED_TOKENS, output)
}

fn responses_usage_json((input, cached, output): (u64, u64, u64)) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output,
    })
}

fn response_object(model: &str, status: &str, output: Value, usage: Value) -> Value {
    json!({
        "id": "resp_mock",
        "object": "response",
        "created_at": CHAT_CREATED,
        "status": status,
        "error": null,
        "incomplete_details": null,
        "model": model,
        "output": output,
        "usage": usage,
    })
}

fn output_message(status: &str, text: &str) -> Value {
    json!({
        "type": "message", "id": "msg_mock", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    })
}

/// The events of a streamed response, in order, as (event name, data):
/// `response.created` ... one `response.output_text.delta` per
/// `CHAT_STREAM_PIECES` ... `response.completed` carrying the usage.
pub fn responses_stream_events(model: &str, usage: (u64, u64, u64)) -> Vec<(String, Value)> {
    let text = CHAT_STREAM_PIECES.concat();
    let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": []});
    let in_progress = response_object(model, "in_progress", json!([]), Value::Null);
    let mut events = vec![
        json!({"type": "response.created", "response": in_progress}),
        json!({"type": "response.in_progress", "response": in_progress}),
        json!({"type": "response.output_item.added", "output_index": 0,
               "item": {"type": "message", "id": "msg_mock", "status": "in_progress",
                        "role": "assistant", "content": []}}),
        json!({"type": "response.content_part.added", "item_id": "msg_mock",
               "output_index": 0, "content_index": 0, "part": part("")}),
    ];
    for piece in CHAT_STREAM_PIECES {
        events.push(
            json!({"type": "response.output_text.delta", "item_id": "msg_mock",
                           "output_index": 0, "content_index": 0, "delta": piece}),
        );
    }
    events.extend([
        json!({"type": "response.output_text.done", "item_id": "msg_mock",
               "output_index": 0, "content_index": 0, "text": text}),
        json!({"type": "response.content_part.done", "item_id": "msg_mock",
               "output_index": 0, "content_index": 0, "part": part(&text)}),
        json!({"type": "response.output_item.done", "output_index": 0,
               "item": output_message("completed", &text)}),
        json!({"type": "response.completed", "response": response_object(
            model, "completed", json!([output_message("completed", &text)]),
            responses_usage_json(usage))}),
    ]);
    events
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e["sequence_number"] = i.into();
            let name = e["type"].as_str().unwrap_or_default().to_string();
            (name, e)
        })
        .collect()
}

/// The exact body the mock sends for a streamed response.
pub fn responses_stream_body(model: &str, usage: (u64, u64, u64)) -> String {
    responses_stream_events(model, usage)
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect()
}

/// `POST /v1/responses`: JSON, or an SSE stream when `"stream": true`.
pub(super) fn responses(state: &MockState, call: &RecordedCall) -> Response {
    let req = match request(state, call) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let usage = responses_usage(&req);
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let mut resp = Response::new(Body::from(responses_stream_body(model, usage)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        return resp;
    }
    let text = CHAT_STREAM_PIECES.concat();
    Json(response_object(
        model,
        "completed",
        json!([output_message("completed", &text)]),
        responses_usage_json(usage),
    ))
    .into_response()
}

/// How many inputs an embeddings request holds (a string, or an array of
/// token ids, is one; an array of strings or of token arrays is one each).
fn embedding_inputs(request: &Value) -> u64 {
    match request.get("input") {
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => 1,
        Some(Value::Array(items)) => items.len() as u64,
        _ => 1,
    }
}

/// Tokens the mock reports for an embeddings request.
pub fn embeddings_usage(request: &Value) -> u64 {
    embedding_inputs(request) * EMBEDDING_TOKENS_PER_INPUT
}

/// `POST /v1/embeddings`: one short vector per input.
pub(super) fn embeddings(state: &MockState, call: &RecordedCall) -> Response {
    let req = match request(state, call) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let data: Vec<Value> = (0..embedding_inputs(&req))
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.0023, -0.0093, 0.0158]}))
        .collect();
    let tokens = embeddings_usage(&req);
    Json(json!({
        "object": "list",
        "data": data,
        "model": req.get("model").cloned().unwrap_or(Value::Null),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

/// `(input, output)` tokens the mock reports for an image generation: a
/// gpt-image model reports usage, the DALL·E models none.
pub fn image_usage(request: &Value) -> Option<(u64, u64)> {
    let model = request.get("model").and_then(Value::as_str)?;
    let n = request.get("n").and_then(Value::as_u64).unwrap_or(1);
    model
        .starts_with("gpt-image")
        .then_some((IMAGE_PROMPT_TOKENS, n * IMAGE_OUTPUT_TOKENS))
}

/// `POST /v1/images/generations`: `n` images (URLs for DALL·E, base64 for
/// gpt-image, which also reports usage).
pub(super) fn image_generation(state: &MockState, call: &RecordedCall) -> Response {
    let req = match request(state, call) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let n = req.get("n").and_then(Value::as_u64).unwrap_or(1);
    let usage = image_usage(&req);
    let data: Vec<Value> = (0..n)
        .map(|_| {
            let id = state.next_id.fetch_add(1, Ordering::SeqCst);
            if usage.is_some() {
                json!({"b64_json": "iVBORw0KGgo="})
            } else {
                json!({"url": format!("https://images.example/mock-{id}.png")})
            }
        })
        .collect();
    let mut body = json!({"created": CHAT_CREATED, "data": data});
    if let Some((input, output)) = usage {
        body["usage"] = json!({
            "total_tokens": input + output,
            "input_tokens": input,
            "output_tokens": output,
            "input_tokens_details": {"text_tokens": input, "image_tokens": 0},
        });
    }
    Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::super::MockVendor;
    use super::*;

    const CREDENTIAL: &str = "sk-test-mock";

    async fn post(mock: &MockVendor, path: &str, auth: &str, body: &Value) -> (u16, String) {
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(format!("{}{path}", mock.url()))
            .header("authorization", auth)
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    #[tokio::test]
    async fn responses_embeddings_and_images_report_predictable_usage() {
        let mock = MockVendor::start(CREDENTIAL).await;
        let good = format!("Bearer {CREDENTIAL}");
        let req = json!({"model": "gpt-4.1", "input": "hi", "max_output_tokens": 100});
        let (s, body) = post(&mock, "/v1/responses", &good, &req).await;
        assert_eq!(s, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(responses_usage(&req), (57, 32, 100));
        assert_eq!(v["usage"]["input_tokens"], 57);
        assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 32);
        assert_eq!(v["usage"]["output_tokens"], 100);
        assert_eq!(
            v["output"][0]["content"][0]["text"],
            CHAT_STREAM_PIECES.concat()
        );

        let stream = json!({"model": "gpt-4.1", "input": "hi", "stream": true});
        let (s, body) = post(&mock, "/v1/responses", &good, &stream).await;
        assert_eq!(s, 200);
        let usage = responses_usage(&stream);
        assert_eq!(usage.2, RESPONSES_OUTPUT_TOKENS);
        assert_eq!(body, responses_stream_body("gpt-4.1", usage));
        let events = responses_stream_events("gpt-4.1", usage);
        assert_eq!(events[0].0, "response.created");
        let (last, data) = events.last().unwrap();
        assert_eq!(last, "response.completed");
        assert_eq!(
            data["response"]["usage"]["output_tokens"],
            RESPONSES_OUTPUT_TOKENS
        );
        assert_eq!(data["sequence_number"], events.len() - 1);

        for (input, inputs) in [
            (json!("one"), 1),
            (json!(["a", "b", "c"]), 3),
            (json!([1, 2, 3]), 1),
            (json!([[1], [2, 3]]), 2),
        ] {
            let req = json!({"model": "text-embedding-3-small", "input": input});
            let (s, body) = post(&mock, "/v1/embeddings", &good, &req).await;
            assert_eq!(s, 200);
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["data"].as_array().unwrap().len(), inputs);
            assert_eq!(
                v["usage"]["prompt_tokens"],
                inputs as u64 * EMBEDDING_TOKENS_PER_INPUT
            );
            assert_eq!(
                embeddings_usage(&req),
                inputs as u64 * EMBEDDING_TOKENS_PER_INPUT
            );
        }

        let dalle = json!({"model": "dall-e-3", "prompt": "an otter"});
        let (s, body) = post(&mock, "/v1/images/generations", &good, &dalle).await;
        assert_eq!(s, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["data"][0]["url"].is_string());
        assert!(v.get("usage").is_none());
        assert_eq!(image_usage(&dalle), None);
        let gpt = json!({"model": "gpt-image-1", "prompt": "an otter", "n": 2});
        let (s, body) = post(&mock, "/v1/images/generations", &good, &gpt).await;
        assert_eq!(s, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert_eq!(v["usage"]["output_tokens"], 2 * IMAGE_OUTPUT_TOKENS);
        assert_eq!(
            image_usage(&gpt),
            Some((IMAGE_PROMPT_TOKENS, 2 * IMAGE_OUTPUT_TOKENS))
        );

        for path in ["/v1/responses", "/v1/embeddings", "/v1/images/generations"] {
            let (s, body) = post(&mock, path, "Bearer sk-wrong", &req).await;
            assert_eq!(s, 401, "{path}");
            assert!(!body.contains("sk-wrong"));
        }
        assert_eq!(mock.calls().len(), 11);
    }
}
