//! The canary: recognisable secrets planted everywhere keycap takes them,
//! every API and error path driven, and then none of them found in plain
//! text in the database, the logs (at trace level, the most keycap and its
//! libraries ever write), any response body or header, CLI output, metrics
//! or audit entries.

use std::path::Path;

use keycap_tests::harness::ProxyOpts;

use super::*;

/// Every regular file directly in `dir`, with its bytes.
fn files_in(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes =
                std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            (p.display().to_string(), bytes)
        })
        .collect();
    files.sort();
    files
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Everything keycap said back: responses (status, headers, body) and CLI
/// output, each under a label saying which call it was.
#[derive(Default)]
struct Heard(Vec<(String, Vec<u8>)>);

impl Heard {
    fn resp(&mut self, label: &str, r: &Resp) {
        self.0.push((
            format!("response to {label}"),
            format!("{} {:?}\n{}", r.status, r.headers, r.text).into_bytes(),
        ));
    }

    fn cli(&mut self, label: &str, out: &harness::CliOutput) {
        self.0.push((
            format!("keycap {label}"),
            format!("{}\n{}", out.stdout, out.stderr).into_bytes(),
        ));
    }
}

const CANARY_CREDENTIAL: &str = "sk_live_CANARY0keycapAtRestCredential7Zq4WmX2pL9sT";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_found_anywhere_keycap_writes_or_answers() {
    // Every span both planes make is exported to a collector, searched too.
    let collector = keycap_tests::otlp::Collector::start().await;
    let mut opts = ControlOpts::sqlite();
    opts.log_level = Some("trace".into());
    opts.env = collector.env();
    let control_metrics_port = harness::free_port();
    opts.args = vec![
        "--metrics-listen".into(),
        format!("127.0.0.1:{control_metrics_port}"),
    ];
    let metrics_port = harness::free_port();
    let stack = Stack::start_with_proxy(
        opts,
        ProxyOpts::new("canary-proxy")
            .log_level("trace")
            .envs(collector.env())
            .flag("metrics-listen", format!("127.0.0.1:{metrics_port}")),
    )
    .await;
    let mock = MockVendor::start(CANARY_CREDENTIAL).await;
    let mut heard = Heard::default();
    let admin = &stack.admin;
    let relay = stack.admin_via_proxy();
    let stripe =
        json!({"profile": "stripe", "base_url": mock.url(), "credential": CANARY_CREDENTIAL});

    // --- admin API, REST, direct and through the proxy's relay ----------------
    let r = admin.put_json("/vault/vendors/stripe", &stripe).await;
    assert_eq!(r.status, 201, "{}", r.text);
    heard.resp("PUT vendor", &r);
    // Registered again, as an operator re-sending the same value would.
    let r = relay.put_json("/vault/vendors/stripe", &stripe).await;
    assert_eq!(r.status, 200, "{}", r.text);
    heard.resp("PUT vendor via relay", &r);
    // Refused writes that carry the credential: the error must not echo it.
    for (label, body) in [
        (
            "PUT vendor, bad profile",
            json!({"profile": "nope", "base_url": mock.url(), "credential": CANARY_CREDENTIAL}),
        ),
        (
            "PUT vendor, bad base URL",
            json!({"profile": "stripe", "base_url": "ftp://x", "credential": CANARY_CREDENTIAL}),
        ),
        (
            "PUT vendor, credential of the wrong type",
            json!({"profile": "stripe", "base_url": mock.url(), "credential": [CANARY_CREDENTIAL]}),
        ),
    ] {
        let r = admin.put_json("/vault/vendors/other", &body).await;
        assert_eq!(r.status, 400, "{label}: {}", r.text);
        heard.resp(label, &r);
    }
    let r = admin
        .send(
            reqwest::Method::PUT,
            "/vault/vendors/other",
            Some((
                "application/json",
                format!("{{\"credential\": \"{CANARY_CREDENTIAL}\", ").into_bytes(),
            )),
            &[],
        )
        .await;
    assert_eq!(r.status, 400, "truncated JSON: {}", r.text);
    heard.resp("PUT vendor, truncated JSON", &r);
    for path in ["/vault/vendors/stripe", "/vault/vendors"] {
        let r = admin.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        heard.resp(path, &r);
    }

    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "canary/1",
        ))
        .await;
    heard
        .0
        .push(("key creation".into(), key.body.to_string().into_bytes()));
    let other = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "canary/2",
        ))
        .await;
    // The only place a key may appear: the answer that minted it.
    assert_eq!(key.body["key"], json!(key.secret));

    // A scoped admin token: shown once, used within and beyond its scope,
    // then revoked and used again.
    let r = admin
        .post_json(
            "/vault/admin-tokens",
            &json!({"name": "canary", "scopes": ["keys:read"], "expires_in": "1h"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let minted_token = r.json()["token"].as_str().expect("token").to_string();
    heard
        .0
        .push(("admin token creation".into(), r.text.clone().into_bytes()));
    let token_id = r.json()["id"].as_str().expect("token id").to_string();
    let scoped = Api::new(&stack.control.url(), Some(&minted_token));
    let r = scoped.get("/vault/keys").await;
    assert_eq!(r.status, 200, "{}", r.text);
    heard.resp("keys with a scoped token", &r);
    let r = scoped
        .post_json(
            "/vault/keys",
            &stripe_key_body(json!(1), &["POST /x"], "canary/x"),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    heard.resp("a scope the token lacks", &r);
    let r = admin.get("/vault/admin-tokens?include_inactive=true").await;
    assert_eq!(r.status, 200, "{}", r.text);
    heard.resp("admin token list", &r);
    let r = admin
        .delete(&format!("/vault/admin-tokens/{token_id}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    heard.resp("admin token revoke", &r);
    let r = scoped.get("/vault/keys").await;
    assert_eq!(r.status, 401, "{}", r.text);
    heard.resp("a revoked admin token", &r);

    // An issuer token: made, listed, used to mint a child, refused beyond
    // that, revoked.
    let r = admin
        .post_json(
            &format!("/vault/keys/{}/issuer-tokens", key.id),
            &json!({"name": "canary scenario"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let issuer_token = r.json()["token"].as_str().expect("token").to_string();
    let issuer_id = r.json()["id"].as_str().expect("token id").to_string();
    heard
        .0
        .push(("issuer token creation".into(), r.text.clone().into_bytes()));
    let r = relay
        .get(&format!(
            "/vault/keys/{}/issuer-tokens?include_inactive=true",
            key.id
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    heard.resp("issuer token list", &r);
    let issuer = Api::new(&stack.control.url(), Some(&issuer_token));
    let mut child_body = stripe_key_body(json!(1), &["POST /v1/payment_intents"], "canary/1/c");
    child_body["expires_in"] = json!("1h");
    let r = issuer.post_json("/vault/keys", &child_body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let issued_child = r.json()["key"].as_str().expect("key secret").to_string();
    heard
        .0
        .push(("issued key creation".into(), r.text.clone().into_bytes()));
    let r = issuer.get("/vault/keys").await;
    assert_eq!(r.status, 403, "{}", r.text);
    heard.resp("an issuer token beyond minting", &r);
    let r = admin
        .delete(&format!("/vault/issuer-tokens/{issuer_id}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    heard.resp("issuer token revoke", &r);
    let r = issuer.post_json("/vault/keys", &child_body).await;
    assert_eq!(r.status, 401, "{}", r.text);
    heard.resp("a revoked issuer token", &r);

    // Secrets handed to the admin API as tokens are refused without echo.
    for (label, token) in [
        ("vault key as admin token", key.secret.as_str()),
        ("vendor credential as admin token", CANARY_CREDENTIAL),
        (
            "fleet token as admin token",
            stack.control.opts.fleet_token.as_str(),
        ),
    ] {
        let r = Api::new(&stack.control.url(), Some(token))
            .get("/vault/keys")
            .await;
        assert_eq!(r.status, 401, "{label}: {}", r.text);
        heard.resp(label, &r);
    }

    // --- the proxy: served, declined and refused calls ------------------------
    let agent = stack.agent(&key.secret);
    let pay = |form: &'static str| agent.post_form("/stripe/v1/payment_intents", form);
    let r = pay("amount=100&currency=usd&confirm=true").await;
    assert_eq!(r.status, 200, "{}", r.text);
    heard.resp("a paid call", &r);
    let r = pay("amount=402&currency=usd&confirm=true").await;
    assert_eq!(r.status, 402, "{}", r.text);
    heard.resp("a declined call", &r);
    let r = pay("amount=100000&currency=usd&confirm=true").await;
    assert_eq!(r.status, 429, "{}", r.text);
    heard.resp("a call over the cap", &r);
    let r = pay("amount=abc&currency=usd").await;
    assert_eq!(r.status, 400, "{}", r.text);
    heard.resp("an unpriceable call", &r);
    let r = agent.get("/stripe/v1/customers").await;
    assert_eq!(r.status, 403, "{}", r.text);
    heard.resp("an endpoint not allowed", &r);
    let r = agent
        .post_form("/nope/v1/payment_intents", "amount=1")
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    heard.resp("an unknown vendor", &r);
    let mut forged = key.secret.clone().into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).expect("ASCII");
    for (label, token) in [
        ("a forged key", forged.as_str()),
        (
            "the admin token as a vault key",
            stack.control.opts.admin_token.as_str(),
        ),
        ("the vendor credential as a vault key", CANARY_CREDENTIAL),
    ] {
        let r = Api::new(&stack.proxy.url(), Some(token))
            .post_form(
                "/stripe/v1/payment_intents",
                "amount=100&currency=usd&confirm=true",
            )
            .await;
        assert_eq!(r.status, 401, "{label}: {}", r.text);
        heard.resp(label, &r);
    }
    // Keys refused by their network and rate limits.
    let mut limited = stripe_key_body(json!(50), &["POST /v1/payment_intents"], "canary/3");
    limited["rate_limit_per_minute"] = json!(1);
    let limited = stack.mint(&limited).await;
    let mut fenced = stripe_key_body(json!(50), &["POST /v1/payment_intents"], "canary/4");
    fenced["allowed_cidrs"] = json!(["10.0.0.0/8"]);
    let fenced = stack.create_key(&fenced).await;
    let limited_agent = stack.agent(&limited.secret);
    let first = limited_agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.text);
    let last = limited_agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await;
    assert_eq!(
        last.error_code().as_deref(),
        Some("rate_limited"),
        "{}",
        last.text
    );
    heard.resp("a rate-limited call", &last);
    let refused = wait_for(within(harness::POLICY_TIMEOUT), || async {
        let r = stack
            .agent(&fenced.secret)
            .post_form(
                "/stripe/v1/payment_intents",
                "amount=100&currency=usd&confirm=true",
            )
            .await;
        (r.error_code().as_deref() == Some("ip_not_allowed")).then_some(r)
    })
    .await
    .expect("the proxy never refused the fenced key's address");
    heard.resp("a call from outside the key's networks", &refused);

    // The key in the other header agents use.
    let r = Api::new(&stack.proxy.url(), None)
        .send(
            reqwest::Method::POST,
            "/stripe/v1/payment_intents",
            Some((
                "application/x-www-form-urlencoded",
                b"amount=100&currency=usd&confirm=true".to_vec(),
            )),
            &[("x-api-key", &other.secret)],
        )
        .await;
    assert_eq!(r.status, 200, "x-api-key: {}", r.text);
    heard.resp("a call with x-api-key", &r);
    assert!(mock
        .calls()
        .iter()
        .all(|c| c.authorization() == Some(format!("Bearer {CANARY_CREDENTIAL}").as_str())));

    // --- spend, audit, revocation, the CLI over gRPC ------------------------------
    stack.wait_key_spend(&key.id, 1_000_000, 2).await;
    let audit = stack.wait_audit("agent_run_label=canary/1", 2).await;
    heard.0.push((
        "audit entries".into(),
        json!(audit).to_string().into_bytes(),
    ));
    for path in [
        format!("/vault/keys/{}", key.id),
        "/vault/keys?all=true".to_string(),
        "/vault/spend?agent_run_label=canary/1".to_string(),
        "/vault/audit?limit=100".to_string(),
    ] {
        let r = relay.get(&path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        heard.resp(&path, &r);
    }
    let r = admin.delete(&format!("/vault/keys/{}", key.id)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    heard.resp("revoke", &r);
    let r = admin
        .post_json(
            "/vault/keys/revoke",
            &json!({"agent_run_label": "canary/2"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    heard.resp("revoke run", &r);
    let revoked = wait_until(within(harness::POLICY_TIMEOUT), || async {
        stack.probe("stripe", &key.secret).await.as_deref() == Some("key_revoked")
    })
    .await;
    assert!(revoked, "the proxy never learned of the revocation");
    let r = pay("amount=100&currency=usd&confirm=true").await;
    assert_eq!(r.status, 401, "{}", r.text);
    heard.resp("a revoked key", &r);

    let url = stack.control.url();
    let token = stack.control.opts.admin_token.clone();
    for args in [
        &["vendor", "list"][..],
        &["key", "list", "--all"][..],
        &["key", "get", &key.id][..],
        &["audit", "--run-label", "canary/1"][..],
        &["admin", "rotate-kek"][..],
        &["key", "issuer-token", "list", &key.id, "--all"][..],
    ] {
        let out = keycap_cli(&url, &token, args).await;
        assert!(out.status.success(), "keycap {args:?}: {}", out.stderr);
        heard.cli(&args.join(" "), &out);
    }
    let out = keycap_cli(&url, &key.secret, &["key", "list"]).await;
    assert!(!out.status.success(), "a vault key is no admin token");
    heard.cli("key list with a vault key", &out);

    let metrics = Api::new(&format!("http://127.0.0.1:{metrics_port}"), None)
        .get("/metrics")
        .await;
    assert!(
        metrics.text.contains("keycap_proxy_requests_total"),
        "{}",
        metrics.text
    );
    heard.resp("metrics", &metrics);
    let control_metrics = Api::new(&format!("http://127.0.0.1:{control_metrics_port}"), None)
        .get("/metrics")
        .await;
    assert!(
        control_metrics
            .text
            .contains("keycap_control_store_query_duration_seconds"),
        "{}",
        control_metrics.text
    );
    heard.resp("control-plane metrics", &control_metrics);
    // Spans of the last calls leave within 100 ms of ending; the key's
    // revocation (the last change) is among them.
    let exported = wait_for(within(Duration::from_secs(15)), || async {
        let spans = collector.spans();
        spans
            .iter()
            .any(|s| s.name == "POST /vault/keys/revoke")
            .then(|| format!("{spans:?}"))
    })
    .await
    .expect("the revocation's span exported");

    // --- the search ------------------------------------------------------------------
    let canaries = [
        ("the vendor credential", CANARY_CREDENTIAL.to_string()),
        ("the first vault key", key.secret.clone()),
        ("the second vault key", other.secret.clone()),
        ("the rate-limited vault key", limited.secret.clone()),
        ("the fenced vault key", fenced.secret.clone()),
        ("the minted admin token", minted_token.clone()),
        ("the issuer token", issuer_token.clone()),
        (
            "the vault key minted by the issuer token",
            issued_child.clone(),
        ),
        ("the admin token", stack.control.opts.admin_token.clone()),
        ("the fleet token", stack.control.opts.fleet_token.clone()),
        ("the master key", stack.control.opts.master_key.clone()),
    ];
    let db_dir = stack.control.database_dir().expect("a SQLite stack");
    let db_files = files_in(db_dir);
    assert!(
        db_files.iter().any(|(p, _)| p.ends_with("keycap.db")),
        "no database file in {}",
        db_dir.display()
    );
    // The scans see the data: the key's id was written in each place.
    for (place, bytes) in [
        (
            "database",
            db_files
                .iter()
                .flat_map(|(_, b)| b.clone())
                .collect::<Vec<u8>>(),
        ),
        (
            "responses",
            heard.0.iter().flat_map(|(_, b)| b.clone()).collect(),
        ),
    ] {
        assert!(
            contains(&bytes, &key.id),
            "key id {} is in no {place}: nothing was scanned",
            key.id
        );
    }
    let mut scanned = db_files;
    for log in [
        stack.control.process().log_path(),
        stack.proxy.process().log_path(),
    ] {
        let bytes =
            std::fs::read(log).unwrap_or_else(|e| panic!("cannot read {}: {e}", log.display()));
        // Trace level really was on: libraries' trace lines are there.
        assert!(
            contains(&bytes, "TRACE"),
            "{} has no trace lines",
            log.display()
        );
        scanned.push((log.display().to_string(), bytes));
    }
    scanned.extend(heard.0);
    assert!(exported.contains(&key.id), "exported spans name no key id");
    scanned.push(("exported spans".to_string(), exported.into_bytes()));
    for (place, bytes) in &scanned {
        for (what, secret) in &canaries {
            // A minted secret is shown once, by design: in the answer that made it.
            if (place == "key creation" && *secret == key.secret)
                || (place == "admin token creation" && *secret == minted_token)
                || (place == "issuer token creation" && *secret == issuer_token)
                || (place == "issued key creation" && *secret == issued_child)
            {
                continue;
            }
            assert!(
                !contains(bytes, secret),
                "{what} is in plain text in {place}"
            );
        }
    }
}
