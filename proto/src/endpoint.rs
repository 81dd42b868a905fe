//! What a key may call.
//!
//! Owns the `METHOD /path` endpoint patterns a vault key carries and the
//! decision whether a request's method and vendor path match one of them.
//!
//! It must never widen what an operator wrote: a literal segment matches only
//! itself, `*` matches whole non-empty segments only (never part of one, never
//! an empty segment or a trailing slash), and an empty set allows nothing. It
//! does not decode or normalise the request path; `target` has already refused
//! every path whose meaning could differ from its bytes, so the path matched
//! here is the path forwarded.

use std::fmt;

/// The HTTP methods a pattern may name. Methods are case-sensitive (RFC 9110),
/// so `get` is refused rather than silently treated as `GET`.
const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// Longest pattern text echoed back in an error.
const ECHO_LIMIT: usize = 80;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("endpoint {0:?} must look like \"METHOD /path\"")]
    Shape(String),
    #[error("endpoint {0:?}: method must be one of GET POST PUT PATCH DELETE HEAD OPTIONS or *")]
    Method(String),
    #[error("endpoint {pattern:?}: {reason}")]
    Path {
        pattern: String,
        reason: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: one whole non-empty segment, or one or more when last.
    Any,
}

/// One allowed endpoint, e.g. `POST /v1/payment_intents` or
/// `GET /v1/customers/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPattern {
    /// `None` for `*` (any method).
    method: Option<String>,
    segments: Vec<Segment>,
}

impl EndpointPattern {
    pub fn parse(s: &str) -> Result<Self, EndpointError> {
        let echo = || shorten(s);
        let mut parts = s.split_whitespace();
        let (Some(method), Some(path), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(EndpointError::Shape(echo()));
        };
        let method = match method {
            "*" => None,
            m if METHODS.contains(&m) => Some(m.to_string()),
            _ => return Err(EndpointError::Method(echo())),
        };
        let bad_path = |reason| EndpointError::Path {
            pattern: echo(),
            reason,
        };
        let Some(rest) = path.strip_prefix('/') else {
            return Err(bad_path("path must start with '/'"));
        };
        if path.contains(['?', '#', '%', '\\']) {
            // Patterns match the raw forwarded path; escapes, queries and
            // fragments in a pattern would never match what `target` passes.
            return Err(bad_path("path must not contain '?', '#', '%' or '\\'"));
        }
        if path.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(bad_path("path must be visible ASCII"));
        }
        let mut segments = Vec::new();
        if !rest.is_empty() {
            for seg in rest.split('/') {
                segments.push(match seg {
                    "" => return Err(bad_path("path has an empty segment or trailing '/'")),
                    "." | ".." => return Err(bad_path("path has a '.' or '..' segment")),
                    "*" => Segment::Any,
                    s if s.contains('*') => {
                        return Err(bad_path("'*' must be a whole segment (no partial globs)"))
                    }
                    s => Segment::Literal(s.to_string()),
                });
            }
        }
        Ok(EndpointPattern { method, segments })
    }

    /// Whether a request with this method and vendor path (no query) matches.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        if let Some(m) = &self.method {
            if m != method {
                return false;
            }
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        // "/" has no segments; anything else keeps its empty segments so a
        // trailing slash or `//` can never satisfy a `*` or a literal.
        let req: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let last = self.segments.len().wrapping_sub(1);
        for (i, pat) in self.segments.iter().enumerate() {
            match pat {
                Segment::Literal(lit) => {
                    if req.get(i) != Some(&lit.as_str()) {
                        return false;
                    }
                }
                Segment::Any if i == last => {
                    // Tail glob: one or more segments, all non-empty.
                    let tail = req.get(i..).unwrap_or(&[]);
                    return !tail.is_empty() && tail.iter().all(|s| !s.is_empty());
                }
                Segment::Any => match req.get(i) {
                    Some(s) if !s.is_empty() => {}
                    _ => return false,
                },
            }
        }
        req.len() == self.segments.len()
    }
}

impl std::str::FromStr for EndpointPattern {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for EndpointPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.method.as_deref().unwrap_or("*"))?;
        f.write_str(" ")?;
        if self.segments.is_empty() {
            return f.write_str("/");
        }
        for seg in &self.segments {
            f.write_str("/")?;
            match seg {
                Segment::Literal(l) => f.write_str(l)?,
                Segment::Any => f.write_str("*")?,
            }
        }
        Ok(())
    }
}

/// All the endpoints a key may call. Empty means nothing is allowed: a key
/// without endpoints is useless rather than unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSet(Vec<EndpointPattern>);

impl EndpointSet {
    pub fn parse(patterns: &[String]) -> Result<Self, EndpointError> {
        patterns
            .iter()
            .map(|p| EndpointPattern::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map(EndpointSet)
    }

    pub fn allows(&self, method: &str, path: &str) -> bool {
        self.0.iter().any(|p| p.matches(method, path))
    }

    pub fn patterns(&self) -> &[EndpointPattern] {
        &self.0
    }
}

fn shorten(s: &str) -> String {
    crate::clip(s, ECHO_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> EndpointPattern {
        EndpointPattern::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn issue_examples() {
        let set = EndpointSet::parse(&[
            "POST /v1/payment_intents".to_string(),
            "GET /v1/customers/*".to_string(),
        ])
        .unwrap();
        assert!(set.allows("POST", "/v1/payment_intents"));
        assert!(!set.allows("GET", "/v1/payment_intents"));
        assert!(!set.allows("POST", "/v1/payment_intents/pi_1"));
        assert!(!set.allows("POST", "/v1/payment_intents/"));
        assert!(set.allows("GET", "/v1/customers/cus_1"));
        assert!(set.allows("GET", "/v1/customers/cus_1/sources"));
        assert!(!set.allows("GET", "/v1/customers"));
        assert!(!set.allows("POST", "/v1/customers/cus_1"));
    }

    #[test]
    fn literal_segments_match_exactly() {
        let e = p("GET /v1/models");
        assert!(e.matches("GET", "/v1/models"));
        assert!(!e.matches("GET", "/v1/models/"));
        assert!(!e.matches("GET", "/v1/model"));
        assert!(!e.matches("GET", "/v1/modelsx"));
        assert!(!e.matches("GET", "/v1/Models"));
        assert!(!e.matches("GET", "/v1"));
        assert!(!e.matches("GET", "/v1/models/x"));
        assert!(!e.matches("GET", "v1/models"));
        assert!(!e.matches("GET", "//v1/models"));
        assert!(!e.matches("get", "/v1/models"));
    }

    #[test]
    fn middle_star_is_exactly_one_nonempty_segment() {
        let e = p("POST /v1/payment_intents/*/confirm");
        assert!(e.matches("POST", "/v1/payment_intents/pi_1/confirm"));
        assert!(!e.matches("POST", "/v1/payment_intents//confirm"));
        assert!(!e.matches("POST", "/v1/payment_intents/a/b/confirm"));
        assert!(!e.matches("POST", "/v1/payment_intents/pi_1"));
        assert!(!e.matches("POST", "/v1/payment_intents/pi_1/confirm/x"));
        assert!(!e.matches("POST", "/v1/payment_intents/pi_1/confirm/"));
    }

    #[test]
    fn tail_star_is_one_or_more_nonempty_segments() {
        let e = p("GET /v1/files/*");
        assert!(e.matches("GET", "/v1/files/f"));
        assert!(e.matches("GET", "/v1/files/f/content"));
        assert!(e.matches("GET", "/v1/files/a/b/c/d"));
        assert!(!e.matches("GET", "/v1/files"));
        assert!(!e.matches("GET", "/v1/files/"));
        assert!(!e.matches("GET", "/v1/files/f/"));
        assert!(!e.matches("GET", "/v1/files//f"));
        assert!(!e.matches("GET", "/v1/files/a//b"));
        assert!(!e.matches("GET", "/v1/filesx/f"));
    }

    #[test]
    fn root_and_whole_glob() {
        let root = p("GET /");
        assert!(root.matches("GET", "/"));
        assert!(!root.matches("GET", "/x"));
        let all = p("* /*");
        assert!(all.matches("DELETE", "/anything/at/all"));
        assert!(all.matches("PATCH", "/x"));
        assert!(!all.matches("GET", "/"));
        assert!(!all.matches("GET", "/x/"));
    }

    #[test]
    fn any_method() {
        let e = p("* /v1/models");
        for m in METHODS {
            assert!(e.matches(m, "/v1/models"), "{m}");
        }
        assert!(!e.matches("GET", "/v1/models/x"));
    }

    #[test]
    fn parse_refuses_bad_patterns() {
        for bad in [
            "",
            "GET",
            "/v1/x",
            "GET /v1 extra",
            "get /v1/x",
            "FETCH /v1/x",
            "GET v1/x",
            "GET /v1/",
            "GET /v1//x",
            "GET //",
            "GET /v1/cus_*",
            "GET /v1/*x",
            "GET /v1/**",
            "GET /v1/../x",
            "GET /v1/./x",
            "GET /v1/x?y=1",
            "GET /v1/x#y",
            "GET /v1/%2e",
            "GET /v1\\x",
        ] {
            assert!(EndpointPattern::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(matches!(
            EndpointPattern::parse("GET /a*b"),
            Err(EndpointError::Path { .. })
        ));
        assert!(matches!(
            EndpointPattern::parse("get /a"),
            Err(EndpointError::Method(_))
        ));
    }

    #[test]
    fn surrounding_whitespace_is_tolerated() {
        assert_eq!(p("  GET   /v1/x  "), p("GET /v1/x"));
    }

    #[test]
    fn display_round_trips() {
        for s in ["GET /", "* /v1/*", "POST /v1/a/*/b", "DELETE /x"] {
            let e = p(s);
            assert_eq!(e.to_string(), s);
            assert_eq!(p(&e.to_string()), e);
        }
    }

    #[test]
    fn empty_set_allows_nothing() {
        let set = EndpointSet::parse(&[]).unwrap();
        assert!(!set.allows("GET", "/"));
        assert!(!set.allows("GET", "/v1/models"));
        assert!(EndpointSet::default().patterns().is_empty());
    }

    #[test]
    fn set_parse_fails_on_any_bad_entry() {
        let err = EndpointSet::parse(&["GET /ok".into(), "GET /bad*".into()]).unwrap_err();
        assert!(err.to_string().contains("/bad*"), "{err}");
    }

    #[test]
    fn errors_truncate_long_input() {
        let long = format!("GET /{}", "a*".repeat(10_000));
        let msg = EndpointPattern::parse(&long).unwrap_err().to_string();
        assert!(msg.len() < 250, "{}", msg.len());
    }
}
