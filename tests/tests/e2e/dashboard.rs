//! The operator's dashboard at `/ui`, driven over HTTP as a browser drives
//! it: sign in with an admin token, a sealed HttpOnly SameSite=Strict
//! cookie, a CSP with no inline script, CSRF values on every form, a
//! session that ends with its token, a run's spend after real calls through
//! the proxy, and revoking the run from the page. Included from `e2e.rs`.

use std::path::Path;

use keycap_tests::harness::{Api, Control, ControlOpts, ControlTls, Stack};
use keycap_tests::pki::TestCa;
use reqwest::header::{HeaderMap, CONTENT_SECURITY_POLICY, LOCATION, SET_COOKIE};
use serde_json::json;

use super::{dollar_charge, stack_with_stripe, stripe_key_body, wait_for, within, Duration};

/// A browser's view of the dashboard: one cookie jar of one cookie, no
/// redirects followed, so every answer can be inspected.
struct Browser {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

struct Page {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> Option<&str> {
        self.headers.get(LOCATION).and_then(|v| v.to_str().ok())
    }

    fn set_cookie(&self) -> Option<&str> {
        self.headers.get(SET_COOKIE).and_then(|v| v.to_str().ok())
    }

    /// The CSRF value the page's forms carry.
    #[track_caller]
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no CSRF field in page: {}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap()].to_string()
    }
}

impl Browser {
    fn new(base: &str) -> Browser {
        Browser::with(base, reqwest::Client::builder())
    }

    /// A browser for an `https://` dashboard whose certificate `ca` signed.
    fn trusting(base: &str, ca: &Path) -> Browser {
        let pem = std::fs::read(ca).unwrap();
        let builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        Browser::with(base, builder)
    }

    fn with(base: &str, builder: reqwest::ClientBuilder) -> Browser {
        Browser {
            http: builder
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: base.to_string(),
            cookie: None,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Page {
        let req = match &self.cookie {
            Some(c) => req.header("cookie", c),
            None => req,
        };
        let res = req.send().await.expect("dashboard request");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.text().await.unwrap();
        Page {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Page {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// A same-origin form post, as the dashboard's own forms send it.
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Page {
        self.post_from(&self.base.clone(), path, form).await
    }

    /// A form post that the browser says comes from `origin`.
    async fn post_from(&self, origin: &str, path: &str, form: &[(&str, &str)]) -> Page {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("origin", origin)
                .form(form),
        )
        .await
    }

    /// Signs in with `token`, keeping the session cookie; the answer.
    async fn sign_in(&mut self, token: &str) -> Page {
        let page = self.post("/ui/sign-in", &[("token", token)]).await;
        if let Some(c) = page.set_cookie() {
            self.cookie = Some(c.split(';').next().unwrap().to_string());
        }
        page
    }
}

async fn signed_in(base: &str, token: &str) -> Browser {
    let mut b = Browser::new(base);
    let page = b.sign_in(token).await;
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(page.location(), Some("/ui"));
    b
}

async fn key_status(admin: &Api, id: &str) -> String {
    let k = admin.get(&format!("/vault/keys/{id}")).await.expect(200);
    k["status"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_gives_a_sealed_strict_cookie_and_pages_allow_no_inline_script() {
    let control = Control::start(ControlOpts::sqlite()).await;
    let token = control.opts.admin_token.clone();
    let mut browser = Browser::new(&control.url());

    let page = browser.get("/ui").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.location(), Some("/ui/sign-in"));

    let page = browser.sign_in("kcadm_test_not-a-real-token").await;
    assert_eq!(page.status, 401);
    assert!(page.set_cookie().is_none());
    assert!(page.body.contains("not a valid, active admin token"));

    let page = browser.sign_in(&token).await;
    assert_eq!(page.status, 303, "{}", page.body);
    let cookie = page.set_cookie().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(attr), "{attr} missing from {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http: {cookie}");
    assert!(!cookie.contains(&token), "the token is sealed: {cookie}");

    let page = browser.get("/ui").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let csp = page.headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(!page.body.contains("<script"), "{}", page.body);
    assert!(!page.body.contains(&token));
    assert!(page.body.contains("Overview"));

    // A tampered cookie is no session.
    let mut forged = Browser::new(&control.url());
    let value = browser.cookie.clone().unwrap();
    // Change one character in the middle (the last one may only carry
    // base64 padding bits).
    let mut chars: Vec<char> = value.chars().collect();
    let mid = chars.len() / 2;
    chars[mid] = if chars[mid] == 'A' { 'B' } else { 'A' };
    forged.cookie = Some(chars.into_iter().collect());
    assert_eq!(forged.get("/ui").await.status, 303);

    // Signing out needs the page's CSRF value.
    let csrf = page.csrf();
    assert_eq!(browser.post("/ui/sign-out", &[]).await.status, 403);
    let out = browser.post("/ui/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303);
    assert_eq!(out.location(), Some("/ui/sign-in"));
    assert!(out.set_cookie().unwrap().contains("Max-Age=0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_tls_the_session_cookie_is_secure() {
    let ca = TestCa::new("dashboard");
    let control = Control::start(ControlOpts::sqlite().tls(ControlTls {
        server: ca.server("control"),
        ca: ca.ca_pem(),
        client_ca: None,
    }))
    .await;
    assert!(control.url().starts_with("https://"));
    let mut browser = Browser::trusting(&control.url(), &ca.ca_pem());
    let page = browser.sign_in(&control.opts.admin_token).await;
    assert_eq!(page.status, 303, "{}", page.body);
    let cookie = page.set_cookie().unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert_eq!(browser.get("/ui").await.status, 200);
    let out = browser
        .post(
            "/ui/sign-out",
            &[("csrf", &browser.get("/ui").await.csrf())],
        )
        .await;
    assert!(out.set_cookie().unwrap().contains("; Secure"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_is_revoked() {
    let control = Control::start(ControlOpts::sqlite()).await;
    let admin = control.admin();
    let created = admin
        .post_json(
            "/vault/admin-tokens",
            &json!({"name": "dashboard operator", "scopes": ["keys:read"]}),
        )
        .await
        .expect(201);
    let browser = signed_in(&control.url(), created["token"].as_str().unwrap()).await;
    assert_eq!(browser.get("/ui/keys").await.status, 200);

    admin
        .delete(&format!(
            "/vault/admin-tokens/{}",
            created["id"].as_str().unwrap()
        ))
        .await
        .expect(200);
    let page = browser.get("/ui/keys").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.location(), Some("/ui/sign-in"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_a_runs_spend_and_revokes_the_run() {
    let (stack, mock) = stack_with_stripe().await;
    let label = "dashboard/run-1";
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            label,
        ))
        .await;
    let agent = stack.agent(&key.secret);
    dollar_charge(&agent).await.expect(200);
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;

    let browser = signed_in(&stack.control.url(), &stack.control.opts.admin_token).await;
    let overview = browser.get("/ui").await;
    assert!(overview.body.contains(label), "{}", overview.body);
    let run = browser.get("/ui/run?label=dashboard%2Frun-1").await;
    assert_eq!(run.status, 200, "{}", run.body);
    assert!(
        run.body.contains("id=\"run-spend\">$1<"),
        "run spend: {}",
        run.body
    );
    assert!(run.body.contains(&key.id));
    let csrf = run.csrf();

    // The vendor without its credential, and the call in the audit.
    let vendors = browser.get("/ui/vendors").await;
    assert_eq!(vendors.status, 200, "{}", vendors.body);
    assert!(vendors.body.contains(&mock.url()), "{}", vendors.body);
    assert!(!vendors.body.contains(super::STRIPE_CREDENTIAL));
    // The credential's fingerprint, as an operator computes it from the key
    // they hold, tells which credential is set.
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        super::STRIPE_CREDENTIAL.as_bytes(),
    ));
    assert!(
        vendors.body.contains(&format!("sha256:{}", &digest[..12])),
        "{}",
        vendors.body
    );
    let audit = browser.get("/ui/audit?label=dashboard%2Frun-1").await;
    assert_eq!(audit.status, 200, "{}", audit.body);
    assert!(audit.body.contains("/v1/payment_intents"), "{}", audit.body);
    assert!(audit.body.contains(&key.id), "{}", audit.body);
    let other_run = browser.get("/ui/audit?label=no-such%2Frun").await;
    assert!(other_run.body.contains("No audit entries match."));
    let bad_page = browser.get("/ui/audit?before=yesterday").await;
    assert_eq!(bad_page.status, 400, "{}", bad_page.body);

    // A cross-site post is refused even with the right CSRF value, and a
    // same-site one without it: the key stays active.
    let refused = browser
        .post_from(
            "https://attacker.example",
            "/ui/run/revoke",
            &[("csrf", &csrf), ("label", label)],
        )
        .await;
    assert_eq!(refused.status, 403);
    let refused = browser.post("/ui/run/revoke", &[("label", label)]).await;
    assert_eq!(refused.status, 403);
    assert_eq!(key_status(&stack.admin, &key.id).await, "active");

    let done = browser
        .post("/ui/run/revoke", &[("csrf", &csrf), ("label", label)])
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(
        done.body.contains("<li>e2e-proxy</li>"),
        "confirmed proxies: {}",
        done.body
    );
    assert_eq!(key_status(&stack.admin, &key.id).await, "revoked");
    dollar_charge(&agent).await.expect_error(401, "key_revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_sees_no_revoke_button_and_cannot_revoke() {
    let stack = Stack::start().await;
    let mock = keycap_tests::mock::MockVendor::start("sk_live_51KeycapDashboardReadOnly").await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(5),
            &["POST /v1/payment_intents"],
            "ro/run",
        ))
        .await;
    let created = stack
        .admin
        .post_json(
            "/vault/admin-tokens",
            &json!({"name": "read only", "scopes": ["keys:read", "audit:read"]}),
        )
        .await
        .expect(201);
    let browser = signed_in(&stack.control.url(), created["token"].as_str().unwrap()).await;

    let keys = browser.get("/ui/keys").await;
    assert_eq!(keys.status, 200);
    assert!(keys.body.contains(&key.id), "{}", keys.body);
    assert!(!keys.body.contains(">Revoke<"), "{}", keys.body);
    let run = browser.get("/ui/run?label=ro%2Frun").await;
    assert!(!run.body.contains("Revoke run"), "{}", run.body);

    // The server refuses the action anyway.
    let csrf = keys.csrf();
    let refused = browser
        .post(&format!("/ui/keys/{}/revoke", key.id), &[("csrf", &csrf)])
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("keys:revoke"), "{}", refused.body);
    let refused = browser
        .post("/ui/run/revoke", &[("csrf", &csrf), ("label", "ro/run")])
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(key_status(&stack.admin, &key.id).await, "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_registers_tests_and_watches_a_webhook_from_the_dashboard() {
    let mut opts = ControlOpts::sqlite();
    opts.args.push("--allow-private-webhooks".into());
    let stack = Stack::start_with(opts).await;
    let receiver = keycap_tests::receiver::Receiver::start(&[500]).await;
    let browser = signed_in(&stack.control.url(), &stack.control.opts.admin_token).await;
    // The overview names the connected proxy and the policy version it
    // applied.
    let overview = browser.get("/ui").await;
    assert!(
        overview.body.contains("Proxies connected"),
        "{}",
        overview.body
    );
    assert!(
        overview.body.contains("<td>e2e-proxy</td>"),
        "{}",
        overview.body
    );
    assert!(overview.body.contains("(current)"), "{}", overview.body);
    // The Audit page links the ledger export, served on the session.
    let audit = browser.get("/ui/audit").await;
    assert!(
        audit.body.contains("/ui/audit/export?format=csv"),
        "{}",
        audit.body
    );
    let export = browser.get("/ui/audit/export?format=jsonl").await;
    assert_eq!(export.status, 200, "{}", export.body);
    assert_eq!(
        export.headers.get("content-disposition").unwrap(),
        "attachment; filename=\"keycap-audit.jsonl\""
    );
    let anonymous = Browser::new(&stack.control.url())
        .get("/ui/audit/export?format=csv")
        .await;
    assert_eq!(anonymous.status, 303, "no session, no export");
    let page = browser.get("/ui/webhooks").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("Register an endpoint"));
    let csrf = page.csrf();
    let url = receiver.url("/ui-hook");
    let created = browser
        .post(
            "/ui/webhooks",
            &[
                ("csrf", &csrf),
                ("url", &url),
                ("event", "cap.threshold"),
                ("event", "key.revoked"),
                ("thresholds", "80, 100"),
                ("format", "keycap"),
            ],
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let at = created
        .body
        .find("id=\"secret\">")
        .expect("the secret, once");
    let secret = &created.body[at + 12..];
    let secret = &secret[..secret.find('<').unwrap()];
    assert!(secret.starts_with("whsec_"), "{secret}");
    let listed = stack.admin.get("/vault/webhooks").await.expect(200);
    let id = listed["webhooks"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(listed["webhooks"][0]["thresholds"], json!([80, 100]));
    assert_eq!(
        listed["webhooks"][0]["events"],
        json!(["cap.threshold", "key.revoked"])
    );
    let again = browser.get("/ui/webhooks").await;
    assert!(again.body.contains(&id) && !again.body.contains(secret));

    // A bad URL is shown as the field's error and registers nothing.
    let bad = browser
        .post(
            "/ui/webhooks",
            &[("csrf", &csrf), ("url", "ftp://x.example.com/")],
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        bad.body.contains("url: only http and https"),
        "{}",
        bad.body
    );

    // "Send test event": the receiver answers 500, then 200 on the retry;
    // the endpoint's page shows both attempts.
    let tested = browser
        .post(&format!("/ui/webhooks/{id}/test"), &[("csrf", &csrf)])
        .await;
    assert_eq!(tested.status, 202, "{}", tested.body);
    assert!(tested.body.contains("Queued test event"));
    let shown = wait_for(within(Duration::from_secs(20)), || async {
        let p = browser.get(&format!("/ui/webhooks/{id}")).await;
        (p.body.contains("HTTP 500") && p.body.contains("HTTP 200")).then_some(p)
    })
    .await
    .expect("both attempts shown");
    assert!(shown.body.contains("webhook.test"));
    assert!(shown.body.contains("delivered"));

    // Cross-site posts are refused; a read-only token has no form and its
    // forged post is refused by the server.
    let forged = browser
        .post_from(
            "https://evil.example.com",
            &format!("/ui/webhooks/{id}/delete"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(forged.status, 403);
    let reader = stack
        .admin
        .post_json(
            "/vault/admin-tokens",
            &json!({"name": "hooks reader", "scopes": ["webhooks:read"]}),
        )
        .await
        .expect(201);
    let ro = signed_in(&stack.control.url(), reader["token"].as_str().unwrap()).await;
    let ro_page = ro.get("/ui/webhooks").await;
    assert_eq!(ro_page.status, 200);
    assert!(!ro_page.body.contains("Register an endpoint"));
    let refused = ro
        .post(
            &format!("/ui/webhooks/{id}/delete"),
            &[("csrf", &ro_page.csrf())],
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("webhooks:write"));

    let deleted = browser
        .post(&format!("/ui/webhooks/{id}/delete"), &[("csrf", &csrf)])
        .await;
    assert_eq!(deleted.status, 200);
    assert_eq!(
        stack.admin.get("/vault/webhooks").await.expect(200)["webhooks"],
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mint_form_shows_the_secret_once_and_the_key_works_at_once() {
    let (stack, _mock) = stack_with_stripe().await;
    let browser = signed_in(&stack.control.url(), &stack.control.opts.admin_token).await;
    let keys = browser.get("/ui/keys").await;
    assert!(keys.body.contains("Mint a key"), "{}", keys.body);
    let csrf = keys.csrf();
    let minted = browser
        .post(
            "/ui/keys",
            &[
                ("csrf", &csrf),
                ("vendor", "stripe"),
                ("daily_usd_cap", "5"),
                ("allowed_endpoints", "POST /v1/payment_intents\r\n"),
                ("expires_in", "1h"),
                ("agent_run_label", "ui/minted"),
            ],
        )
        .await;
    assert_eq!(minted.status, 201, "{}", minted.body);
    let at = minted.body.find("id=\"key-secret\">").expect("the secret");
    let secret = &minted.body[at + 16..];
    let secret = secret[..secret.find('<').unwrap()].to_string();
    assert!(secret.starts_with("kc_"), "{secret}");
    // Usable on its first call, like a key minted over REST.
    assert_eq!(dollar_charge(&stack.agent(&secret)).await.status, 200);
    let again = browser.get("/ui/keys").await;
    assert!(again.body.contains("ui/minted") && !again.body.contains(&secret));

    // Bad input names the field and mints nothing.
    let bad = browser
        .post(
            "/ui/keys",
            &[
                ("csrf", &csrf),
                ("vendor", "stripe"),
                ("daily_usd_cap", "lots"),
                ("allowed_endpoints", "POST /v1/payment_intents"),
                ("expires_in", "1h"),
                ("agent_run_label", "ui/bad"),
            ],
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("daily_usd_cap"), "{}", bad.body);

    // A token without keys:issue has no form and is refused.
    let reader = stack
        .admin
        .post_json(
            "/vault/admin-tokens",
            &json!({"name": "reader", "scopes": ["keys:read"]}),
        )
        .await
        .expect(201);
    let ro = signed_in(&stack.control.url(), reader["token"].as_str().unwrap()).await;
    let page = ro.get("/ui/keys").await;
    assert!(!page.body.contains("Mint a key"));
    let refused = ro
        .post("/ui/keys", &[("csrf", &page.csrf()), ("vendor", "stripe")])
        .await;
    assert_eq!(refused.status, 403);
    assert!(refused.body.contains("keys:issue"), "{}", refused.body);
}

/// Reads a server-sent event stream until an `audit` event whose data
/// contains `needle` arrives; its data.
async fn next_audit_event(res: &mut reqwest::Response, buf: &mut String, needle: &str) -> String {
    loop {
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if event.lines().any(|l| l == "event: audit") {
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                if data.contains(needle) {
                    return data;
                }
            }
        }
        let chunk = res
            .chunk()
            .await
            .expect("stream readable")
            .expect("stream still open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_audit_entries_arrive_live_on_its_page() {
    let (stack, _mock) = stack_with_stripe().await;
    let label = "dashboard/live 1";
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            label,
        ))
        .await;
    let agent = stack.agent(&key.secret);
    dollar_charge(&agent).await.expect(200);
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;

    let browser = signed_in(&stack.control.url(), &stack.control.opts.admin_token).await;
    // Without script the page shows the entries; the script is a file.
    let run = browser.get("/ui/run?label=dashboard%2Flive+1").await;
    assert_eq!(run.status, 200, "{}", run.body);
    assert!(run.body.contains("id=\"run-audit\""), "{}", run.body);
    assert!(run.body.contains("/v1/payment_intents"), "{}", run.body);
    assert!(
        run.body
            .contains("<script src=\"/ui/assets/live.js\" defer></script>"),
        "{}",
        run.body
    );
    assert_eq!(run.body.matches("<script").count(), 1, "no inline script");
    let csp = run.headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let script = browser.get("/ui/assets/live.js").await;
    assert_eq!(script.status, 200);
    assert!(script.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert!(script.body.contains("EventSource"));

    // No session, no stream.
    let anonymous = Browser::new(&stack.control.url());
    let page = anonymous.get("/ui/runs/dashboard%2Flive%201/events").await;
    assert_eq!(page.status, 303);

    let after = {
        let at = run.body.find("data-after=\"").unwrap() + "data-after=\"".len();
        run.body[at..at + run.body[at..].find('"').unwrap()].to_string()
    };
    let mut res = browser
        .http
        .get(format!(
            "{}/ui/runs/dashboard%2Flive%201/events?after={after}",
            stack.control.url()
        ))
        .header("cookie", browser.cookie.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");

    // A call made now appears on the open stream.
    dollar_charge(&agent).await.expect(200);
    let mut buf = String::new();
    let data = tokio::time::timeout(
        Duration::from_secs(30),
        next_audit_event(&mut res, &mut buf, &key.id),
    )
    .await
    .expect("the new entry arrives on the stream");
    let event: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert!(event["seq"].as_i64().unwrap() > after.parse::<i64>().unwrap());
    let cells: Vec<&str> = event["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cells[2], key.id);
    assert_eq!(cells[3], "stripe POST /v1/payment_intents");
    assert_eq!(cells[5], "$1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_todays_refusals_by_reason() {
    let (mut stack, _mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(5),
            &["POST /v1/payment_intents"],
            "dashboard/refused",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    for _ in 0..3 {
        agent
            .get("/stripe/v1/customers")
            .await
            .expect_error(403, "endpoint_not_allowed");
    }
    let browser = signed_in(&stack.control.url(), &stack.control.opts.admin_token).await;
    let before = browser.get("/ui").await;
    assert!(
        before.body.contains("No calls refused today."),
        "{}",
        before.body
    );
    // The proxy reports a minute's refusals once it is over, or as it stops.
    let status = stack
        .proxy
        .process_mut()
        .terminate(within(Duration::from_secs(30)))
        .await
        .expect("the proxy stops");
    assert!(status.success(), "{status:?}");

    let page = wait_for(within(Duration::from_secs(30)), || async {
        let page = browser.get("/ui").await;
        page.body.contains("id=\"refusals-by-key\"").then_some(page)
    })
    .await
    .expect("the refusals appear on the overview");
    assert!(
        page.body.contains("Calls refused today by reason"),
        "{}",
        page.body
    );
    let row = format!(
        "<td><code>endpoint_not_allowed</code></td><td><small>{}</small></td>",
        key.id
    );
    assert!(page.body.contains(&row), "{}", page.body);
    assert!(page.body.contains("<td>3</td>"), "{}", page.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stream_ends_when_its_token_is_revoked() {
    let control = Control::start(ControlOpts::sqlite()).await;
    let admin = control.admin();
    let created = admin
        .post_json(
            "/vault/admin-tokens",
            &json!({"name": "live reader", "scopes": ["keys:read", "audit:read"]}),
        )
        .await
        .expect(201);
    let browser = signed_in(&control.url(), created["token"].as_str().unwrap()).await;
    let mut res = browser
        .http
        .get(format!("{}/ui/runs/some-run/events", control.url()))
        .header("cookie", browser.cookie.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    admin
        .delete(&format!(
            "/vault/admin-tokens/{}",
            created["id"].as_str().unwrap()
        ))
        .await
        .expect(200);
    // The stream re-checks its session every 10 s: it says so and closes.
    let mut seen = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(chunk) = res.chunk().await.expect("stream readable") {
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream stayed open: {seen}");
    assert!(seen.contains("event: end"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_decided_from_its_page_and_a_read_only_token_cannot() {
    let (stack, _mock) = stack_with_stripe().await;
    let mut body = stripe_key_body(json!(100), &["POST /v1/payment_intents"], "ui/approvals");
    body["approval_above_usd"] = json!(10);
    let key = stack.mint(&body).await;
    let held = stack
        .agent(&key.secret)
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=5000&currency=usd&confirm=true",
        )
        .await;
    let refusal = held.expect_error(403, "approval_required");
    let id = refusal["approval_id"].as_str().unwrap().to_string();
    let url = refusal["approval_url"].as_str().unwrap().to_string();
    assert_eq!(url, format!("/ui/approvals/{id}"));

    // A token that may read keys sees the approval and no form; the
    // server refuses its decision anyway.
    let reader = stack
        .admin
        .post_json(
            "/vault/admin-tokens",
            &json!({"name": "reader", "scopes": ["keys:read"]}),
        )
        .await
        .expect(201);
    let ro = signed_in(&stack.control.url(), reader["token"].as_str().unwrap()).await;
    let listed = ro.get("/ui/approvals").await;
    assert_eq!(listed.status, 200);
    assert!(listed.body.contains(&id), "{}", listed.body);
    let page = ro.get(&url).await;
    assert_eq!(page.status, 200);
    assert!(!page.body.contains(">Approve<"), "{}", page.body);
    let csrf = page.csrf();
    let refused = ro
        .post(
            &url,
            &[("csrf", &csrf), ("verdict", "approve"), ("reason", "x")],
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused.body.contains("approvals:decide"),
        "{}",
        refused.body
    );

    // The operator approves it with a reason.
    let op = signed_in(&stack.control.url(), &stack.control.opts.admin_token).await;
    let page = op.get(&url).await;
    assert!(page.body.contains(">Approve<"), "{}", page.body);
    let csrf = page.csrf();
    let done = op
        .post(
            &url,
            &[
                ("csrf", &csrf),
                ("verdict", "approve"),
                ("reason", "quarterly invoice"),
            ],
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("quarterly invoice"), "{}", done.body);
    let a = stack
        .admin
        .get(&format!("/vault/approvals/{id}"))
        .await
        .expect(200);
    assert_eq!(a["state"], "approved");
    assert_eq!(a["reason"], "quarterly invoice");
}
