//! Invariant checks for the proxy's edge parsers: where a request may go
//! (`target`), what a key may call (`endpoint`), which key was presented
//! (`secret` and the proxy's header extraction), how raw bytes are cut
//! into requests (`edge`), which headers would change how a vendor reads a
//! body (`body_headers`), how the credential is masked in what a vendor
//! answers (`scrub`), and what an agent says of its call (`context`).
//!
//! Test support, not part of the request path, in the same form as
//! `pricing::check`: each `pub fn` takes arbitrary bytes and panics when an
//! invariant breaks. The fuzz targets in `fuzz/fuzz_targets/` call one
//! function each, and `tests/fuzz_seeds.rs` runs them over the seed corpus
//! on stable. It must never be called by the proxy, and it holds no `cfg`
//! and no `unsafe`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use keycap_proto::endpoint::EndpointPattern;
use keycap_proto::secret::{self, SecretKind};
use sha2::{Digest, Sha256};

use crate::edge::RequestFraming;
use crate::pricing::check::{split_chunks, Check};
use crate::proxy::presented_key;
use crate::target::{join, normalize, Target};
/// Inbound webhook signature headers: the parsers live with the vendors.
pub use keycap_vendors::webhooks::check::hook_signature;

/// Every edge fuzz target, by the name of its file in `fuzz/fuzz_targets/`
/// and of its seed directory in `fuzz/corpus/`.
pub const TARGETS: &[(&str, Check)] = &[
    ("target_path", target_path),
    ("endpoint_match", endpoint_match),
    ("vault_key", vault_key),
    ("request_framing", request_framing),
    ("response_scrub", response_scrub),
    ("body_headers", body_headers),
    ("keycap_context", keycap_context),
    ("hook_signature", hook_signature),
    ("approval_fingerprint", approval_fingerprint),
];

/// Base URLs a target is joined onto, with and without a path prefix.
const BASES: [&str; 3] = [
    "http://127.0.0.1:9/v1",
    "https://api.example.com",
    "http://h:1/a/b/",
];

/// The bytes as a raw request-target: a refusal is short and printable; an
/// accepted target names a valid vendor, has no dot, empty or encoded-
/// separator segment, normalises to itself again, and joined onto any base
/// stays on the base's host and under its path.
pub fn target_path(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let t = match normalize(&raw) {
        Ok(t) => t,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.len() < 200, "error of {} bytes", msg.len());
            assert!(
                msg.chars().all(|c| !c.is_control()),
                "control character in {msg:?}"
            );
            return;
        }
    };
    assert!(
        !t.vendor.is_empty()
            && t.vendor.len() <= 64
            && t.vendor
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "vendor {:?} from {raw:?}",
        t.vendor
    );
    assert!(t.path.starts_with('/'), "{t:?}");
    assert!(!t.path.contains('?'), "{t:?}");
    assert!(t.query.as_deref() != Some(""), "{t:?}");
    let all = format!("{}{}", t.path, t.query.as_deref().unwrap_or(""));
    assert!(
        all.chars()
            .all(|c| c.is_ascii_graphic() && c != '\\' && c != '#'),
        "{t:?}"
    );
    assert_clean_segments(&t.path, &raw);
    let lower = t.path.to_ascii_lowercase();
    for enc in ["%2e", "%2f", "%5c", "%25"] {
        assert!(!lower.contains(enc), "{enc} kept in {t:?} from {raw:?}");
    }
    // What was accepted is what the agent sent, and accepted again.
    let again = rebuild(&t);
    assert_eq!(normalize(&again).as_ref(), Ok(&t), "{raw:?} -> {again:?}");
    for base in BASES {
        let joined = join(base, &t);
        let trimmed = base.trim_end_matches('/');
        let uri: http::Uri = joined
            .parse()
            .unwrap_or_else(|e| panic!("{raw:?} -> {joined:?} is no URI: {e}"));
        let base_uri: http::Uri = trimmed.parse().expect("base");
        assert_eq!(uri.authority(), base_uri.authority(), "{joined:?}");
        assert_eq!(uri.scheme(), base_uri.scheme(), "{joined:?}");
        let prefix = base_uri.path().trim_end_matches('/');
        let rest = uri
            .path()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{joined:?} left {prefix:?}"));
        assert!(rest.starts_with('/'), "{joined:?}");
        assert_clean_segments(rest, &raw);
    }
}

/// `/{vendor}{path}?{query}` of an accepted target.
fn rebuild(t: &Target) -> String {
    let mut s = format!("/{}{}", t.vendor, t.path);
    if let Some(q) = &t.query {
        s.push('?');
        s.push_str(q);
    }
    s
}

/// A path below a base: no empty segment (but one trailing slash) and no
/// dot segment, also not behind `;params`.
fn assert_clean_segments(path: &str, raw: &str) {
    let inner = &path[1..];
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if inner.is_empty() {
        return;
    }
    for seg in inner.split('/') {
        assert!(!seg.is_empty(), "empty segment in {path:?} from {raw:?}");
        let bare = seg.split(';').next().unwrap_or(seg);
        assert!(
            bare != "." && bare != "..",
            "dot segment in {path:?} from {raw:?}"
        );
    }
}

/// The bytes as three lines: an endpoint pattern, a method and a path.
/// Parsing never panics and refuses with a short single-line message; an
/// accepted pattern prints as text that parses back to it; a match never
/// crosses methods, and honours `*`: a whole non-empty segment, one or more
/// when last; a pattern without `*` matches its own path exactly; the
/// pattern's path with each `*` filled in always matches.
pub fn endpoint_match(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let pattern = lines.next().unwrap_or("");
    let method = lines.next().unwrap_or("");
    let path = lines.next().unwrap_or("");
    let p = match EndpointPattern::parse(pattern) {
        Ok(p) => p,
        Err(e) => {
            // The pattern is echoed clipped to 80 characters, each escaped
            // to at most 10 (`\u{10ffff}`).
            let msg = e.to_string();
            assert!(msg.len() < 1000, "error of {} bytes", msg.len());
            assert!(!msg.contains(['\n', '\r']), "{msg:?}");
            return;
        }
    };
    let shown = p.to_string();
    assert_eq!(
        EndpointPattern::parse(&shown).as_ref(),
        Ok(&p),
        "{pattern:?} shows as {shown:?}"
    );
    let (pat_method, pat_path) = shown.split_once(' ').expect("METHOD /path");
    let pat_segs: Vec<&str> = if pat_path == "/" {
        Vec::new()
    } else {
        pat_path[1..].split('/').collect()
    };

    if p.matches(method, path) {
        assert!(
            pat_method == "*" || pat_method == method,
            "{shown} ~ {method}"
        );
        let rest = path
            .strip_prefix('/')
            .unwrap_or_else(|| panic!("{shown} matched relative {path:?}"));
        let req: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        assert!(
            req.iter().all(|s| !s.is_empty()),
            "{shown} matched {path:?} with an empty segment"
        );
        let tail_glob = pat_segs.last() == Some(&"*");
        if tail_glob {
            assert!(req.len() >= pat_segs.len(), "{shown} ~ {path:?}");
        } else {
            assert_eq!(req.len(), pat_segs.len(), "{shown} ~ {path:?}");
        }
        for (i, seg) in pat_segs.iter().enumerate() {
            if *seg != "*" {
                assert_eq!(req[i], *seg, "{shown} ~ {path:?}");
            }
        }
    }
    if !pat_segs.contains(&"*") {
        let exact = p.matches(method, path);
        assert_eq!(
            exact,
            (pat_method == "*" || pat_method == method) && path == pat_path,
            "{shown} ~ {method} {path:?}"
        );
    }
    // Filled in with a segment taken from the input, or a plain one.
    let fill = path
        .split('/')
        .find(|s| !s.is_empty() && !s.contains(['?', '#']))
        .unwrap_or("x");
    let concrete: String = if pat_segs.is_empty() {
        "/".into()
    } else {
        pat_segs
            .iter()
            .map(|s| format!("/{}", if *s == "*" { fill } else { s }))
            .collect()
    };
    let m = if pat_method == "*" { "GET" } else { pat_method };
    assert!(p.matches(m, &concrete), "{shown} refuses {m} {concrete:?}");
    if pat_method != "*" {
        assert!(!p.matches("BREW", &concrete), "{shown} ignores the method");
    }
}

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The documented vault-key checksum, computed independently of
/// `keycap_proto::secret`, so a change there that breaks the published
/// format (which secret scanners rely on) fails here.
fn documented_checksum(head: &str) -> String {
    let d = Sha256::digest(head.as_bytes());
    let mut n = u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("ASCII")
}

/// A well-formed vault key made from arbitrary bytes: an environment of
/// 1-16 lowercase letters and a 43-character body.
fn key_from(data: &[u8]) -> String {
    let env_len = 1 + data.first().map_or(0, |b| usize::from(b % 16));
    let mut bytes = data.iter().copied().skip(1).cycle();
    let mut next = || bytes.next().unwrap_or(0);
    let env: String = (0..env_len)
        .map(|_| char::from(b'a' + next() % 26))
        .collect();
    let body: String = (0..43)
        .map(|_| char::from(ALPHABET[usize::from(next()) % 62]))
        .collect();
    let head = format!("kc_{env}_{body}");
    let check = documented_checksum(&head);
    format!("{head}{check}")
}

/// The bytes as a presented key, and as the seed of a well-formed one.
/// Checking never panics; a well-formed key is refused after any single
/// character is changed, dropped or added, and as another kind of secret;
/// the proxy reads it back exactly from `Bearer`, `Basic` (as the password)
/// and `x-api-key`, and reads nothing from a header it cannot decode.
pub fn vault_key(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let raw_ok = secret::is_well_formed(SecretKind::VaultKey, &raw);
    if raw_ok {
        assert_single_changes_fail(&raw);
    }
    for kind in [SecretKind::AdminToken, SecretKind::FleetToken] {
        // Another kind's prefix never passes as a vault key, or vice versa.
        assert!(!(raw_ok && secret::is_well_formed(kind, &raw)), "{raw:?}");
    }
    let key = key_from(data);
    assert!(
        secret::is_well_formed(SecretKind::VaultKey, &key),
        "the documented format is refused: {key:?}"
    );
    assert!(!secret::is_well_formed(SecretKind::AdminToken, &key));
    assert_single_changes_fail(&key);

    let spaces = " ".repeat(usize::from(data.first().copied().unwrap_or(0) % 3));
    let user = String::from_utf8_lossy(data)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(40)
        .collect::<String>();
    let presented = [
        ("authorization", format!("Bearer{spaces} {key}{spaces}")),
        ("authorization", format!("bearer {key}")),
        (
            "authorization",
            format!("Basic {}", BASE64.encode(format!("{user}:{key}"))),
        ),
        ("x-api-key", format!("{spaces}{key}")),
    ];
    for (name, value) in presented {
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).expect("header value"),
        );
        assert_eq!(
            presented_key(&h).as_deref(),
            Some(key.as_str()),
            "{name}: {value:?}"
        );
    }
    // Arbitrary header bytes: never a panic; a key read from them is
    // either in the header as sent or, for Basic, its decoded password.
    if let Ok(v) = HeaderValue::from_bytes(data) {
        for name in ["authorization", "x-api-key"] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), v.clone());
            if let Some(k) = presented_key(&h) {
                let sent = String::from_utf8_lossy(data);
                let basic = sent
                    .trim()
                    .split_once(' ')
                    .filter(|(s, _)| s.eq_ignore_ascii_case("basic"))
                    .and_then(|(_, t)| BASE64.decode(t.trim()).ok())
                    .map(|d| String::from_utf8_lossy(&d).into_owned());
                assert!(
                    sent.contains(k.as_ref()) || basic.is_some_and(|d| d.ends_with(k.as_ref())),
                    "{name}: {sent:?} presented {k:?}"
                );
            }
        }
    }
}

fn assert_single_changes_fail(key: &str) {
    let b = key.as_bytes();
    for i in 0..b.len() {
        let mut changed = b.to_vec();
        // The next character of the alphabet (or '_' / 'a' for others).
        changed[i] = match ALPHABET.iter().position(|&c| c == b[i]) {
            Some(p) => ALPHABET[(p + 1) % 62],
            None if b[i] == b'_' => b'a',
            None => b'_',
        };
        let changed = String::from_utf8(changed).expect("ASCII");
        assert!(
            !secret::is_well_formed(SecretKind::VaultKey, &changed),
            "{key:?} with character {i} changed still passes: {changed:?}"
        );
        let mut dropped = b.to_vec();
        dropped.remove(i);
        let dropped = String::from_utf8(dropped).expect("ASCII");
        assert!(!secret::is_well_formed(SecretKind::VaultKey, &dropped));
    }
    assert!(!secret::is_well_formed(
        SecretKind::VaultKey,
        &format!("{key}0")
    ));
}

/// The bytes as what a client sends on one connection, cut into reads by
/// the leading chunk-size header (`pricing::check::split_chunks`). Fed
/// whole or in those reads, the framing passes the same bytes, counts the
/// same heads and refuses the same way; what it passes is always a prefix
/// of the input, byte for byte.
pub fn request_framing(data: &[u8]) {
    let (stream, cuts) = split_chunks(data);
    let mut whole = RequestFraming::new();
    let mut out = Vec::new();
    let refused = whole.feed(stream, &mut out);
    let mut pieces = RequestFraming::new();
    let mut out2 = Vec::new();
    let mut refused2 = None;
    for cut in &cuts {
        refused2 = pieces.feed(cut, &mut out2).or(refused2);
    }
    assert_eq!(out, out2, "reads of {:?} changed what passed", cuts.len());
    assert_eq!(refused, refused2);
    assert_eq!(whole.heads(), pieces.heads());
    assert!(stream.starts_with(&out), "passed bytes that were not sent");
    if refused.is_some() {
        // Nothing passes after a refusal.
        let before = out.len();
        whole.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out);
        assert_eq!(out.len(), before);
    }
}

/// The bytes as a vendor's response body and the secret to keep out of it:
/// the first byte picks the secret's length (8 to 23), the next that many
/// bytes are the secret, and the rest is cut into chunks as in
/// `pricing::check::split_chunks`. However the body is cut, streaming it
/// through `StreamScrub` gives exactly what masking it whole gives; the
/// result has the body's length, holds the secret nowhere, and differs from
/// the body only by `*` inside occurrences of the secret.
pub fn response_scrub(data: &[u8]) {
    use crate::scrub::{CredentialScrub, StreamScrub, MASK};
    use bytes::Bytes;
    use memchr::memmem;

    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = 8 + usize::from(n % 16);
    if rest.len() < n {
        return;
    }
    let (secret, rest) = rest.split_at(n);
    if secret.contains(&MASK) {
        // A secret of '*' could be re-formed by its own mask.
        return;
    }
    let scrub = std::sync::Arc::new(CredentialScrub::new(&[secret]));
    let (body, cuts) = split_chunks(rest);
    let whole = scrub.bytes(Bytes::copy_from_slice(body));
    let mut stream = StreamScrub::new(scrub);
    let mut streamed = Vec::with_capacity(body.len());
    for cut in cuts {
        streamed.extend_from_slice(&stream.pass(Bytes::copy_from_slice(cut)));
    }
    streamed.extend_from_slice(&stream.finish());
    assert_eq!(streamed, whole[..], "streamed and whole masking differ");
    assert_eq!(whole.len(), body.len(), "masking changed the length");
    assert!(
        memmem::find(&whole, secret).is_none(),
        "the secret survived"
    );
    let mut covered = vec![false; body.len()];
    let mut from = 0;
    while let Some(i) = memmem::find(&body[from..], secret) {
        covered[from + i..from + i + secret.len()].fill(true);
        from += i + 1;
    }
    for (i, (before, after)) in body.iter().zip(whole.iter()).enumerate() {
        if before != after {
            assert!(
                *after == MASK && covered[i],
                "byte {i} changed outside the secret"
            );
        }
    }
}

/// Arbitrary bytes as request headers, one `name: value` per line (lines
/// that are no header are skipped): a set `body_headers::check` accepts has
/// at most one Content-Type, of one media type and no charset but UTF-8,
/// no Content-Encoding but `identity`, no Content-Transfer-Encoding and no
/// method override; a set with none of those headers is always accepted;
/// a refusal's message is short and printable.
pub fn body_headers(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(line[..colon].trim_ascii()),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let decisive = [
        "content-type",
        "content-encoding",
        "content-transfer-encoding",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ];
    let result = crate::body_headers::check(&headers);
    if let Err(e) = &result {
        assert!(
            decisive.iter().any(|h| headers.contains_key(*h)),
            "refused without a header that changes how the body is read: {e}"
        );
        assert!(e.0.len() < 300 && !e.0.chars().any(char::is_control), "{e}");
        return;
    }
    let types: Vec<&HeaderValue> = headers.get_all("content-type").iter().collect();
    assert!(types.len() <= 1, "two Content-Types accepted: {types:?}");
    if let Some(ct) = types.first() {
        let ct = ct.to_str().expect("an accepted Content-Type is text");
        let media = ct.split(';').next().unwrap_or("");
        assert!(
            media.matches('/').count() == 1 && !media.contains(','),
            "{ct:?} accepted as one media type"
        );
        for param in ct.split(';').skip(1) {
            let (name, value) = param.split_once('=').unwrap_or((param, ""));
            if name.trim().eq_ignore_ascii_case("charset") {
                let v = value.trim().trim_matches('"').to_ascii_lowercase();
                assert!(v == "utf-8" || v == "utf8", "charset {v:?} accepted");
            }
        }
    }
    for coding in headers.get_all("content-encoding") {
        assert!(
            coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"identity"),
            "Content-Encoding {coding:?} accepted"
        );
    }
    for h in &decisive[2..] {
        assert!(!headers.contains_key(*h), "{h} accepted");
    }
}

/// Arbitrary bytes as `Keycap-Context` header lines (split at `\n`; a
/// line that is no header value is skipped) and as a `traceparent`:
/// reading never panics; an accepted context holds at most
/// `context::MAX_PAIRS` pairs, each key and value within its bound and of
/// its alphabet, read back from the lines exactly (every pair of the lines
/// is in it, and nothing else); a refusal's message is short and printable
/// and never echoes a value; a trace id read is 32 lowercase hex digits,
/// not all zero, taken from the header.
pub fn keycap_context(data: &[u8]) {
    use crate::context::{self, MAX_KEY_BYTES, MAX_PAIRS, MAX_VALUE_BYTES};
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append(context::KEYCAP_CONTEXT, v.clone());
            headers.append(context::TRACEPARENT, v);
        }
    }
    match context::read(&headers) {
        Ok(pairs) => {
            assert!(pairs.len() <= MAX_PAIRS, "{} pairs accepted", pairs.len());
            let mut seen = 0;
            for line in headers.get_all(context::KEYCAP_CONTEXT) {
                let line = line.to_str().expect("an accepted context is ASCII");
                for pair in line.split(',') {
                    let (k, v) = pair
                        .trim_matches([' ', '\t'])
                        .split_once('=')
                        .expect("accepted as pairs");
                    assert_eq!(pairs.get(k).map(String::as_str), Some(v), "{line:?}");
                    seen += 1;
                }
            }
            assert_eq!(seen, pairs.len(), "a pair read that the lines do not hold");
            for (k, v) in &pairs {
                assert!(!k.is_empty() && k.len() <= MAX_KEY_BYTES, "{k:?}");
                assert!(k.as_bytes()[0].is_ascii_alphabetic(), "{k:?}");
                assert!(
                    k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')),
                    "{k:?}"
                );
                assert!(!v.is_empty() && v.len() <= MAX_VALUE_BYTES, "{v:?}");
                assert!(
                    v.bytes()
                        .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'=' | b'"' | b'\\')),
                    "{v:?}"
                );
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.len() < 1024 && !message.chars().any(char::is_control),
                "{message:?}"
            );
            if let context::ContextError::BadValue(key) = &e {
                // Names the key, never the value it refused.
                assert!(key.len() <= MAX_KEY_BYTES, "{key:?}");
            }
        }
    }
    if let Some(id) = context::trace_id(&headers) {
        assert_eq!(id.len(), 32, "{id:?}");
        assert!(
            id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{id:?}"
        );
        assert!(id.bytes().any(|b| b != b'0'), "{id:?}");
        let line = headers
            .get(context::TRACEPARENT)
            .expect("read from the header");
        assert!(line.to_str().is_ok_and(|l| l.contains(&id)), "{id:?}");
    }
}

/// One request's fingerprint parts from fuzz bytes: lines of key id,
/// method, path, `?query` (absent without `?`), body, `=idempotency key`
/// (absent without `=`), then `<n><value>` lines, each a bound header
/// (`approval::BOUND_HEADERS[n % 9]`) and its value.
fn approval_request(bytes: &[u8]) -> crate::approval::Canonical {
    use crate::approval::{Canonical, BOUND_HEADERS};
    let mut lines = bytes.split(|&b| b == b'\n');
    let mut next = || lines.next().unwrap_or_default();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let key_id = text(next());
    let method = text(next());
    let path = text(next());
    let query = next().strip_prefix(b"?").map(text);
    let body_sha256 = Sha256::digest(next()).into();
    let idempotency_key = next().strip_prefix(b"=").map(text);
    let mut headers = Vec::new();
    loop {
        let line = next();
        let Some((&n, value)) = line.split_first() else {
            break;
        };
        let name = BOUND_HEADERS[usize::from(n) % BOUND_HEADERS.len()];
        headers.push((name.to_string(), value.to_vec()));
    }
    Canonical {
        key_id,
        method,
        path,
        query,
        body_sha256,
        idempotency_key,
        headers,
    }
}

/// The bytes as two requests, cut at the first 0xFF: each one's canonical
/// encoding decodes back to it (so the encoding is injective), and two
/// requests that differ in any bound part — which the vendor may treat
/// differently — never share an encoding or a fingerprint.
pub fn approval_fingerprint(data: &[u8]) {
    use crate::approval::Canonical;
    let (a, b) = match data.iter().position(|&x| x == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (a, b) = (approval_request(a), approval_request(b));
    for r in [&a, &b] {
        assert_eq!(Canonical::decode(&r.encode()).as_ref(), Some(r), "{r:?}");
    }
    if a != b {
        assert_ne!(a.encode(), b.encode(), "{a:?} and {b:?} share an encoding");
        assert_ne!(a.fingerprint(), b.fingerprint(), "{a:?} and {b:?}");
    } else {
        assert_eq!(a.fingerprint(), b.fingerprint());
    }
}
