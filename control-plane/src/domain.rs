//! Validated domain types of the control plane.
//!
//! Everything the store and the services handle has passed through here:
//! wire messages and REST bodies are converted with the constructors below,
//! so the core never sees an unvalidated name, URL, cap or duration. This
//! module owns validation rules and must never do I/O.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use keycap_proto::secret::SecretKind;
use keycap_proto::Micros;

pub mod roll;
pub use roll::KeyRoll;

/// Largest cap keycap accepts: one billion dollars. Anything above is a typo
/// (or an attempt to make a cap meaningless) and is refused.
pub const MAX_CAP: Micros = Micros(1_000_000_000 * 1_000_000);
/// Longest a vault key may live.
pub const MAX_KEY_LIFETIME: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);
pub const MAX_ALLOWED_ENDPOINTS: usize = 256;

/// A validation failure, phrased for the client that sent the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidInput {
    pub field: &'static str,
    pub reason: String,
}

pub fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidInput {
    InvalidInput {
        field,
        reason: reason.into(),
    }
}

/// A vendor's name: the first path segment agents use on the proxy
/// (`/{vendor}/...`). Lowercase letters, digits and '-', 1 to 64 characters,
/// and never `vault` (reserved for the admin relay).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VendorName(String);

impl VendorName {
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-');
        if !ok {
            return Err(invalid(
                "name",
                "vendor names are 1-64 characters of a-z, 0-9 and '-'",
            ));
        }
        if s == "vault" || s == "_keycap" {
            return Err(invalid("name", format!("{s:?} is reserved")));
        }
        Ok(VendorName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VendorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub use keycap_proto::profile::Profile;

/// The profile named `s`, or a clear error naming the known ones.
pub fn parse_profile(s: &str) -> Result<Profile, InvalidInput> {
    Profile::parse(s).ok_or_else(|| {
        invalid(
            "profile",
            format!(
                "unknown profile {:?}; known profiles: {}",
                keycap_proto::clip(s, 64),
                Profile::names()
            ),
        )
    })
}

/// An http(s) base URL without query, fragment or userinfo, stored without a
/// trailing slash.
pub fn parse_base_url(s: &str) -> Result<String, InvalidInput> {
    let bad = |why: &str| invalid("base_url", why.to_string());
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| bad("must start with https:// or http://"))?;
    if s.len() > 2048 {
        return Err(bad("too long"));
    }
    if rest.contains(['?', '#', '@', '\\', ' ']) || rest.chars().any(|c| c.is_control()) {
        return Err(bad(
            "must not contain a query, fragment, userinfo, backslash or space",
        ));
    }
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    if rest.split('/').skip(1).any(|seg| seg == "." || seg == "..") {
        return Err(bad("must not contain dot segments"));
    }
    // The proxy joins request paths onto it and parses the result: a base
    // it cannot parse (a '%' or '[' in the host, say) would make every call
    // to the vendor fail.
    if s.parse::<http::Uri>()
        .map_or(true, |u| u.host().is_none_or(str::is_empty))
    {
        return Err(bad("is not a valid URL"));
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// Where a vendor's calls may go: the control plane's
/// `--allow-private-upstreams` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamPolicy {
    /// `https://` only, and only to globally routable addresses
    /// (`keycap_proto::network::is_public_upstream`): the default.
    PublicHttps,
    /// Any `http(s)` base URL: for test vendors on loopback and `keycap
    /// dev`. Proxies are told, per vendor, that they may connect to
    /// private addresses for it.
    AllowPrivate,
}

/// Checks what can be checked of `base_url` (already parsed by
/// `parse_base_url`) without a resolver under `policy`: the scheme, and a
/// host given as an IP address. Returns the host name and port still to
/// be resolved and checked, if any.
pub fn check_upstream(
    base_url: &str,
    policy: UpstreamPolicy,
) -> Result<Option<(String, u16)>, InvalidInput> {
    if policy == UpstreamPolicy::AllowPrivate {
        return Ok(None);
    }
    let uri: http::Uri = base_url
        .parse()
        .map_err(|_| invalid("base_url", "is not a valid URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(invalid(
            "base_url",
            "must be https:// (plain http only with the control plane's --allow-private-upstreams)",
        ));
    }
    let host = uri.host().unwrap_or("");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return if keycap_proto::network::is_public_upstream(ip) {
            Ok(None)
        } else {
            Err(private_upstream(host, ip))
        };
    }
    Ok(Some((host.to_string(), uri.port_u16().unwrap_or(443))))
}

/// The refusal of a base URL whose host is, or resolves to, `ip`.
pub fn private_upstream(host: &str, ip: std::net::IpAddr) -> InvalidInput {
    let host = keycap_proto::clip(host, 128);
    let what = if host.trim_matches(['[', ']']) == ip.to_string() {
        host
    } else {
        format!("{host} resolves to {ip}, which")
    };
    invalid(
        "base_url",
        format!(
            "{what} is a loopback, link-local, private or otherwise non-public address; \
             vendors there need the control plane's --allow-private-upstreams"
        ),
    )
}

/// Currency code -> decimal USD per unit. Codes are lowercased and rates
/// trimmed, then checked by the rule the proxy prices with
/// (`prices::CurrencyRates`), so every rate stored is one each proxy serves.
pub fn parse_currency_rates(
    raw: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, InvalidInput> {
    let out: BTreeMap<String, String> = raw
        .iter()
        .map(|(code, rate)| (code.to_ascii_lowercase(), rate.trim().to_string()))
        .collect();
    if out.len() != raw.len() {
        return Err(invalid(
            "currency_rates",
            "a currency is given twice (codes are not case-sensitive)",
        ));
    }
    keycap_proto::prices::CurrencyRates::parse(&out)
        .map_err(|e| invalid("currency_rates", e.to_string()))?;
    Ok(out)
}

/// An operator's price table for a vendor of `profile`: checked by the
/// same parser the proxy prices with, and stored as compact JSON. Empty
/// text keeps the prices shipped with keycap.
pub fn parse_prices(profile: Profile, text: &str) -> Result<String, InvalidInput> {
    if text.trim().is_empty() {
        if profile == Profile::Generic {
            return Err(invalid(
                "prices_json",
                "a generic vendor needs its pricing rules (see docs/pricing.md)",
            ));
        }
        return Ok(String::new());
    }
    keycap_proto::prices::VendorPrices::parse(profile, text)
        .map_err(|e| invalid("prices_json", e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid("prices_json", e.to_string()))?;
    Ok(value.to_string())
}

/// Whether `credential` can be injected for a vendor of `profile` with
/// `prices` (a generic vendor's rules may name the header): checked by the
/// code the proxy injects with, so a credential stored here is never one a
/// proxy cannot send.
pub fn check_credential(
    profile: Profile,
    prices: &str,
    credential: &str,
) -> Result<(), InvalidInput> {
    let own_header = match profile {
        Profile::Generic => {
            keycap_proto::prices::GenericRules::from_json(prices)
                .map_err(|e| invalid("prices_json", e.to_string()))?
                .credential_header
        }
        _ => None,
    };
    keycap_proto::profile::CredentialInjection::new(profile, own_header.as_deref(), credential)
        .map(drop)
        .map_err(|e| invalid("credential", e.to_string()))
}

/// A vendor as stored, without its credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vendor {
    pub name: VendorName,
    pub profile: Profile,
    pub base_url: String,
    pub currency_rates: BTreeMap<String, String>,
    /// The operator's price table (canonical JSON text); empty when the
    /// prices shipped with keycap apply.
    pub prices: String,
    /// Proxies forward the agent's W3C trace context (`traceparent`,
    /// `tracestate`) to the vendor; off by default, when both are stripped.
    pub forward_trace_context: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the credential was last set (a KEK rotation does not count).
    pub credential_set_at: DateTime<Utc>,
    /// How long a credential may be used before it is due for rotation;
    /// `None`: never.
    pub rotate_after: Option<chrono::TimeDelta>,
}

impl Vendor {
    /// When the credential is due for rotation, if the vendor says.
    pub fn rotation_due_at(&self) -> Option<DateTime<Utc>> {
        self.rotate_after.map(|d| self.credential_set_at + d)
    }

    /// Whether the credential is due for rotation at `now`.
    pub fn rotation_overdue(&self, now: DateTime<Utc>) -> bool {
        self.rotation_due_at().is_some_and(|due| due <= now)
    }
}

/// Parses a vendor's `rotate_after`: "90d", "12h", "30days"; empty for
/// none. At least an hour, at most ten years.
pub fn parse_rotate_after(s: &str) -> Result<Option<chrono::TimeDelta>, InvalidInput> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let d = humantime::parse_duration(t).map_err(|e| {
        invalid(
            "rotate_after",
            format!("{s:?} is not a duration like \"90d\": {e}"),
        )
    })?;
    if d < std::time::Duration::from_secs(1) || d.as_secs() > 10 * 366 * 86_400 {
        return Err(invalid("rotate_after", "must be from 1 second to 10 years"));
    }
    chrono::TimeDelta::from_std(d)
        .map(Some)
        .map_err(|_| invalid("rotate_after", "too large"))
}

/// An allowed endpoint, `METHOD /path` with `*` globs. Parsed by the same
/// code the proxy matches with, so a key the control plane accepts is never
/// one the proxy would drop; stored in its canonical form.
pub fn parse_allowed_endpoint(s: &str) -> Result<String, InvalidInput> {
    keycap_proto::endpoint::EndpointPattern::parse(s)
        .map(|p| p.to_string())
        .map_err(|e| invalid("allowed_endpoints", e.to_string()))
}

/// A key's allowed endpoints: 1 to `MAX_ALLOWED_ENDPOINTS` of them, each
/// parsed by `parse_allowed_endpoint`.
pub fn parse_allowed_endpoints(list: &[String]) -> Result<Vec<String>, InvalidInput> {
    if list.is_empty() {
        return Err(invalid(
            "allowed_endpoints",
            "at least one endpoint is required, e.g. \"POST /v1/payment_intents\"",
        ));
    }
    if list.len() > MAX_ALLOWED_ENDPOINTS {
        return Err(invalid("allowed_endpoints", "at most 256 endpoints"));
    }
    list.iter().map(|e| parse_allowed_endpoint(e)).collect()
}

/// A cap in micro-dollars: positive and at most `MAX_CAP`.
pub fn parse_cap(field: &'static str, v: Micros) -> Result<Micros, InvalidInput> {
    if v.0 <= 0 {
        return Err(invalid(field, "must be greater than 0"));
    }
    if v > MAX_CAP {
        return Err(invalid(field, format!("must be at most {MAX_CAP} USD")));
    }
    Ok(v)
}

/// Parses `expires_in` text: "2h", "90m", "1d 12h", "3600s", or seconds as
/// digits.
pub fn parse_expires_in(s: &str) -> Result<std::time::Duration, InvalidInput> {
    let t = s.trim();
    let d = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>()
            .map(std::time::Duration::from_secs)
            .map_err(|_| invalid("expires_in", "too large"))?
    } else {
        humantime::parse_duration(t).map_err(|e| {
            invalid(
                "expires_in",
                format!("{s:?} is not a duration like \"2h\" or \"30m\": {e}"),
            )
        })?
    };
    check_lifetime(d)
}

pub fn check_lifetime(d: std::time::Duration) -> Result<std::time::Duration, InvalidInput> {
    if d.as_secs() < 1 {
        return Err(invalid("expires_in", "must be at least 1 second"));
    }
    if d > MAX_KEY_LIFETIME {
        return Err(invalid("expires_in", "must be at most 366 days"));
    }
    Ok(d)
}

/// Longest a change may be asked to wait for proxies to confirm.
pub const MAX_ACK_TIMEOUT_MS: u64 = 60_000;

/// A change's wait for proxies, in milliseconds: `None` (the control
/// plane's `--ack-timeout-ms`) for 0, at most a minute.
pub fn parse_ack_timeout_ms(ms: u64) -> Result<Option<std::time::Duration>, InvalidInput> {
    match ms {
        0 => Ok(None),
        ms if ms > MAX_ACK_TIMEOUT_MS => Err(invalid(
            "ack_timeout_ms",
            format!("must be at most {MAX_ACK_TIMEOUT_MS} (0: the control plane's default)"),
        )),
        ms => Ok(Some(std::time::Duration::from_millis(ms))),
    }
}

/// A node id as proxies send it on the fleet API: 1-128 characters, no
/// control characters.
pub fn parse_node_id(s: &str) -> Result<&str, InvalidInput> {
    if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control()) {
        return Err(invalid("node_id", "must be 1-128 printable characters"));
    }
    Ok(s)
}

/// An agent run label: free text that ties spend to a run, 1-200 printable
/// characters.
pub fn parse_run_label(s: &str) -> Result<String, InvalidInput> {
    if s.is_empty() || s.len() > 200 || s.chars().any(|c| c.is_control()) {
        return Err(invalid(
            "agent_run_label",
            "must be 1-200 printable characters",
        ));
    }
    Ok(s.to_string())
}

/// A key's network limits: its request rate per proxy, the client networks
/// it may be used from and the zone of proxies that serve it. The default
/// limits nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Calls per minute through one proxy; `None`: no limit.
    pub rate_limit_per_minute: Option<u32>,
    /// Empty: any client address.
    pub allowed_cidrs: Vec<keycap_proto::network::IpNet>,
    /// `None`: served by a proxy in any zone (or none).
    pub zone: Option<String>,
}

impl KeyLimits {
    /// Validates limits as a client sent them: `rate_limit_per_minute` 0
    /// (none) up to `MAX_RATE_LIMIT_PER_MINUTE`, CIDRs (or single
    /// addresses) without host bits, and a zone name or "" for any.
    pub fn parse(
        rate_limit_per_minute: i64,
        allowed_cidrs: &[String],
        zone: &str,
    ) -> Result<Self, InvalidInput> {
        use keycap_proto::network;
        let rate = u32::try_from(rate_limit_per_minute).map_err(|_| {
            invalid(
                "rate_limit_per_minute",
                "must be 0 (no limit) or a positive whole number",
            )
        })?;
        let rate_limit_per_minute = network::parse_rate_limit(rate)
            .map_err(|e| invalid("rate_limit_per_minute", e.to_string()))?;
        let allowed_cidrs = network::parse_cidrs(allowed_cidrs)
            .map_err(|e| invalid("allowed_cidrs", e.to_string()))?;
        let zone = match zone {
            "" => None,
            z => Some(network::parse_zone(z).map_err(|e| invalid("zone", e.to_string()))?),
        };
        Ok(KeyLimits {
            rate_limit_per_minute,
            allowed_cidrs,
            zone,
        })
    }

    /// The CIDRs as text, in their canonical form.
    pub fn cidr_strings(&self) -> Vec<String> {
        self.allowed_cidrs.iter().map(|n| n.to_string()).collect()
    }

    /// A child key's limits under a parent with `self`: each limit the
    /// child leaves out is the parent's; one it states must be at least as
    /// tight (every CIDR inside one of the parent's, the parent's zone, a
    /// rate no higher), or it is refused naming the field. Like caps and
    /// endpoints, a child never loosens what its parent is held to.
    pub fn for_child(&self, child: &KeyLimits) -> Result<KeyLimits, InvalidInput> {
        let rate_limit_per_minute = match (self.rate_limit_per_minute, child.rate_limit_per_minute)
        {
            (Some(p), Some(c)) if c > p => {
                return Err(invalid(
                    "rate_limit_per_minute",
                    format!("must not exceed the parent key's ({p} per minute)"),
                ))
            }
            (p, None) => p,
            (_, c) => c,
        };
        let allowed_cidrs = if child.allowed_cidrs.is_empty() {
            self.allowed_cidrs.clone()
        } else {
            if !self.allowed_cidrs.is_empty() {
                if let Some(outside) = child
                    .allowed_cidrs
                    .iter()
                    .find(|c| !self.allowed_cidrs.iter().any(|p| p.contains(*c)))
                {
                    return Err(invalid(
                        "allowed_cidrs",
                        format!("{outside} is not within the parent key's networks"),
                    ));
                }
            }
            child.allowed_cidrs.clone()
        };
        let zone = match (&self.zone, &child.zone) {
            (Some(p), Some(c)) if p != c => {
                return Err(invalid(
                    "zone",
                    format!("the parent key is bound to zone {p:?}; a child must be too"),
                ))
            }
            (p, None) => p.clone(),
            (_, c) => c.clone(),
        };
        Ok(KeyLimits {
            rate_limit_per_minute,
            allowed_cidrs,
            zone,
        })
    }
}

/// A vault key as stored. The secret itself is never stored: only its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultKey {
    pub id: String,
    pub key_hash: [u8; 32],
    pub key_prefix: String,
    pub vendor: VendorName,
    pub allowed_endpoints: Vec<String>,
    pub daily_cap: Micros,
    pub per_call_cap: Option<Micros>,
    pub lifetime_cap: Option<Micros>,
    pub expires_at: DateTime<Utc>,
    pub agent_run_label: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub limits: KeyLimits,
    /// The key whose caps this key also draws on (a budget tree); `None`
    /// for a root key. Fixed at mint.
    pub parent_id: Option<String>,
    /// A call reserving more than this needs a person's approval
    /// (`crate::approval`); already the lowest along the key's ancestors.
    pub approval_above: Option<Micros>,
    /// Its place in a roll chain, and the budget it spends (`roll`).
    pub roll: KeyRoll,
    /// Set: the key is in observe mode (docs/observe.md) and this is the
    /// daily ceiling actually enforced; its own caps, allowlist and rate
    /// limit only mark the calls they would refuse. `None`: it enforces.
    pub observe_ceiling: Option<Micros>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

impl KeyStatus {
    /// The REST spelling, shared by keys and admin tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }
}

impl VaultKey {
    /// The budget this key spends: its roll chain's first key, or itself.
    /// Leases, daily spend and the budget tree are all keyed by it.
    pub fn budget_id(&self) -> &str {
        self.roll.budget_id.as_deref().unwrap_or(&self.id)
    }

    /// The daily cap the budget machinery holds the key to: its observe
    /// ceiling in observe mode, else its daily cap.
    pub fn enforced_daily_cap(&self) -> Micros {
        self.observe_ceiling.unwrap_or(self.daily_cap)
    }

    /// The mode's REST and gRPC spelling: `observe` or `enforce`.
    pub fn mode(&self) -> &'static str {
        if self.observe_ceiling.is_some() {
            "observe"
        } else {
            "enforce"
        }
    }

    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        if self.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at <= now {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

/// The policy a key in observe mode enforces once switched (`Store::
/// enforce_key`): its caps and endpoints, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnforcedTerms {
    pub daily_cap: Micros,
    pub per_call_cap: Option<Micros>,
    pub lifetime_cap: Option<Micros>,
    pub allowed_endpoints: Vec<String>,
}

/// What a key has spent: settled amounts from the ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeySpend {
    pub spent_day: Micros,
    pub calls_day: i64,
    pub spent_lifetime: Micros,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyFilter {
    pub agent_run_label: Option<String>,
    pub vendor: Option<String>,
    pub include_inactive: bool,
}

/// How a reserved call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Settled at the cost the response showed.
    Settled,
    /// The vendor did not bill the call; the reservation was released.
    Released,
    /// The response could not be priced; settled at the reservation.
    SettledAtReservation,
    /// Not a forwarded call: calls of the key refused for one reason within
    /// one minute on one proxy (`refusal_reason`, `refused_calls`). Costs
    /// nothing and counts no call against the key.
    Refused,
    /// Not a vendor call: an inbound hook's event verified and relayed to
    /// its destination (`crate::hooks`). Costs nothing, names no key.
    Relayed,
}

impl Outcome {
    /// Whether the entry is a call of its key: spend and call counts add
    /// up only these.
    pub fn is_call(self) -> bool {
        !matches!(self, Outcome::Refused | Outcome::Relayed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Settled => "settled",
            Outcome::Released => "released",
            Outcome::SettledAtReservation => "settled_at_reservation",
            Outcome::Refused => "refused",
            Outcome::Relayed => "relayed",
        }
    }

    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "settled" => Ok(Outcome::Settled),
            "released" => Ok(Outcome::Released),
            "settled_at_reservation" => Ok(Outcome::SettledAtReservation),
            "refused" => Ok(Outcome::Refused),
            "relayed" => Ok(Outcome::Relayed),
            other => Err(invalid("outcome", format!("unknown outcome {other:?}"))),
        }
    }
}

/// One spend event from a proxy: a forwarded call and what it cost. Applied
/// once per `event_id`; it becomes one audit entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendEvent {
    pub event_id: String,
    pub lease_id: String,
    pub key_id: String,
    /// UTC day (YYYY-MM-DD) of the budget window the call was reserved in.
    pub day: String,
    pub vendor: String,
    pub method: String,
    pub path: String,
    pub upstream_status: i32,
    pub reserved: Micros,
    pub cost: Micros,
    pub outcome: Outcome,
    pub at: DateTime<Utc>,
    pub node_id: String,
    pub detail_json: String,
    /// W3C trace id of the call's span (32 lowercase hex digits), or empty.
    pub trace_id: String,
    /// The agent's context for the call (see `validate_context`).
    pub context: BTreeMap<String, String>,
    /// For a `Refused` entry, the error code the calls were refused with
    /// (see `REFUSAL_REASONS`); empty otherwise.
    pub refusal_reason: String,
    /// For a `Refused` entry, how many calls it stands for (at least 1); 0
    /// otherwise.
    pub refused_calls: i64,
    /// The vendor credential version the call was forwarded with
    /// (docs/rotation.md); 0 for a refusal, or from a proxy before versions.
    pub credential_version: i64,
    /// For a call of a key in observe mode: the refusal code enforcement
    /// would have answered it with (one of `WOULD_REFUSE`); empty when
    /// enforcement would have forwarded it, and for every other entry.
    pub would_refuse: String,
}

#[cfg(test)]
impl SpendEvent {
    /// A settled Stripe call of `key_id`, for unit tests.
    pub(crate) fn settled(event_id: &str, key_id: &str, reserved: i64, cost: i64) -> SpendEvent {
        SpendEvent {
            event_id: event_id.into(),
            lease_id: "l".into(),
            key_id: key_id.into(),
            day: "2026-12-06".into(),
            vendor: "stripe".into(),
            method: "POST".into(),
            path: "/v1/charges".into(),
            upstream_status: 200,
            reserved: Micros(reserved),
            cost: Micros(cost),
            outcome: Outcome::Settled,
            at: Utc::now(),
            node_id: "n".into(),
            detail_json: "{}".into(),
            trace_id: String::new(),
            context: BTreeMap::new(),
            refusal_reason: String::new(),
            refused_calls: 0,
            credential_version: 0,
            would_refuse: String::new(),
        }
    }
}

/// The refusals observe mode forwards instead (docs/observe.md), each with
/// the rule that would have fired, in the order the proxy checks them.
pub const WOULD_REFUSE: [(&str, &str); 5] = [
    ("endpoint_not_allowed", "allowed_endpoints"),
    ("rate_limited", "rate_limit"),
    ("per_call_cap_exceeded", "per_call_cap"),
    ("daily_cap_exceeded", "daily_cap"),
    ("lifetime_cap_exceeded", "lifetime_cap"),
];

/// The rule behind a would-refuse code; `None` for an unknown code.
pub fn would_refuse_rule(code: &str) -> Option<&'static str> {
    WOULD_REFUSE
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, rule)| *rule)
}

/// The refusals a proxy records in the ledger: a known key's calls refused
/// by its policy (revoked, expired, allowlist, network, zone, rate, caps)
/// or because they could not be priced. Each is the error code the caller
/// got; a pricing refusal's code starts with one of `PRICING_REFUSALS`.
pub const REFUSAL_REASONS: [&str; 9] = [
    "key_revoked",
    "key_expired",
    "endpoint_not_allowed",
    "ip_not_allowed",
    "zone_mismatch",
    "rate_limited",
    "per_call_cap_exceeded",
    "daily_cap_exceeded",
    "lifetime_cap_exceeded",
];

/// Whether `reason` is a refusal the ledger records: one of
/// `REFUSAL_REASONS`, or a pricing refusal's code (lowercase letters,
/// digits and `_`, at most 64 bytes: the codes differ per vendor).
pub fn validate_refusal_reason(reason: &str) -> Result<(), InvalidInput> {
    let code_like = !reason.is_empty()
        && reason.len() <= 64
        && reason
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if code_like {
        Ok(())
    } else {
        Err(invalid(
            "refusal_reason",
            "must be an error code: 1-64 lowercase letters, digits or _",
        ))
    }
}

/// At most this many context entries per call.
pub const MAX_CONTEXT_ENTRIES: usize = 32;
/// Longest context key, in bytes.
pub const MAX_CONTEXT_KEY: usize = 128;
/// Longest context value, in bytes.
pub const MAX_CONTEXT_VALUE: usize = 1024;

/// Checks a call's trace id: empty, or 32 lowercase hex digits.
pub fn validate_trace_id(trace_id: &str) -> Result<(), InvalidInput> {
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if trace_id.is_empty() || (trace_id.len() == 32 && trace_id.bytes().all(hex)) {
        Ok(())
    } else {
        Err(InvalidInput {
            field: "trace_id",
            reason: "must be empty or 32 lowercase hex digits".into(),
        })
    }
}

/// Checks a call's context: bounded count and sizes, keys of letters,
/// digits and `_ . : -` (so a key is safe in a query filter), values
/// without control characters.
pub fn validate_context(context: &BTreeMap<String, String>) -> Result<(), InvalidInput> {
    let bad = |reason: String| InvalidInput {
        field: "context",
        reason,
    };
    if context.len() > MAX_CONTEXT_ENTRIES {
        return Err(bad(format!("at most {MAX_CONTEXT_ENTRIES} entries")));
    }
    for (k, v) in context {
        validate_context_key(k)?;
        if v.len() > MAX_CONTEXT_VALUE || v.chars().any(char::is_control) {
            return Err(bad(format!(
                "value of {k}: at most {MAX_CONTEXT_VALUE} bytes, no control characters"
            )));
        }
    }
    Ok(())
}

/// Parses an audit filter on the context: `key=value`.
pub fn parse_context_filter(s: &str) -> Result<(String, String), InvalidInput> {
    let (k, v) = s.split_once('=').ok_or_else(|| InvalidInput {
        field: "context",
        reason: "must be key=value".into(),
    })?;
    validate_context_key(k)?;
    Ok((k.to_string(), v.to_string()))
}

/// Checks a trace id given as a filter: 32 lowercase hex digits.
pub fn parse_trace_filter(s: &str) -> Result<String, InvalidInput> {
    if s.is_empty() {
        return Err(invalid("trace_id", "must be 32 lowercase hex digits"));
    }
    validate_trace_id(s)?;
    Ok(s.to_string())
}

/// Checks one context key (also a query filter's).
pub fn validate_context_key(k: &str) -> Result<(), InvalidInput> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-');
    if k.is_empty() || k.len() > MAX_CONTEXT_KEY || !k.chars().all(ok) {
        return Err(InvalidInput {
            field: "context",
            reason: format!("key {k:?}: 1-{MAX_CONTEXT_KEY} letters, digits or _ . : -"),
        });
    }
    Ok(())
}

/// An audit ledger row: a spend event plus its sequence number, the run
/// label of its key at the time, and its place in the hash chain (see
/// `ledger`): `None` for a row written before the ledger was chained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub seq: i64,
    pub agent_run_label: String,
    pub event: SpendEvent,
    pub prev_hash: Option<[u8; 32]>,
    pub hash: Option<[u8; 32]>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub key_id: Option<String>,
    pub agent_run_label: Option<String>,
    pub vendor: Option<String>,
    /// Only entries of these vendors (an admin token's restriction); `None`
    /// for every vendor.
    pub vendors: Option<Vec<String>>,
    /// Entries at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Entries before this time (exclusive).
    pub until: Option<DateTime<Utc>>,
    /// Return entries with `seq` below this (the previous page's last seq).
    pub before_seq: Option<i64>,
    /// Only entries of the call with this trace id.
    pub trace_id: Option<String>,
    /// Only entries whose context has this key with this value.
    pub context: Option<(String, String)>,
    /// Only entries with this outcome (`Refused`: the recorded refusals).
    pub outcome: Option<Outcome>,
    /// Only refusal entries with this reason (an error code).
    pub refusal_reason: Option<String>,
    /// Page size: 0 means 100; at most 1000.
    pub limit: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendSummary {
    pub total: Micros,
    pub calls: i64,
    /// (vendor, total, calls), sorted by vendor.
    pub vendors: Vec<(String, Micros, i64)>,
}

/// What a spend report groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SpendDimension {
    RunLabel,
    Key,
    Vendor,
    /// The UTC day (`YYYY-MM-DD`) of the budget window.
    Day,
}

impl SpendDimension {
    pub fn as_str(self) -> &'static str {
        match self {
            SpendDimension::RunLabel => "run_label",
            SpendDimension::Key => "key",
            SpendDimension::Vendor => "vendor",
            SpendDimension::Day => "day",
        }
    }

    /// `run_label` (or `agent_run_label`, `label`), `key` (or `key_id`),
    /// `vendor`, `day`.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        match s.trim() {
            "run_label" | "agent_run_label" | "label" => Ok(SpendDimension::RunLabel),
            "key" | "key_id" => Ok(SpendDimension::Key),
            "vendor" => Ok(SpendDimension::Vendor),
            "day" => Ok(SpendDimension::Day),
            other => Err(invalid(
                "group_by",
                format!("unknown dimension {other:?}: use run_label, key, vendor or day"),
            )),
        }
    }

    /// A comma-separated list, each dimension at most once, in the order
    /// given.
    pub fn parse_list<'a>(
        items: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Self>, InvalidInput> {
        let mut out: Vec<SpendDimension> = Vec::new();
        for item in items.into_iter().flat_map(|s| s.split(',')) {
            if item.trim().is_empty() {
                continue;
            }
            let d = SpendDimension::parse(item)?;
            if out.contains(&d) {
                return Err(invalid(
                    "group_by",
                    format!("{} is named twice", d.as_str()),
                ));
            }
            out.push(d);
        }
        Ok(out)
    }
}

/// Most groups a spend report returns.
pub const MAX_REPORT_GROUPS: u32 = 10_000;

/// A spend report's question: spend, calls and refusals of the ledger's
/// entries at or after `since` and before `until`, grouped by `group_by`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendReportQuery {
    pub group_by: Vec<SpendDimension>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only the entries of this run label.
    pub agent_run_label: Option<String>,
    /// Only entries of these vendors (an admin token's restriction).
    pub vendors: Option<Vec<String>>,
    /// The `top` groups by spend (then by calls); 1..=`MAX_REPORT_GROUPS`.
    pub top: u32,
}

/// One group of a spend report: the values of the dimensions grouped by
/// (`None` for the others), the settled spend, the forwarded calls and the
/// refused calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendGroup {
    pub agent_run_label: Option<String>,
    pub key_id: Option<String>,
    pub vendor: Option<String>,
    pub day: Option<String>,
    pub total: Micros,
    pub calls: i64,
    pub refused_calls: i64,
    /// Calls of keys in observe mode enforcement would have refused, and
    /// what they spent (docs/observe.md).
    pub would_refuse_calls: i64,
    pub would_refuse: Micros,
}

/// A spend report: the top groups, largest spend first, and the totals
/// over every entry asked about (not only the groups shown).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendReport {
    pub groups: Vec<SpendGroup>,
    pub total: Micros,
    pub calls: i64,
    pub refused_calls: i64,
    /// Groups beyond `top` left out.
    pub more: bool,
    pub would_refuse_calls: i64,
    pub would_refuse: Micros,
}

/// A request to grow a lease: a proxy's local slice of one key's budget for
/// one UTC day.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseGrantRequest {
    pub grant_id: String,
    pub lease_id: String,
    pub key_id: String,
    pub node_id: String,
    pub day: String,
    pub requested: Micros,
    pub minimum: Micros,
    /// Expiry given to a new lease (an existing lease keeps its own).
    pub expires_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    pub granted: Micros,
    pub lease_total: Micros,
    /// Budget left for the key and day after this grant, outside any live
    /// lease.
    pub unleased: Micros,
    pub expires_at: DateTime<Utc>,
    /// The key's lifetime cap, not its daily cap, is what limits it now.
    pub lifetime_bound: bool,
}

/// A proxy with an open policy stream, as the fleet table records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetNode {
    pub node_id: String,
    /// The replica serving its stream.
    pub replica: String,
    /// Highest change-log version the proxy said it applied on this stream.
    pub applied_version: i64,
    /// Last time the serving replica said the stream was open.
    pub heartbeat_at: DateTime<Utc>,
}

/// A lease as its node sees it: what was granted, what was reported spent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLease {
    pub id: String,
    pub key_id: String,
    pub day: String,
    pub granted: Micros,
    pub reported: Micros,
    pub expires_at: DateTime<Utc>,
}

/// A vendor a proxy reported it cannot load, as its last policy
/// acknowledgement said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VendorLoadError {
    pub vendor: String,
    pub node_id: String,
    pub error: String,
    pub at: DateTime<Utc>,
}

/// Longest load error kept from a proxy's report.
pub const MAX_VENDOR_ERROR_LEN: usize = 512;

/// One entry of the change log: what changed, at which version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeRef {
    Vendor(String),
    Key(String),
    /// An inbound hook (`crate::hooks`), by id.
    Hook(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub version: i64,
    pub what: ChangeRef,
}

// --- admin tokens -------------------------------------------------------------

/// An admin token as stored: its hash, never its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminToken {
    pub id: String,
    pub token_hash: [u8; 32],
    /// First characters of the token, enough to recognise it in a list.
    pub token_prefix: String,
    pub name: String,
    pub scopes: crate::scope::Scopes,
    pub vendors: crate::scope::VendorScope,
    pub created_at: DateTime<Utc>,
    /// `None`: never expires.
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The name the `--admin-token` token is recorded under.
pub const BOOTSTRAP_TOKEN_NAME: &str = "bootstrap";

impl AdminToken {
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        if self.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }

    /// Holds every scope over every vendor: what the bootstrap token has,
    /// and what must remain after any revocation.
    pub fn is_unrestricted_admin(&self) -> bool {
        self.scopes.is_admin() && self.vendors == crate::scope::VendorScope::All
    }

    /// Can be what remains after another admin token is revoked: every
    /// scope over every vendor, no expiry (a token that expires tomorrow
    /// would leave nobody then), and a token that can still sign in (rows
    /// from before the `kcadm_` format cannot; their prefix is empty).
    pub fn can_stand_in_for_admin(&self) -> bool {
        self.is_unrestricted_admin()
            && self.expires_at.is_none()
            && self
                .token_prefix
                .starts_with(&format!("{}_", SecretKind::AdminToken.prefix()))
    }
}

// --- issuer tokens ------------------------------------------------------------

/// An issuer token as stored: its hash, never its text. It may only mint
/// child keys of `key_id`, each within that key's vendor, endpoints, caps
/// and expiry; it authorises nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerToken {
    pub id: String,
    pub token_hash: [u8; 32],
    /// First characters of the token, enough to recognise it in a list.
    pub token_prefix: String,
    /// The key whose children it mints.
    pub key_id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// `None`: lives as long as its key.
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl IssuerToken {
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        if self.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

/// An admin token name: 1-64 printable characters.
pub fn parse_token_name(s: &str) -> Result<String, InvalidInput> {
    let s = s.trim();
    if s.is_empty() || s.len() > 64 || s.chars().any(|c| c.is_control()) {
        return Err(invalid("name", "must be 1-64 printable characters"));
    }
    Ok(s.to_string())
}

/// Whether every endpoint pattern of a child key lies within its parent's: a
/// child pattern is within when the parent's set matches the child's pattern
/// text taken literally as a request (`*` as a segment named "*", `*` as a
/// method named "*"). Sound because a parent `*` matches the literal segment
/// "*" exactly where it matches any segment, and a parent literal matches
/// only itself, never a child's `*`.
pub fn endpoints_within(parent: &[String], child: &[String]) -> Result<(), InvalidInput> {
    let parent = keycap_proto::endpoint::EndpointSet::parse(parent)
        .map_err(|e| invalid("allowed_endpoints", format!("parent key: {e}")))?;
    for c in child {
        let pattern = keycap_proto::endpoint::EndpointPattern::parse(c)
            .map_err(|e| invalid("allowed_endpoints", e.to_string()))?;
        let text = pattern.to_string();
        let (method, path) = text.split_once(' ').unwrap_or((text.as_str(), "/"));
        if !parent.allows(method, path) {
            return Err(invalid(
                "allowed_endpoints",
                format!("{text:?} is not within the parent key's allowed endpoints"),
            ));
        }
    }
    Ok(())
}

/// Whether `child` may be minted under `parent` at `now`: the parent is
/// active and of the same vendor; the child's caps are no larger than the
/// parent's (a cap the parent has, the child must have too); its network
/// limits are at least as tight (`KeyLimits::for_child`, already applied);
/// it expires no later; its endpoints lie within the parent's.
pub fn check_child_key(
    parent: &VaultKey,
    child: &VaultKey,
    now: DateTime<Utc>,
) -> Result<(), InvalidInput> {
    match parent.status(now) {
        KeyStatus::Active => {}
        KeyStatus::Revoked => return Err(invalid("parent_id", "the parent key is revoked")),
        KeyStatus::Expired => return Err(invalid("parent_id", "the parent key has expired")),
    }
    if parent.vendor != child.vendor {
        return Err(invalid(
            "parent_id",
            format!(
                "the parent key is for vendor {:?}; a child must be for the same vendor",
                parent.vendor.as_str()
            ),
        ));
    }
    if child.daily_cap > parent.daily_cap {
        return Err(invalid(
            "daily_usd_cap",
            format!("must not exceed the parent key's ({})", parent.daily_cap),
        ));
    }
    let within = |field: &'static str, parent_cap: Option<Micros>, child_cap: Option<Micros>| match (
        parent_cap, child_cap,
    ) {
        (None, _) => Ok(()),
        (Some(p), None) => Err(invalid(
            field,
            format!("the parent key has one ({p}); the child needs one no larger"),
        )),
        (Some(p), Some(c)) if c > p => Err(invalid(
            field,
            format!("must not exceed the parent key's ({p})"),
        )),
        _ => Ok(()),
    };
    within("per_call_usd_cap", parent.per_call_cap, child.per_call_cap)?;
    within("lifetime_usd_cap", parent.lifetime_cap, child.lifetime_cap)?;
    if parent.limits.for_child(&child.limits)? != child.limits {
        // `create_key` fills in what the child left out before this check:
        // a child that reaches it without its parent's limits was minted
        // past that step.
        return Err(invalid(
            "allowed_cidrs",
            "a child key carries its parent's network limits",
        ));
    }
    if child.expires_at > parent.expires_at {
        return Err(invalid(
            "expires_in",
            format!(
                "the key would expire after its parent (at {})",
                parent.expires_at.to_rfc3339()
            ),
        ));
    }
    endpoints_within(&parent.allowed_endpoints, &child.allowed_endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_names() {
        assert!(VendorName::parse("stripe").is_ok());
        assert!(VendorName::parse("my-vendor2").is_ok());
        for bad in ["", "Stripe", "a/b", "vault", "-x", &"a".repeat(65)] {
            assert!(VendorName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base_url("https://api.stripe.com/").unwrap(),
            "https://api.stripe.com"
        );
        assert!(parse_base_url("http://127.0.0.1:9000/v1").is_ok());
        for bad in [
            "ftp://x",
            "https://",
            "https://a@b",
            "https://x/?q",
            "https://x/../y",
            "api.stripe.com",
            // Found by the rest_body fuzzer: not a URL the proxy can parse.
            "https://api.strip%abcdef",
            "https://[x/v1",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstreams_are_public_https_unless_the_operator_opts_in() {
        use UpstreamPolicy::*;
        let field = |u: &str| check_upstream(u, PublicHttps).unwrap_err().field;
        for bad in [
            "http://api.stripe.com",
            "https://169.254.169.254",
            "https://127.0.0.1:8443",
            "https://10.0.0.1/v1",
            "https://[::1]",
            "https://[::ffff:169.254.169.254]",
            "https://[fe80::1]",
            "https://0.0.0.0",
        ] {
            assert_eq!(field(bad), "base_url", "{bad}");
        }
        assert_eq!(
            check_upstream("https://93.184.216.34", PublicHttps),
            Ok(None)
        );
        assert_eq!(
            check_upstream("https://api.stripe.com", PublicHttps),
            Ok(Some(("api.stripe.com".into(), 443)))
        );
        assert_eq!(
            check_upstream("https://localhost:8443/v1", PublicHttps),
            Ok(Some(("localhost".into(), 8443)))
        );
        for fine in [
            "http://127.0.0.1:9000",
            "http://169.254.169.254",
            "https://[::1]",
        ] {
            assert_eq!(check_upstream(fine, AllowPrivate), Ok(None), "{fine}");
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_allowed_endpoint("POST /v1/payment_intents").unwrap(),
            "POST /v1/payment_intents"
        );
        assert!(parse_allowed_endpoint("GET /v1/customers/*").is_ok());
        for bad in [
            "/v1/x",
            "FETCH /x",
            "GET v1",
            "GET /a/../b",
            "GET /a*b",
            "GET /a?x=1",
            "GET /a/%2e",
            // Shapes the proxy cannot match: accepting them would mint a key
            // every proxy silently drops.
            "GET /v1/customers/",
            "GET /a//b",
            "GET /caf\u{e9}",
            "GET /a /b",
        ] {
            assert!(parse_allowed_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn caps_and_lifetimes() {
        assert!(parse_cap("daily_usd_cap", Micros(-1)).is_err());
        assert!(parse_cap("daily_usd_cap", Micros(0)).is_err());
        assert!(parse_cap("daily_usd_cap", Micros(MAX_CAP.0 + 1)).is_err());
        assert!(parse_cap("daily_usd_cap", Micros(500_000_000)).is_ok());
        assert_eq!(parse_expires_in("2h").unwrap().as_secs(), 7200);
        assert_eq!(parse_expires_in("90").unwrap().as_secs(), 90);
        for bad in ["", "soon", "2 parsecs", "0s", "400d", "-1h"] {
            assert!(parse_expires_in(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_limits_name_the_field_they_refuse() {
        let ok = KeyLimits::parse(60, &["10.0.0.0/8".into(), "192.0.2.7".into()], "eu").unwrap();
        assert_eq!(ok.rate_limit_per_minute, Some(60));
        assert_eq!(ok.cidr_strings(), ["10.0.0.0/8", "192.0.2.7/32"]);
        assert_eq!(ok.zone.as_deref(), Some("eu"));
        assert_eq!(KeyLimits::parse(0, &[], "").unwrap(), KeyLimits::default());
        let field = |r: i64, c: &[&str], z: &str| {
            let c: Vec<String> = c.iter().map(|s| s.to_string()).collect();
            KeyLimits::parse(r, &c, z).unwrap_err().field
        };
        assert_eq!(field(-1, &[], ""), "rate_limit_per_minute");
        assert_eq!(field(1_000_000_000, &[], ""), "rate_limit_per_minute");
        assert_eq!(field(i64::MAX, &[], ""), "rate_limit_per_minute");
        assert_eq!(field(0, &["10.0.0.1/8"], ""), "allowed_cidrs");
        assert_eq!(field(0, &["not-a-net"], ""), "allowed_cidrs");
        assert_eq!(field(0, &[], "EU"), "zone");
    }

    #[test]
    fn currency_rates() {
        let mut m = BTreeMap::new();
        m.insert("EUR".to_string(), "1.08".to_string());
        assert_eq!(parse_currency_rates(&m).unwrap()["eur"], "1.08");
        m.insert("euro".to_string(), "1".to_string());
        assert!(parse_currency_rates(&m).is_err());
        // What the proxy refuses, the control plane refuses: usd is 1.
        let usd: BTreeMap<_, _> = [("usd".to_string(), "2".to_string())].into();
        let e = parse_currency_rates(&usd).unwrap_err();
        assert_eq!(e.field, "currency_rates");
        assert!(e.reason.contains("usd"), "{e}");
        let twice: BTreeMap<_, _> = [
            ("EUR".to_string(), "1".to_string()),
            ("eur".to_string(), "2".to_string()),
        ]
        .into();
        assert!(parse_currency_rates(&twice).is_err());
        // Rates are exact decimals: more places than micro-dollars are fine.
        let fine: BTreeMap<_, _> = [("jpy".to_string(), "0.0062345".to_string())].into();
        assert!(parse_currency_rates(&fine).is_ok());
    }

    fn endpoint_list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn child_endpoints_must_lie_within_the_parent() {
        let parent = endpoint_list(&["POST /v1/*", "GET /v1/customers/*/sources"]);
        for ok in [
            "POST /v1/payment_intents",
            "POST /v1/*",
            "POST /v1/refunds/*",
            "GET /v1/customers/*/sources",
            "GET /v1/customers/cus_1/sources",
        ] {
            assert!(
                endpoints_within(&parent, &endpoint_list(&[ok])).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "GET /v1/payment_intents",
            "* /v1/payment_intents",
            "POST /v2/x",
            "POST /*",
            "POST /v1",
            "GET /v1/customers/*",
            "GET /v1/customers/*/sources/*",
        ] {
            assert!(
                endpoints_within(&parent, &endpoint_list(&["POST /v1/x", bad])).is_err(),
                "{bad}"
            );
        }
        let any_method = endpoint_list(&["* /v1/*"]);
        assert!(endpoints_within(&any_method, &endpoint_list(&["* /v1/x"])).is_ok());
        assert!(endpoints_within(&any_method, &endpoint_list(&["DELETE /v1/x/y"])).is_ok());
    }

    fn tree_now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_900_000_000, 0).unwrap()
    }

    fn tree_key(daily: i64, per_call: Option<i64>, life: Option<i64>) -> VaultKey {
        let now = tree_now();
        VaultKey {
            id: "key_p".into(),
            key_hash: [0; 32],
            key_prefix: "kc_".into(),
            vendor: VendorName::parse("stripe").unwrap(),
            allowed_endpoints: endpoint_list(&["POST /v1/*"]),
            daily_cap: Micros(daily),
            per_call_cap: per_call.map(Micros),
            lifetime_cap: life.map(Micros),
            expires_at: now + chrono::TimeDelta::hours(2),
            agent_run_label: "run".into(),
            metadata: BTreeMap::new(),
            created_at: now,
            revoked_at: None,
            limits: KeyLimits::default(),
            parent_id: None,
            approval_above: None,
            roll: KeyRoll::default(),
            observe_ceiling: None,
        }
    }

    #[test]
    fn child_caps_and_expiry_stay_within_the_parent() {
        let now = tree_now();
        let parent = tree_key(100, Some(10), Some(1000));
        let fits = tree_key(100, Some(10), Some(1000));
        assert!(check_child_key(&parent, &fits, now).is_ok());
        let field = |c: &VaultKey| check_child_key(&parent, c, now).unwrap_err().field;
        assert_eq!(field(&tree_key(101, Some(10), Some(1000))), "daily_usd_cap");
        assert_eq!(
            field(&tree_key(50, Some(11), Some(1000))),
            "per_call_usd_cap"
        );
        assert_eq!(field(&tree_key(50, None, Some(1000))), "per_call_usd_cap");
        assert_eq!(
            field(&tree_key(50, Some(5), Some(1001))),
            "lifetime_usd_cap"
        );
        assert_eq!(field(&tree_key(50, Some(5), None)), "lifetime_usd_cap");
        let mut late = tree_key(50, Some(5), Some(10));
        late.expires_at = parent.expires_at + chrono::TimeDelta::seconds(1);
        assert_eq!(field(&late), "expires_in");
        let mut wide = tree_key(50, Some(5), Some(10));
        wide.allowed_endpoints = endpoint_list(&["POST /*"]);
        assert_eq!(field(&wide), "allowed_endpoints");
        let mut other = tree_key(50, Some(5), Some(10));
        other.vendor = VendorName::parse("openai").unwrap();
        assert_eq!(field(&other), "parent_id");
        // A parent without per-call or lifetime caps leaves the child free
        // to have them or not.
        let open = tree_key(100, None, None);
        assert!(check_child_key(&open, &tree_key(100, None, None), now).is_ok());
        assert!(check_child_key(&open, &tree_key(100, Some(1), Some(1)), now).is_ok());
        let mut revoked = tree_key(100, None, None);
        revoked.revoked_at = Some(now);
        assert_eq!(
            check_child_key(&revoked, &fits, now).unwrap_err().field,
            "parent_id"
        );
    }

    fn limits(rate: i64, cidrs: &[&str], zone: &str) -> KeyLimits {
        let cidrs: Vec<String> = cidrs.iter().map(|s| s.to_string()).collect();
        KeyLimits::parse(rate, &cidrs, zone).unwrap()
    }

    #[test]
    fn a_child_inherits_the_network_limits_it_leaves_out() {
        let parent = limits(60, &["10.0.0.0/8", "2001:db8::/32"], "eu");
        assert_eq!(parent.for_child(&KeyLimits::default()).unwrap(), parent);
        // Tighter limits stand as the child states them.
        let tight = limits(10, &["10.1.0.0/16", "2001:db8:1::/48"], "eu");
        assert_eq!(parent.for_child(&tight).unwrap(), tight);
        // Each limit is inherited on its own.
        let rate_only = limits(5, &[], "");
        assert_eq!(
            parent.for_child(&rate_only).unwrap(),
            limits(5, &["10.0.0.0/8", "2001:db8::/32"], "eu")
        );
        // A parent without limits leaves the child free to have them.
        assert_eq!(KeyLimits::default().for_child(&tight).unwrap(), tight);
    }

    #[test]
    fn a_child_with_wider_network_limits_is_refused_naming_the_field() {
        let parent = limits(60, &["10.0.0.0/8"], "eu");
        let field = |c: KeyLimits| parent.for_child(&c).unwrap_err().field;
        assert_eq!(field(limits(61, &[], "")), "rate_limit_per_minute");
        assert_eq!(field(limits(0, &["11.0.0.0/8"], "")), "allowed_cidrs");
        assert_eq!(field(limits(0, &["0.0.0.0/0"], "")), "allowed_cidrs");
        assert_eq!(
            field(limits(0, &["10.0.0.0/16", "192.0.2.7"], "")),
            "allowed_cidrs"
        );
        assert_eq!(field(limits(0, &["::ffff:0:0/96"], "")), "allowed_cidrs");
        assert_eq!(field(limits(0, &[], "us")), "zone");
        // A key minted without the step in front (as `create_key` takes it)
        // still fails `check_child_key`.
        let now = tree_now();
        let mut p = tree_key(100, None, None);
        p.limits = parent.clone();
        let open_child = tree_key(100, None, None);
        assert!(check_child_key(&p, &open_child, now).is_err());
        let mut fitted = tree_key(100, None, None);
        fitted.limits = parent.for_child(&KeyLimits::default()).unwrap();
        assert!(check_child_key(&p, &fitted, now).is_ok());
    }
}
