//! Traces end to end: the agent's W3C `traceparent` continues into the
//! proxy's span for the call, whose phases are its children, and across
//! gRPC metadata into the control plane's span for the lease grant; all
//! exported to the harness's own OTLP collector. No secret reaches a span
//! or a log line, the vendor is not told of the trace, and a collector
//! that is gone or never answers fails and holds up no call. Included from
//! `e2e.rs`.

use keycap_tests::harness::{free_port, ProxyOpts};
use keycap_tests::otlp::{CollectedSpan, Collector, SpanCounter};

use super::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const AGENT_SPAN: &str = "00f067aa0ba902b7";

async fn traced_stack(collector: &Collector) -> (Stack, MockVendor) {
    let mut control = ControlOpts::sqlite();
    control.env = collector.env();
    control.args = vec!["--log-format".into(), "json".into()];
    let proxy = ProxyOpts::new("traced-proxy")
        .envs(collector.env())
        .flag("log-format", "json")
        .log_level("info,keycap_proxy=debug");
    let stack = Stack::start_with_proxy(control, proxy).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    (stack, mock)
}

/// The one span named `name` that `service` sent.
fn one<'a>(spans: &'a [CollectedSpan], service: &str, name: &str) -> &'a CollectedSpan {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(found.len(), 1, "{service} {name}: {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_agent_through_the_proxy_to_the_control_plane() {
    let collector = Collector::start().await;
    let (stack, mock) = traced_stack(&collector).await;
    let key = stack
        .mint(&stripe_key_body(json!(10), &["POST /v1/*"], "traced/1"))
        .await;
    let agent = stack.agent(&key.secret);
    let traceparent = format!("00-{TRACE}-{AGENT_SPAN}-01");
    let paid = agent
        .send(
            reqwest::Method::POST,
            "/stripe/v1/payment_intents?expand[]=latest_charge",
            Some((
                "application/x-www-form-urlencoded",
                b"amount=100&currency=usd&confirm=true".to_vec(),
            )),
            &[
                ("traceparent", &traceparent),
                ("keycap-context", "step=charge-customer"),
            ],
        )
        .await;
    assert_eq!(paid.status, 200, "{}", paid.text);

    let spans = collector
        .wait_trace(
            TRACE,
            &[
                ("keycap-proxy", "POST /stripe/*"),
                ("keycap-proxy", "authenticate"),
                ("keycap-proxy", "price"),
                ("keycap-proxy", "reserve"),
                ("keycap-proxy", "keycap.v1.FleetService/GrantLease"),
                ("keycap-control", "keycap.v1.FleetService/GrantLease"),
                ("keycap-proxy", "forward"),
                ("keycap-proxy", "settle"),
                ("keycap-control", "ingest spend"),
            ],
        )
        .await;
    let proxy = |name| one(&spans, "keycap-proxy", name);
    let call = proxy("POST /stripe/*");
    assert_eq!(call.kind, "SPAN_KIND_SERVER");
    assert_eq!(
        call.parent_span_id, AGENT_SPAN,
        "continues the agent's span"
    );
    for (attr, want) in [
        ("http.request.method", "POST"),
        ("http.route", "/stripe/*"),
        ("http.response.status_code", "200"),
        ("keycap.vendor", "stripe"),
        ("keycap.key_id", key.id.as_str()),
        ("keycap.run_label", "traced/1"),
        ("keycap.cost_usd", "1"),
        ("keycap.outcome", "settled"),
        ("keycap.call_id", paid.header("keycap-call-id").unwrap()),
    ] {
        assert_eq!(call.attr(attr), Some(want), "{attr}: {call:#?}");
    }
    for phase in ["authenticate", "price", "reserve", "forward", "settle"] {
        assert_eq!(proxy(phase).parent_span_id, call.span_id, "{phase}");
    }
    assert_eq!(proxy("forward").kind, "SPAN_KIND_CLIENT");
    let grant = proxy("keycap.v1.FleetService/GrantLease");
    assert_eq!(grant.kind, "SPAN_KIND_CLIENT");
    assert_eq!(grant.parent_span_id, proxy("reserve").span_id);
    let granted = one(
        &spans,
        "keycap-control",
        "keycap.v1.FleetService/GrantLease",
    );
    assert_eq!(granted.kind, "SPAN_KIND_SERVER");
    assert_eq!(
        granted.parent_span_id, grant.span_id,
        "crosses gRPC metadata"
    );
    assert_eq!(granted.attr("rpc.grpc.status_code"), Some("0"));
    // The call's spend event, reported in a batch later, is ingested in a
    // span of the same trace, under the proxy's `settle`.
    let ingested = one(&spans, "keycap-control", "ingest spend");
    assert_eq!(ingested.parent_span_id, proxy("settle").span_id);
    assert_eq!(
        ingested.attr("keycap.call_id"),
        paid.header("keycap-call-id")
    );
    assert_eq!(ingested.attr("keycap.cost_usd"), Some("1"));

    // The admin revokes the key inside a trace of its own: the control
    // plane's span for the call and for the fleet's confirmation join it.
    const ADMIN_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    const ADMIN_SPAN: &str = "10f067aa0ba902b8";
    let revoked = stack
        .admin
        .send(
            reqwest::Method::DELETE,
            &format!("/vault/keys/{}", key.id),
            None,
            &[("traceparent", &format!("00-{ADMIN_TRACE}-{ADMIN_SPAN}-01"))],
        )
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.text);
    assert_eq!(revoked.json()["confirmation"]["all_confirmed"], true);
    let admin_spans = collector
        .wait_trace(
            ADMIN_TRACE,
            &[
                ("keycap-control", "DELETE /vault/keys/{id}"),
                ("keycap-control", "confirm revocation"),
            ],
        )
        .await;
    let call = one(&admin_spans, "keycap-control", "DELETE /vault/keys/{id}");
    assert_eq!(call.parent_span_id, ADMIN_SPAN);
    assert_eq!(call.kind, "SPAN_KIND_SERVER");
    assert_eq!(call.attr("http.response.status_code"), Some("200"));
    let confirm = one(&admin_spans, "keycap-control", "confirm revocation");
    assert_eq!(confirm.parent_span_id, call.span_id);
    assert_eq!(confirm.attr("keycap.unconfirmed_nodes"), Some("0"));
    assert_eq!(confirm.attr("keycap.confirmed_nodes"), Some("1"));

    // Never the raw path or query, the vault key or the credential.
    let everything = format!("{:?}", collector.spans());
    for secret in [
        key.secret.as_str(),
        STRIPE_CREDENTIAL,
        "payment_intents",
        "latest_charge",
    ] {
        assert!(!everything.contains(secret), "{secret} in a span");
    }
    for log in [stack.proxy.process(), stack.control.process()] {
        assert!(!log.log_contains(&key.secret), "the vault key in a log");
        assert!(
            !log.log_contains(STRIPE_CREDENTIAL),
            "the credential in a log"
        );
    }
    // JSON log lines written inside the call's span carry its trace.
    let proxy_log = std::fs::read_to_string(stack.proxy.process().log_path()).unwrap();
    let traced_line = proxy_log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["trace_id"] == TRACE && l["message"] == "call settled");
    assert!(
        traced_line.is_some(),
        "no log line of the trace: {proxy_log}"
    );

    // The vendor is not told of the agent's trace.
    let sent = mock.calls();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header("traceparent"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_gone_fails_no_call() {
    let mut collector = Collector::start().await;
    let (stack, _mock) = traced_stack(&collector).await;
    collector.stop();
    let key = stack
        .mint(&stripe_key_body(json!(100), &["POST /v1/*"], "traced/2"))
        .await;
    let agent = stack.agent(&key.secret);
    for _ in 0..20 {
        assert_eq!(dollar_charge(&agent).await.status, 200);
    }
    stack.wait_key_spend(&key.id, 20_000_000, 20).await;
}

/// A collector that takes every export and never answers (each held an
/// hour): the proxy's exporter is stuck on its first batch. Calls go on
/// being answered and settled while that export is held, and the spans
/// that no longer fit the proxy's bounded queue are dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_holds_up_no_call() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let stalled = SpanCounter::answering_after(Duration::from_secs(3600));
    tokio::spawn(stalled.clone().serve(listener));
    let metrics_port = free_port();
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "20".to_string()),
        ("OTEL_BSP_MAX_QUEUE_SIZE".to_string(), "16".to_string()),
        ("OTEL_BSP_EXPORT_TIMEOUT".to_string(), "3600000".to_string()),
    ];
    let proxy = ProxyOpts::new("stalled-collector-proxy")
        .envs(env)
        .flag("metrics-listen", format!("127.0.0.1:{metrics_port}"));
    let stack = Stack::start_with_proxy(ControlOpts::sqlite(), proxy).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(1000),
            &["POST /v1/*"],
            "traced/stalled",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    // Call until the collector holds an export (the first batch leaves
    // within the 20 ms schedule), then forty more while it is held.
    let mut calls = 0;
    while stalled.count() == 0 {
        assert!(
            calls < 500,
            "no export reached the collector after {calls} calls"
        );
        assert_eq!(dollar_charge(&agent).await.status, 200);
        calls += 1;
    }
    for _ in 0..40 {
        assert_eq!(dollar_charge(&agent).await.status, 200);
        calls += 1;
    }
    stack
        .wait_key_spend(&key.id, calls * 1_000_000, calls)
        .await;
    let metrics = Api::new(&format!("http://127.0.0.1:{metrics_port}"), None)
        .get("/metrics")
        .await;
    assert_eq!(metrics.status, 200, "{}", metrics.text);
    let dropped: f64 = metrics
        .text
        .lines()
        .find_map(|l| l.strip_prefix("keycap_proxy_trace_spans_dropped_total "))
        .expect("the dropped-spans counter")
        .trim()
        .parse()
        .unwrap();
    assert!(dropped > 0.0, "{}", metrics.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycap_dev_traces_a_call_and_its_audit_entry_names_the_trace_and_context() {
    let collector = Collector::start().await;
    let token = harness::admin_token();
    let dev = Dev::start_with_env(&token, &collector.env()).await;
    let admin = Api::new(&dev.proxy_url, Some(&token));
    let k = admin
        .post_json(
            "/vault/keys",
            &json!({
                "vendor": "sandbox",
                "daily_usd_cap": 5,
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "expires_in": "1h",
                "agent_run_label": "dev-traced/1",
            }),
        )
        .await
        .expect(201);
    let secret = k["key"].as_str().expect("key").to_string();
    let agent = Api::new(&dev.proxy_url, Some(&secret));
    let paid = agent
        .send(
            reqwest::Method::POST,
            "/sandbox/v1/payment_intents",
            Some((
                "application/x-www-form-urlencoded",
                b"amount=300&currency=usd&confirm=true".to_vec(),
            )),
            &[
                ("traceparent", &format!("00-{TRACE}-{AGENT_SPAN}-01")),
                (
                    "keycap-context",
                    "step=charge-customer, tool_call_id=call_abc, reasoning_id=r_42",
                ),
            ],
        )
        .await;
    assert_eq!(paid.status, 200, "{}", paid.text);
    let spans = collector
        .wait_trace(
            TRACE,
            &[("keycap-dev", "POST /sandbox/*"), ("keycap-dev", "settle")],
        )
        .await;
    let call = one(&spans, "keycap-dev", "POST /sandbox/*");
    assert_eq!(call.parent_span_id, AGENT_SPAN);
    assert_eq!(call.attr("keycap.cost_usd"), Some("3"));
    assert!(!format!("{spans:?}").contains(&secret));

    // The audit entry of the call names the agent's trace and context.
    let call_id = paid.header("keycap-call-id").expect("Keycap-Call-Id");
    let entry = wait_for(within(SPEND_TIMEOUT), || async {
        let audit = admin.get(&format!("/vault/audit?trace_id={TRACE}")).await;
        let entries = audit.json()["entries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        entries.into_iter().find(|e| e["event_id"] == call_id)
    })
    .await
    .expect("the call's audit entry, found by its trace id");
    assert_eq!(entry["trace_id"], TRACE, "{entry}");
    assert_eq!(
        entry["context"],
        json!({"step": "charge-customer", "tool_call_id": "call_abc", "reasoning_id": "r_42"}),
        "{entry}"
    );
}

/// One $1 Stripe charge of `key` at `vendor`, sent with the agent's trace
/// context.
async fn traced_charge(stack: &Stack, vendor: &str, secret: &str, traceparent: &str) -> Resp {
    stack
        .agent(secret)
        .send(
            reqwest::Method::POST,
            &format!("/{vendor}/v1/payment_intents"),
            Some((
                "application/x-www-form-urlencoded",
                b"amount=100&currency=usd&confirm=true".to_vec(),
            )),
            &[("traceparent", traceparent), ("tracestate", "agent=7")],
        )
        .await
}

fn key_for(vendor: &str, label: &str) -> Value {
    let mut body = stripe_key_body(json!(10), &["POST /v1/*"], label);
    body["vendor"] = json!(vendor);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_vendor_set_to_forward_trace_context_is_told_of_the_trace() {
    let collector = Collector::start().await;
    let (stack, quiet) = traced_stack(&collector).await;
    let told = MockVendor::start(STRIPE_CREDENTIAL).await;
    let put = stack
        .put_vendor(
            "told",
            &json!({"profile": "stripe", "base_url": told.url(), "credential": told.credential(),
                    "forward_trace_context": true}),
        )
        .await;
    assert_eq!(put["forward_trace_context"], true, "{put}");
    let read = stack.admin.get("/vault/vendors/stripe").await.expect(200);
    assert_eq!(
        read["forward_trace_context"], false,
        "off by default: {read}"
    );

    let traceparent = format!("00-{TRACE}-{AGENT_SPAN}-01");
    for (vendor, label) in [("stripe", "quiet/1"), ("told", "told/1")] {
        let key = stack.mint(&key_for(vendor, label)).await;
        let paid = traced_charge(&stack, vendor, &key.secret, &traceparent).await;
        assert_eq!(paid.status, 200, "{vendor}: {}", paid.text);
    }

    let sent = quiet.calls();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header("traceparent"), None);
    assert_eq!(sent[0].header("tracestate"), None);

    // The told vendor's call continues the proxy's `forward` span of the
    // agent's trace, and keeps the agent's tracestate.
    let spans = collector
        .wait_trace(TRACE, &[("keycap-proxy", "POST /told/*")])
        .await;
    let call = one(&spans, "keycap-proxy", "POST /told/*");
    let forward = spans
        .iter()
        .find(|s| s.name == "forward" && s.parent_span_id == call.span_id)
        .expect("the told call's forward span");
    let sent = told.calls();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].header("traceparent"),
        Some(format!("00-{TRACE}-{}-01", forward.span_id).as_str())
    );
    assert_eq!(sent[0].header("tracestate"), Some("agent=7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tracing_a_told_vendor_gets_the_agents_trace_context_as_sent() {
    let stack = Stack::start().await;
    let told = MockVendor::start(STRIPE_CREDENTIAL).await;
    let quiet = MockVendor::start(STRIPE_CREDENTIAL).await;
    let url = stack.control.url();
    let token = stack.control.opts.admin_token.clone();
    for (name, mock, forward) in [("told", &told, true), ("quiet", &quiet, false)] {
        let base_url = mock.url();
        let mut args = vec![
            "vendor",
            "put",
            name,
            "--profile",
            "stripe",
            "--base-url",
            &base_url,
            "--credential",
            "-",
        ];
        if forward {
            args.push("--forward-trace-context");
        }
        let out =
            harness::keycap_cli_with_stdin(&url, &token, &args, Some(mock.credential())).await;
        assert_eq!(out.json()["forward_trace_context"], forward, "{name}");
    }
    let traceparent = format!("00-{TRACE}-{AGENT_SPAN}-01");
    for vendor in ["told", "quiet"] {
        let key = stack.mint(&key_for(vendor, "untraced/1")).await;
        let paid = traced_charge(&stack, vendor, &key.secret, &traceparent).await;
        assert_eq!(paid.status, 200, "{vendor}: {}", paid.text);
    }
    let sent = told.calls();
    assert_eq!(sent[0].header("traceparent"), Some(traceparent.as_str()));
    assert_eq!(sent[0].header("tracestate"), Some("agent=7"));
    let sent = quiet.calls();
    assert_eq!(sent[0].header("traceparent"), None);
    assert_eq!(sent[0].header("tracestate"), None);
}
