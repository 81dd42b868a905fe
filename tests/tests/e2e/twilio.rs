//! The Twilio profile end to end: an agent using Twilio's SDK convention
//! (`Authorization: Basic base64(ACCOUNT_SID:<vault key>)`) sends messages
//! and places calls; each is priced before it leaves (segments x the
//! destination's price, or the flat call reservation), the mock sees only
//! the real `ACCOUNT_SID:AUTH_TOKEN`, and a message keycap cannot price
//! never reaches Twilio. Included from `e2e.rs`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use keycap_tests::harness::{ControlOpts, ProxyOpts, Stack};
use keycap_tests::mock::twilio::INVALID_TO;
use keycap_tests::mock::MockVendor;
use serde_json::{json, Value};

use super::{assert_mock_never_saw, usd_micros};

const ACCOUNT_SID: &str = "AC5ef8732a3c49700934481addd5ce1659";
const TWILIO_CREDENTIAL: &str =
    "AC5ef8732a3c49700934481addd5ce1659:KeycapE2eRealTwilioAuthTokenDoNotLeak";

fn messages_path() -> String {
    format!("/twilio/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
}

fn calls_path() -> String {
    format!("/twilio/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json")
}

fn basic(user_password: &str) -> String {
    format!("Basic {}", BASE64.encode(user_password))
}

/// The shipped table, compiled in, so the test reads the prices the proxy
/// was built with.
fn shipped() -> Value {
    serde_json::from_str(include_str!("../../../vendors/prices/twilio.json")).unwrap()
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (k, v) in pairs {
        if !s.is_empty() {
            s.push('&');
        }
        s.push_str(&format!("{k}={}", keycap_tests::harness::q(v)));
    }
    s
}

fn twilio_key(label: &str) -> Value {
    json!({
        "vendor": "twilio",
        "daily_usd_cap": 2,
        "allowed_endpoints": [
            "POST /2010-04-01/Accounts/*/Messages.json",
            "POST /2010-04-01/Accounts/*/Calls.json",
        ],
        "expires_in": "1h",
        "agent_run_label": label,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_messages_and_calls_are_priced_and_the_agent_never_holds_the_token() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(TWILIO_CREDENTIAL).await;
    stack.register("twilio", "twilio", &mock).await;
    let key = stack.mint(&twilio_key("twilio/1")).await;
    // Where Twilio's SDKs put the auth token, the agent puts its vault key.
    let sdk_auth = basic(&format!("{ACCOUNT_SID}:{}", key.secret));
    let agent = stack.agent(&key.secret).with_authorization(Some(&sdk_auth));
    let table = shipped();
    let uk = usd_micros(table["sms"]["prefixes"]["+44"].as_str().unwrap());
    let call = usd_micros(table["call_reservation"].as_str().unwrap());

    // 187 septets ('[' and ']' take two each): two segments.
    let body = "Your appointment with Dr. Rivera is confirmed for Tuesday 14 May at 09:30. \
                Please arrive 10 minutes early and bring your insurance card. Reply C to \
                cancel or R to reschedule. [Ref 4471]";
    let sent = agent
        .post_form(
            &messages_path(),
            &form(&[
                ("To", "+447700900123"),
                ("From", "+15017122661"),
                ("Body", body),
            ]),
        )
        .await
        .expect(201);
    assert_eq!(sent["status"], "queued");
    assert_eq!(sent["price"], Value::Null);
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].path,
        format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
    );
    assert_eq!(
        calls[0].authorization(),
        Some(basic(TWILIO_CREDENTIAL).as_str()),
        "the mock must see the real SID:TOKEN"
    );
    assert_mock_never_saw(&mock, &key.secret);
    assert_mock_never_saw(
        &mock,
        &BASE64.encode(format!("{ACCOUNT_SID}:{}", key.secret)),
    );
    stack.wait_key_spend(&key.id, 2 * uk, 1).await;
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 1).await;
    let e = &entries[0];
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["reserved_micros"], 2 * uk, "{e}");
    assert_eq!(e["cost_micros"], 2 * uk, "{e}");
    assert_eq!(e["detail"]["destination_prefix"], "+44", "{e}");
    assert_eq!(e["detail"]["encoding"], "gsm7", "{e}");
    assert_eq!(e["detail"]["segments"], 2, "{e}");
    assert_eq!(e["detail"]["unit_price_micros"], uk, "{e}");
    assert_eq!(e["detail"]["price_source"], "quote", "{e}");
    assert!(
        !e.to_string().contains("+447700900123"),
        "the number stays out of the audit: {e}"
    );

    // A destination the table does not price never leaves.
    let r = agent
        .post_form(
            &messages_path(),
            &form(&[("To", "+819012345678"), ("Body", "Hello")]),
        )
        .await;
    let err = r.expect_error(400, "unknown_destination");
    assert!(err["message"].as_str().unwrap().contains("price"), "{err}");
    let r = agent
        .post_form(
            &messages_path(),
            &form(&[("To", "whatsapp:+14155552671"), ("Body", "Hello")]),
        )
        .await;
    r.expect_error(400, "unpriceable_request");
    assert_eq!(mock.calls().len(), 1, "an unpriced message was forwarded");

    // Twilio refuses the number: nothing is billed.
    let r = agent
        .post_form(
            &messages_path(),
            &form(&[("To", INVALID_TO), ("Body", "Hello")]),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["code"], 21211);
    stack.wait_key_spend(&key.id, 2 * uk, 2).await;

    // A call reserves and settles the flat reservation.
    agent
        .post_form(
            &calls_path(),
            &form(&[
                ("To", "+14155551212"),
                ("From", "+15017122661"),
                ("Url", "http://demo.twilio.com/docs/voice.xml"),
            ]),
        )
        .await
        .expect(201);
    stack.wait_key_spend(&key.id, 2 * uk + call, 3).await;
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 3).await;
    let released = entries
        .iter()
        .find(|e| e["upstream_status"] == 400)
        .unwrap_or_else(|| panic!("no entry for the refused number in {entries:?}"));
    assert_eq!(released["outcome"], "released", "{released}");
    assert_eq!(released["cost_micros"], 0, "{released}");
    assert_eq!(released["detail"]["channel"], "sms", "{released}");
    let placed = entries
        .iter()
        .find(|e| e["detail"]["channel"] == "call")
        .unwrap_or_else(|| panic!("no call entry in {entries:?}"));
    assert_eq!(placed["cost_micros"], call, "{placed}");
    assert_eq!(
        placed["detail"]["price_source"], "call_reservation",
        "{placed}"
    );

    // Bearer still works for the same key, and the vault key is worth
    // nothing at Twilio itself.
    let bearer = stack.agent(&key.secret);
    bearer
        .post_form(
            &messages_path(),
            &form(&[("To", "+14155552671"), ("Body", "Hi there")]),
        )
        .await
        .expect(201);
    let direct = keycap_tests::harness::Api::new(&mock.url(), None)
        .with_authorization(Some(&sdk_auth))
        .post_form(
            &format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"),
            &form(&[("To", "+14155552671"), ("Body", "Hi there")]),
        )
        .await;
    assert_eq!(direct.status, 401);
    // A wrong password presents no key at all.
    let stranger = stack
        .agent(&key.secret)
        .with_authorization(Some(&basic(TWILIO_CREDENTIAL)));
    stranger
        .post_form(
            &messages_path(),
            &form(&[("To", "+14155552671"), ("Body", "Hi there")]),
        )
        .await
        .expect_error(401, "invalid_key");
    assert_eq!(mock.calls().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_prices_come_from_the_operator_file_and_a_bad_credential_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("twilio.json");
    std::fs::write(
        &file,
        r#"{"as_of": "2026-11-20", "currency": "usd",
            "sms": {"default": "0.25", "prefixes": {"+1": "0.01"}}}"#,
    )
    .unwrap();
    let stack = Stack::start_with_proxy(
        ControlOpts::sqlite(),
        ProxyOpts::new("e2e-proxy").flag("twilio-prices", file.display()),
    )
    .await;
    let mock = MockVendor::start(TWILIO_CREDENTIAL).await;

    // A credential that is not SID:TOKEN is refused, naming the field.
    let r = stack
        .admin
        .put_json(
            "/vault/vendors/twilio",
            &json!({"profile": "twilio", "base_url": mock.url(), "credential": "justatoken"}),
        )
        .await;
    let err = r.expect_error(400, "invalid_request");
    assert_eq!(err["field"], "credential", "{err}");

    stack.register("twilio", "twilio", &mock).await;
    let key = stack.mint(&twilio_key("twilio/file")).await;
    let agent = stack
        .agent(&key.secret)
        .with_authorization(Some(&basic(&format!("{ACCOUNT_SID}:{}", key.secret))));
    // The file's default prices a destination the shipped table does not.
    agent
        .post_form(
            &messages_path(),
            &form(&[("To", "+819012345678"), ("Body", "Hello")]),
        )
        .await
        .expect(201);
    stack.wait_key_spend(&key.id, 250_000, 1).await;
    // The file has no call_reservation: calls are refused, not forwarded.
    agent
        .post_form(&calls_path(), &form(&[("To", "+14155551212")]))
        .await
        .expect_error(400, "unpriceable_request");
    assert_eq!(mock.calls().len(), 1);
}
