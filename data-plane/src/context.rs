//! What an agent says about the call it makes: its `Keycap-Context` header
//! (the step, tool call or reasoning that led to the call) and the trace
//! id of its W3C `traceparent`. Both go into the call's audit entry; the
//! context header never reaches the vendor.
//!
//! This module only reads and validates; it never decides whether a call
//! is forwarded beyond refusing a context it cannot read.

use std::collections::HashMap;

use http::header::{HeaderMap, HeaderName};

/// The agent's context for one call.
pub const KEYCAP_CONTEXT: HeaderName = HeaderName::from_static("keycap-context");
/// W3C Trace Context: where a call's trace is carried.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C Trace Context: vendor-specific trace data beside `traceparent`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// At most this many `key=value` pairs in a call's context.
pub const MAX_PAIRS: usize = 16;
/// At most this many bytes in a key.
pub const MAX_KEY_BYTES: usize = 64;
/// At most this many bytes in a value.
pub const MAX_VALUE_BYTES: usize = 256;
/// At most this many bytes in all `Keycap-Context` header lines together.
pub const MAX_HEADER_BYTES: usize = 2048;

/// Why a `Keycap-Context` header was refused; the message is safe for the
/// client (it names the rule, never echoes more than the offending key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("Keycap-Context is over {MAX_HEADER_BYTES} bytes")]
    TooLong,
    #[error("Keycap-Context has more than {MAX_PAIRS} pairs")]
    TooManyPairs,
    #[error("Keycap-Context is not a list of key=value pairs separated by commas")]
    NotPairs,
    #[error(
        "Keycap-Context key {0:?} is not 1-{MAX_KEY_BYTES} letters, digits, '_', '.' or '-' starting with a letter"
    )]
    BadKey(String),
    #[error(
        "Keycap-Context value of {0:?} is not 1-{MAX_VALUE_BYTES} visible ASCII characters without ',', '=', '\"' or '\\\\'"
    )]
    BadValue(String),
    #[error("Keycap-Context names {0:?} twice")]
    Repeated(String),
}

/// Reads every `Keycap-Context` line of `headers` as one comma-separated
/// list of `key=value` pairs (spaces and tabs around a pair are ignored;
/// nothing else that is not ASCII). No header is an empty context.
pub fn read(headers: &HeaderMap) -> Result<HashMap<String, String>, ContextError> {
    let mut total = 0;
    let mut pairs = HashMap::new();
    for line in headers.get_all(KEYCAP_CONTEXT) {
        total += line.len();
        if total > MAX_HEADER_BYTES {
            return Err(ContextError::TooLong);
        }
        let line = std::str::from_utf8(line.as_bytes()).map_err(|_| ContextError::NotPairs)?;
        for pair in line.split(',') {
            let (key, value) = pair
                .trim_matches([' ', '\t'])
                .split_once('=')
                .ok_or(ContextError::NotPairs)?;
            if !valid_key(key) {
                return Err(ContextError::BadKey(clip(key)));
            }
            if !valid_value(value) {
                return Err(ContextError::BadValue(key.to_string()));
            }
            if pairs.len() == MAX_PAIRS {
                return Err(ContextError::TooManyPairs);
            }
            if pairs.insert(key.to_string(), value.to_string()).is_some() {
                return Err(ContextError::Repeated(key.to_string()));
            }
        }
    }
    Ok(pairs)
}

fn valid_key(k: &str) -> bool {
    k.len() <= MAX_KEY_BYTES
        && k.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_VALUE_BYTES
        && v.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'=' | b'"' | b'\\'))
}

/// A key short enough to name in an error.
fn clip(k: &str) -> String {
    k.chars().take(MAX_KEY_BYTES).collect()
}

/// The trace id of the agent's `traceparent` when it is one valid W3C
/// header (version 00: `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero;
/// a later version is read by its first four fields), lowercase. Anything
/// else carries no trace: the call goes on untraced, as W3C asks.
pub fn trace_id(headers: &HeaderMap) -> Option<String> {
    let mut lines = headers.get_all(TRACEPARENT).iter();
    let line = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let value = line.to_str().ok()?.trim();
    let mut fields = value.split('-');
    let version = fields.next()?;
    let trace = fields.next()?;
    let parent = fields.next()?;
    let flags = fields.next()?;
    let rest = fields.next();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || rest.is_none())
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then(|| trace.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &HeaderName, lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(name.clone(), l.parse().unwrap());
        }
        h
    }

    fn context(lines: &[&str]) -> Result<HashMap<String, String>, ContextError> {
        read(&headers(&KEYCAP_CONTEXT, lines))
    }

    #[test]
    fn pairs_are_read_across_lines_and_spaces() {
        let c = context(&[
            "step=charge-customer, tool_call_id=call_abc",
            " reasoning_id=r_42 ",
        ])
        .unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c["step"], "charge-customer");
        assert_eq!(c["tool_call_id"], "call_abc");
        assert_eq!(c["reasoning_id"], "r_42");
        assert!(context(&[]).unwrap().is_empty());
    }

    #[test]
    fn malformed_contexts_are_refused_with_the_rule_they_break() {
        assert_eq!(context(&[""]), Err(ContextError::NotPairs));
        assert_eq!(context(&["step"]), Err(ContextError::NotPairs));
        assert_eq!(context(&["a=1,,b=2"]), Err(ContextError::NotPairs));
        assert_eq!(context(&["1st=a"]), Err(ContextError::BadKey("1st".into())));
        assert_eq!(context(&["a b=1"]), Err(ContextError::BadKey("a b".into())));
        assert_eq!(
            context(&["step="]),
            Err(ContextError::BadValue("step".into()))
        );
        assert_eq!(
            context(&["step=a=b"]),
            Err(ContextError::BadValue("step".into()))
        );
        assert_eq!(
            context(&["step=\"x\""]),
            Err(ContextError::BadValue("step".into()))
        );
        assert_eq!(
            context(&["a=1", "a=2"]),
            Err(ContextError::Repeated("a".into()))
        );
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(
            context(&[&format!("{long_key}=1")]),
            Err(ContextError::BadKey(_))
        ));
        let long_value = "v".repeat(MAX_VALUE_BYTES + 1);
        assert!(matches!(
            context(&[&format!("k={long_value}")]),
            Err(ContextError::BadValue(_))
        ));
    }

    #[test]
    fn contexts_are_bounded_in_count_and_size() {
        let at_most: Vec<String> = (0..MAX_PAIRS).map(|i| format!("k{i}=v")).collect();
        assert_eq!(context(&[&at_most.join(",")]).unwrap().len(), MAX_PAIRS);
        let over: Vec<String> = (0..=MAX_PAIRS).map(|i| format!("k{i}=v")).collect();
        assert_eq!(context(&[&over.join(",")]), Err(ContextError::TooManyPairs));
        // Eight lines of one long pair each: under the pair count, over the
        // byte bound.
        let lines: Vec<String> = (0..8)
            .map(|i| format!("k{i}={}", "v".repeat(MAX_VALUE_BYTES)))
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        assert_eq!(context(&lines), Err(ContextError::TooLong));
        assert_eq!(context(&lines[..7]).unwrap().len(), 7);
    }

    #[test]
    fn the_trace_id_is_read_from_one_valid_traceparent() {
        let tp = |lines: &[&str]| trace_id(&headers(&TRACEPARENT, lines));
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            tp(&[good]).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        // A later version may add fields.
        assert!(tp(&["01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"]).is_some());
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(tp(&[bad]), None, "{bad}");
        }
        assert_eq!(tp(&[good, good]), None);
        assert_eq!(tp(&[]), None);
    }

    #[test]
    fn a_unicode_space_around_a_pair_is_not_a_space() {
        let mut h = HeaderMap::new();
        h.append(
            KEYCAP_CONTEXT,
            http::HeaderValue::from_bytes("\u{3000}step=a".as_bytes()).unwrap(),
        );
        assert!(matches!(read(&h), Err(ContextError::BadKey(_))));
        assert_eq!(context(&["\tstep=a "]).unwrap()["step"], "a");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any header bytes at all: reading never panics, and whatever
        /// it accepts is within the documented bounds.
        #[test]
        fn reading_any_header_never_panics(
            lines in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..12)
        ) {
            crate::check::keycap_context(&lines.join(&b'\n'));
        }

        /// Lines shaped like contexts (the alphabet the parser cares
        /// about), so the checks reach past the first refusal.
        #[test]
        fn reading_context_shaped_headers_never_panics(
            lines in proptest::collection::vec("[a-z0-9_=, \t\\\".-]{0,80}", 0..24)
        ) {
            crate::check::keycap_context(lines.join("\n").as_bytes());
        }

        /// Well-formed pairs are read back exactly.
        #[test]
        fn well_formed_pairs_are_read_back(
            pairs in proptest::collection::btree_map("[a-z][a-z0-9_.-]{0,20}", "[!-~&&[^,=\"\\\\]]{1,40}", 0..MAX_PAIRS)
        ) {
            let line: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let got = context(&[&line.join(", ")]);
            if pairs.is_empty() {
                proptest::prop_assert_eq!(got, Err(ContextError::NotPairs));
            } else {
                let got = got.unwrap();
                proptest::prop_assert_eq!(got.len(), pairs.len());
                for (k, v) in &pairs {
                    proptest::prop_assert_eq!(&got[k], v);
                }
            }
        }
    }
}
