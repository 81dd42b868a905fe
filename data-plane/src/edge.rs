//! The proxy's first look at an agent's connection, before hyper parses it.
//!
//! Owns the raw HTTP/1 request heads: every head is read here in full and
//! checked before hyper sees a byte of it, so a request whose framing two
//! parsers could read differently never reaches the request path. Refused:
//! `Content-Length` together with `Transfer-Encoding` (hyper would quietly
//! drop the length), more than one `Content-Length` (even equal ones), a
//! length that is not plain digits, any transfer coding but a single
//! `chunked`, a head larger than `MAX_HEAD_BYTES` or with more than
//! `MAX_HEADERS` fields, and a head hyper's own parser would not accept.
//! A refused connection gets a JSON error with `Connection: close` after
//! every response already owed on it, and is then closed: nothing after the
//! refused head is read. It also bounds how long a client may take to send
//! its first head (`header_read_timeout`); hyper bounds the later ones.
//!
//! It must never change an accepted byte: what passes is what hyper parses.
//! HTTP/2 (prior knowledge, or `h2` chosen by ALPN over TLS) has no such
//! framing ambiguity and is passed through unchecked after its preface;
//! its requests get the checks that still mean something there from
//! `check_h2_head`, once the h2 library has decoded them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Largest request head accepted, request line and headers included. The
/// same as hyper's read buffer, so hyper never refuses a head this allowed.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most header fields in one head (hyper's own limit).
pub const MAX_HEADERS: usize = 100;

/// Longest chunk-size line (size and extensions) or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// Largest HTTP/2 header list the h2 library decodes (counted its way: 32
/// bytes more per field); above it the library answers a bare 431 itself
/// and resets the stream. Twice `MAX_HEAD_BYTES`, so a head that is too
/// large by keycap's measure still reaches `check_h2_head` and is refused
/// with the same JSON as on HTTP/1.1.
pub const H2_MAX_HEADER_LIST: u32 = 2 * MAX_HEAD_BYTES as u32;

/// Why a request head was refused: status, stable code and a message safe
/// to show the client (it never echoes the head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadRefusal {
    /// Both `Content-Length` and `Transfer-Encoding`.
    LengthAndChunked,
    /// `Content-Length` more than once.
    DuplicateLength,
    /// A `Content-Length` that is not plain decimal digits.
    InvalidLength,
    /// A transfer coding other than one `chunked`, or chunked on HTTP/1.0.
    UnsupportedTransferEncoding,
    /// Over `MAX_HEAD_BYTES` or `MAX_HEADERS`.
    TooLarge,
    /// Not a request head HTTP/1.1 parsers agree on.
    Malformed,
    /// A request-target that is not a URI at all, or carries a fragment
    /// (`#`), which the URI parser behind hyper would silently drop
    /// (`target::normalize` judges the rest).
    InvalidTarget,
}

impl HeadRefusal {
    pub fn status(self) -> u16 {
        match self {
            HeadRefusal::TooLarge => 431,
            _ => 400,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            HeadRefusal::TooLarge => "headers_too_large",
            HeadRefusal::Malformed => "malformed_request",
            HeadRefusal::InvalidTarget => "invalid_target",
            _ => "invalid_request_framing",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            HeadRefusal::LengthAndChunked => {
                "a request may not carry both Content-Length and Transfer-Encoding"
            }
            HeadRefusal::DuplicateLength => "a request may carry Content-Length only once",
            HeadRefusal::InvalidLength => "Content-Length must be a decimal number of bytes",
            HeadRefusal::UnsupportedTransferEncoding => {
                "the only Transfer-Encoding accepted is a single 'chunked' (HTTP/1.1)"
            }
            HeadRefusal::TooLarge => "the request headers are too large",
            HeadRefusal::Malformed => "the request head is not valid HTTP/1.1",
            HeadRefusal::InvalidTarget => {
                "the request target is not a valid URI without a fragment (#)"
            }
        }
    }

    /// The JSON error sent for this refusal. No key has been read yet, so
    /// it is worded in the pre-authentication envelope
    /// (`envelope::before_authentication`). On HTTP/1 it closes the
    /// connection; on HTTP/2 only the request's stream ends (HTTP/2 has no
    /// `Connection` header, and its framing leaves nothing ambiguous).
    pub fn into_response(self, version: http::Version) -> http::Response<crate::body::ProxyBody> {
        let status =
            http::StatusCode::from_u16(self.status()).unwrap_or(http::StatusCode::BAD_REQUEST);
        let wire = crate::envelope::before_authentication(&crate::envelope::Refused {
            status,
            code: self.code(),
            message: self.message(),
            fields: &serde_json::Map::new(),
            retry_is_futile: false,
        });
        let mut resp = http::Response::new(crate::body::bytes(bytes::Bytes::from(
            wire.body.to_string(),
        )));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if version < http::Version::HTTP_2 {
            h.insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}

/// The HTTP/1 head checks that still mean something for an HTTP/2 request,
/// applied to the head the h2 library decoded. The library itself resets
/// the stream (`PROTOCOL_ERROR`, no HTTP answer, nothing reaches keycap)
/// for a connection-specific field (`Connection`, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`), a `TE` other than
/// `trailers`, a `Content-Length` that is not digits or differs from
/// another one or from the DATA it frames, and a header list over
/// `H2_MAX_HEADER_LIST`. Refused here: `Content-Length` more than once
/// (even equal), more than `MAX_HEADERS` fields, and a head larger than
/// `MAX_HEAD_BYTES` when written as HTTP/1.1 (`:authority` as `Host`).
/// Where the request may go is judged with HTTP/1's targets, on `:path`.
pub fn check_h2_head<B>(req: &http::Request<B>) -> Option<HeadRefusal> {
    let headers = req.headers();
    let line = req.method().as_str().len()
        + 1
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + b" HTTP/1.1\r\n".len();
    let host = req
        .uri()
        .authority()
        .map_or(0, |a| b"host: \r\n".len() + a.as_str().len());
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + b": \r\n".len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || line + host + fields + 2 > MAX_HEAD_BYTES {
        return Some(HeadRefusal::TooLarge);
    }
    if headers.get_all(http::header::CONTENT_LENGTH).iter().count() > 1 {
        return Some(HeadRefusal::DuplicateLength);
    }
    None
}

/// A head hyper is given in place of a refused one, so that the refusal is
/// answered in turn, after every response already owed on the connection.
/// The service recognises it by its position (`ConnEdge::refusal_for_next`),
/// never by its bytes, so a client sending the same bytes gains nothing.
const STAND_IN_HEAD: &[u8] = b"GET / HTTP/1.1\r\nhost: keycap\r\nconnection: close\r\n\r\n";

/// What a connection's reader and its request service share: which request
/// (by position) stands in for a refused head.
#[derive(Debug, Default)]
pub struct ConnEdge {
    refused: std::sync::Mutex<Option<(u64, HeadRefusal)>>,
    requests: std::sync::atomic::AtomicU64,
}

impl ConnEdge {
    /// Called once per request, in order: the refusal to answer it with,
    /// when it is the stand-in for a refused head.
    pub fn refusal_for_next(&self) -> Option<HeadRefusal> {
        let n = self
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match *self.refused.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((at, r)) if at == n => Some(r),
            _ => None,
        }
    }

    fn refuse(&self, at: u64, r: HeadRefusal) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some((at, r));
    }
}

/// Where the reader is in the stream of requests.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Inside a body of known length: bytes still to come.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// HTTP/2, or a chunked body this reader could not follow (hyper then
    /// fails the body and closes the connection): no more checks.
    Passthrough,
    /// A head was refused: nothing more is accepted.
    Refused(HeadRefusal),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Inside chunk data: bytes still to come.
    Data(u64),
    /// The CRLF after chunk data: bytes of it still to come.
    DataEnd(u8),
    /// Reading trailer lines after the last chunk.
    Trailer,
}

/// Splits the bytes a client sends into request heads (each checked whole)
/// and bodies (passed as they come), following HTTP/1.1 framing. Sync and
/// IO-free, so it can be fuzzed and tested byte by byte.
#[derive(Debug)]
pub struct RequestFraming {
    state: State,
    /// A head or chunk line not yet complete.
    pending: Vec<u8>,
    heads: u64,
}

impl Default for RequestFraming {
    fn default() -> Self {
        RequestFraming::new()
    }
}

impl RequestFraming {
    pub fn new() -> RequestFraming {
        RequestFraming {
            state: State::Head,
            pending: Vec::new(),
            heads: 0,
        }
    }

    /// Feeds bytes read from the client; appends to `out` every byte that
    /// may go on to hyper. Bytes of an incomplete head are held back until
    /// the head is whole. Returns the refusal once a head has been refused
    /// (then nothing more is ever passed).
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Option<HeadRefusal> {
        while !data.is_empty() {
            match &mut self.state {
                State::Refused(r) => return Some(*r),
                State::Passthrough => {
                    out.extend_from_slice(data);
                    return None;
                }
                State::Body(left) => {
                    let take = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&data[..take]);
                    *left -= take as u64;
                    data = &data[take..];
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::Chunked(_) => {
                    let used = self.chunked(data);
                    out.extend_from_slice(&data[..used]);
                    data = &data[used..];
                }
                State::Head => {
                    let used = self.head(data, out);
                    data = &data[used..];
                }
            }
        }
        match self.state {
            State::Refused(r) => Some(r),
            _ => None,
        }
    }

    /// True while no byte of a head has arrived since the last message
    /// ended: the connection is idle between requests.
    pub fn idle(&self) -> bool {
        self.state == State::Head && self.pending.is_empty()
    }

    /// Request heads accepted so far.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// Whether the first head has been read whole (or the connection
    /// turned out to speak HTTP/2, which has no such head).
    pub fn past_first_head(&self) -> bool {
        self.heads > 0 || self.state == State::Passthrough
    }

    /// Bytes of an incomplete head, released when the client closes so that
    /// hyper sees (and reports) the truncated request itself.
    pub fn take_pending_head(&mut self) -> Vec<u8> {
        if self.state == State::Head {
            std::mem::take(&mut self.pending)
        } else {
            Vec::new()
        }
    }

    /// Consumes head bytes; returns how many of `data` were used.
    fn head(&mut self, data: &[u8], out: &mut Vec<u8>) -> usize {
        if self.pending.is_empty() && matches!(data[0], b'\r' | b'\n') {
            // Blank lines before a request line are skipped by every parser
            // (some clients send one after a body).
            out.push(data[0]);
            return 1;
        }
        // Only the new bytes (and the last 3 held ones) can hold the end.
        let from = self.pending.len().saturating_sub(3);
        self.pending.extend_from_slice(data);
        let Some(end) = find(&self.pending[from..], b"\r\n\r\n").map(|i| from + i + 4) else {
            if self.pending.len() > MAX_HEAD_BYTES {
                self.state = State::Refused(HeadRefusal::TooLarge);
            }
            return data.len();
        };
        let used = data.len() - (self.pending.len() - end);
        self.pending.truncate(end);
        if end > MAX_HEAD_BYTES {
            self.state = State::Refused(HeadRefusal::TooLarge);
            return used;
        }
        if self.heads == 0 && self.pending == H2_PREFACE_LINE {
            out.extend_from_slice(&self.pending);
            self.pending.clear();
            self.state = State::Passthrough;
            return used;
        }
        match check_head(&self.pending) {
            Ok(body) => {
                out.extend_from_slice(&self.pending);
                self.pending.clear();
                self.heads += 1;
                self.state = match body {
                    BodyFraming::Chunked => State::Chunked(Chunk::Size),
                    BodyFraming::Length(n) if n > 0 => State::Body(n),
                    BodyFraming::Length(_) => State::Head,
                };
            }
            Err(r) => {
                self.pending.clear();
                self.state = State::Refused(r);
            }
        }
        used
    }

    /// Consumes chunked-body bytes; returns how many of `data` were used.
    fn chunked(&mut self, data: &[u8]) -> usize {
        let State::Chunked(chunk) = &mut self.state else {
            return 0;
        };
        match chunk {
            Chunk::Data(left) => {
                let take = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= take as u64;
                if *left == 0 {
                    *chunk = Chunk::DataEnd(2);
                }
                take
            }
            Chunk::DataEnd(left) => {
                let expected = if *left == 2 { b'\r' } else { b'\n' };
                if data[0] != expected {
                    self.state = State::Passthrough;
                    return 0;
                }
                *left -= 1;
                if *left == 0 {
                    *chunk = Chunk::Size;
                }
                1
            }
            Chunk::Size | Chunk::Trailer => {
                let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                    self.pending.extend_from_slice(data);
                    if self.pending.len() > MAX_CHUNK_LINE {
                        self.state = State::Passthrough;
                    }
                    return data.len();
                };
                self.pending.extend_from_slice(&data[..=nl]);
                let line = std::mem::take(&mut self.pending);
                let next = if *chunk == Chunk::Trailer {
                    if line == b"\r\n" {
                        State::Head
                    } else if line.len() > MAX_CHUNK_LINE {
                        State::Passthrough
                    } else {
                        State::Chunked(Chunk::Trailer)
                    }
                } else {
                    match chunk_size(&line) {
                        Some(0) => State::Chunked(Chunk::Trailer),
                        Some(n) => State::Chunked(Chunk::Data(n)),
                        None => State::Passthrough,
                    }
                };
                self.state = next;
                nl + 1
            }
        }
    }
}

/// How a checked request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    Length(u64),
    Chunked,
}

/// Checks one complete head (ending in CRLF CRLF).
fn check_head(head: &[u8]) -> Result<BodyFraming, HeadRefusal> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Err(httparse::Error::TooManyHeaders) => return Err(HeadRefusal::TooLarge),
        _ => return Err(HeadRefusal::Malformed),
    }
    // hyper would answer a target it cannot parse with a bare 400 of its own.
    if req
        .path
        .is_none_or(|p| p.contains('#') || p.parse::<http::Uri>().is_err())
    {
        return Err(HeadRefusal::InvalidTarget);
    }
    let mut length = None;
    let mut lengths = 0;
    let mut codings = 0;
    let mut chunked = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            let v = trim(h.value);
            if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
                return Err(HeadRefusal::InvalidLength);
            }
            length = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings += 1;
            chunked = trim(h.value).eq_ignore_ascii_case(b"chunked");
        }
    }
    if lengths > 0 && codings > 0 {
        return Err(HeadRefusal::LengthAndChunked);
    }
    if lengths > 1 {
        return Err(HeadRefusal::DuplicateLength);
    }
    if codings > 0 {
        if codings > 1 || !chunked || req.version != Some(1) {
            return Err(HeadRefusal::UnsupportedTransferEncoding);
        }
        return Ok(BodyFraming::Chunked);
    }
    Ok(BodyFraming::Length(length.unwrap_or(0)))
}

/// The size of a chunk-size line (`1a;ext=x\r\n`), as hyper reads it.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = &line[digits..];
    let rest = trim(rest);
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let Some(start) = start else {
        return &[];
    };
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(start);
    &v[start..=end]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An agent's connection as hyper sees it: bytes pass only through a
/// `RequestFraming`. A refused head is replaced by `STAND_IN_HEAD`, which
/// the service answers with the refusal (and `Connection: close`); nothing
/// after it is read.
pub struct CheckedConn<S> {
    inner: S,
    framing: RequestFraming,
    edge: std::sync::Arc<ConnEdge>,
    /// Checked bytes hyper has not read yet, from `ready_at` on.
    ready: Vec<u8>,
    ready_at: usize,
    refused: bool,
    eof: bool,
    /// Runs until the first head is whole; hyper times the later ones.
    first_head: Option<Pin<Box<Sleep>>>,
    /// After a refusal: how long what the client still sends is read and
    /// dropped, so that closing with unread input (a TCP reset) does not
    /// destroy the refusal before the client has read it.
    linger: Option<Pin<Box<Sleep>>>,
    lingered: usize,
    scratch: Box<[u8]>,
}

impl<S> CheckedConn<S> {
    /// The connection, and the state its request service must consult.
    pub fn new(
        inner: S,
        header_read_timeout: Duration,
    ) -> (CheckedConn<S>, std::sync::Arc<ConnEdge>) {
        let edge = std::sync::Arc::new(ConnEdge::default());
        let conn = CheckedConn {
            inner,
            framing: RequestFraming::new(),
            edge: edge.clone(),
            ready: Vec::new(),
            ready_at: 0,
            refused: false,
            eof: false,
            first_head: Some(Box::pin(tokio::time::sleep(header_read_timeout))),
            linger: None,
            lingered: 0,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
        };
        (conn, edge)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CheckedConn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_at);
                buf.put_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                if this.ready_at == this.ready.len() {
                    this.ready.clear();
                    this.ready_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.refused {
                // Hyper answers the stand-in and then closes; reading on
                // (or reporting an end, which hyper takes for a client that
                // hung up mid-request) would lose the answer.
                return Poll::Pending;
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.framing.past_first_head() {
                this.first_head = None;
            }
            let mut read = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => {
                    if let Some(t) = this.first_head.as_mut() {
                        if t.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "request head not received in time",
                            )));
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = read.filled().len();
            if n == 0 {
                this.eof = true;
                this.ready = this.framing.take_pending_head();
                this.ready_at = 0;
                continue;
            }
            let data = this.scratch[..n].to_vec();
            if let Some(r) = this.framing.feed(&data, &mut this.ready) {
                tracing::debug!(code = r.code(), "request head refused");
                this.edge.refuse(this.framing.heads(), r);
                this.ready.extend_from_slice(STAND_IN_HEAD);
                this.refused = true;
                this.first_head = None;
            }
        }
    }
}

/// Longest a refused connection is drained before it is closed.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes drained from a refused connection.
const LINGER_BYTES: usize = 1 << 20;

impl<S: AsyncRead + Unpin> CheckedConn<S> {
    /// Reads and drops input until the client closes, the linger time
    /// passes or `LINGER_BYTES` have been dropped.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(t) = self.linger.as_mut() {
                if t.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            let mut read = ReadBuf::new(&mut self.scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    self.lingered += n;
                    if n == 0 || self.lingered > LINGER_BYTES {
                        self.eof = true;
                        return Poll::Ready(());
                    }
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for CheckedConn<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refused {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            if this.linger.is_none() {
                this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
            }
            if !this.eof {
                ready!(this.poll_linger(cx));
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` whole and byte by byte; both must agree.
    fn run(input: &[u8]) -> (Vec<u8>, Option<HeadRefusal>, u64) {
        let mut whole = RequestFraming::new();
        let mut out = Vec::new();
        let r = whole.feed(input, &mut out);
        let mut bytewise = RequestFraming::new();
        let mut out2 = Vec::new();
        let mut r2 = None;
        for b in input {
            r2 = bytewise.feed(std::slice::from_ref(b), &mut out2).or(r2);
        }
        assert_eq!(out, out2, "split reads changed what passed");
        assert_eq!(r, r2);
        assert_eq!(whole.heads(), bytewise.heads());
        (out, r, whole.heads())
    }

    const GET: &str = "GET /s/x HTTP/1.1\r\nHost: a\r\n\r\n";

    #[test]
    fn passes_ordinary_requests_unchanged() {
        let chunked = "POST /s/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                       5;x=y\r\nhello\r\n0\r\nTrailer: t\r\n\r\n";
        let sized = "POST /s/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        let input = format!("{GET}{chunked}\r\n{sized}{GET}");
        let (out, refused, heads) = run(input.as_bytes());
        assert_eq!(refused, None);
        assert_eq!(out, input.as_bytes());
        assert_eq!(heads, 4);
    }

    #[test]
    fn a_head_is_held_back_until_it_is_whole() {
        let mut f = RequestFraming::new();
        let mut out = Vec::new();
        f.feed(b"GET /s/x HTTP/1.1\r\nHost", &mut out);
        assert!(out.is_empty());
        f.feed(b": a\r\n\r\nGET /s", &mut out);
        assert_eq!(out, GET.as_bytes());
        assert_eq!(f.take_pending_head(), b"GET /s");
    }

    #[test]
    fn refuses_ambiguous_framing() {
        for (head, want) in [
            (
                "POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadRefusal::LengthAndChunked,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 4\r\n\r\n",
                HeadRefusal::LengthAndChunked,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
                HeadRefusal::DuplicateLength,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
                HeadRefusal::DuplicateLength,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 4, 4\r\n\r\n",
                HeadRefusal::InvalidLength,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n",
                HeadRefusal::InvalidLength,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                HeadRefusal::UnsupportedTransferEncoding,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadRefusal::UnsupportedTransferEncoding,
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadRefusal::UnsupportedTransferEncoding,
            ),
            ("GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", HeadRefusal::Malformed),
            ("GET / HTTP/1.1\r\n folded\r\n\r\n", HeadRefusal::Malformed),
            ("GET @evil.example/x HTTP/1.1\r\n\r\n", HeadRefusal::InvalidTarget),
            ("GET /s/v1/x#frag HTTP/1.1\r\n\r\n", HeadRefusal::InvalidTarget),
            ("GET /s/v1/x?q=1#f HTTP/1.1\r\n\r\n", HeadRefusal::InvalidTarget),
            ("GET http://a b/ HTTP/1.1\r\n\r\n", HeadRefusal::Malformed),
        ] {
            let input = format!("{GET}{head}0\r\n\r\n{GET}");
            let (out, refused, heads) = run(input.as_bytes());
            assert_eq!(refused, Some(want), "{head:?}");
            // The request before passed; nothing from the refused head on.
            assert_eq!(out, GET.as_bytes(), "{head:?}");
            assert_eq!(heads, 1);
        }
    }

    #[test]
    fn refuses_oversized_heads_without_waiting_for_their_end() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        let (out, refused, _) = run(big.as_bytes());
        assert_eq!(refused, Some(HeadRefusal::TooLarge));
        assert!(out.is_empty());
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let (_, refused, _) = run(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
        assert_eq!(refused, Some(HeadRefusal::TooLarge));
    }

    #[test]
    fn http2_preface_passes_through() {
        let input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04";
        let (out, refused, _) = run(input);
        assert_eq!(refused, None);
        assert_eq!(out, input);
        let mut f = RequestFraming::new();
        assert!(!f.past_first_head());
        f.feed(input, &mut Vec::new());
        assert!(
            f.past_first_head(),
            "HTTP/2 would be timed out as a slow head"
        );
    }

    #[test]
    fn a_body_is_never_read_as_a_head() {
        // A body that looks like a smuggled request is just a body.
        let inner = "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let input = format!(
            "POST /s HTTP/1.1\r\nContent-Length: {}\r\n\r\n{inner}{GET}",
            inner.len()
        );
        let (out, refused, heads) = run(input.as_bytes());
        assert_eq!(refused, None);
        assert_eq!(out, input.as_bytes());
        assert_eq!(heads, 2);
    }

    #[test]
    fn refusals_are_json_closing_http1_connections_only() {
        let r = HeadRefusal::LengthAndChunked.into_response(http::Version::HTTP_11);
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["connection"], "close");
        assert_eq!(r.headers()["content-type"], "application/json");
        let r = HeadRefusal::TooLarge.into_response(http::Version::HTTP_2);
        assert_eq!(r.status(), 431);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert!(r.headers().get("connection").is_none());
    }

    fn h2_request(fields: &[(&str, String)]) -> http::Request<()> {
        let mut req = http::Request::builder()
            .version(http::Version::HTTP_2)
            .method("POST")
            .uri("https://proxy.example/stripe/v1/payment_intents");
        for (n, v) in fields {
            req = req.header(*n, v);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn http2_heads_get_the_length_and_size_checks() {
        let ok = h2_request(&[
            ("content-length", "5".into()),
            ("authorization", "Bearer k".into()),
        ]);
        assert_eq!(check_h2_head(&ok), None);
        let twice = h2_request(&[
            ("content-length", "5".into()),
            ("content-length", "5".into()),
        ]);
        assert_eq!(check_h2_head(&twice), Some(HeadRefusal::DuplicateLength));

        let many: Vec<(&str, String)> = (0..=MAX_HEADERS).map(|_| ("x-pad", "v".into())).collect();
        assert_eq!(
            check_h2_head(&h2_request(&many)),
            Some(HeadRefusal::TooLarge)
        );
        let most: Vec<(&str, String)> = (0..MAX_HEADERS).map(|_| ("x-pad", "v".into())).collect();
        assert_eq!(check_h2_head(&h2_request(&most)), None);

        // Measured as the same head written as HTTP/1.1 would be.
        let h1_head = |pad: usize| {
            format!(
                "POST /stripe/v1/payment_intents HTTP/1.1\r\nhost: proxy.example\r\nx-pad: {}\r\n\r\n",
                "a".repeat(pad)
            )
        };
        let fits = MAX_HEAD_BYTES - h1_head(0).len();
        let mut f = RequestFraming::new();
        assert_eq!(f.feed(h1_head(fits).as_bytes(), &mut Vec::new()), None);
        let at_limit = h2_request(&[("x-pad", "a".repeat(fits))]);
        assert_eq!(check_h2_head(&at_limit), None);
        let mut f = RequestFraming::new();
        assert_eq!(
            f.feed(h1_head(fits + 1).as_bytes(), &mut Vec::new()),
            Some(HeadRefusal::TooLarge)
        );
        let over = h2_request(&[("x-pad", "a".repeat(fits + 1))]);
        assert_eq!(check_h2_head(&over), Some(HeadRefusal::TooLarge));
    }

    #[test]
    fn the_stand_in_is_answered_by_position() {
        let edge = ConnEdge::default();
        edge.refuse(2, HeadRefusal::DuplicateLength);
        assert_eq!(edge.refusal_for_next(), None);
        assert_eq!(edge.refusal_for_next(), None);
        assert_eq!(edge.refusal_for_next(), Some(HeadRefusal::DuplicateLength));
        assert_eq!(edge.refusal_for_next(), None);
        // The stand-in is a head the framing accepts as it is.
        let (out, refused, heads) = run(STAND_IN_HEAD);
        assert_eq!((out.as_slice(), refused, heads), (STAND_IN_HEAD, None, 1));
    }
}
