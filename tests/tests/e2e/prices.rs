//! LiteLLM price imports end to end: `keycap prices import` converts the
//! file offline into a table the proxy loads (`--openai-prices`); the admin
//! API converts it and stores it as a vendor's prices — over REST, and over
//! gRPC through the CLI's `--remote` — and the proxy then prices that
//! vendor's calls by it; a file the converter refuses, or a token without
//! the scopes a price change needs, changes nothing. Included from `e2e.rs`.

use std::path::Path;

use keycap_tests::harness::{keycap_cli, Api, ControlOpts, ProxyOpts, Stack};
use keycap_tests::mock::{self, MockVendor};
use serde_json::{json, Value};

use super::{usd_micros, OPENAI_CREDENTIAL};

/// A reduced sample of LiteLLM's file (proto/tests/fixtures/litellm/).
const SAMPLE: &str = include_str!("../../../proto/tests/fixtures/litellm/model_prices_sample.json");

/// A LiteLLM file with one OpenAI model the shipped table does not have, so
/// a call to it is priced only if the imported table is in force.
const HOUSE_MODEL: &str = "house-llm-1";
const HOUSE_FILE: &str = r#"{
    "house-llm-1": {"litellm_provider": "openai", "mode": "chat", "max_output_tokens": 4096,
                    "input_cost_per_token": 3e-06, "output_cost_per_token": 1.2e-05},
    "house-llm-1-batch-only": {"litellm_provider": "openai", "mode": "batch"},
    "claude-house": {"litellm_provider": "anthropic", "mode": "chat", "max_output_tokens": 10,
                     "input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06}
}"#;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn key_body(vendor: &str) -> Value {
    json!({
        "vendor": vendor,
        "daily_usd_cap": 5,
        "allowed_endpoints": ["POST /v1/chat/completions"],
        "expires_in": "1h",
        "agent_run_label": "prices/import",
    })
}

/// What a chat call with this usage costs by `table` (input and output
/// each rounded up).
fn cost_by(table: &Value, model: &str, (input, output): (u64, u64)) -> i64 {
    let m = &table["models"][model];
    let price = |f: &str| usd_micros(m[f].as_str().unwrap());
    let ceil = |tokens: u64, p: i64| (tokens as i64 * p + 999_999) / 1_000_000;
    ceil(input, price("input")) + ceil(output, price("output"))
}

/// Calls `model` through the proxy and returns the call's settled cost.
async fn chat_cost(stack: &Stack, vendor: &str, model: &str) -> (i64, (u64, u64)) {
    let key = stack.mint(&key_body(vendor)).await;
    let request = json!({"model": model, "max_tokens": 50,
                         "messages": [{"role": "user", "content": "hi"}]});
    stack
        .agent(&key.secret)
        .post_json(&format!("/{vendor}/v1/chat/completions"), &request)
        .await
        .expect(200);
    let e = &stack.wait_audit(&format!("key_id={}", key.id), 1).await[0];
    assert_eq!(e["outcome"], "settled", "{e}");
    (
        e["cost_micros"].as_i64().unwrap(),
        mock::chat_usage(&request),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_writes_a_table_the_proxy_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "litellm.json", HOUSE_FILE);
    let out = dir.path().join("openai.json");
    let out_arg = out.display().to_string();
    // Offline: no control plane is asked (nothing listens at this URL).
    let r = keycap_cli(
        "http://127.0.0.1:9",
        "unused",
        &[
            "prices",
            "import",
            &file,
            "--vendor",
            "openai",
            "--out",
            &out_arg,
            "--as-of",
            "2026-12-01",
            "--source",
            "house file",
        ],
    )
    .await;
    let report = r.json();
    assert_eq!(report["models"], json!([HOUSE_MODEL]), "{report}");
    assert_eq!(report["entries"], 2, "only the openai entries count");
    assert!(report["skipped"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("mode \"batch\""));
    let table: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(table["as_of"], "2026-12-01");
    assert_eq!(table["source"], "house file");

    let stack = Stack::start_with_proxy(
        ControlOpts::sqlite(),
        ProxyOpts::new("e2e-proxy").flag("openai-prices", &out_arg),
    )
    .await;
    let mock = MockVendor::start(OPENAI_CREDENTIAL).await;
    stack.register("openai", "openai", &mock).await;
    let (cost, usage) = chat_cost(&stack, "openai", HOUSE_MODEL).await;
    assert_eq!(cost, cost_by(&table, HOUSE_MODEL, usage));
    // The table replaced the shipped one: its other models are unknown.
    let key = stack.mint(&key_body("openai")).await;
    stack
        .agent(&key.secret)
        .post_json(
            "/openai/v1/chat/completions",
            &json!({"model": "gpt-4o", "messages": [], "max_tokens": 5}),
        )
        .await
        .expect_error(400, "unknown_model");
    assert_eq!(mock.calls().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_imports_litellm_prices_and_a_bad_file_changes_nothing() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(OPENAI_CREDENTIAL).await;
    stack.register("openai", "openai", &mock).await;
    let import = |admin: &Api, vendor: &str, text: &str| {
        let (admin, path, text) = (
            admin.clone(),
            format!("/vault/vendors/{vendor}/prices/import"),
            text.to_string(),
        );
        async move { admin.post_raw(&path, "application/json", &text).await }
    };
    let prices_of = |vendor: &str| {
        let (admin, path) = (stack.admin.clone(), format!("/vault/vendors/{vendor}"));
        async move { admin.get(&path).await.expect(200)["prices"].clone() }
    };

    // REST, through the proxy's /vault relay as a scenario would call it.
    let body = import(&stack.admin_via_proxy(), "openai", HOUSE_FILE)
        .await
        .expect(200);
    let report = &body["report"];
    assert_eq!(report["models"], json!([HOUSE_MODEL]), "{body}");
    assert_eq!(report["vendor"], "openai");
    let table = prices_of("openai").await;
    assert_eq!(table, body["vendor"]["prices"]);
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(table["as_of"], today);
    assert!(table["source"].as_str().unwrap().contains("LiteLLM"));
    // The proxy prices the vendor's calls by it (the key is minted after
    // the import, so the proxy has applied both).
    let (cost, usage) = chat_cost(&stack, "openai", HOUSE_MODEL).await;
    assert_eq!(cost, cost_by(&table, HOUSE_MODEL, usage));

    // A file it cannot read, or that prices no model of the vendor, is a
    // 400 naming what is wrong, and the stored prices stay as they were.
    for (text, says) in [
        ("not json", "LiteLLM file"),
        (
            r#"{"a": {"litellm_provider": "openai"}, "a": {}}"#,
            "appears twice",
        ),
        (
            r#"{"claude-x": {"litellm_provider": "anthropic", "mode": "chat"}}"#,
            "no openai chat or responses model",
        ),
    ] {
        let err = import(&stack.admin, "openai", text)
            .await
            .expect_error(400, "invalid_request");
        assert_eq!(err["field"], "litellm_json", "{err}");
        assert!(err["message"].as_str().unwrap().contains(says), "{err}");
        assert_eq!(prices_of("openai").await, table, "{text}");
    }
    // A price change needs credentials:write besides vendors:write.
    let (_, token, _) = super::admin_tokens::create_token(
        &stack.admin,
        json!({"name": "vendor writer", "scopes": ["vendors:write"]}),
    )
    .await;
    let writer = Api::new(&stack.control.url(), Some(&token));
    let err = import(&writer, "openai", SAMPLE)
        .await
        .expect_error(403, "missing_scope");
    assert_eq!(err["scope"], "credentials:write");
    assert_eq!(prices_of("openai").await, table);
    // Only LLM vendors take LiteLLM's prices; an unknown vendor is 404.
    let stripe = MockVendor::start("sk_test_prices").await;
    stack.register("stripe", "stripe", &stripe).await;
    let err = import(&stack.admin, "stripe", SAMPLE)
        .await
        .expect_error(400, "invalid_request");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("openai and anthropic"));
    import(&stack.admin, "nobody", SAMPLE)
        .await
        .expect_error(404, "not_found");

    // gRPC, through `keycap prices import --remote`.
    let dir = tempfile::tempdir().unwrap();
    let sample = write(dir.path(), "litellm.json", SAMPLE);
    let control = stack.control.url();
    let token = stack.control.opts.admin_token.clone();
    let r = keycap_cli(
        &control,
        &token,
        &[
            "prices",
            "import",
            &sample,
            "--remote",
            "--vendor-name",
            "openai",
        ],
    )
    .await;
    let out = r.json();
    let models = out["report"]["models"].as_array().unwrap();
    assert!(models.contains(&json!("gpt-5-mini")), "{out}");
    assert!(out["report"]["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "ft:gpt-4o-2024-08-06"));
    let table = prices_of("openai").await;
    assert_eq!(table, out["vendor"]["prices"]);
    assert!(table["models"]["gpt-5-mini"].is_object(), "{table}");
    assert!(table["models"].get(HOUSE_MODEL).is_none());
    // A bad file over gRPC is INVALID_ARGUMENT, and changes nothing.
    let bad = write(
        dir.path(),
        "bad.json",
        r#"{"claude-x": {"litellm_provider": "anthropic", "mode": "chat"}}"#,
    );
    let r = keycap_cli(
        &control,
        &token,
        &[
            "prices",
            "import",
            &bad,
            "--remote",
            "--vendor-name",
            "openai",
        ],
    )
    .await;
    assert!(!r.status.success(), "{}", r.stdout);
    assert!(r.stderr.contains("invalid_request: "), "{}", r.stderr);
    assert!(r.stderr.contains("no openai chat"), "{}", r.stderr);
    assert_eq!(prices_of("openai").await, table);
    assert_eq!(mock.calls().len(), 1);
}
