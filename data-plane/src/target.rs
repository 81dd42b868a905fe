//! Where a request may go.
//!
//! Owns the parsing of the raw request-target (`/{vendor}/{path}?{query}`)
//! into the vendor name and the exact path and query that are forwarded, and
//! the joining of that path onto the vendor's configured base URL.
//!
//! It must never let a request leave the vendor's base path: no absolute- or
//! authority-form targets, no dot segments, no empty segments, and no percent
//! encodings that an upstream (or a server in front of it) could decode into a
//! separator, a dot or another escape. It never rewrites what it accepts: the
//! path is forwarded byte for byte as received, so what was checked is what is
//! sent. It never echoes more than a short prefix of hostile input in an error.

use std::fmt;

/// A request-target that passed every check, split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The first path segment: which configured vendor the call is for.
    pub vendor: String,
    /// The vendor path, starting with '/', exactly as it will be forwarded.
    pub path: String,
    /// The raw query after the first '?', without the '?'; `None` when absent
    /// or empty.
    pub query: Option<String>,
}

/// Why a request-target was refused. Messages are safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("request target must be a path starting with '/' (absolute and authority forms are not accepted)")]
    NotOriginForm,
    #[error("request target contains a character that is not allowed ({0})")]
    ForbiddenChar(CharDesc),
    #[error("request target contains a malformed percent escape")]
    MalformedEscape,
    #[error("request path contains an encoded '{0}' which is not allowed")]
    EncodedForbidden(String),
    #[error("request path contains an empty segment")]
    EmptySegment,
    #[error("request path contains a '.' or '..' segment")]
    DotSegment,
    #[error("request path must start with a vendor name: /{{vendor}}/...")]
    MissingVendor,
    #[error("vendor name {0:?} is not valid (1-64 characters of a-z, 0-9 and '-')")]
    InvalidVendor(String),
    #[error("request target is not a valid URI path and query")]
    NotAUri,
}

/// A printable description of a refused character, so an error never carries
/// a raw control byte back to the client or into a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CharDesc(pub char);

impl fmt::Display for CharDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            ' ' => f.write_str("space"),
            '\\' => f.write_str("backslash"),
            '#' => f.write_str("'#'"),
            c if c.is_ascii_graphic() => write!(f, "'{c}'"),
            c => write!(f, "U+{:04X}", u32::from(c)),
        }
    }
}

/// Longest vendor name accepted; also bounds what an error may echo.
const MAX_VENDOR_LEN: usize = 64;

/// Parses and checks a raw request-target as received on the wire.
pub fn normalize(path_and_query: &str) -> Result<Target, TargetError> {
    if !path_and_query.starts_with('/') {
        return Err(TargetError::NotOriginForm);
    }
    // Character checks cover the query too: a fragment marker, whitespace or
    // a control byte in a query can split or smuggle a request just as well.
    // Anything outside visible ASCII is refused; clients percent-encode it.
    if let Some(c) = path_and_query
        .chars()
        .find(|&c| !c.is_ascii_graphic() || c == '\\' || c == '#')
    {
        return Err(TargetError::ForbiddenChar(CharDesc(c)));
    }
    // Whatever is accepted is joined onto the vendor's base URL and parsed
    // again there; visible characters a URI path or query may not hold are
    // refused here rather than after the call was priced.
    if path_and_query.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(TargetError::NotAUri);
    }

    let (raw_path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    check_escapes(raw_path, true)?;
    if let Some(q) = query {
        // Query escapes may encode anything (Stripe metadata, prompts), but
        // they must be well-formed so that every parser reads the same bytes.
        check_escapes(q, false)?;
    }

    // raw_path starts with '/', so the first split item is the vendor.
    let rest = &raw_path[1..];
    let (vendor, vendor_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if vendor.is_empty() {
        return Err(if vendor_path.is_empty() {
            TargetError::MissingVendor
        } else {
            TargetError::EmptySegment
        });
    }
    check_segments(vendor_path)?;
    // Dot segments are checked before the vendor name so `/../x` reports the
    // traversal rather than a confusing vendor-name error.
    check_segment(vendor)?;
    if vendor.len() > MAX_VENDOR_LEN
        || !vendor
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(TargetError::InvalidVendor(truncate(vendor)));
    }

    let path = if vendor_path.is_empty() {
        "/".to_string()
    } else {
        vendor_path.to_string()
    };
    Ok(Target {
        vendor: vendor.to_string(),
        path,
        query: query.filter(|q| !q.is_empty()).map(str::to_string),
    })
}

/// Joins a vendor's base URL (which may carry its own path prefix, such as
/// `http://127.0.0.1:9/v1`) and a checked target. Because `target.path`
/// always starts with '/' and has no dot or empty segments, the result always
/// starts with `base_url` followed by '/' and stays under the base path.
pub fn join(base_url: &str, target: &Target) -> String {
    // A configured trailing slash would otherwise produce `//`, an empty
    // segment some upstreams collapse and others route differently.
    let base = base_url.trim_end_matches('/');
    let mut out = String::with_capacity(
        base.len() + target.path.len() + target.query.as_ref().map_or(0, |q| q.len() + 1),
    );
    out.push_str(base);
    if !target.path.starts_with('/') {
        // Unreachable for targets built by `normalize`; kept so a hand-built
        // Target still cannot glue itself onto the base's last segment.
        out.push('/');
    }
    out.push_str(&target.path);
    if let Some(q) = &target.query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Checks that every '%' starts a well-formed escape and, in the path, that no
/// escape decodes to a character that changes how the path is split: '.', '/',
/// '\\', '%' (double encoding) or a control byte.
fn check_escapes(s: &str, is_path: bool) -> Result<(), TargetError> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            i += 1;
            continue;
        }
        let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) else {
            return Err(TargetError::MalformedEscape);
        };
        let (Some(h), Some(l)) = (hex(h), hex(l)) else {
            return Err(TargetError::MalformedEscape);
        };
        if is_path {
            let decoded = h << 4 | l;
            let refused = match decoded {
                b'.' => Some("."),
                b'/' => Some("/"),
                b'\\' => Some("\\"),
                b'%' => Some("%"),
                0x00..=0x1f | 0x7f => Some("control character"),
                _ => None,
            };
            if let Some(what) = refused {
                return Err(TargetError::EncodedForbidden(what.to_string()));
            }
        }
        i += 3;
    }
    Ok(())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Checks the vendor path ("" or "/..."). A single trailing slash is allowed
/// (it is part of some vendors' routes and endpoint patterns refuse it on
/// their own); any other empty segment is not.
fn check_segments(vendor_path: &str) -> Result<(), TargetError> {
    if vendor_path.is_empty() || vendor_path == "/" {
        return Ok(());
    }
    let inner = vendor_path[1..]
        .strip_suffix('/')
        .unwrap_or(&vendor_path[1..]);
    for seg in inner.split('/') {
        if seg.is_empty() {
            return Err(TargetError::EmptySegment);
        }
        check_segment(seg)?;
    }
    Ok(())
}

fn check_segment(seg: &str) -> Result<(), TargetError> {
    // Some servers (Tomcat, Jetty) strip `;params` before resolving dots, so
    // `..;x` is treated as `..` by whatever sits behind the vendor's URL.
    let bare = seg.split(';').next().unwrap_or(seg);
    if bare == "." || bare == ".." {
        return Err(TargetError::DotSegment);
    }
    Ok(())
}

/// Shortens client input for an error message.
fn truncate(s: &str) -> String {
    keycap_proto::clip(s, 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Target {
        normalize(s).unwrap_or_else(|e| panic!("{s:?} refused: {e}"))
    }

    fn t(vendor: &str, path: &str, query: Option<&str>) -> Target {
        Target {
            vendor: vendor.into(),
            path: path.into(),
            query: query.map(Into::into),
        }
    }

    #[test]
    fn splits_vendor_path_and_query() {
        assert_eq!(
            ok("/stripe/v1/payment_intents"),
            t("stripe", "/v1/payment_intents", None)
        );
        assert_eq!(
            ok("/openai/v1/models?limit=2&x=%2F"),
            t("openai", "/v1/models", Some("limit=2&x=%2F"))
        );
        assert_eq!(ok("/stripe"), t("stripe", "/", None));
        assert_eq!(ok("/stripe/"), t("stripe", "/", None));
        assert_eq!(ok("/stripe?x=1"), t("stripe", "/", Some("x=1")));
        // Only the first '?' splits; later ones belong to the query.
        assert_eq!(ok("/a/b?c?d"), t("a", "/b", Some("c?d")));
        // An empty query is dropped rather than forwarded as a bare '?'.
        assert_eq!(ok("/a/b?"), t("a", "/b", None));
    }

    #[test]
    fn keeps_path_bytes_as_received() {
        // Ordinary escapes, a trailing slash and odd-but-safe characters pass
        // through unchanged so the upstream sees exactly what was checked.
        assert_eq!(ok("/s/v1/c%20d/").path, "/v1/c%20d/");
        assert_eq!(ok("/s/v1/a:b@c;d=e").path, "/v1/a:b@c;d=e");
        assert_eq!(ok("/s/...").path, "/...");
        assert_eq!(ok("/s/.hidden/x..y").path, "/.hidden/x..y");
        assert_eq!(ok("/s/%41%e2%82%ac").path, "/%41%e2%82%ac");
    }

    #[test]
    fn refuses_non_origin_forms() {
        for s in [
            "",
            "*",
            "http://evil.example/stripe/v1",
            "https://x/y",
            "evil.example:443",
            "stripe/v1",
            "?/stripe",
        ] {
            assert_eq!(normalize(s), Err(TargetError::NotOriginForm), "{s:?}");
        }
    }

    #[test]
    fn refuses_forbidden_characters() {
        for (s, c) in [
            ("/s/a b", ' '),
            ("/s/a\tb", '\t'),
            ("/s/a\r\nHost: x", '\r'),
            ("/s/a\0", '\0'),
            ("/s/a\u{7f}", '\u{7f}'),
            ("/s/a\\..\\b", '\\'),
            ("/s/a#frag", '#'),
            ("/s/a?q=1#f", '#'),
            ("/s/a?q= 1", ' '),
            ("/s/caf\u{e9}", '\u{e9}'),
        ] {
            assert_eq!(
                normalize(s),
                Err(TargetError::ForbiddenChar(CharDesc(c))),
                "{s:?}"
            );
        }
    }

    #[test]
    fn refuses_encoded_separators_in_any_case() {
        for s in [
            "/s/%2e%2e/x",
            "/s/%2E%2E/x",
            "/s/.%2e/x",
            "/s/a%2fb",
            "/s/a%2Fb",
            "/s/a%5cb",
            "/s/a%5Cb",
            "/s/%252e%252e",
            "/s/a%25",
            "/s/a%00b",
            "/s/a%0Ab",
            "/s/a%7f",
            "/%2e%2e/etc",
            "/st%2fripe/x",
        ] {
            assert!(
                matches!(normalize(s), Err(TargetError::EncodedForbidden(_))),
                "{s:?} -> {:?}",
                normalize(s)
            );
        }
        // The same escapes are fine in the query, which is never split on.
        assert_eq!(
            ok("/s/x?a=%2e%2F%5c%25").query.as_deref(),
            Some("a=%2e%2F%5c%25")
        );
    }

    #[test]
    fn refuses_malformed_escapes() {
        for s in [
            "/s/a%",
            "/s/a%4",
            "/s/a%zz",
            "/s/a%4g/b",
            "/s/a?x=%",
            "/s/x?y=%G1",
        ] {
            assert_eq!(normalize(s), Err(TargetError::MalformedEscape), "{s:?}");
        }
    }

    #[test]
    fn refuses_empty_and_dot_segments() {
        for s in [
            "//stripe/v1",
            "/stripe//v1",
            "/stripe/v1//",
            "/stripe/v1//x",
            "//",
        ] {
            assert_eq!(normalize(s), Err(TargetError::EmptySegment), "{s:?}");
        }
        for s in [
            "/stripe/..",
            "/stripe/../x",
            "/stripe/./x",
            "/stripe/v1/.",
            "/stripe/v1/../",
            "/..",
            "/../openai",
            "/.",
            "/stripe/..;x/admin",
            "/stripe/.;/x",
        ] {
            assert_eq!(normalize(s), Err(TargetError::DotSegment), "{s:?}");
        }
    }

    #[test]
    fn refuses_what_is_no_uri() {
        // Found by the target_path fuzzer: accepted, then unparsable once
        // joined onto the base URL.
        assert_eq!(normalize("/v1/st]e`/v1/v1"), Err(TargetError::NotAUri));
    }

    #[test]
    fn checks_vendor_name() {
        assert_eq!(normalize("/"), Err(TargetError::MissingVendor));
        assert_eq!(normalize("/?x=1"), Err(TargetError::MissingVendor));
        assert_eq!(ok("/a-1/x").vendor, "a-1");
        assert_eq!(ok(&format!("/{}/x", "a".repeat(64))).vendor.len(), 64);
        for s in [
            "/Stripe/x",
            "/str_ipe/x",
            "/str.ipe/x",
            "/a@b/x",
            "/a:1/x",
            "/%41/x",
        ] {
            assert!(
                matches!(normalize(s), Err(TargetError::InvalidVendor(_))),
                "{s:?}"
            );
        }
        let long = format!("/{}/x", "a".repeat(65));
        assert!(matches!(
            normalize(&long),
            Err(TargetError::InvalidVendor(_))
        ));
    }

    #[test]
    fn errors_never_echo_huge_input() {
        let huge = format!("/{}/x", "A".repeat(100_000));
        let msg = normalize(&huge).unwrap_err().to_string();
        assert!(msg.len() < 200, "{} bytes", msg.len());
        let huge_path = format!("/s/{}%2f", "a".repeat(100_000));
        assert!(normalize(&huge_path).unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn control_chars_in_errors_are_described_not_echoed() {
        let msg = normalize("/s/a\r\nX").unwrap_err().to_string();
        assert!(!msg.contains('\r') && !msg.contains('\n'));
        assert!(msg.contains("U+000D"), "{msg}");
    }

    #[test]
    fn joins_onto_base_with_prefix() {
        let tg = ok("/openai/v1/chat/completions?x=1");
        assert_eq!(
            join("http://127.0.0.1:9/v1", &tg),
            "http://127.0.0.1:9/v1/v1/chat/completions?x=1"
        );
        assert_eq!(
            join("https://api.stripe.com/", &ok("/stripe/v1/charges")),
            "https://api.stripe.com/v1/charges"
        );
        assert_eq!(join("https://h", &ok("/stripe")), "https://h/");
        // A hand-built target without a leading slash still gets one.
        assert_eq!(
            join("https://h/base", &t("v", "x", None)),
            "https://h/base/x"
        );
    }

    /// Every target that `normalize` accepts, built from pieces chosen to
    /// confuse path handling, keeps the invariants of the `target_path` fuzz
    /// target: it joins to a URL that stays on the base's host and under its
    /// path prefix, with no dot or empty segment after it.
    #[test]
    fn join_never_escapes_base_property() {
        const PIECES: [&str; 18] = [
            "/", "v", "..", ".", "%2e", "%2F", "?", "#", "\\", "@", ":", "%41", ";", "%", "//",
            "?/..", "evil.com", "%5C",
        ];
        let mut accepted = 0usize;
        let mut input = String::new();
        // Every sequence of up to 4 pieces after "/vendor": 18^4 + ... inputs.
        let mut stack: Vec<usize> = Vec::new();
        loop {
            input.clear();
            input.push_str("/vendor");
            for &i in &stack {
                input.push_str(PIECES[i]);
            }
            if let Ok(tg) = normalize(&input) {
                accepted += 1;
                assert!(tg.vendor.starts_with("vendor"), "{input:?}");
                // The fuzz target's invariants: on the base's host, under its
                // path, no dot or empty segment, accepted again as built.
                crate::check::target_path(input.as_bytes());
            }
            // Advance `stack` like an odometer over 0..=4 digits.
            let mut pos = stack.len();
            loop {
                if pos == 0 {
                    if stack.len() == 4 {
                        assert!(accepted > 1000, "only {accepted} accepted");
                        return;
                    }
                    stack = vec![0; stack.len() + 1];
                    break;
                }
                pos -= 1;
                stack[pos] += 1;
                if stack[pos] < PIECES.len() {
                    break;
                }
                stack[pos] = 0;
            }
        }
    }
}
