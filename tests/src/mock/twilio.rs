//! The mock's Twilio routes: creating a message or a call under
//! `/2010-04-01/Accounts/{AccountSid}/`.
//!
//! The credential must arrive as Twilio's SDKs send it,
//! `Authorization: Basic base64(<credential>)` with the mock's credential
//! being `ACCOUNT_SID:AUTH_TOKEN`. Answers are shaped like Twilio's message
//! and call resources as returned on creation: status `queued`, `price`
//! null, counts as strings. `To` = `INVALID_TO` answers 400 (error 21211),
//! as Twilio's magic test number does.

use std::sync::atomic::Ordering;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::json;

use super::{MockState, RecordedCall};

/// A `To` the mock refuses with 400, as Twilio refuses its magic invalid
/// number.
pub const INVALID_TO: &str = "+15005550001";

/// When the mock says every resource was created.
const CREATED: &str = "Mon, 23 Nov 2026 10:00:00 +0000";

/// The account of a create call: `Some(sid)` when `path` is
/// `/2010-04-01/Accounts/{sid}/{resource}`.
fn create_path<'a>(path: &'a str, resource: &str) -> Option<&'a str> {
    path.strip_prefix("/2010-04-01/Accounts/")?
        .strip_suffix(resource)?
        .strip_suffix('/')
        .filter(|sid| !sid.is_empty() && !sid.contains('/'))
}

/// Whether `path` creates a message or a call.
pub(super) fn is_create(path: &str) -> bool {
    create_path(path, "Messages.json").is_some() || create_path(path, "Calls.json").is_some()
}

/// Answers a create call (`is_create` holds for its path).
pub(super) fn create(state: &MockState, call: &RecordedCall) -> Response {
    match (
        create_path(&call.path, "Messages.json"),
        create_path(&call.path, "Calls.json"),
    ) {
        (Some(account), _) => message(state, call, account),
        (_, Some(account)) => create_call(state, call, account),
        (None, None) => error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        ),
    }
}

fn authorized(state: &MockState, call: &RecordedCall) -> bool {
    call.authorization() == Some(format!("Basic {}", BASE64.encode(&state.credential)).as_str())
}

fn error(status: StatusCode, code: u32, message: &str) -> Response {
    (
        status,
        Json(json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status.as_u16(),
        })),
    )
        .into_response()
}

/// The form parameters of a create call: single values by name, and how
/// many `MediaUrl` there were.
fn params(call: &RecordedCall) -> (impl Fn(&str) -> Option<String>, usize) {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(&call.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let media = pairs.iter().filter(|(k, _)| k == "MediaUrl").count();
    let get = move |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    (get, media)
}

fn sid(state: &MockState, prefix: &str) -> String {
    format!(
        "{prefix}{:032x}",
        state.next_id.fetch_add(1, Ordering::SeqCst)
    )
}

/// `POST .../Messages.json`: 201 with a queued message resource.
fn message(state: &MockState, call: &RecordedCall, account: &str) -> Response {
    if !authorized(state, call) {
        return error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    let (get, media) = params(call);
    let Some(to) = get("To") else {
        return error(
            StatusCode::BAD_REQUEST,
            21604,
            "A 'To' phone number is required.",
        );
    };
    if to == INVALID_TO {
        return error(
            StatusCode::BAD_REQUEST,
            21211,
            &format!("Invalid 'To' Phone Number: {to}"),
        );
    }
    let body = get("Body").unwrap_or_default();
    // Rough, as a mock may be: one segment up to 160 characters, else 153
    // to a segment.
    let chars = body.chars().count();
    let segments = if chars <= 160 { 1 } else { chars.div_ceil(153) };
    let sid = sid(state, "SM");
    let uri = format!("/2010-04-01/Accounts/{account}/Messages/{sid}");
    (
        StatusCode::CREATED,
        Json(json!({
            "account_sid": account,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": CREATED,
            "date_sent": null,
            "date_updated": CREATED,
            "direction": "outbound-api",
            "error_code": null,
            "error_message": null,
            "from": get("From"),
            "messaging_service_sid": get("MessagingServiceSid"),
            "num_media": media.to_string(),
            "num_segments": segments.to_string(),
            "price": null,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": format!("{uri}/Media.json")},
            "to": to,
            "uri": format!("{uri}.json"),
        })),
    )
        .into_response()
}

/// `POST .../Calls.json`: 201 with a queued call resource.
fn create_call(state: &MockState, call: &RecordedCall, account: &str) -> Response {
    if !authorized(state, call) {
        return error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    let (get, _) = params(call);
    let Some(to) = get("To") else {
        return error(
            StatusCode::BAD_REQUEST,
            21201,
            "No 'To' number is specified",
        );
    };
    let sid = sid(state, "CA");
    let uri = format!("/2010-04-01/Accounts/{account}/Calls/{sid}");
    (
        StatusCode::CREATED,
        Json(json!({
            "account_sid": account,
            "api_version": "2010-04-01",
            "date_created": CREATED,
            "date_updated": CREATED,
            "direction": "outbound-api",
            "duration": null,
            "end_time": null,
            "from": get("From"),
            "price": null,
            "price_unit": "USD",
            "sid": sid,
            "start_time": null,
            "status": "queued",
            "to": to,
            "uri": format!("{uri}.json"),
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::super::MockVendor;
    use super::*;
    use serde_json::Value;

    const CREDENTIAL: &str = "AC0123456789abcdef0123456789abcdef:mocktoken";
    const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";

    async fn post(mock: &MockVendor, resource: &str, auth: &str, form: &str) -> (u16, Value) {
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(format!(
                "{}/2010-04-01/Accounts/{ACCOUNT}/{resource}",
                mock.url()
            ))
            .header("authorization", auth)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    #[test]
    fn create_paths_name_the_account() {
        let p = "/2010-04-01/Accounts/AC1/Messages.json";
        assert_eq!(create_path(p, "Messages.json"), Some("AC1"));
        assert_eq!(create_path(p, "Calls.json"), None);
        assert_eq!(
            create_path("/2010-04-01/Accounts//Messages.json", "Messages.json"),
            None
        );
        assert_eq!(
            create_path(
                "/2010-04-01/Accounts/AC1/Messages/SM1.json",
                "Messages.json"
            ),
            None
        );
    }

    #[tokio::test]
    async fn messages_and_calls_need_the_basic_credential() {
        let mock = MockVendor::start(CREDENTIAL).await;
        let good = format!("Basic {}", BASE64.encode(CREDENTIAL));
        let form = "To=%2B14155552671&From=%2B15017122661&Body=Hello";
        let (s, v) = post(&mock, "Messages.json", &good, form).await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["status"], "queued");
        assert_eq!(v["price"], Value::Null);
        assert_eq!(v["num_segments"], "1");
        assert_eq!(v["to"], "+14155552671");
        assert_eq!(v["account_sid"], ACCOUNT);
        assert!(v["sid"].as_str().unwrap().starts_with("SM"));
        let long = format!("To=%2B14155552671&Body={}", "a".repeat(161));
        assert_eq!(
            post(&mock, "Messages.json", &good, &long).await.1["num_segments"],
            "2"
        );

        let wrong = format!(
            "Basic {}",
            BASE64.encode("AC0123456789abcdef0123456789abcdef:kc_live_x")
        );
        for auth in [
            wrong.as_str(),
            "Bearer AC0123456789abcdef0123456789abcdef:mocktoken",
        ] {
            let (s, v) = post(&mock, "Messages.json", auth, form).await;
            assert_eq!((s, &v["code"]), (401, &json!(20003)));
            assert!(!v.to_string().contains("kc_live_x"));
        }
        let (s, v) = post(&mock, "Messages.json", &good, "To=%2B15005550001&Body=x").await;
        assert_eq!((s, &v["code"]), (400, &json!(21211)));
        let (s, _) = post(&mock, "Messages.json", &good, "Body=x").await;
        assert_eq!(s, 400);

        let (s, v) = post(&mock, "Calls.json", &good, "To=%2B14155551212&From=%2B15017122661&Url=https%3A%2F%2Fdemo.twilio.com%2Fdocs%2Fvoice.xml").await;
        assert_eq!(s, 201, "{v}");
        assert!(v["sid"].as_str().unwrap().starts_with("CA"));
        assert_eq!(post(&mock, "Calls.json", &wrong, "To=%2B1").await.0, 401);
        assert_eq!(mock.calls().len(), 8);
    }
}
