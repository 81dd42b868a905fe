//! The OpenAI profile beyond plain chat completions, end to end: the
//! Responses API (JSON and streamed), embeddings, image generation, and a
//! streamed chat completion whose client did not ask for usage (keycap asks
//! for it, settles from it and keeps it from the client). Every cost is
//! computed here from the shipped price table and the usage the mock
//! reports. Included from `e2e.rs`.

use keycap_tests::harness::{MintedKey, Stack};
use keycap_tests::mock::{self, openai as mock_openai, MockVendor};
use serde_json::{json, Value};

use super::{assert_mock_never_saw, assert_resp_lacks, usd_micros, OPENAI_CREDENTIAL};

async fn stack() -> (Stack, MockVendor, MintedKey) {
    let stack = Stack::start().await;
    let mock = MockVendor::start(OPENAI_CREDENTIAL).await;
    stack.register("openai", "openai", &mock).await;
    let key = stack
        .mint(&json!({
            "vendor": "openai",
            "daily_usd_cap": 5,
            "allowed_endpoints": [
                "POST /v1/chat/completions",
                "POST /v1/responses",
                "POST /v1/embeddings",
                "POST /v1/images/generations",
            ],
            "expires_in": "1h",
            "agent_run_label": "openai/more",
        }))
        .await;
    (stack, mock, key)
}

/// The price table the proxy was built with (compiled in).
fn table() -> Value {
    serde_json::from_str(include_str!("../../../vendors/prices/openai.json")).unwrap()
}

fn ceil_div(n: i64, d: i64) -> i64 {
    (n + d - 1) / d
}

/// What `input` tokens (`cached` of them from the cache) and `output`
/// tokens cost on `model`: input rounded up once, output rounded up.
fn token_cost(model: &str, input: u64, cached: u64, output: u64) -> i64 {
    let t = table();
    let m = &t["models"][model];
    let price = |f: &str| usd_micros(m[f].as_str().unwrap());
    let cached_price = m["cached_input"]
        .as_str()
        .map_or(price("input"), usd_micros);
    let (input, cached, output) = (input as i64, cached as i64, output as i64);
    ceil_div(
        (input - cached) * price("input") + cached * cached_price,
        1_000_000,
    ) + ceil_div(output * price("output"), 1_000_000)
}

/// The newest audit entry once key `id` has `n`.
async fn newest_entry(stack: &Stack, id: &str, n: usize) -> Value {
    stack.wait_audit(&format!("key_id={id}"), n).await.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_settle_from_usage_as_json_and_as_a_stream() {
    let (stack, mock, key) = stack().await;
    let agent = stack.agent(&key.secret);
    let model = "gpt-4.1";
    let request = json!({
        "model": model,
        "instructions": "Answer in one line.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
        "max_output_tokens": 100,
    });
    let r = agent.post_json("/openai/v1/responses", &request).await;
    let body = r.expect(200);
    assert_resp_lacks(&r, OPENAI_CREDENTIAL);
    let (input, cached, output) = mock_openai::responses_usage(&request);
    assert_eq!(output, 100, "the mock reports the request's limit");
    assert_eq!(body["usage"]["output_tokens"], output);
    assert_eq!(
        mock.calls()[0].authorization(),
        Some(format!("Bearer {OPENAI_CREDENTIAL}").as_str())
    );
    let cost = token_cost(model, input, cached, output);
    assert!(cost > 0 && cost < token_cost(model, input, 0, output));
    let e = newest_entry(&stack, &key.id, 1).await;
    assert_eq!(e["path"], "/v1/responses", "{e}");
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], cost, "{e}");
    assert!(e["reserved_micros"].as_i64().unwrap() >= cost, "{e}");
    assert_eq!(e["detail"]["cached_input_tokens"], cached, "{e}");
    stack.wait_key_spend(&key.id, cost, 1).await;

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let r = agent.post_json("/openai/v1/responses", &streamed).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let usage = mock_openai::responses_usage(&streamed);
    assert_eq!(r.text, mock_openai::responses_stream_body(model, usage));
    let stream_cost = token_cost(model, usage.0, usage.1, usage.2);
    let e = newest_entry(&stack, &key.id, 2).await;
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], stream_cost, "{e}");
    stack.wait_key_spend(&key.id, cost + stream_cost, 2).await;
    assert_mock_never_saw(&mock, &key.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_embeddings_and_images_are_priced_before_and_settled_after() {
    let (stack, mock, key) = stack().await;
    let agent = stack.agent(&key.secret);

    let inputs = ["first passage", "second passage", "third"];
    let request = json!({"model": "text-embedding-3-large", "input": inputs});
    let body = agent
        .post_json("/openai/v1/embeddings", &request)
        .await
        .expect(200);
    assert_eq!(body["data"].as_array().map(Vec::len), Some(3));
    let tokens = mock_openai::embeddings_usage(&request) as i64;
    let per_million = usd_micros(
        table()["embeddings"]["text-embedding-3-large"]["input"]
            .as_str()
            .unwrap(),
    );
    let embed_cost = ceil_div(tokens * per_million, 1_000_000);
    let e = newest_entry(&stack, &key.id, 1).await;
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], embed_cost, "{e}");
    // Reserved from the inputs' bytes, settled from the tokens reported.
    let bytes: i64 = inputs.iter().map(|s| s.len() as i64).sum();
    assert_eq!(e["detail"]["input_tokens_max"], bytes, "{e}");
    assert_eq!(
        e["reserved_micros"],
        ceil_div(bytes * per_million, 1_000_000),
        "{e}"
    );

    // A fixed price per image, spent in full. DALL·E is no longer in the
    // shipped table: an operator prices it with a table of its own.
    let dalle_table = json!({"as_of": "2025-08-01", "currency": "usd", "unit": "per_million_tokens",
        "models": {}, "images": {"dall-e-3": {"per_image": {"hd/1024x1792": "0.12"}}}});
    stack
        .put_vendor(
            "openai-dalle",
            &json!({"profile": "openai", "base_url": mock.url(),
                    "credential": mock.credential(), "prices": dalle_table}),
        )
        .await;
    let dalle_key = stack
        .mint(&json!({
            "vendor": "openai-dalle",
            "daily_usd_cap": 5,
            "allowed_endpoints": ["POST /v1/images/generations"],
            "expires_in": "1h",
            "agent_run_label": "openai/dalle",
        }))
        .await;
    let dalle =
        json!({"model": "dall-e-3", "prompt": "an otter", "quality": "hd", "size": "1024x1792"});
    let body = stack
        .agent(&dalle_key.secret)
        .post_json("/openai-dalle/v1/images/generations", &dalle)
        .await
        .expect(200);
    assert!(body["data"][0]["url"].is_string(), "{body}");
    let dalle_cost = usd_micros(
        dalle_table["images"]["dall-e-3"]["per_image"]["hd/1024x1792"]
            .as_str()
            .unwrap(),
    );
    let e = newest_entry(&stack, &dalle_key.id, 1).await;
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(
        (e["reserved_micros"].clone(), e["cost_micros"].clone()),
        (json!(dalle_cost), json!(dalle_cost)),
        "{e}"
    );
    stack.wait_key_spend(&dalle_key.id, dalle_cost, 1).await;

    // Billed in tokens: reserved at the dearest image `auto` may pick,
    // settled from the usage reported.
    let gpt = json!({"model": "gpt-image-1", "prompt": "an otter", "n": 2});
    agent
        .post_json("/openai/v1/images/generations", &gpt)
        .await
        .expect(200);
    let (input, output) = mock_openai::image_usage(&gpt).unwrap();
    let t = table();
    let gpt_price = |f: &str| usd_micros(t["images"]["gpt-image-1"][f].as_str().unwrap());
    let gpt_cost = ceil_div(input as i64 * gpt_price("input"), 1_000_000)
        + ceil_div(output as i64 * gpt_price("output"), 1_000_000);
    let e = newest_entry(&stack, &key.id, 2).await;
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], gpt_cost, "{e}");
    assert_eq!(e["detail"]["output_tokens_max"], 2 * 6240, "{e}");
    assert!(e["reserved_micros"].as_i64().unwrap() > gpt_cost, "{e}");
    stack
        .wait_key_spend(&key.id, embed_cost + gpt_cost, 2)
        .await;
    assert_mock_never_saw(&mock, &key.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_calls_keycap_cannot_bound_never_leave() {
    let (stack, mock, key) = stack().await;
    let agent = stack.agent(&key.secret);
    for (path, body) in [
        (
            "/openai/v1/responses",
            json!({"model": "gpt-4.1", "input": "news?", "tools": [{"type": "web_search_preview"}]}),
        ),
        (
            "/openai/v1/responses",
            json!({"model": "gpt-4.1", "input": "go on", "previous_response_id": "resp_1"}),
        ),
        (
            "/openai/v1/responses",
            json!({"model": "gpt-4.1", "input": [{"role": "user", "content": [
                {"type": "input_file", "file_id": "file-1"}]}]}),
        ),
        (
            "/openai/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": []}),
        ),
        (
            "/openai/v1/images/generations",
            json!({"model": "gpt-image-1", "prompt": "x", "size": "256x256"}),
        ),
    ] {
        agent
            .post_json(path, &body)
            .await
            .expect_error(400, "unpriceable_request");
    }
    agent
        .post_json(
            "/openai/v1/embeddings",
            &json!({"model": "text-embedding-9", "input": "x"}),
        )
        .await
        .expect_error(400, "unknown_model");
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_stream_without_include_usage_settles_from_a_usage_chunk_the_agent_never_sees()
{
    let (stack, mock, key) = stack().await;
    let agent = stack.agent(&key.secret);
    let model = "gpt-4o-mini";
    let request = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Stream a hello."}],
        "max_tokens": 200,
        "temperature": 0.5,
        "stream": true,
    });
    let usage = mock::chat_usage(&request);
    // The stream the agent asked for: every chunk but the usage one (the
    // others carry "usage": null, as OpenAI sends them with include_usage).
    let events = mock::chat_stream_events(model, true, usage);
    let usage_chunk = &events[events.len() - 2];
    assert!(usage_chunk.contains("\"prompt_tokens\""));
    let expected: String = events
        .iter()
        .filter(|e| *e != usage_chunk)
        .map(|e| format!("data: {e}\n\n"))
        .collect();

    let r = agent
        .post_json("/openai/v1/chat/completions", &request)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.text, expected);
    assert!(!r.text.contains("prompt_tokens"), "{}", r.text);

    // The vendor got the same request, asking for usage.
    let sent: Value = serde_json::from_slice(&mock.calls()[0].body).unwrap();
    let mut asked = request.clone();
    asked["stream_options"] = json!({"include_usage": true});
    assert_eq!(sent, asked);

    let cost = super::openai_cost(model, usage);
    let e = newest_entry(&stack, &key.id, 1).await;
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], cost, "{e}");
    assert_eq!(e["detail"]["stream_usage_requested"], true, "{e}");
    stack.wait_key_spend(&key.id, cost, 1).await;

    // A client that turned usage off explicitly is treated the same way.
    let mut off = request.clone();
    off["stream_options"] = json!({"include_usage": false});
    let r = agent.post_json("/openai/v1/chat/completions", &off).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.text, expected);
    let sent: Value = serde_json::from_slice(&mock.calls()[1].body).unwrap();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    stack.wait_key_spend(&key.id, 2 * cost, 2).await;
    assert_mock_never_saw(&mock, &key.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpt_5_mini_is_priced_from_the_shipped_table_and_settled_from_usage() {
    let (stack, mock, key) = stack().await;
    let agent = stack.agent(&key.secret);
    let model = "gpt-5-mini";
    let request = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_completion_tokens": 300,
    });
    agent
        .post_json("/openai/v1/chat/completions", &request)
        .await
        .expect(200);
    let usage = mock::chat_usage(&request);
    let cost = token_cost(model, usage.0, 0, usage.1);
    assert!(cost > 0);
    let e = newest_entry(&stack, &key.id, 1).await;
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], cost, "{e}");
    assert_eq!(e["detail"]["priced_as"], model, "{e}");
    // Reserved: the body's bytes as input, the requested output.
    let n = request.to_string().len() as u64;
    assert_eq!(e["reserved_micros"], token_cost(model, n, 0, 300), "{e}");
    stack.wait_key_spend(&key.id, cost, 1).await;

    // A predicted output's unused tokens are billed as output on top of
    // the completion: reserved so.
    let prediction = json!({"type": "content", "content": "print('hello')"});
    let mut predicted = request.clone();
    predicted["prediction"] = prediction.clone();
    agent
        .post_json("/openai/v1/chat/completions", &predicted)
        .await
        .expect(200);
    let e = newest_entry(&stack, &key.id, 2).await;
    let extra = prediction.to_string().len() as u64;
    assert_eq!(e["detail"]["output_tokens_max"], 300 + extra, "{e}");
    let n = predicted.to_string().len() as u64;
    assert_eq!(
        e["reserved_micros"],
        token_cost(model, n, 0, 300 + extra),
        "{e}"
    );
    assert_mock_never_saw(&mock, &key.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_naming_a_key_twice_never_leaves() {
    let (stack, mock, key) = stack().await;
    let agent = stack.agent(&key.secret);
    // keycap would bound the output by one max_completion_tokens; OpenAI
    // might read the other.
    let twice = r#"{"model":"gpt-5-mini","max_completion_tokens":5,"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":100000}"#;
    let body = agent
        .post_raw("/openai/v1/chat/completions", "application/json", twice)
        .await
        .expect_error(400, "unpriceable_request");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("\"max_completion_tokens\""), "{message}");
    for (path, nested) in [
        (
            "/openai/v1/responses",
            r#"{"model":"gpt-5-mini","input":[{"role":"user","content":"hi","content":[{"type":"input_file","file_id":"f"}]}]}"#,
        ),
        (
            "/openai/v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":"x","input":["a","b"]}"#,
        ),
    ] {
        agent
            .post_raw(path, "application/json", nested)
            .await
            .expect_error(400, "unpriceable_request");
    }
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
}
