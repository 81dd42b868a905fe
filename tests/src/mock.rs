//! A mock vendor for end-to-end tests: a Stripe-like and OpenAI-like HTTP
//! server on 127.0.0.1 that records every call it receives.
//!
//! It owns the vendor side of a test: it checks that keycap injected the real
//! credential (`Authorization: Bearer <credential>`), answers with bodies
//! shaped like the real vendors' (including the `usage` OpenAI reports, with
//! numbers a test can predict), and keeps a log of what reached it so a test
//! can prove a refused call never left the proxy. Outside `/echo/` it never
//! echoes a presented credential back, and it moves no money.
//!
//! Routes:
//! * Stripe (see `stripe`): `POST /v1/charges`; `POST /v1/payment_intents`
//!   (confirmed only with `confirm=true`), `GET`/`POST /v1/payment_intents/{id}`,
//!   `.../confirm`, `.../capture`; `POST /v1/invoices`, `GET`/`POST
//!   /v1/invoices/{id}`, `.../pay` (invoices also added with `add_invoice`),
//!   `POST /v1/invoiceitems`; `GET /v1/prices/{id}`, `/v1/shipping_rates/{id}`,
//!   `/v1/tax_rates/{id}` (added with `add_price`, `add_shipping_rate`,
//!   `add_tax_rate`); `POST /v1/checkout/sessions`; subscriptions created,
//!   updated and canceled by `/v1/subscriptions[/{id}]` or
//!   `/v1/customers/{id}/subscriptions[/{id}]`; `POST /v1/refunds`. The
//!   query string merged with a form (or JSON) body, read as a form unless
//!   every Content-Type says JSON; 401 on a wrong credential, 400 without an integer
//!   amount, 402 `card_declined` when the amount is 402, 500 for a charge
//!   whose description is `fail500`; `description` is
//!   echoed, as Stripe does, so a test can make a response as large as it
//!   needs; a repeated `Idempotency-Key` is answered from the saved response
//!   with `Idempotent-Replayed: true`.
//! * `GET /v1/customers/{*rest}`: 200.
//! * `POST /v1/chat/completions`: JSON body; non-streamed JSON with `usage`,
//!   or `text/event-stream` when `"stream": true` (a final usage chunk when
//!   `stream_options.include_usage` is true), ending with `data: [DONE]`;
//!   with an `x-mock-echo` request header the stream also repeats the
//!   `Authorization` it got, in an SSE comment cut over two frames.
//! * `POST /v1/responses`, `POST /v1/embeddings`, `POST /v1/images/generations`
//!   (module `openai`): Bearer credential (401 otherwise); a response as JSON,
//!   or as an SSE stream (`response.created` ... `response.output_text.delta`
//!   ... `response.completed` with `usage`) when `"stream": true`; a vector
//!   per embeddings input; `n` images, with `usage` for gpt-image models.
//!   Usage as `openai::responses_usage`, `embeddings_usage`, `image_usage`.
//! * `POST /v1/messages` (Anthropic): the real credential in `x-api-key` and
//!   no `Authorization` (401 otherwise); JSON with `usage`, or an SSE stream
//!   (`message_start` ... `message_delta` with the output count) when
//!   `"stream": true`. Usage as for chat completions, from `max_tokens`.
//! * `POST /emails`, `POST /emails/batch` (Resend): Bearer credential (401
//!   otherwise); 200 with an id per email.
//! * `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, `.../Calls.json`
//!   (Twilio, see `twilio`): `Authorization: Basic base64(<credential>)`
//!   (401 otherwise); 201 with a queued message or call, `price` null.
//! * `POST /v1/fail500`: 500.
//! * any method on `/echo/{*rest}` (or `/v1/echo/{*rest}`, a path a Stripe
//!   vendor forwards): the request's headers echoed back in
//!   response headers and a streamed body (see `echo`) — the one route that
//!   repeats what it was sent, to prove keycap masks the credential.
//! * `POST /generic/{*rest}`: a generic vendor (see `generic_call`).
//! * anything else: 404 (still recorded).
//!
//! A test can also script the answer to one path (`MockVendor::script`):
//! a fixed status, headers and body, ahead of every route above; or only
//! the next answer to it (`MockVendor::script_once`).
//!
//! A payment intent created with the description `LOSE_FIRST_ANSWER` is
//! made, and its answer saved for its Idempotency-Key, but the answer is
//! held until a retry with the same key has been answered from it (or
//! 30 s): the first answer is lost to a caller that gives up sooner, as
//! when Stripe answers too late.
//!
//! A test can hold the responses to one path until it releases them
//! (`MockVendor::hold`): the whole response, or a streamed completion after
//! its first event. A held call is recorded when it arrives, before it waits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;

pub mod openai;
mod stripe;
pub use stripe::LOSE_FIRST_ANSWER;
pub mod twilio;

/// Prompt tokens the mock reports for every chat completion.
pub const CHAT_PROMPT_TOKENS: u64 = 42;
/// Completion tokens the mock reports, unless the request's `max_tokens` /
/// `max_completion_tokens` is smaller (then it reports that limit).
pub const CHAT_COMPLETION_TOKENS: u64 = 321;
/// The pieces of assistant text a streamed completion sends, one per event.
pub const CHAT_STREAM_PIECES: [&str; 3] = ["Hello", " from", " the mock."];
/// `created` in every chat response, so streamed bodies are reproducible.
const CHAT_CREATED: i64 = 1_700_000_000;

/// Largest request body the mock reads.
const MAX_BODY: usize = 16 << 20;

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedCall {
    pub method: String,
    pub path: String,
    /// The raw query string, without '?'.
    pub query: Option<String>,
    /// Header names lowercased, in arrival order (authorization included).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RecordedCall {
    /// The first value of a header (name is case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn authorization(&self) -> Option<&str> {
        self.header("authorization")
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Everything the vendor saw, as text: request line, headers and body.
    /// For asserting that a secret never reached it.
    pub fn as_text(&self) -> String {
        let mut out = format!("{} {}", self.method, self.path);
        if let Some(q) = &self.query {
            out.push('?');
            out.push_str(q);
        }
        out.push('\n');
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\n"));
        }
        out.push('\n');
        out.push_str(&self.body_text());
        out
    }
}

/// Where a held response waits for the test to release it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldAt {
    /// Before anything is sent: no status line, no headers.
    Response,
    /// A streamed chat completion sends its first event, then waits before
    /// the rest (the usage chunk included). Other responses are not held.
    AfterFirstEvent,
}

/// Holds the mock's responses to one path until `release` is called or the
/// value is dropped (so no handler is left waiting after a test).
pub struct Hold {
    released: watch::Sender<bool>,
}

impl Hold {
    /// Lets every held response (and every later one) proceed.
    pub fn release(&self) {
        self.released.send_replace(true);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

/// A fixed answer to one path, set with `MockVendor::script`.
#[derive(Clone, Debug)]
pub struct Scripted {
    pub status: u16,
    /// Sent as given (names and values), after the status line.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

struct HeldPath {
    path: String,
    at: HoldAt,
    released: watch::Receiver<bool>,
}

/// Waits until a hold is released (or its `Hold` is gone).
async fn until_released(mut released: watch::Receiver<bool>) {
    let _ = released.wait_for(|r| *r).await;
}

/// What the router shares between requests.
struct MockState {
    credential: String,
    /// Further credentials the probe endpoint (`GET /v1/balance`) accepts,
    /// as a vendor accepts a new key next to the old during a rotation.
    also_accepted: Mutex<Vec<String>>,
    calls: Mutex<Vec<RecordedCall>>,
    holds: Mutex<Vec<HeldPath>>,
    scripts: Mutex<Vec<(String, Scripted)>>,
    /// Answers to the next request to a path only, oldest first.
    scripts_once: Mutex<Vec<(String, Scripted)>>,
    /// First answers held back (`LOSE_FIRST_ANSWER`), by Idempotency-Key.
    lost_answers: Mutex<std::collections::HashMap<String, watch::Sender<bool>>>,
    /// Money moved, in minor units, counted as `stripe` describes.
    stripe_amount: AtomicI64,
    next_id: AtomicU64,
    stripe: Mutex<stripe::StripeObjects>,
}

/// A running mock vendor. Stops when dropped.
pub struct MockVendor {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
}

impl MockVendor {
    /// Starts a mock on a free 127.0.0.1 port that accepts only
    /// `Authorization: Bearer <credential>`.
    pub async fn start(credential: &str) -> MockVendor {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock vendor: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("mock vendor: local addr");
        let state = new_state(credential);
        let app = router_with(state.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("mock vendor on {addr} stopped: {e}");
            }
        });
        MockVendor {
            addr,
            scheme: "http",
            state,
            task,
        }
    }

    /// Like `start`, but serves HTTPS with `tls` (see `pki::TestCa`). A
    /// client that rejects the certificate never gets as far as a request,
    /// so `calls()` stays empty for it.
    pub async fn start_tls(credential: &str, tls: Arc<rustls::ServerConfig>) -> MockVendor {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock vendor: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("mock vendor: local addr");
        let state = new_state(credential);
        let app = router_with(state.clone());
        let listener = TlsListener {
            tcp: listener,
            acceptor: tokio_rustls::TlsAcceptor::from(tls),
        };
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("mock vendor on {addr} stopped: {e}");
            }
        });
        MockVendor {
            addr,
            scheme: "https",
            state,
            task,
        }
    }

    /// `http://127.0.0.1:<port>` (`https://` when started with TLS), the
    /// base URL to register as the vendor's.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn credential(&self) -> &str {
        &self.state.credential
    }

    /// Makes `GET /v1/balance` accept `credential` too (as Bearer), as a
    /// vendor accepts a newly issued key next to the old one.
    pub fn accept_also(&self, credential: &str) {
        self.state
            .also_accepted
            .lock()
            .expect("mock credentials lock")
            .push(credential.to_string());
    }

    /// Every call received so far, oldest first.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.state.calls.lock().expect("mock calls lock").clone()
    }

    /// Money the mock's Stripe moved, in minor units: charges made, payment
    /// intents confirmed, invoices paid, checkout sessions created.
    pub fn forwarded_stripe_amount(&self) -> i64 {
        self.state.stripe_amount.load(Ordering::SeqCst)
    }

    /// The `amount` of every form-encoded `POST /v1/payment_intents`
    /// received so far, in arrival order, whether or not it was answered: a
    /// call whose caller went away while it was held still reached the
    /// vendor.
    pub fn payment_intent_amounts(&self) -> Vec<i64> {
        self.calls()
            .iter()
            .filter(|c| c.method == "POST" && c.path == "/v1/payment_intents")
            .filter_map(|c| {
                form_urlencoded::parse(&c.body)
                    .find(|(k, _)| k == "amount")
                    .and_then(|(_, v)| v.parse().ok())
            })
            .collect()
    }

    /// A fresh Stripe-like object id, `<prefix>_mock_<n>`.
    fn new_id(&self, prefix: &str) -> String {
        let n = self.state.next_id.fetch_add(1, Ordering::SeqCst);
        format!("{prefix}_mock_{n}")
    }

    /// Adds an open invoice of `amount_due` and returns its id.
    pub fn add_invoice(&self, amount_due: i64, currency: &str) -> String {
        let id = self.new_id("in");
        let mut objects = self.state.stripe.lock().expect("mock stripe lock");
        objects.add_invoice(id.clone(), amount_due, currency);
        id
    }

    /// Adds a one-time Price of `unit_amount` and returns its id.
    pub fn add_price(&self, unit_amount: i64, currency: &str) -> String {
        let id = self.new_id("price");
        let mut objects = self.state.stripe.lock().expect("mock stripe lock");
        objects.add_price(id.clone(), unit_amount, currency);
        id
    }

    /// Adds a fixed-amount Shipping Rate and returns its id.
    pub fn add_shipping_rate(&self, amount: i64, currency: &str) -> String {
        let id = self.new_id("shr");
        let mut objects = self.state.stripe.lock().expect("mock stripe lock");
        objects.add_shipping_rate(id.clone(), amount, currency);
        id
    }

    /// Adds a Tax Rate of `percentage` (exclusive unless `inclusive`) and
    /// returns its id.
    pub fn add_tax_rate(&self, percentage: f64, inclusive: bool) -> String {
        let id = self.new_id("txr");
        let mut objects = self.state.stripe.lock().expect("mock stripe lock");
        objects.add_tax_rate(id.clone(), percentage, inclusive);
        id
    }

    /// An invoice as the mock holds it.
    pub fn invoice(&self, id: &str) -> Option<Value> {
        self.state
            .stripe
            .lock()
            .expect("mock stripe lock")
            .invoice(id)
    }

    /// A payment intent as the mock holds it.
    pub fn payment_intent(&self, id: &str) -> Option<Value> {
        self.state
            .stripe
            .lock()
            .expect("mock stripe lock")
            .intent(id)
    }

    /// Holds responses to `path` (any method) at `at` until the returned
    /// `Hold` is released or dropped. The latest hold on a path wins.
    pub fn hold(&self, path: &str, at: HoldAt) -> Hold {
        let (released, rx) = watch::channel(false);
        self.state
            .holds
            .lock()
            .expect("mock holds lock")
            .push(HeldPath {
                path: path.to_string(),
                at,
                released: rx,
            });
        Hold { released }
    }

    /// Answers every later request to `path` (any method) with `answer`.
    /// The latest script for a path wins.
    pub fn script(&self, path: &str, answer: Scripted) {
        self.state
            .scripts
            .lock()
            .expect("mock scripts lock")
            .push((path.to_string(), answer));
    }

    /// Answers only the next request to `path` (any method) with `answer`,
    /// ahead of any `script` for it.
    pub fn script_once(&self, path: &str, answer: Scripted) {
        self.state
            .scripts_once
            .lock()
            .expect("mock scripts lock")
            .push((path.to_string(), answer));
    }

    /// Forgets recorded calls and the charged total.
    pub fn reset(&self) {
        self.state.calls.lock().expect("mock calls lock").clear();
        self.state.stripe_amount.store(0, Ordering::SeqCst);
    }
}

/// Accepts TCP connections and completes a TLS handshake on each, one at a
/// time (enough for a test vendor). A failed handshake drops only that
/// connection.
struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, peer)) = self.tcp.accept().await else {
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

impl Drop for MockVendor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn new_state(credential: &str) -> Arc<MockState> {
    Arc::new(MockState {
        credential: credential.to_string(),
        also_accepted: Mutex::new(Vec::new()),
        calls: Mutex::new(Vec::new()),
        holds: Mutex::new(Vec::new()),
        scripts: Mutex::new(Vec::new()),
        scripts_once: Mutex::new(Vec::new()),
        lost_answers: Mutex::new(std::collections::HashMap::new()),
        stripe_amount: AtomicI64::new(0),
        next_id: AtomicU64::new(1),
        stripe: Mutex::new(stripe::StripeObjects::default()),
    })
}

/// The mock's router, for serving it elsewhere (the `keycap-mock-vendor`
/// binary).
pub fn router(credential: &str) -> Router {
    router_with(new_state(credential))
}

/// Serves the mock on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    credential: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(credential))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The oldest `script_once` answer for `path`, taken.
fn take_script_once(state: &MockState, path: &str) -> Option<Scripted> {
    let mut once = state.scripts_once.lock().expect("mock scripts lock");
    let at = once.iter().position(|(p, _)| p == path)?;
    Some(once.remove(at).1)
}

fn router_with(state: Arc<MockState>) -> Router {
    // One handler for every request, so that unknown paths are recorded too.
    Router::new().fallback(handle).with_state(state)
}

async fn handle(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response(),
    };
    let call = RecordedCall {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    state
        .calls
        .lock()
        .expect("mock calls lock")
        .push(call.clone());
    let hold = state
        .holds
        .lock()
        .expect("mock holds lock")
        .iter()
        .rev()
        .find(|h| h.path == call.path)
        .map(|h| (h.at, h.released.clone()));
    let mid_stream = match hold {
        Some((HoldAt::Response, released)) => {
            until_released(released).await;
            None
        }
        Some((HoldAt::AfterFirstEvent, released)) => Some(released),
        None => None,
    };

    let scripted = take_script_once(&state, &call.path).or_else(|| {
        state
            .scripts
            .lock()
            .expect("mock scripts lock")
            .iter()
            .rev()
            .find(|(p, _)| *p == call.path)
            .map(|(_, s)| s.clone())
    });
    if let Some(s) = scripted {
        let mut resp = Response::new(Body::from(s.body));
        *resp.status_mut() = StatusCode::from_u16(s.status).expect("scripted status");
        for (n, v) in s.headers {
            resp.headers_mut().append(
                header::HeaderName::from_bytes(n.as_bytes()).expect("scripted header name"),
                HeaderValue::from_str(&v).expect("scripted header value"),
            );
        }
        return resp;
    }
    if let Some(r) = stripe::answer(&state, &call) {
        return stripe::deliver(&state, &call, r).await;
    }
    match (call.method.as_str(), call.path.as_str()) {
        ("GET", p) if customer_path(p).is_some() => {
            stripe_customer(&state, &call, customer_path(p).unwrap_or_default())
        }
        ("GET", "/v1/balance") => balance(&state, &call),
        ("POST", "/v1/chat/completions") => chat_completion(&state, &call, mid_stream),
        ("POST", "/v1/responses") => openai::responses(&state, &call),
        ("POST", "/v1/embeddings") => openai::embeddings(&state, &call),
        ("POST", "/v1/images/generations") => openai::image_generation(&state, &call),
        ("POST", "/v1/messages") => anthropic_message(&state, &call),
        ("POST", "/emails" | "/emails/batch") => resend_send(&state, &call),
        ("POST", p) if p.starts_with("/generic/") => generic_call(&state, &call),
        ("POST", p) if twilio::is_create(p) => twilio::create(&state, &call),
        (_, p) if p.starts_with("/echo/") || p.starts_with("/v1/echo/") => echo(&call),
        ("POST", "/v1/fail500") => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"type": "api_error", "message": "mock internal failure"}})),
        )
            .into_response(),
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {
                "type": "invalid_request_error",
                "message": format!("Unrecognized request URL ({} {}).", call.method, call.path),
            }})),
        )
            .into_response(),
    }
}

/// Stripe's balance, the read a credential probe makes: 200 for the mock's
/// credential or one `accept_also` added, else Stripe's 401 — whose body,
/// like Stripe's, repeats part of the key it was given.
fn balance(state: &MockState, call: &RecordedCall) -> Response {
    let given = call
        .authorization()
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or_default();
    let accepted = given == state.credential
        || state
            .also_accepted
            .lock()
            .expect("mock credentials lock")
            .iter()
            .any(|c| c == given);
    if !accepted {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {
                "type": "invalid_request_error",
                "message": format!("Invalid API Key provided: {given}"),
            }})),
        )
            .into_response();
    }
    Json(json!({"object": "balance", "available": [{"amount": 0, "currency": "usd"}]}))
        .into_response()
}

/// Echoes the request's headers back, the way some vendors' debugging
/// endpoints do: each as an `x-echo-<name>` response header, and in the
/// body, which is streamed three bytes at a time so anything echoed is cut
/// by chunk boundaries: JSON `{"headers": {...}}`, or with `sse` in the
/// query an SSE event per header (`text/event-stream`).
fn echo(call: &RecordedCall) -> Response {
    let echoed: Vec<&(String, String)> = call
        .headers
        .iter()
        .filter(|(n, _)| !matches!(n.as_str(), "host" | "content-length" | "connection"))
        .collect();
    let sse = call.query.as_deref().is_some_and(|q| q.contains("sse"));
    let text = if sse {
        echoed
            .iter()
            .map(|(n, v)| format!("data: {}\n\n", json!({ n.as_str(): v })))
            .collect::<String>()
    } else {
        let map: serde_json::Map<String, Value> = echoed
            .iter()
            .map(|(n, v)| (n.clone(), Value::from(v.as_str())))
            .collect();
        json!({ "headers": map }).to_string()
    };
    let chunks: Vec<Result<Bytes, Infallible>> = text
        .into_bytes()
        .chunks(3)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let mut resp = Response::new(Body::from_stream(tokio_stream::iter(chunks)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if sse {
            "text/event-stream"
        } else {
            "application/json"
        }),
    );
    for (n, v) in echoed {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(format!("x-echo-{n}").as_bytes()),
            HeaderValue::from_str(v),
        ) {
            resp.headers_mut().append(name, value);
        }
    }
    resp
}

/// A generic vendor's call: the credential in `x-vendor-key` (401
/// otherwise); the cost it states is whatever the test asked for, in the
/// `x-request-cost` response header (from the request's `x-mock-cost`) and
/// at `/usage/cost` in the body (from `x-mock-body-cost`).
fn generic_call(state: &MockState, call: &RecordedCall) -> Response {
    if call.header("x-vendor-key") != Some(state.credential.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "unauthorized"})),
        )
            .into_response();
    }
    let body_cost = call.header("x-mock-body-cost").map(str::to_string);
    let mut resp = Json(json!({"ok": true, "usage": {"cost": body_cost}})).into_response();
    if let Some(c) = call
        .header("x-mock-cost")
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        resp.headers_mut().insert("x-request-cost", c);
    }
    resp
}

/// The part after `/v1/customers/`, when there is one.
fn customer_path(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/customers/")
        .filter(|r| !r.is_empty())
}

fn authorized(state: &MockState, call: &RecordedCall) -> bool {
    call.authorization() == Some(format!("Bearer {}", state.credential).as_str())
}

fn stripe_error(status: StatusCode, error: Value) -> Response {
    (status, Json(json!({ "error": error }))).into_response()
}

fn stripe_unauthorized() -> Response {
    // Like Stripe's, but without echoing any part of what was presented.
    stripe_error(
        StatusCode::UNAUTHORIZED,
        json!({"type": "invalid_request_error", "message": "Invalid API Key provided."}),
    )
}

/// `amount`, `currency` and `description` of a charge, from a form or JSON
/// body, as text.
struct ChargeParams {
    amount: Option<String>,
    currency: Option<String>,
    description: Option<String>,
}

fn charge_params(call: &RecordedCall) -> ChargeParams {
    // Read as JSON only when every Content-Type says so: a server that
    // honours another one reads the body as a form.
    let mut types = call
        .headers
        .iter()
        .filter(|(n, _)| n == "content-type")
        .map(|(_, v)| v.to_ascii_lowercase());
    let first = types.next();
    let is_json = first
        .as_deref()
        .is_some_and(|ct| ct.starts_with("application/json"))
        && types.all(|ct| ct.starts_with("application/json"));
    if is_json {
        let v: Value = serde_json::from_slice(&call.body).unwrap_or(Value::Null);
        let text = |f: &str| match v.get(f) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        return ChargeParams {
            amount: text("amount"),
            currency: text("currency"),
            description: text("description"),
        };
    }
    let mut p = ChargeParams {
        amount: None,
        currency: None,
        description: None,
    };
    let query = call.query.as_deref().unwrap_or("").as_bytes();
    for (k, v) in form_urlencoded::parse(query).chain(form_urlencoded::parse(&call.body)) {
        match &*k {
            "amount" => p.amount = Some(v.into_owned()),
            "currency" => p.currency = Some(v.into_owned()),
            "description" => p.description = Some(v.into_owned()),
            _ => {}
        }
    }
    p
}

fn stripe_customer(state: &MockState, call: &RecordedCall, rest: &str) -> Response {
    if !authorized(state, call) {
        return stripe_unauthorized();
    }
    Json(json!({"id": rest, "object": "customer", "livemode": false})).into_response()
}

/// The usage the mock reports for a chat completion request body.
pub fn chat_usage(request: &Value) -> (u64, u64) {
    let limit = ["max_tokens", "max_completion_tokens"]
        .iter()
        .filter_map(|f| request.get(*f).and_then(Value::as_u64))
        .min();
    let completion = limit.map_or(CHAT_COMPLETION_TOKENS, |l| l.min(CHAT_COMPLETION_TOKENS));
    (CHAT_PROMPT_TOKENS, completion)
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// The `data:` payloads of a streamed completion, in order, ending with
/// `[DONE]`: one content chunk per `CHAT_STREAM_PIECES`, a finish chunk, and
/// (with `include_usage`) a final chunk carrying `usage`.
pub fn chat_stream_events(model: &str, include_usage: bool, usage: (u64, u64)) -> Vec<String> {
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut c = json!({
            "id": "chatcmpl-mock-stream",
            "object": "chat.completion.chunk",
            "created": CHAT_CREATED,
            "model": model,
            "choices": choices,
        });
        // As OpenAI does: with include_usage every chunk has a `usage` key,
        // null except in the last one.
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        c.to_string()
    };
    let mut events = Vec::new();
    for (i, piece) in CHAT_STREAM_PIECES.iter().enumerate() {
        let delta = if i == 0 {
            json!({"role": "assistant", "content": piece})
        } else {
            json!({"content": piece})
        };
        events.push(chunk(
            json!([{"index": 0, "delta": delta, "finish_reason": null}]),
            None,
        ));
    }
    events.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        None,
    ));
    if include_usage {
        events.push(chunk(json!([]), Some(usage_json(usage.0, usage.1))));
    }
    events.push("[DONE]".to_string());
    events
}

/// The exact body the mock sends for a streamed completion.
pub fn chat_stream_body(model: &str, include_usage: bool, usage: (u64, u64)) -> String {
    chat_stream_events(model, include_usage, usage)
        .iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect()
}

/// A chat completion; a streamed one waits for `mid_stream` (when set)
/// after its first event.
fn chat_completion(
    state: &MockState,
    call: &RecordedCall,
    mid_stream: Option<watch::Receiver<bool>>,
) -> Response {
    if !authorized(state, call) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {
                "message": "Incorrect API key provided.",
                "type": "invalid_request_error",
                "param": null,
                "code": "invalid_api_key",
            }})),
        )
            .into_response();
    }
    let Ok(req) = serde_json::from_slice::<Value>(&call.body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": {"message": "We could not parse the JSON body of your request.",
                                  "type": "invalid_request_error", "param": null, "code": null}}),
            ),
        )
            .into_response();
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    let usage = chat_usage(&req);
    let streaming = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if streaming {
        let include_usage = req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut frames: Vec<Bytes> = chat_stream_events(&model, include_usage, usage)
            .into_iter()
            .map(|e| Bytes::from(format!("data: {e}\n\n")))
            .collect();
        if call.header("x-mock-echo").is_some() {
            // An SSE comment repeating the Authorization header, cut in two
            // frames mid-credential, after the first event.
            let echo = format!(": echo {}\n\n", call.authorization().unwrap_or_default());
            let (a, b) = echo.split_at(echo.len() / 2);
            frames.insert(1, Bytes::from(b.to_string()));
            frames.insert(1, Bytes::from(a.to_string()));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(frames.len());
        tokio::spawn(async move {
            let mut frames = frames.into_iter();
            if let Some(first) = frames.next() {
                if tx.send(Ok(first)).await.is_err() {
                    return;
                }
            }
            if let Some(released) = mid_stream {
                until_released(released).await;
            }
            for f in frames {
                if tx.send(Ok(f)).await.is_err() {
                    return;
                }
            }
        });
        let mut resp = Response::new(Body::from_stream(ReceiverStream::new(rx)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return resp;
    }
    let n = state.next_id.fetch_add(1, Ordering::SeqCst);
    Json(json!({
        "id": format!("chatcmpl-mock-{n}"),
        "object": "chat.completion",
        "created": CHAT_CREATED,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": CHAT_STREAM_PIECES.concat()},
            "finish_reason": "stop",
        }],
        "usage": usage_json(usage.0, usage.1),
    }))
    .into_response()
}

/// Resend's answer to a send: an id per email.
fn resend_send(state: &MockState, call: &RecordedCall) -> Response {
    if !authorized(state, call) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"statusCode": 401, "name": "validation_error", "message": "API key is invalid"})),
        )
            .into_response();
    }
    let id = || {
        format!(
            "email_mock_{}",
            state.next_id.fetch_add(1, Ordering::SeqCst)
        )
    };
    if call.path == "/emails/batch" {
        let n = serde_json::from_slice::<Value>(&call.body)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
        let data: Vec<Value> = (0..n).map(|_| json!({"id": id()})).collect();
        return Json(json!({ "data": data })).into_response();
    }
    Json(json!({"id": id()})).into_response()
}

/// The exact body of a streamed Anthropic message reporting `usage`.
pub fn anthropic_stream_body(model: &str, usage: (u64, u64)) -> String {
    let text = CHAT_STREAM_PIECES.concat();
    let events = [
        json!({"type": "message_start", "message": {
            "id": "msg_mock_stream", "type": "message", "role": "assistant", "content": [],
            "model": model, "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": usage.0, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "ping"}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": usage.1}}),
        json!({"type": "message_stop"}),
    ];
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("")))
        .collect()
}

/// An Anthropic message: the credential must arrive as `x-api-key`.
fn anthropic_message(state: &MockState, call: &RecordedCall) -> Response {
    let key_ok = call.header("x-api-key") == Some(state.credential.as_str());
    if !key_ok || call.authorization().is_some() {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"type": "error", "error": {
                "type": "authentication_error", "message": "invalid x-api-key"}})),
        )
            .into_response();
    }
    let Ok(req) = serde_json::from_slice::<Value>(&call.body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"type": "error", "error": {
                "type": "invalid_request_error", "message": "invalid JSON body"}})),
        )
            .into_response();
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let usage = chat_usage(&req);
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let mut resp = Response::new(Body::from(anthropic_stream_body(model, usage)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        return resp;
    }
    Json(json!({
        "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": CHAT_STREAM_PIECES.concat()}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": usage.0, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": usage.1},
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDENTIAL: &str = "sk_test_mock";

    async fn post(
        mock: &MockVendor,
        path: &str,
        auth: &str,
        ct: &str,
        body: &str,
    ) -> (u16, String) {
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(format!("{}{path}", mock.url()))
            .header("authorization", auth)
            .header("content-type", ct)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    const FORM: &str = "application/x-www-form-urlencoded";

    #[tokio::test]
    async fn stripe_routes_check_the_credential_and_count_charged_amounts() {
        let mock = MockVendor::start(CREDENTIAL).await;
        let good = format!("Bearer {CREDENTIAL}");
        let pi = "/v1/payment_intents";
        let (s, body) = post(
            &mock,
            pi,
            "Bearer kc_live_x",
            FORM,
            "amount=100&currency=usd",
        )
        .await;
        assert_eq!(s, 401);
        assert!(!body.contains("kc_live_x"));
        assert_eq!(post(&mock, pi, &good, FORM, "currency=usd").await.0, 400);
        assert_eq!(post(&mock, pi, &good, FORM, "amount=1.5").await.0, 400);
        let (s, body) = post(
            &mock,
            pi,
            &good,
            FORM,
            "amount=402&currency=usd&confirm=true",
        )
        .await;
        assert_eq!(s, 402);
        assert!(body.contains("card_declined"));
        let (s, body) = post(
            &mock,
            pi,
            &good,
            FORM,
            "amount=2000&currency=usd&confirm=true",
        )
        .await;
        assert_eq!(s, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["amount"], 2000);
        assert_eq!(v["object"], "payment_intent");
        assert_eq!(v["status"], "succeeded");
        let json_body = r#"{"amount": 300, "currency": "usd"}"#;
        let (s, body) = post(&mock, "/v1/charges", &good, "application/json", json_body).await;
        assert_eq!(s, 200);
        assert!(body.contains("\"object\":\"charge\""));
        assert_eq!(mock.forwarded_stripe_amount(), 2300);
        assert_eq!(post(&mock, "/v1/fail500", &good, FORM, "").await.0, 500);
        assert_eq!(post(&mock, "/v1/nothing", &good, FORM, "").await.0, 404);

        let calls = mock.calls();
        assert_eq!(calls.len(), 8);
        assert_eq!(calls[0].authorization(), Some("Bearer kc_live_x"));
        assert_eq!(
            calls[4].body_text(),
            "amount=2000&currency=usd&confirm=true"
        );
        assert_eq!(calls[7].path, "/v1/nothing");
        mock.reset();
        assert!(mock.calls().is_empty());
        assert_eq!(mock.forwarded_stripe_amount(), 0);
    }

    #[tokio::test]
    async fn customers_answer_any_sub_path_with_the_credential_only() {
        let mock = MockVendor::start(CREDENTIAL).await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let get = |path: &str, auth: &str| {
            http.get(format!("{}{path}", mock.url()))
                .header("authorization", auth.to_string())
                .send()
        };
        let good = format!("Bearer {CREDENTIAL}");
        let r = get("/v1/customers/cus_1/sources?limit=3", &good)
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            get("/v1/customers/cus_1", "Bearer x")
                .await
                .unwrap()
                .status(),
            401
        );
        assert_eq!(get("/v1/customers/", &good).await.unwrap().status(), 404);
        let calls = mock.calls();
        assert_eq!(calls[0].path, "/v1/customers/cus_1/sources");
        assert_eq!(calls[0].query.as_deref(), Some("limit=3"));
    }

    #[tokio::test]
    async fn chat_completions_report_predictable_usage() {
        let mock = MockVendor::start(CREDENTIAL).await;
        let good = format!("Bearer {CREDENTIAL}");
        let path = "/v1/chat/completions";
        let ct = "application/json";
        let req = json!({"model": "gpt-4o", "messages": [], "max_tokens": 100});
        let (s, body) = post(&mock, path, &good, ct, &req.to_string()).await;
        assert_eq!(s, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(chat_usage(&req), (CHAT_PROMPT_TOKENS, 100));
        assert_eq!(v["usage"]["prompt_tokens"], CHAT_PROMPT_TOKENS);
        assert_eq!(v["usage"]["completion_tokens"], 100);
        assert_eq!(v["usage"]["total_tokens"], CHAT_PROMPT_TOKENS + 100);

        let stream = json!({"model": "gpt-4o", "messages": [], "stream": true,
                            "stream_options": {"include_usage": true}});
        let (s, body) = post(&mock, path, &good, ct, &stream.to_string()).await;
        assert_eq!(s, 200);
        let usage = chat_usage(&stream);
        assert_eq!(usage, (CHAT_PROMPT_TOKENS, CHAT_COMPLETION_TOKENS));
        assert_eq!(body, chat_stream_body("gpt-4o", true, usage));
        let events = chat_stream_events("gpt-4o", true, usage);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(last["usage"]["completion_tokens"], CHAT_COMPLETION_TOKENS);
        assert!(body.ends_with("data: [DONE]\n\n"));

        let no_usage = chat_stream_body("gpt-4o", false, usage);
        assert!(!no_usage.contains("usage"));
        assert_eq!(
            post(&mock, path, "Bearer nope", ct, &req.to_string())
                .await
                .0,
            401
        );
    }
}
