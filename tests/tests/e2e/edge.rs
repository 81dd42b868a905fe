//! The proxy's edge against hostile raw bytes: request targets that try to
//! leave the vendor, ambiguous body framing, oversized heads and bodies,
//! slow clients (heads and bodies), too many connections, requests without
//! a credential crowding out keyed ones, hop-by-hop headers, redirects,
//! and the same checks over HTTP/2. Every HTTP/1 request here is written
//! byte for byte over a `TcpStream`, so no client library tidies it first;
//! HTTP/2 requests go through hyper's client connection (which sends the
//! URI and headers it is given) or as raw frames. Included from `e2e.rs`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keycap_tests::harness::{
    raw_http, wait_until, within, ControlOpts, HttpVersion, ProxyOpts, Stack,
};
use keycap_tests::mock::{MockVendor, Scripted};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{stack_with_stripe, stripe_key_body, STRIPE_CREDENTIAL};

/// How long a response the proxy owes may take to arrive.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener standing for "another host": it accepts and records whatever
/// reaches it, and never answers.
struct OtherHost {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OtherHost {
    async fn start() -> OtherHost {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (c, r) = (connections.clone(), received.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        r.lock().expect("lock").extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        OtherHost {
            addr,
            connections,
            received,
            task,
        }
    }

    #[track_caller]
    fn assert_untouched(&self) {
        assert_eq!(
            self.connections.load(Ordering::SeqCst),
            0,
            "another host was contacted; it received {:?}",
            String::from_utf8_lossy(&self.received.lock().expect("lock"))
        );
    }
}

impl Drop for OtherHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response: status, headers (names lowercased) and body.
type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// A client connection that reads one response at a time, keeping what
/// arrived beyond it for the next.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    /// The next response, or `None` if the connection closed first.
    async fn response(&mut self) -> Option<Answer> {
        read_response(&mut self.s, &mut self.buf).await
    }

    /// The next response within `ANSWER_TIMEOUT`, which must come.
    async fn answer(&mut self, what: &str) -> Answer {
        tokio::time::timeout(ANSWER_TIMEOUT, self.response())
            .await
            .unwrap_or_else(|_| panic!("no answer: {what}"))
            .unwrap_or_else(|| panic!("closed without an answer: {what}"))
    }
}

/// One response read off a connection that stays open: the head, then a
/// body of the length it announces; bytes after it stay in `buf`. `None`
/// if the connection closed first.
async fn read_response(s: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> Option<Answer> {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some((status, headers, body))
}

/// Whether the peer closes `s` (EOF or reset) before `deadline`; bytes
/// arriving meanwhile are read and dropped.
async fn closed_by_peer(s: &mut (impl AsyncRead + Unpin), deadline: Instant) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .map(|v| keycap_tests::harness::keycap_refusal(&v))
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("<not a JSON error: {:?}>", String::from_utf8_lossy(body)))
}

/// A proxy started with `proxy`, its control plane and a Stripe mock.
async fn stripe_stack_with(proxy: ProxyOpts) -> (Stack, MockVendor) {
    let stack = Stack::start_with_proxy(ControlOpts::sqlite(), proxy).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    (stack, mock)
}

// --- targets ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaping_targets_never_reach_another_host() {
    let (stack, mock) = stack_with_stripe().await;
    let other = OtherHost::start().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["GET /v1/customers/*", "POST /v1/payment_intents"],
            "edge/targets",
        ))
        .await;
    let request = |target: &str, host: &str| {
        format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\
             Connection: close\r\n\r\n",
            key.secret
        )
    };
    let o = other.addr;
    let targets = [
        "/stripe/v1/customers/../../x".to_string(),
        format!("/stripe/v1/customers/../../../{o}/x"),
        "/stripe/v1/customers/%2e%2e/%2e%2e/x".to_string(),
        "/stripe/v1/customers/%2E%2e%2fx".to_string(),
        "/stripe/v1/customers/x%2f..%2f..%2fpayment_intents".to_string(),
        "/stripe/v1/customers/%252f%252e%252e".to_string(),
        "/stripe/v1/customers/x%5c..%5c..%5cy".to_string(),
        "/stripe/v1/customers\\..\\..\\payment_intents".to_string(),
        format!("/stripe@{o}/v1/customers/cus_1"),
        format!("@{o}/v1/customers/cus_1"),
        format!("//{o}/v1/customers/cus_1"),
        format!("http://{o}/stripe/v1/customers/cus_1"),
        format!("http://user@{o}/stripe/v1/customers/cus_1"),
        format!("https://{o}/v1/customers/cus_1"),
        o.to_string(),
        "*".to_string(),
        // A fragment is refused, not dropped before the path is checked.
        "/stripe/v1/customers/cus_1#frag".to_string(),
        "/stripe/v1/customers/cus_1?expand=x#/../../payment_intents".to_string(),
    ];
    for target in &targets {
        let r = raw_http(stack.proxy.addr(), &request(target, "127.0.0.1")).await;
        assert!(
            (400..500).contains(&r.status),
            "{target}: {} {}",
            r.status,
            r.text()
        );
        let body = keycap_tests::harness::keycap_refusal(
            &r.json()
                .unwrap_or_else(|| panic!("{target}: not a JSON error: {:?}", r.text())),
        );
        let code = body["error"].as_str().unwrap_or_default();
        assert!(
            ["invalid_target", "malformed_request"].contains(&code),
            "{target}: {body}"
        );
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{target}: {body}"
        );
        assert!(!r.text().contains(&key.secret));
    }
    assert!(
        mock.calls().is_empty(),
        "escaping targets reached the vendor: {:?}",
        mock.calls()
            .iter()
            .map(|c| format!("{} {}", c.method, c.path))
            .collect::<Vec<_>>()
    );

    // A Host header naming another host changes nothing: the call goes to
    // the vendor's base URL, which the vendor sees as its own host.
    for host in [o.to_string(), format!("user@{o}"), "evil.example".into()] {
        let r = raw_http(
            stack.proxy.addr(),
            &request("/stripe/v1/customers/cus_1", &host),
        )
        .await;
        assert_eq!(r.status, 200, "Host {host}: {}", r.text());
    }
    let calls = mock.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    for c in &calls {
        assert_eq!(c.path, "/v1/customers/cus_1");
        assert_eq!(c.header("host"), Some(mock.addr().to_string().as_str()));
    }
    other.assert_untouched();
}

// --- framing ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_body_framing_is_refused_and_the_connection_closed() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["GET /v1/customers/*", "POST /v1/payment_intents"],
            "edge/framing",
        ))
        .await;
    let body = "amount=100&currency=usd";
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let head = |framing: &str| {
        // No `Connection: close`: the proxy must close on its own.
        format!(
            "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             {framing}\r\n",
            key.secret
        )
    };
    let cases = [
        format!(
            "{}{chunked}",
            head("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n")
        ),
        format!(
            "{}{chunked}",
            head("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n")
        ),
        format!(
            "{}{body}",
            head(&format!(
                "Content-Length: {0}\r\nContent-Length: {0}\r\n",
                body.len()
            ))
        ),
        format!(
            "{}{body}",
            head(&format!(
                "Content-Length: {}\r\nContent-Length: 4\r\n",
                body.len()
            ))
        ),
        format!(
            "{}{body}",
            head(&format!("Content-Length: {0}, {0}\r\n", body.len()))
        ),
        format!("{}{chunked}", head("Transfer-Encoding: gzip, chunked\r\n")),
    ];
    for request in &cases {
        let mut c = Client::connect(stack.proxy.addr()).await;
        c.send(request.as_bytes()).await;
        let (status, headers, resp_body) = c.answer(request).await;
        assert_eq!(status, 400, "{request:?}");
        assert_eq!(
            error_code(&resp_body),
            "invalid_request_framing",
            "{request:?}"
        );
        assert_eq!(header(&headers, "connection"), Some("close"));
        assert!(
            closed_by_peer(&mut c.s, within(ANSWER_TIMEOUT)).await,
            "the connection stayed open after {request:?}"
        );
    }

    // Behind a request that is fine, on the same connection: the first is
    // answered, then the refusal, then the connection ends.
    let good = format!(
        "GET /stripe/v1/customers/cus_1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {}\r\n\r\n",
        key.secret
    );
    let mut c = Client::connect(stack.proxy.addr()).await;
    c.send(format!("{good}{}", cases[0]).as_bytes()).await;
    let first = c.answer("the good request before a refused one").await;
    assert_eq!(first.0, 200, "{:?}", String::from_utf8_lossy(&first.2));
    let second = c.answer("the refused request after a good one").await;
    assert_eq!(second.0, 400);
    assert_eq!(error_code(&second.2), "invalid_request_framing");
    assert!(closed_by_peer(&mut c.s, within(ANSWER_TIMEOUT)).await);

    let calls = mock.calls();
    assert_eq!(
        calls.len(),
        1,
        "a refused request reached the vendor: {calls:?}"
    );
    assert_eq!(calls[0].path, "/v1/customers/cus_1");
    assert_eq!(mock.forwarded_stripe_amount(), 0);
}

// --- sizes --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_declared_bodies_are_refused_early() {
    let (stack, mock) =
        stripe_stack_with(ProxyOpts::new("edge-sizes").flag("max-body-bytes", 1000)).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "edge/sizes",
        ))
        .await;
    let head = |extra: &str| {
        format!(
            "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             {extra}\r\n",
            key.secret
        )
    };

    // One huge header, and too many small ones.
    let huge = head(&format!(
        "X-Padding: {}\r\nContent-Length: 0\r\n",
        "a".repeat(70_000)
    ));
    let many: String = (0..120).map(|i| format!("X-Pad-{i}: v\r\n")).collect();
    for request in [huge, head(&format!("{many}Content-Length: 0\r\n"))] {
        let r = raw_http(stack.proxy.addr(), &request).await;
        assert_eq!(r.status, 431, "{}", r.text());
        assert_eq!(error_code(&r.body), "headers_too_large");
        assert!(!r.text().contains(&key.secret));
    }

    // A body announced above --max-body-bytes is refused from the head
    // alone: the body is never sent, and the answer comes anyway.
    let mut c = Client::connect(stack.proxy.addr()).await;
    c.send(head("Content-Length: 5000\r\n").as_bytes()).await;
    let (status, _, body) = c.answer("a head announcing too large a body").await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    assert_eq!(error_code(&body), "body_too_large");

    // Within both limits the same call goes through.
    let form = "amount=100&currency=usd";
    let r = raw_http(
        stack.proxy.addr(),
        &format!(
            "{}{form}",
            head(&format!(
                "X-Padding: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
                "a".repeat(8_000),
                form.len()
            ))
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.calls().len(), 1, "{:?}", mock.calls());
}

// --- slow and many clients ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_at_the_header_read_timeout() {
    let stack = Stack::start_with_proxy(
        ControlOpts::sqlite(),
        ProxyOpts::new("edge-slow").flag("header-read-timeout-secs", 1),
    )
    .await;

    // Slowloris: a head that never ends, a header line at a time.
    let mut s = TcpStream::connect(stack.proxy.addr())
        .await
        .expect("connect");
    let started = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .expect("write");
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr
                .write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let closed = async {
        let mut chunk = [0u8; 1024];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(8), closed)
        .await
        .expect("a slow head kept its connection past the header read timeout");
    let took = started.elapsed();
    trickle.abort();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");

    // A client that connects and says nothing is dropped too.
    let mut idle = TcpStream::connect(stack.proxy.addr())
        .await
        .expect("connect");
    assert!(
        closed_by_peer(&mut idle, within(Duration::from_secs(8))).await,
        "a silent connection was kept open"
    );

    // A prompt client is still served.
    let r = raw_http(
        stack.proxy.addr(),
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() {
    let stack = Stack::start_with_proxy(
        ControlOpts::sqlite(),
        ProxyOpts::new("edge-conns").flag("max-connections", 2),
    )
    .await;
    let health = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    // Served: two keep-alive connections, each answered and left open.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(stack.proxy.addr()).await;
        c.send(health).await;
        let (status, _, _) = c.answer("a connection within the cap").await;
        assert_eq!(status, 200);
        open.push(c);
    }
    // The third is accepted by the kernel but not read while both are open.
    let mut third = Client::connect(stack.proxy.addr()).await;
    third.send(health).await;
    let early = tokio::time::timeout(Duration::from_millis(700), third.response()).await;
    assert!(
        early.is_err(),
        "a connection past the cap was served: {early:?}"
    );
    // The open ones still work.
    open[0].send(health).await;
    assert_eq!(
        open[0].answer("an open connection within the cap").await.0,
        200
    );
    // One closes: the waiting one is served.
    drop(open.remove(0));
    let (status, _, _) = third
        .answer("the waiting connection, after one closed")
        .await;
    assert_eq!(status, 200);
}

// --- hop-by-hop headers ---------------------------------------------------------------

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-hop-named",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["GET /v1/customers/*", "POST /v1/payment_intents"],
            "edge/hops",
        ))
        .await;

    // Agent to vendor: every hop-by-hop header, and one named by Connection.
    let body = "amount=100&currency=usd&confirm=true";
    let request = format!(
        "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Connection: close, X-Hop-Named\r\nX-Hop-Named: secret-route\r\n\
         Keep-Alive: timeout=300\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\
         TE: trailers\r\nTrailer: X-Checksum\r\nUpgrade: websocket\r\n\
         X-End-To-End: kept\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\n\r\n",
        key.secret,
        body.len()
    );
    let r = raw_http(stack.proxy.addr(), &request).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    let seen = &calls[0];
    for h in HOP_BY_HOP {
        assert!(
            seen.header(h).is_none(),
            "the vendor received {h}: {:?}",
            seen.header(h)
        );
    }
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    assert_eq!(seen.body_text(), body);

    // Vendor to agent.
    mock.script(
        "/v1/customers/hops",
        Scripted {
            status: 200,
            headers: [
                ("connection", "x-hop-named"),
                ("x-hop-named", "internal"),
                ("keep-alive", "timeout=5"),
                ("proxy-authenticate", "Basic realm=\"upstream\""),
                ("trailer", "x-checksum"),
                ("upgrade", "h2c"),
                ("x-end-to-end", "kept"),
                ("content-type", "application/json"),
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .to_vec(),
            body: r#"{"id":"hops"}"#.into(),
        },
    );
    let r = raw_http(
        stack.proxy.addr(),
        &format!(
            "GET /stripe/v1/customers/hops HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
            key.secret
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), Some(json!({"id": "hops"})));
    let got = |n: &str| {
        r.headers
            .iter()
            .filter(|(h, _)| h == n)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    for h in [
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "upgrade",
        "x-hop-named",
    ] {
        assert!(got(h).is_empty(), "the agent received {h}: {:?}", got(h));
    }
    // The agent's own connection is the proxy's to describe (it asked to
    // close); nothing of the vendor's survives in it.
    assert!(
        got("connection")
            .iter()
            .all(|v| v.eq_ignore_ascii_case("close")),
        "{:?}",
        got("connection")
    );
    assert_eq!(got("x-end-to-end"), ["kept"]);
}

// --- redirects ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_returned_never_followed_and_release_the_reservation() {
    let (stack, mock) = stack_with_stripe().await;
    let other = OtherHost::start().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "edge/redirect",
        ))
        .await;
    let location = format!("http://{}/v1/payment_intents", other.addr);
    mock.script(
        "/v1/payment_intents",
        Scripted {
            status: 302,
            headers: vec![("location".into(), location.clone())],
            body: String::new(),
        },
    );
    let form = "amount=700&currency=usd&confirm=true";
    let r = raw_http(
        stack.proxy.addr(),
        &format!(
            "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
            key.secret,
            form.len()
        ),
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(
        r.headers
            .iter()
            .find(|(n, _)| n == "location")
            .map(|(_, v)| v.as_str()),
        Some(location.as_str())
    );
    assert_eq!(mock.calls().len(), 1);

    // No vendor bills a redirect: the $7 reservation is released.
    let entry = stack
        .wait_audit(&format!("key_id={}", key.id), 1)
        .await
        .remove(0);
    assert_eq!(entry["outcome"], "released", "{entry}");
    assert_eq!(entry["cost_micros"], 0, "{entry}");
    assert_eq!(entry["upstream_status"], 302, "{entry}");
    stack.wait_key_spend(&key.id, 0, 1).await;
    other.assert_untouched();
}

// --- slow bodies, and requests without a credential ------------------------------------

/// The head of a form POST for a Stripe payment intent with `key`,
/// announcing a body of `len` bytes.
fn payment_intent_head(key: &str, len: usize) -> String {
    format!(
        "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {len}\r\n\r\n"
    )
}

/// The head of a chunked `POST /vault/keys`, with `authorization` if any.
fn relay_mint_head(authorization: Option<&str>) -> String {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /vault/keys HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
}

/// Sends `head`, then `body` in `pieces` pieces `gap` apart (the pace is
/// what is under test), and returns the answer and whether the proxy then
/// closed the connection. The sending stops once the proxy has answered.
async fn send_paced(
    addr: SocketAddr,
    head: &str,
    body: &[u8],
    pieces: usize,
    gap: Duration,
) -> (Answer, bool) {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(head.as_bytes()).await.expect("write head");
    let body = body.to_vec();
    let writer = tokio::spawn(async move {
        for piece in body.chunks(body.len().div_ceil(pieces).max(1)) {
            tokio::time::sleep(gap).await;
            if wr.write_all(piece).await.is_err() {
                return;
            }
        }
        // Keep the connection open: only the proxy may end it.
        std::future::pending::<()>().await;
    });
    let mut buf = Vec::new();
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, read_response(&mut rd, &mut buf))
        .await
        .unwrap_or_else(|_| panic!("no answer to {head:?} sent in {pieces} pieces"))
        .unwrap_or_else(|| panic!("closed without an answer: {head:?}"));
    let closed = closed_by_peer(&mut rd, within(ANSWER_TIMEOUT)).await;
    writer.abort();
    (answer, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_bodies_are_cut_and_nothing_is_forwarded() {
    let (stack, mock) = stripe_stack_with(
        ProxyOpts::new("edge-slow-body")
            .flag("body-read-timeout-secs", 4)
            .flag("body-rate-grace-secs", 2)
            .flag("body-min-bytes-per-sec", 100),
    )
    .await;
    let key = stack
        .mint(&stripe_key_body(
            json!(5),
            &["POST /v1/payment_intents"],
            "edge/slow-body",
        ))
        .await;
    let addr = stack.proxy.addr();
    // A whole day's cap: if a refused call held a reservation, the last
    // call below could not be made.
    let form = "amount=500&currency=usd&confirm=true";
    let head = payment_intent_head(&key.secret, form.len());
    let admin = format!("Bearer {}", stack.control.opts.admin_token);
    let padded = format!("{form}&metadata[pad]={}", "x".repeat(3000));
    let cases: Vec<(&str, String, Vec<u8>, usize, Duration)> = vec![
        (
            "a vendor call trickling a byte every 300 ms",
            head.clone(),
            form.as_bytes().to_vec(),
            form.len(),
            Duration::from_millis(300),
        ),
        (
            "a vendor call well above the minimum rate that never ends in time",
            payment_intent_head(&key.secret, padded.len()),
            padded.into_bytes(),
            12,
            Duration::from_millis(500),
        ),
        (
            "a relayed call with an admin token trickling its body",
            relay_mint_head(Some(&admin)),
            b"1\r\n{\r\n".repeat(40),
            40,
            Duration::from_millis(300),
        ),
        (
            "a relayed call without a token sending no body",
            relay_mint_head(None),
            Vec::new(),
            1,
            Duration::ZERO,
        ),
    ];
    for (what, head, body, pieces, gap) in &cases {
        let started = Instant::now();
        let ((status, headers, resp_body), closed) =
            send_paced(addr, head, body, *pieces, *gap).await;
        let took = started.elapsed();
        assert_eq!(
            status,
            408,
            "{what}: {}",
            String::from_utf8_lossy(&resp_body)
        );
        assert_eq!(error_code(&resp_body), "request_body_timeout", "{what}");
        assert_eq!(header(&headers, "connection"), Some("close"), "{what}");
        assert!(closed, "{what}: the connection stayed open");
        // Never before the grace: the minimum rate is an average.
        assert!(took >= Duration::from_secs(2), "{what}: cut after {took:?}");
        assert!(!String::from_utf8_lossy(&resp_body).contains(&key.secret));
    }
    assert!(
        mock.calls().is_empty(),
        "a slow body reached the vendor: {:?}",
        mock.calls()
    );

    // Over HTTP/2 the same: a stream whose body stops is answered 408.
    let mut h2 = h2_connect(addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    tx.send(Ok(Frame::data(Bytes::from_static(b"amount=500"))))
        .await
        .expect("queue a piece");
    let stalled = hyper::Request::post(format!("http://{addr}/stripe/v1/payment_intents"))
        .header("authorization", format!("Bearer {}", key.secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-length", form.len())
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed())
        .expect("request");
    let (status, body) = tokio::time::timeout(ANSWER_TIMEOUT, h2_send(&mut h2, stalled))
        .await
        .expect("an HTTP/2 stream with a stalled body was not answered")
        .expect("answered, not reset");
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    assert_eq!(error_code(&body), "request_body_timeout");
    drop(tx);
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
    assert_eq!(stack.key(&key.id).await["spent_today_micros"], 0);

    // A body sent in pieces within the pace is read whole and the call
    // goes through, for the whole cap: nothing was left reserved.
    let ((status, _, resp_body), _) =
        send_paced(addr, &head, form.as_bytes(), 2, Duration::from_millis(200)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp_body));
    assert_eq!(mock.forwarded_stripe_amount(), 500);
    stack.wait_key_spend(&key.id, 5_000_000, 1).await;
    assert_eq!(
        stack
            .wait_audit(&format!("key_id={}", key.id), 1)
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_without_a_credential_leave_keyed_calls_served() {
    let (stack, mock) = stripe_stack_with(
        ProxyOpts::new("edge-share")
            .flag("max-connections", 20)
            // Long enough that the bodies below are never cut during the
            // test: only the share can make room.
            .flag("body-read-timeout-secs", 300)
            .flag("body-rate-grace-secs", 300),
    )
    .await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "edge/share",
        ))
        .await;
    let addr = stack.proxy.addr();

    // Twenty connections each send the head of a chunked POST /vault/keys
    // without a token, then nothing. Each records the answer it gets.
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let mut attackers = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(addr).await;
        c.send(relay_mint_head(None).as_bytes()).await;
        let answers = answers.clone();
        attackers.push(tokio::spawn(async move {
            if let Some(a) = c.response().await {
                answers.lock().expect("lock").push(a);
            }
            // Hold the connection until the test ends.
            std::future::pending::<()>().await;
        }));
    }

    // An agent with a key connects after all of them and is served.
    let started = Instant::now();
    let served = tokio::time::timeout(
        Duration::from_secs(10),
        stack.agent(&key.secret).post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        ),
    )
    .await;
    let took = started.elapsed();
    let r = served.expect("a keyed call waited behind slow bodies without a credential");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(mock.forwarded_stripe_amount(), 100);
    eprintln!("keyed call served in {took:?} beside 20 slow bodies without a credential");

    // A quarter of the connections (5 of 20) still hold their bodies; the
    // rest were refused at once, and their connections closed.
    assert!(
        wait_until(within(ANSWER_TIMEOUT), || async {
            answers.lock().expect("lock").len() >= 15
        })
        .await,
        "only {} were refused",
        answers.lock().expect("lock").len()
    );
    let answered = answers.lock().expect("lock").clone();
    assert_eq!(answered.len(), 15, "{answered:?}");
    for (status, headers, body) in &answered {
        assert_eq!(*status, 503, "{}", String::from_utf8_lossy(body));
        assert_eq!(error_code(body), "unauthenticated_busy");
        assert_eq!(header(headers, "retry-after"), Some("1"));
        assert_eq!(header(headers, "connection"), Some("close"));
    }
    assert!(
        attackers.iter().all(|a| !a.is_finished()),
        "an attacker's connection task ended"
    );
    // An admin token's shape is enough to be read beside them.
    let vendors = stack.admin_via_proxy().get("/vault/vendors").await;
    assert_eq!(vendors.status, 200, "{}", vendors.text);
    for a in attackers {
        a.abort();
    }
}

// --- HTTP/2 -----------------------------------------------------------------------------

type H2Sender = hyper::client::conn::http2::SendRequest<BoxBody<Bytes, std::convert::Infallible>>;

/// An HTTP/2 connection with prior knowledge, through hyper's client
/// connection: it sends the URI and headers it is given, so `:authority`
/// is whatever the URI names, not where the connection goes.
async fn h2_connect(addr: SocketAddr) -> H2Sender {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

/// Sends `req` on `h2`: its status and body, or the error when the stream
/// was reset without an answer.
async fn h2_send(
    h2: &mut H2Sender,
    req: hyper::Request<BoxBody<Bytes, std::convert::Infallible>>,
) -> Result<(u16, Vec<u8>), String> {
    h2.ready().await.map_err(|e| e.to_string())?;
    let resp = h2.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body.to_vec()))
}

fn full(body: impl Into<Bytes>) -> BoxBody<Bytes, std::convert::Infallible> {
    Full::new(body.into()).boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_get_the_checks_http1_heads_get() {
    let (stack, mock) =
        stripe_stack_with(ProxyOpts::new("edge-h2").flag("max-body-bytes", 1000)).await;
    let other = OtherHost::start().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["GET /v1/customers/*", "POST /v1/payment_intents"],
            "edge/h2",
        ))
        .await;
    let addr = stack.proxy.addr();
    let o = other.addr;
    let auth = format!("Bearer {}", key.secret);
    let mut h2 = h2_connect(addr).await;
    let get = |uri: String| {
        hyper::Request::get(uri)
            .header("authorization", &auth)
            .body(full(Bytes::new()))
            .expect("request")
    };
    let form = "amount=100&currency=usd&confirm=true";
    let post = |extra: &[(&str, String)], body: String| {
        let mut req = hyper::Request::post(format!("http://{addr}/stripe/v1/payment_intents"))
            .header("authorization", &auth)
            .header("content-type", "application/x-www-form-urlencoded");
        for (n, v) in extra {
            req = req.header(*n, v);
        }
        req.body(full(body)).expect("request")
    };

    // `:authority` naming another host changes nothing: the call goes to
    // the vendor's base URL.
    let (status, body) = h2_send(
        &mut h2,
        get(format!("http://{o}/stripe/v1/customers/cus_1")),
    )
    .await
    .expect("answered");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let calls = mock.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].path, "/v1/customers/cus_1");
    assert_eq!(
        calls[0].header("host"),
        Some(mock.addr().to_string().as_str())
    );
    mock.reset();

    let many: Vec<(&str, String)> = (0..120).map(|_| ("x-pad", "v".to_string())).collect();
    let refused: Vec<(&str, hyper::Request<_>, u16, &str)> = vec![
        (
            "userinfo in :authority",
            get(format!("http://user@{o}/stripe/v1/customers/cus_1")),
            400,
            "invalid_target",
        ),
        (
            "CONNECT (no :path)",
            hyper::Request::connect(o.to_string())
                .header("authorization", &auth)
                .body(full(Bytes::new()))
                .expect("request"),
            400,
            "invalid_target",
        ),
        (
            "an encoded dot segment in :path",
            get(format!("http://{addr}/stripe/v1/customers/%2e%2e/x")),
            400,
            "invalid_target",
        ),
        (
            "Content-Length twice, equal",
            post(
                &[
                    ("content-length", form.len().to_string()),
                    ("content-length", form.len().to_string()),
                ],
                form.to_string(),
            ),
            400,
            "invalid_request_framing",
        ),
        (
            "more than 100 header fields",
            post(&many, form.to_string()),
            431,
            "headers_too_large",
        ),
        (
            "headers over 64 KiB",
            post(&[("x-pad", "a".repeat(70_000))], form.to_string()),
            431,
            "headers_too_large",
        ),
        (
            "a declared body over --max-body-bytes",
            post(&[("content-length", "5000".into())], "a".repeat(5000)),
            413,
            "body_too_large",
        ),
    ];
    for (what, req, want_status, want_code) in refused {
        let (status, body) = h2_send(&mut h2, req)
            .await
            .unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        assert_eq!(
            status,
            want_status,
            "{what}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(error_code(&body), want_code, "{what}");
        assert!(!String::from_utf8_lossy(&body).contains(&key.secret));
    }

    // A Content-Length the DATA does not match: the h2 library resets the
    // stream (or the proxy refuses the unreadable body); nothing leaves.
    let short = post(&[("content-length", "50".into())], form.to_string());
    if let Ok((status, body)) = h2_send(&mut h2, short).await {
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
        assert_eq!(error_code(&body), "invalid_request_body");
    }

    // The connection survived every refusal: HTTP/2 framing leaves nothing
    // ambiguous, so only the stream ends.
    let (status, body) = h2_send(&mut h2, post(&[], form.to_string()))
        .await
        .expect("answered");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        mock.calls().len(),
        1,
        "a refused call left: {:?}",
        mock.calls()
    );
    assert_eq!(mock.forwarded_stripe_amount(), 100);
    other.assert_untouched();
}

/// An HPACK integer with a 7-bit prefix (RFC 7541 5.1), high bit clear.
fn hpack_int(mut n: usize, out: &mut Vec<u8>) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// A raw HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;

/// What became of stream 1 of a raw HTTP/2 connection.
#[derive(Debug, PartialEq)]
enum H2Outcome {
    /// The proxy sent response headers.
    Answered,
    /// The stream was reset with this error code.
    Reset(u32),
    /// The proxy said GOAWAY (with this error code) and closed, or just
    /// closed (`None`).
    Closed(Option<u32>),
}

/// Opens a raw HTTP/2 connection (prior knowledge), sends `frames` after
/// the preface and an empty SETTINGS, and reads the proxy's frames
/// (acknowledging its SETTINGS) until stream 1 is answered or reset, or
/// the connection ends.
async fn h2_raw(addr: SocketAddr, frames: &[Vec<u8>]) -> H2Outcome {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut out = H2_PREFACE.to_vec();
    out.extend(h2_frame(FRAME_SETTINGS, 0, 0, &[]));
    for f in frames {
        out.extend_from_slice(f);
    }
    s.write_all(&out).await.expect("write frames");
    let mut goaway = None;
    let read = async {
        loop {
            let mut head = [0u8; 9];
            if s.read_exact(&mut head).await.is_err() {
                return H2Outcome::Closed(goaway);
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return H2Outcome::Closed(goaway);
            }
            match (kind, stream) {
                (FRAME_SETTINGS, 0) if flags & 0x1 == 0 => {
                    let _ = s.write_all(&h2_frame(FRAME_SETTINGS, 0x1, 0, &[])).await;
                }
                (FRAME_HEADERS, 1) => return H2Outcome::Answered,
                (FRAME_RST_STREAM, 1) => {
                    return H2Outcome::Reset(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]))
                }
                (FRAME_GOAWAY, 0) => {
                    goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]))
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("the proxy neither answered, reset nor closed"))
}

/// A HEADERS frame for stream 1 carrying `fields` as literal HPACK fields
/// (never indexed, no Huffman coding), ending the headers and the stream.
fn h2_headers(fields: &[(&str, &str)], end_headers: bool) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x10);
        hpack_int(name.len(), &mut block);
        block.extend_from_slice(name.as_bytes());
        hpack_int(value.len(), &mut block);
        block.extend_from_slice(value.as_bytes());
    }
    let flags = 0x1 | if end_headers { 0x4 } else { 0 };
    h2_frame(FRAME_HEADERS, flags, 1, &block)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connection_specific_fields_reset_the_stream_and_reach_nobody() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["GET /v1/customers/*"],
            "edge/h2-raw",
        ))
        .await;
    let auth = format!("Bearer {}", key.secret);
    let request = |extra: (&'static str, &'static str)| {
        let mut fields = vec![
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "127.0.0.1"),
            (":path", "/stripe/v1/customers/cus_1"),
            ("authorization", auth.as_str()),
        ];
        fields.push(extra);
        h2_headers(&fields, true)
    };
    // What HTTP/1.1 frames with these headers HTTP/2 frames itself: the h2
    // library refuses the request (PROTOCOL_ERROR) before keycap sees it.
    for extra in [
        ("transfer-encoding", "chunked"),
        ("te", "gzip"),
        ("connection", "close"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("upgrade", "websocket"),
    ] {
        let outcome = h2_raw(stack.proxy.addr(), &[request(extra)]).await;
        assert_eq!(outcome, H2Outcome::Reset(0x1), "{extra:?}");
    }
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
    // The one TE HTTP/2 allows is served.
    let outcome = h2_raw(stack.proxy.addr(), &[request(("te", "trailers"))]).await;
    assert_eq!(outcome, H2Outcome::Answered);
    assert_eq!(mock.calls().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_http2_connections_are_closed_at_the_header_read_timeout() {
    let stack = Stack::start_with_proxy(
        ControlOpts::sqlite(),
        ProxyOpts::new("edge-h2-idle").flag("header-read-timeout-secs", 1),
    )
    .await;
    let addr = stack.proxy.addr();
    // The preface and nothing more: without a request in flight the
    // connection is told GOAWAY (NO_ERROR) and closed.
    let started = Instant::now();
    assert_eq!(h2_raw(addr, &[]).await, H2Outcome::Closed(Some(0)));
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A head that never ends (no END_HEADERS, no CONTINUATION) is no
    // request either.
    let partial = h2_headers(&[(":method", "GET"), (":scheme", "http")], false);
    assert!(matches!(
        h2_raw(addr, &[partial]).await,
        H2Outcome::Closed(_)
    ));
    // A prompt HTTP/2 client is served.
    let health = stack
        .proxy
        .api(None)
        .speaking(HttpVersion::Http2)
        .get("/healthz")
        .await;
    assert_eq!(health.status, 200, "{}", health.text);
    assert_eq!(health.version, reqwest::Version::HTTP_2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_calls_are_minted_priced_audited_and_refused_like_http1() {
    let (stack, mock) = stack_with_stripe().await;
    // Minted through the proxy's /vault relay, over HTTP/2.
    let key = stack
        .mint_via_proxy(
            HttpVersion::Http2,
            &stripe_key_body(
                json!(5),
                &["POST /v1/payment_intents", "GET /v1/customers/*"],
                "edge/h2-path",
            ),
        )
        .await;
    let (id, secret) = (key.id, key.secret);

    let h2 = stack.agent(&secret).speaking(HttpVersion::Http2);
    let r = h2
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=300&currency=usd&confirm=true",
        )
        .await;
    assert_eq!(r.version, reqwest::Version::HTTP_2);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(mock.forwarded_stripe_amount(), 300);
    let calls = mock.calls();
    assert_eq!(
        calls[0].header("host"),
        Some(mock.addr().to_string().as_str())
    );
    stack.wait_key_spend(&id, 3_000_000, 1).await;
    let entry = stack.wait_audit(&format!("key_id={id}"), 1).await.remove(0);
    assert_eq!(entry["cost_micros"], 3_000_000, "{entry}");
    assert_eq!(entry["outcome"], "settled", "{entry}");

    // Refused the same way over either version.
    let h1 = stack.agent(&secret).speaking(HttpVersion::Http1);
    let stranger = stack
        .agent(&secret)
        .with_authorization(Some("Bearer kc_live_nosuchkey"));
    let cases: Vec<(
        &str,
        keycap_tests::harness::Api,
        reqwest::Method,
        &str,
        u16,
        &str,
    )> = vec![
        (
            "over the daily cap",
            h2.clone(),
            reqwest::Method::POST,
            "/stripe/v1/payment_intents",
            429,
            "daily_cap_exceeded",
        ),
        (
            "an endpoint not allowed",
            h2.clone(),
            reqwest::Method::DELETE,
            "/stripe/v1/customers/cus_1",
            403,
            "endpoint_not_allowed",
        ),
        (
            "an escaping target",
            h2.clone(),
            reqwest::Method::GET,
            "/stripe/v1/customers/x%2f..%2fy",
            400,
            "invalid_target",
        ),
        (
            "an unknown key",
            stranger.speaking(HttpVersion::Http2),
            reqwest::Method::GET,
            "/stripe/v1/customers/cus_1",
            401,
            "invalid_key",
        ),
    ];
    let form = Some((
        "application/x-www-form-urlencoded",
        b"amount=300&currency=usd&confirm=true".to_vec(),
    ));
    for (what, api, method, path, status, code) in cases {
        let body = (method == reqwest::Method::POST)
            .then(|| form.clone())
            .flatten();
        let over_h2 = api.send(method.clone(), path, body.clone(), &[]).await;
        assert_eq!(over_h2.version, reqwest::Version::HTTP_2, "{what}");
        over_h2.expect_error(status, code);
        let h1_api = if code == "invalid_key" {
            &stranger
        } else {
            &h1
        };
        let over_h1 = h1_api.send(method, path, body, &[]).await;
        assert_eq!(over_h1.version, reqwest::Version::HTTP_11, "{what}");
        over_h1.expect_error(status, code);
    }
    assert_eq!(mock.calls().len(), 1, "{:?}", mock.calls());
}
