//! The proxy's edge against hostile raw bytes: request targets that try to
//! leave the vendor, ambiguous body framing, oversized heads and bodies,
//! slow clients, too many connections, hop-by-hop headers and redirects.
//! Every request here is written byte for byte over a `TcpStream`, so no
//! client library tidies it first. Included from `e2e.rs`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keycap_tests::harness::{raw_http, within, ControlOpts, ProxyOpts, Stack};
use keycap_tests::mock::{MockVendor, Scripted};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Answer> {
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
async fn closed_by_peer(s: &mut TcpStream, deadline: Instant) -> bool {
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
        let body = r
            .json()
            .unwrap_or_else(|| panic!("{target}: not a JSON error: {:?}", r.text()));
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
