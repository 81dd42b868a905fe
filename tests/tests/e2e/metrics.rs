//! The proxy's Prometheus metrics, on their own listener.

use keycap_tests::harness::{free_port, ProxyOpts};

use super::*;

/// The value of one sample (`name{labels}`) in a text exposition, 0 when
/// absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// The OpenMetrics exposition, as Prometheus asks for it.
async fn scrape(port: u16) -> String {
    let r = Api::new(&format!("http://127.0.0.1:{port}"), None)
        .send(
            reqwest::Method::GET,
            "/metrics",
            None,
            &[("accept", "application/openmetrics-text;version=1.0.0")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.ends_with("# EOF\n"), "{}", r.text);
    r.text
}

/// The classic text exposition, served to a scraper that does not ask
/// for OpenMetrics.
async fn scrape_classic(port: u16) -> String {
    let r = Api::new(&format!("http://127.0.0.1:{port}"), None)
        .get("/metrics")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    r.text
}

#[tokio::test]
async fn proxy_metrics_count_calls_by_outcome_and_spend_by_vendor() {
    let port = free_port();
    let stack = Stack::start_with_proxy(
        ControlOpts::sqlite(),
        ProxyOpts::new("metrics-proxy").flag("metrics-listen", format!("127.0.0.1:{port}")),
    )
    .await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "metrics/1",
        ))
        .await;
    // Metrics are not served to agents.
    let r = stack.agent(&key.secret).get("/metrics").await;
    assert_ne!(r.status, 200, "{}", r.text);

    let forwarded = r#"keycap_proxy_requests_total{outcome="forwarded"}"#;
    let invalid = r#"keycap_proxy_requests_total{outcome="invalid_key"}"#;
    let micros = r#"keycap_proxy_settled_micros_total{vendor="stripe"}"#;
    let settled = r#"keycap_proxy_calls_settled_total{vendor="stripe"}"#;
    let before = scrape(port).await;
    let agent = stack.agent(&key.secret);
    for amount in [100, 250] {
        let r = agent
            .post_form(
                "/stripe/v1/payment_intents",
                &format!("amount={amount}&currency=usd&confirm=true"),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = Api::new(&stack.proxy.url(), Some("kc_live_nope"))
        .post_form("/stripe/v1/payment_intents", "amount=1&currency=usd")
        .await;
    assert_eq!(r.status, 401);
    let after = wait_for(within(SPEND_TIMEOUT), || async {
        let t = scrape(port).await;
        (sample(&t, settled) - sample(&before, settled) == 2.0).then_some(t)
    })
    .await
    .expect("two settled calls in the metrics");
    assert_eq!(
        sample(&after, forwarded) - sample(&before, forwarded),
        2.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, invalid) - sample(&before, invalid),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, micros) - sample(&before, micros),
        3_500_000.0,
        "{after}"
    );
    assert!(
        sample(&after, "keycap_proxy_policy_version") >= 1.0,
        "{after}"
    );
}

/// Passes `text` through `promtool check metrics` (Debian package
/// `prometheus`), which judges names, units, types and help as Prometheus
/// conventions ask.
fn promtool_accepts(text: &str, what: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool rejects the {what} metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_planes_serve_metrics_that_promtool_accepts() {
    let (proxy_port, control_port) = (free_port(), free_port());
    let mut control = ControlOpts::sqlite();
    control.args = vec![
        "--metrics-listen".into(),
        format!("127.0.0.1:{control_port}"),
    ];
    let stack = Stack::start_with_proxy(
        control,
        ProxyOpts::new("metrics-proxy").flag("metrics-listen", format!("127.0.0.1:{proxy_port}")),
    )
    .await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&stripe_key_body(json!(50), &["POST /v1/*"], "metrics/2"))
        .await;
    let agent = stack.agent(&key.secret);
    assert_eq!(dollar_charge(&agent).await.status, 200);
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;

    let proxy = scrape(proxy_port).await;
    for series in [
        r#"keycap_proxy_call_overhead_seconds_count{vendor="stripe"}"#,
        r#"keycap_proxy_vendor_response_seconds_count{vendor="stripe"}"#,
        r#"keycap_proxy_upstream_responses_total{vendor="stripe",class="2xx"}"#,
    ] {
        assert_eq!(sample(&proxy, series), 1.0, "{series} in {proxy}");
    }
    assert!(
        proxy.contains("keycap_proxy_build_info{version=\""),
        "{proxy}"
    );
    assert!(
        proxy.contains("keycap_proxy_trace_spans_dropped_total 0"),
        "{proxy}"
    );

    let control = scrape(control_port).await;
    let grants = r#"keycap_control_grpc_requests_total{service="keycap.v1.FleetService",method="GrantLease",code="0"}"#;
    assert!(sample(&control, grants) >= 1.0, "{control}");
    let applied = r#"keycap_control_spend_events_ingested_total{result="applied"}"#;
    assert!(sample(&control, applied) >= 1.0, "{control}");
    assert!(
        control.contains("keycap_control_build_info{version=\""),
        "{control}"
    );
    // The fleet as the control plane sees it, and how long its work takes.
    for (series, at_least) in [
        ("keycap_control_proxies_connected", 1.0),
        (
            r#"keycap_control_proxy_policy_version{node="metrics-proxy"}"#,
            1.0,
        ),
        ("keycap_control_change_log_version", 1.0),
        ("keycap_control_leases_outstanding", 1.0),
        (
            r#"keycap_control_store_query_duration_seconds_count{op="grant_lease"}"#,
            1.0,
        ),
        (
            r#"keycap_control_store_query_duration_seconds_count{op="apply_spend"}"#,
            1.0,
        ),
        (
            r#"keycap_control_change_confirmation_duration_seconds_count{change="key_creation"}"#,
            1.0,
        ),
        (
            r#"keycap_control_change_confirmation_duration_seconds_count{change="vendor_write"}"#,
            1.0,
        ),
    ] {
        assert!(
            sample(&control, series) >= at_least,
            "{series} in {control}"
        );
    }
    assert_eq!(
        sample(&control, "keycap_control_change_log_lag_versions"),
        0.0,
        "{control}"
    );
    let proxy_gauges = [
        "keycap_proxy_control_plane_connected",
        "keycap_proxy_leases",
        "keycap_proxy_lease_available_micros",
        "keycap_proxy_lease_reserved_micros",
        "keycap_proxy_spend_events_pending",
        "keycap_proxy_spend_delivery_lag_seconds",
    ];
    for gauge in proxy_gauges {
        assert!(proxy.contains(&format!("\n{gauge} ")), "{gauge} in {proxy}");
    }

    // Both planes are alive and ready, the proxy on its metrics listener
    // too, where a balancer probes it away from agent traffic.
    for base in [
        stack.control.url(),
        stack.proxy.url(),
        format!("http://127.0.0.1:{proxy_port}"),
    ] {
        for path in ["/livez", "/readyz"] {
            let r = Api::new(&base, None).get(path).await;
            assert_eq!(r.status, 200, "{base}{path}: {}", r.text);
            assert_eq!(r.json()["status"], "ok");
        }
    }

    let classic = [
        (scrape_classic(proxy_port).await, "proxy"),
        (scrape_classic(control_port).await, "control plane"),
    ];
    for (text, what) in &classic {
        promtool_accepts(text, what);
    }
    deploy_files_name_only_served_metrics(&format!("{proxy}{control}"));
    for (text, what) in [(&proxy, "proxy"), (&control, "control plane")] {
        for secret in [key.secret.as_str(), STRIPE_CREDENTIAL, key.id.as_str()] {
            assert!(!text.contains(secret), "{what} metrics name {secret}");
        }
    }
}

/// The dashboard and alert rules in deploy/ name only metrics the planes
/// serve (in `served`), and promtool accepts the rules.
fn deploy_files_name_only_served_metrics(served: &str) {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let rules = deploy.join("prometheus-alerts.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (Debian package prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [rules, deploy.join("grafana-dashboard.json")] {
        let text = std::fs::read_to_string(&file).expect("deploy file");
        let names: BTreeSet<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("keycap_proxy_") || w.starts_with("keycap_control_"))
            .collect();
        assert!(!names.is_empty(), "{}", file.display());
        for name in names {
            // Histograms are named by their series.
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                served.contains(family),
                "{} names {name}, which no plane serves",
                file.display()
            );
        }
    }
}

/// `/readyz` on the proxy's metrics listener: its status code and reason.
async fn ready(port: u16) -> (u16, String) {
    let r = Api::new(&format!("http://127.0.0.1:{port}"), None)
        .get("/readyz")
        .await;
    let reason = r.json()["status"].as_str().unwrap_or_default().to_string();
    (r.status, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_the_control_plane_is_ready_while_its_leases_serve() {
    let port = free_port();
    let mut stack = Stack::start_with_proxy(
        ControlOpts::sqlite(),
        ProxyOpts::new("cut-off-proxy").flag("metrics-listen", format!("127.0.0.1:{port}")),
    )
    .await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&stripe_key_body(json!(100), &["POST /v1/*"], "cut-off/1"))
        .await;
    let agent = stack.agent(&key.secret);
    assert_eq!(dollar_charge(&agent).await.status, 200);
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;
    let t = scrape(port).await;
    assert_eq!(
        sample(&t, "keycap_proxy_control_plane_connected"),
        1.0,
        "{t}"
    );
    assert_eq!(sample(&t, "keycap_proxy_leases"), 1.0, "{t}");
    assert_eq!(sample(&t, "keycap_proxy_spend_events_pending"), 0.0, "{t}");
    assert_eq!(ready(port).await, (200, "ok".to_string()));

    // A call draws a lease that holds more than it (an idle key's lease
    // gives its leftover back after a while, so it is read at once).
    assert_eq!(dollar_charge(&agent).await.status, 200);
    let t = scrape(port).await;
    assert!(
        sample(&t, "keycap_proxy_lease_available_micros") > 0.0,
        "{t}"
    );
    stack.control.kill().await;
    let cut_off = wait_until(within(Duration::from_secs(15)), || async {
        sample(&scrape(port).await, "keycap_proxy_control_plane_connected") == 0.0
    })
    .await;
    assert!(
        cut_off,
        "the proxy never noticed its control plane was gone"
    );

    // Served from the lease: ready, and the spend waits for delivery.
    let r = dollar_charge(&agent).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(ready(port).await, (200, "ok".to_string()));
    let t = wait_for(within(Duration::from_secs(15)), || async {
        let t = scrape(port).await;
        (sample(&t, "keycap_proxy_spend_events_pending") >= 1.0).then_some(t)
    })
    .await
    .expect("the undelivered spend event in the metrics");
    assert!(
        sample(&t, "keycap_proxy_spend_delivery_lag_seconds") > 0.0,
        "{t}"
    );

    // Once its leases can serve no more (spent, or handed back after the
    // key fell idle), it is not ready: a balancer sends agents elsewhere.
    for _ in 0..200 {
        let r = dollar_charge(&agent).await;
        if r.status != 200 {
            assert_eq!(r.status, 503, "{}", r.text);
            break;
        }
    }
    let unready = wait_until(within(Duration::from_secs(15)), || async {
        ready(port).await == (503, "control_plane_unreachable".to_string())
    })
    .await;
    assert!(unready, "still ready with no control plane and no budget");
    let r = Api::new(&stack.proxy.url(), None).get("/readyz").await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json()["status"], "control_plane_unreachable");

    // Back: ready again, and the backlog is delivered.
    stack.control.restart().await;
    let caught_up = wait_until(within(SPEND_TIMEOUT), || async {
        let t = scrape(port).await;
        sample(&t, "keycap_proxy_control_plane_connected") == 1.0
            && sample(&t, "keycap_proxy_spend_events_pending") == 0.0
            && ready(port).await.0 == 200
    })
    .await;
    assert!(caught_up, "{}", scrape(port).await);
}
