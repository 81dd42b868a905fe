//! The generic profile's rules: how to price any HTTP API.
//!
//! An operator lists the vendor's endpoints (the allowed-endpoint pattern
//! syntax, first match wins) and for each either a fixed cost, or a fixed
//! reservation plus where the response states the real cost (a header or a
//! JSON pointer into the body). A request no rule matches is refused, so
//! nothing leaves unpriced. A rule may name the query parameters it lets
//! through on writes (`query_params`); the proxy refuses any other query
//! parameter on a write. Amounts are decimal strings, never floats.

use serde::Deserialize;

use super::{clip, PriceTableError};
use crate::endpoint::EndpointPattern;
use crate::Micros;

/// The unit a vendor states its cost in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CostUnit {
    /// Decimal US dollars: "0.25" (or a JSON number written the same way).
    Usd,
    /// Whole US cents.
    Cents,
    /// Whole micro-dollars.
    Micros,
}

/// Where a call's cost comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cost {
    /// The same for every call the rule matches.
    Fixed(Micros),
    /// Read from a response header (name lowercase).
    Header { name: String, unit: CostUnit },
    /// Read from the response's JSON body at an RFC 6901 pointer.
    JsonPointer { pointer: String, unit: CostUnit },
}

/// One endpoint's price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenericRule {
    pub endpoint: EndpointPattern,
    /// What is reserved before the call: the fixed cost, or the rule's
    /// `reserve` for a cost read from the response.
    pub reserve: Micros,
    pub cost: Cost,
    /// Query parameters the operator knows are harmless on this rule's
    /// writes (any value); any other query parameter on a write is refused.
    pub query_params: Vec<String>,
}

/// A generic vendor's rules, in match order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenericRules {
    pub as_of: Option<String>,
    pub rules: Vec<GenericRule>,
    /// The header the real credential goes in, as the value itself;
    /// `None` for `Authorization: Bearer <credential>`.
    pub credential_header: Option<String>,
    /// The path of a cheap authenticated read (`GET`) that shows whether a
    /// credential works (`profile::ProbeRequest`); `None`: credentials of
    /// this vendor cannot be probed.
    pub probe_path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    #[serde(default)]
    as_of: Option<String>,
    currency: String,
    rules: Vec<RawRule>,
    #[serde(default)]
    credential_header: Option<String>,
    #[serde(default)]
    probe_path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    endpoint: String,
    #[serde(default)]
    reserve: Option<String>,
    cost: RawCost,
    #[serde(default)]
    query_params: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RawCost {
    Fixed(String),
    Header { name: String, unit: CostUnit },
    JsonPointer { pointer: String, unit: CostUnit },
}

/// Most rules one vendor may have.
const MAX_RULES: usize = 256;
/// Most query parameters one rule may let through on a write.
const MAX_QUERY_PARAMS: usize = 32;

fn err(msg: String) -> PriceTableError {
    PriceTableError(msg)
}

fn amount(field: &str, text: &str) -> Result<Micros, PriceTableError> {
    Micros::parse_usd(text)
        .ok()
        .filter(|m| !m.is_negative())
        .ok_or_else(|| {
            err(format!(
                "generic rules: {field} must be a non-negative decimal of USD, got {:?}",
                clip(text)
            ))
        })
}

fn header_name(name: &str, field: &str) -> Result<String, PriceTableError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(err(format!(
            "generic rules: {field} {:?} is not a header name",
            clip(name)
        )));
    }
    Ok(name.to_ascii_lowercase())
}

impl GenericRules {
    pub fn from_json(text: &str) -> Result<Self, PriceTableError> {
        let raw: RawRules = serde_json::from_str(text)
            .map_err(|e| err(format!("generic rules are not valid: {e}")))?;
        if raw.currency != "usd" {
            return Err(err(
                "generic rules must have \"currency\": \"usd\"".to_string()
            ));
        }
        if raw.rules.is_empty() || raw.rules.len() > MAX_RULES {
            return Err(err(format!(
                "generic rules: \"rules\" must list 1 to {MAX_RULES} endpoints"
            )));
        }
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.into_iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            let endpoint = EndpointPattern::parse(&r.endpoint)
                .map_err(|e| err(format!("generic rules: {}: {e}", at("endpoint"))))?;
            let reserve = r
                .reserve
                .as_deref()
                .map(|t| amount(&at("reserve"), t))
                .transpose()?;
            let (reserve, cost) = match r.cost {
                RawCost::Fixed(t) => {
                    if reserve.is_some() {
                        return Err(err(format!(
                            "generic rules: {} is not used with a fixed cost",
                            at("reserve")
                        )));
                    }
                    let c = amount(&at("cost.fixed"), &t)?;
                    (c, Cost::Fixed(c))
                }
                RawCost::Header { name, unit } => {
                    let name = header_name(&name, &at("cost.header.name"))?;
                    (
                        needs_reserve(reserve, &at("reserve"))?,
                        Cost::Header { name, unit },
                    )
                }
                RawCost::JsonPointer { pointer, unit } => {
                    if !(pointer.is_empty() || pointer.starts_with('/')) || pointer.len() > 256 {
                        return Err(err(format!(
                            "generic rules: {} must be a JSON pointer (\"/usage/cost\")",
                            at("cost.json_pointer.pointer")
                        )));
                    }
                    (
                        needs_reserve(reserve, &at("reserve"))?,
                        Cost::JsonPointer { pointer, unit },
                    )
                }
            };
            if r.query_params.len() > MAX_QUERY_PARAMS {
                return Err(err(format!(
                    "generic rules: {} may name at most {MAX_QUERY_PARAMS} parameters",
                    at("query_params")
                )));
            }
            for name in &r.query_params {
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.[]".contains(&b));
                if !ok {
                    return Err(err(format!(
                        "generic rules: {} entry {:?} is not a query parameter name",
                        at("query_params"),
                        clip(name)
                    )));
                }
            }
            rules.push(GenericRule {
                endpoint,
                reserve,
                cost,
                query_params: r.query_params,
            });
        }
        let credential_header = raw
            .credential_header
            .map(|h| header_name(&h, "credential_header"))
            .transpose()?;
        if let Some(h) = &credential_header {
            crate::profile::check_credential_header(h)
                .map_err(|e| err(format!("generic rules: credential_header: {e}")))?;
        }
        if let Some(p) = &raw.probe_path {
            crate::profile::check_probe_path(p)
                .map_err(|e| err(format!("generic rules: probe_path: {e}")))?;
        }
        Ok(GenericRules {
            as_of: raw.as_of,
            rules,
            credential_header,
            probe_path: raw.probe_path,
        })
    }

    /// The first rule matching a request.
    pub fn rule_for(&self, method: &str, path: &str) -> Option<(usize, &GenericRule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.endpoint.matches(method, path))
    }
}

/// A cost read from the response needs a positive reservation first: the
/// call must hold budget before it leaves.
fn needs_reserve(reserve: Option<Micros>, field: &str) -> Result<Micros, PriceTableError> {
    match reserve {
        Some(r) if r.0 > 0 => Ok(r),
        _ => Err(err(format!(
            "generic rules: {field} must be a positive decimal of USD when the cost is read from the response"
        ))),
    }
}

impl CostUnit {
    /// The cost stated by `text` in this unit, as micro-dollars; `None` if
    /// it is not a non-negative amount in the unit.
    pub fn parse(self, text: &str) -> Option<Micros> {
        let t = text.trim();
        let m = match self {
            CostUnit::Usd => Micros::parse_usd(t).ok()?,
            CostUnit::Cents => {
                let cents: i64 = digits(t)?;
                Micros(cents.checked_mul(10_000)?)
            }
            CostUnit::Micros => Micros(digits(t)?),
        };
        (!m.is_negative()).then_some(m)
    }
}

fn digits(t: &str) -> Option<i64> {
    (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .then(|| t.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"{
        "as_of": "2026-11-23", "currency": "usd",
        "credential_header": "X-Api-Key",
        "rules": [
            {"endpoint": "POST /v1/renders", "cost": {"fixed": "0.05"},
             "query_params": ["format", "page[size]"]},
            {"endpoint": "POST /v1/jobs/*", "reserve": "1.00",
             "cost": {"header": {"name": "X-Request-Cost", "unit": "usd"}}},
            {"endpoint": "POST /v1/generate", "reserve": "0.50",
             "cost": {"json_pointer": {"pointer": "/usage/cost_micros", "unit": "micros"}}},
            {"endpoint": "GET /*", "cost": {"fixed": "0"}}
        ]}"#;

    #[test]
    fn rules_parse_and_match_in_order() {
        let r = GenericRules::from_json(RULES).unwrap();
        assert_eq!(r.credential_header.as_deref(), Some("x-api-key"));
        let (i, rule) = r.rule_for("POST", "/v1/renders").unwrap();
        assert_eq!((i, rule.reserve), (0, Micros(50_000)));
        assert_eq!(rule.query_params, ["format", "page[size]"]);
        let (i, rule) = r.rule_for("POST", "/v1/jobs/j1").unwrap();
        assert_eq!(i, 1);
        assert_eq!(rule.reserve, Micros(1_000_000));
        assert_eq!(
            rule.cost,
            Cost::Header {
                name: "x-request-cost".into(),
                unit: CostUnit::Usd
            }
        );
        assert_eq!(r.rule_for("GET", "/anything").unwrap().0, 3);
        assert!(r.rule_for("POST", "/v1/other").is_none());
        assert!(r.rule_for("DELETE", "/v1/renders").is_none());
    }

    #[test]
    fn bad_rules_are_refused_naming_the_field() {
        for (bad, says) in [
            (RULES.replace("\"currency\": \"usd\"", "\"currency\": \"eur\""), "currency"),
            (RULES.replace("POST /v1/renders", "POST v1/renders"), "rules[0].endpoint"),
            (RULES.replace("\"fixed\": \"0.05\"", "\"fixed\": \"-1\""), "rules[0].cost.fixed"),
            (RULES.replace("\"fixed\": \"0.05\"", "\"fixed\": 0.05"), "not valid"),
            (RULES.replace("\"reserve\": \"1.00\",", ""), "rules[1].reserve"),
            (RULES.replace("\"reserve\": \"1.00\"", "\"reserve\": \"0\""), "rules[1].reserve"),
            (RULES.replace("X-Request-Cost", "x cost"), "rules[1].cost.header.name"),
            (RULES.replace("/usage/cost_micros", "usage"), "pointer"),
            (RULES.replace("\"micros\"", "\"pennies\""), "not valid"),
            (RULES.replace("X-Api-Key", "x:key"), "credential_header"),
            (RULES.replace("X-Api-Key", "Host"), "credential_header"),
            (RULES.replace("X-Api-Key", "Content-Length"), "credential_header"),
            (RULES.replace("X-Api-Key", "transfer-encoding"), "credential_header"),
            (RULES.replace("X-Api-Key", "Connection"), "credential_header"),
            (RULES.replace("X-Api-Key", "Proxy-Authorization"), "credential_header"),
            (RULES.replace("\"format\"", "\"a b\""), "rules[0].query_params"),
            (RULES.replace("\"format\"", "\"\""), "rules[0].query_params"),
            (
                r#"{"currency": "usd", "rules": []}"#.to_string(),
                "1 to",
            ),
            (
                r#"{"currency": "usd", "rules": [{"endpoint": "GET /", "reserve": "1", "cost": {"fixed": "1"}}]}"#.to_string(),
                "not used with a fixed cost",
            ),
        ] {
            let e = GenericRules::from_json(&bad).unwrap_err();
            assert!(e.0.contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn cost_units() {
        assert_eq!(CostUnit::Usd.parse("0.25"), Some(Micros(250_000)));
        assert_eq!(CostUnit::Usd.parse(" 1 "), Some(Micros(1_000_000)));
        assert_eq!(CostUnit::Usd.parse("1e-3"), None);
        assert_eq!(CostUnit::Usd.parse("-1"), None);
        assert_eq!(CostUnit::Cents.parse("25"), Some(Micros(250_000)));
        assert_eq!(CostUnit::Cents.parse("2.5"), None);
        assert_eq!(CostUnit::Micros.parse("1234"), Some(Micros(1234)));
        assert_eq!(CostUnit::Micros.parse("99999999999999999999"), None);
        assert_eq!(CostUnit::Micros.parse(""), None);
    }
}
