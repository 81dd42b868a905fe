//! The Anthropic profile end to end: an agent built on Anthropic's SDK sends
//! its vault key as `x-api-key`; the vendor gets the real key there and
//! nowhere else; messages are priced from the shipped table and settled from
//! the usage the vendor reports, streamed or not. Included from `e2e.rs`.

use keycap_tests::harness::{Api, MintedKey, Resp, Stack};
use keycap_tests::mock::{self, MockVendor};
use reqwest::Method;
use serde_json::{json, Value};

use super::{assert_mock_never_saw, assert_resp_lacks, usd_micros};

const ANTHROPIC_CREDENTIAL: &str = "sk-ant-api03-KeycapE2eRealAnthropicCredentialDoNotLeak";

async fn stack_with_anthropic() -> (Stack, MockVendor, MintedKey) {
    let stack = Stack::start().await;
    let mock = MockVendor::start(ANTHROPIC_CREDENTIAL).await;
    stack.register("anthropic", "anthropic", &mock).await;
    let key = stack
        .mint(&json!({
            "vendor": "anthropic",
            "daily_usd_cap": 5,
            "allowed_endpoints": ["POST /v1/messages"],
            "expires_in": "1h",
            "agent_run_label": "anthropic/1",
        }))
        .await;
    (stack, mock, key)
}

/// A message request sent the way Anthropic's SDKs send it: the key in
/// `x-api-key`, no `Authorization`.
async fn send_message(stack: &Stack, key: &str, body: &Value) -> Resp {
    Api::new(&stack.proxy.url(), None)
        .send(
            Method::POST,
            "/anthropic/v1/messages",
            Some(("application/json", body.to_string().into_bytes())),
            &[("x-api-key", key), ("anthropic-version", "2023-06-01")],
        )
        .await
}

/// What a message with this usage costs by the shipped table.
fn anthropic_cost(model: &str, (input, output): (u64, u64)) -> i64 {
    // Compiled in, so the test reads the table the proxy was built with.
    let table: Value =
        serde_json::from_str(include_str!("../../../vendors/prices/anthropic.json")).unwrap();
    let m = &table["models"][model];
    let price = |field: &str| usd_micros(m[field].as_str().unwrap());
    let ceil = |tokens: u64, p: i64| (tokens as i64 * p + 999_999) / 1_000_000;
    ceil(input, price("input")) + ceil(output, price("output"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_goes_out_with_the_real_key_in_x_api_key_and_settles_from_usage() {
    let (stack, mock, key) = stack_with_anthropic().await;
    let model = "claude-sonnet-4-5";
    let request = json!({
        "model": model,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Say hello."}],
    });
    let r = send_message(&stack, &key.secret, &request).await;
    let body = r.expect(200);
    let usage = mock::chat_usage(&request);
    assert_eq!(body["usage"]["output_tokens"], usage.1);
    assert_resp_lacks(&r, ANTHROPIC_CREDENTIAL);
    let call = &mock.calls()[0];
    assert_eq!(call.header("x-api-key"), Some(ANTHROPIC_CREDENTIAL));
    assert_eq!(
        call.authorization(),
        None,
        "no Authorization reaches Anthropic"
    );
    assert_eq!(call.header("anthropic-version"), Some("2023-06-01"));
    assert_mock_never_saw(&mock, &key.secret);

    let cost = anthropic_cost(model, usage);
    assert!(cost > 0);
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 1).await;
    let e = &entries[0];
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], cost, "{e}");
    assert!(e["reserved_micros"].as_i64().unwrap() >= cost, "{e}");
    assert_eq!(e["detail"]["model"], model, "{e}");
    assert_eq!(e["detail"]["input_tokens"], usage.0, "{e}");
    assert_eq!(e["detail"]["output_tokens"], usage.1, "{e}");
    stack.wait_key_spend(&key.id, cost, 1).await;

    // The vault key also works as a Bearer token (the proxy's usual form);
    // the vendor still gets only x-api-key.
    let r = stack
        .agent(&key.secret)
        .post_json("/anthropic/v1/messages", &request)
        .await;
    r.expect(200);
    let call = &mock.calls()[1];
    assert_eq!(call.header("x-api-key"), Some(ANTHROPIC_CREDENTIAL));
    assert_eq!(call.authorization(), None);
    stack.wait_key_spend(&key.id, 2 * cost, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_message_passes_through_and_settles_from_its_final_delta() {
    let (stack, _mock, key) = stack_with_anthropic().await;
    let model = "claude-haiku-4-5";
    let request = json!({
        "model": model,
        "max_tokens": 100,
        "stream": true,
        "messages": [{"role": "user", "content": "Stream a hello."}],
    });
    let r = send_message(&stack, &key.secret, &request).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let usage = mock::chat_usage(&request);
    assert_eq!(r.text, mock::anthropic_stream_body(model, usage));
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 1).await;
    let e = &entries[0];
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], anthropic_cost(model, usage), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_and_unpriceable_messages_never_reach_anthropic() {
    let (stack, mock, key) = stack_with_anthropic().await;
    let ok = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let last = if key.secret.ends_with('x') { 'y' } else { 'x' };
    let forged = format!("{}{last}", &key.secret[..key.secret.len() - 1]);
    send_message(&stack, &forged, &ok)
        .await
        .expect_error(401, "invalid_key");

    let mut no_limit = ok.clone();
    no_limit.as_object_mut().unwrap().remove("max_tokens");
    let mut pdf = ok.clone();
    pdf["messages"][0]["content"] = json!([{"type": "document",
        "source": {"type": "url", "url": "https://example.com/report.pdf"}}]);
    let mut server_tool = ok.clone();
    server_tool["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}]);
    // Remote MCP servers add their tools and results to the input.
    let mut mcp = ok.clone();
    mcp["mcp_servers"] =
        json!([{"type": "url", "url": "https://mcp.example.com/sse", "name": "x"}]);
    let mut fast = ok.clone();
    fast["speed"] = json!("fast");
    for body in [no_limit, pdf, server_tool, mcp, fast] {
        send_message(&stack, &key.secret, &body)
            .await
            .expect_error(400, "unpriceable_request");
    }
    // A key named twice is read one way by keycap and maybe another by
    // Anthropic: refused, naming the key.
    let twice = r#"{"model":"claude-sonnet-4-5","max_tokens":10,"max_tokens":64000,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = Api::new(&stack.proxy.url(), None)
        .send(
            Method::POST,
            "/anthropic/v1/messages",
            Some(("application/json", twice.as_bytes().to_vec())),
            &[
                ("x-api-key", &key.secret),
                ("anthropic-version", "2023-06-01"),
            ],
        )
        .await;
    let body = r.expect_error(400, "unpriceable_request");
    assert!(
        body["message"].as_str().unwrap().contains("\"max_tokens\""),
        "{body}"
    );
    let mut unknown = ok.clone();
    unknown["model"] = json!("claude-unreleased-9");
    send_message(&stack, &key.secret, &unknown)
        .await
        .expect_error(400, "unknown_model");
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_beta_call_passes_and_other_write_queries_and_two_content_types_do_not() {
    let (stack, mock, key) = stack_with_anthropic().await;
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let send = |path: &'static str, extra: Vec<(&'static str, &'static str)>| {
        let api = Api::new(&stack.proxy.url(), None);
        let key = key.secret.clone();
        let body = body.to_string().into_bytes();
        async move {
            let mut headers = vec![
                ("x-api-key", key.as_str()),
                ("anthropic-version", "2023-06-01"),
            ];
            headers.extend(extra);
            api.send(
                Method::POST,
                path,
                Some(("application/json", body)),
                &headers,
            )
            .await
        }
    };
    // Anthropic's SDKs send beta calls with `?beta=true`.
    send("/anthropic/v1/messages?beta=true", vec![])
        .await
        .expect(200);
    // A query parameter pricing does not read, on a write: refused.
    send("/anthropic/v1/messages?max_tokens=64000", vec![])
        .await
        .expect_error(400, "unpriceable_request");
    // Two Content-Types: the vendor could read the other one.
    send(
        "/anthropic/v1/messages",
        vec![("content-type", "text/plain")],
    )
    .await
    .expect_error(400, "ambiguous_request");
    send("/anthropic/v1/messages", vec![("content-encoding", "gzip")])
        .await
        .expect_error(400, "ambiguous_request");
    let calls = mock.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].query.as_deref(), Some("beta=true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_claude_model_is_priced_with_its_us_inference_surcharge() {
    let (stack, mock, key) = stack_with_anthropic().await;
    let model = "claude-opus-4-6";
    let table: Value =
        serde_json::from_str(include_str!("../../../vendors/prices/anthropic.json")).unwrap();
    let uplift = usd_micros(
        table["models"][model]["uplifts"]["inference_geo_us"]
            .as_str()
            .expect("the shipped table carries opus 4.6's US-only surcharge"),
    );
    // No inference_geo: the workspace's default applies, which may be "us".
    let request = json!({
        "model": model,
        "max_tokens": 300,
        "messages": [{"role": "user", "content": "Summarize the key points."}],
    });
    send_message(&stack, &key.secret, &request)
        .await
        .expect(200);
    let usage = mock::chat_usage(&request);
    let m = &table["models"][model];
    let price = |field: &str| usd_micros(m[field].as_str().unwrap());
    // Each of input and output rounded up once, surcharge included; the
    // mock's usage does not say where inference ran.
    let ceil = |tokens: u64, p: i64| {
        let n = u128::from(tokens) * p as u128 * uplift as u128;
        n.div_ceil(1_000_000_000_000) as i64
    };
    let cost = ceil(usage.0, price("input")) + ceil(usage.1, price("output"));
    assert!(cost > anthropic_cost(model, usage));
    let e = &stack.wait_audit(&format!("key_id={}", key.id), 1).await[0];
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], cost, "{e}");
    assert_eq!(e["detail"]["uplift_millionths"], uplift, "{e}");
    stack.wait_key_spend(&key.id, cost, 1).await;

    // Pinned to global inference, it is priced without the surcharge.
    let mut global = request.clone();
    global["inference_geo"] = json!("global");
    send_message(&stack, &key.secret, &global).await.expect(200);
    let plain = anthropic_cost(model, mock::chat_usage(&global));
    let e = &stack.wait_audit(&format!("key_id={}", key.id), 2).await[0];
    assert_eq!(e["cost_micros"], plain, "{e}");
    stack.wait_key_spend(&key.id, cost + plain, 2).await;
    assert_eq!(mock.calls().len(), 2);
}
