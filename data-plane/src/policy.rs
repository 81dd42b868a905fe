//! The proxy's in-memory policy: vendors and vault keys as the control
//! plane streamed them, keyed by the SHA-256 of the secret.
//!
//! Readers on the request path take a lock-free snapshot (`ArcSwap`);
//! updates from the watch stream build a new `Policy` and swap it in. This
//! module never talks to the network and never holds a secret, only hashes
//! and the vendors' real credentials it must inject.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use http::{HeaderName, HeaderValue};
use keycap_proto::network::{self, IpNet};
use keycap_proto::prices::GenericRules;
use keycap_proto::profile::{CredentialInjection, Profile};
use keycap_proto::secret::{self, SecretKind};
use keycap_proto::{pb, time::from_proto, Micros};
use subtle::ConstantTimeEq;

use crate::endpoint::EndpointSet;
use crate::pricing::{self, Catalog, PriceModel};
use crate::scrub::CredentialScrub;

/// A vendor as the request path needs it.
pub struct VendorPolicy {
    pub name: String,
    pub profile: String,
    pub base_url: String,
    /// The header the real credential goes in (`Authorization`, or
    /// `x-api-key` for Anthropic) and its value, ready to inject (Bearer,
    /// or Basic for Twilio).
    pub credential_header: HeaderName,
    pub credential: HeaderValue,
    /// The version `credential` is (0 from a control plane before
    /// versions): recorded with every call made with it. A call keeps the
    /// `VendorPolicy` it started with, so it injects and records one
    /// version even when a promote lands meanwhile.
    pub credential_version: i64,
    pub pricing: Arc<dyn PriceModel>,
    /// The control plane runs with `--allow-private-upstreams`: calls may
    /// go over plain http and to non-public addresses.
    pub allow_private_upstream: bool,
    /// The agent's W3C trace context (`traceparent`, `tracestate`) goes on
    /// to the vendor, continued by the proxy's `forward` span when traces
    /// are exported. Off by default: both are stripped.
    pub forward_trace_context: bool,
    /// Masks the credential wherever a response repeats it.
    pub scrub: Arc<CredentialScrub>,
}

impl std::fmt::Debug for VendorPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VendorPolicy")
            .field("name", &self.name)
            .field("profile", &self.profile)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// A vault key as the request path needs it.
#[derive(Debug)]
pub struct KeyPolicy {
    pub id: String,
    /// The budget the key spends: its roll chain's first key (its own id
    /// when it was never rolled into). Leases and reservations are keyed by
    /// it, so a rolled key and its successor draw on one lease pool.
    pub budget_id: String,
    pub hash: [u8; 32],
    pub vendor: String,
    pub endpoints: EndpointSet,
    pub daily_cap: Micros,
    pub per_call_cap: Option<Micros>,
    pub lifetime_cap: Option<Micros>,
    pub expires_at: DateTime<Utc>,
    pub agent_run_label: String,
    pub revoked: bool,
    /// Calls per minute through this proxy; `None`: no limit.
    pub rate_limit_per_minute: Option<u32>,
    /// Client networks the key may be used from; empty: any.
    pub allowed_cidrs: Vec<IpNet>,
    /// Only a proxy of this zone serves the key; `None`: any.
    pub zone: Option<String>,
    /// A call reserving more than this needs an approval
    /// (`crate::approval`); `None`: no gate.
    pub approval_above: Option<Micros>,
    /// Set: the key is in observe mode (docs/observe.md) and its budget is
    /// this a day; its own caps, endpoints and rate limit only mark calls.
    pub observe_ceiling: Option<Micros>,
}

impl KeyPolicy {
    /// The daily cap the key's budget holds it to: the observe ceiling in
    /// observe mode, else its daily cap.
    pub fn budget_daily_cap(&self) -> Micros {
        self.observe_ceiling.unwrap_or(self.daily_cap)
    }

    /// The lifetime cap the key's budget holds it to: none in observe mode.
    pub fn budget_lifetime_cap(&self) -> Option<Micros> {
        self.lifetime_cap.filter(|_| self.observe_ceiling.is_none())
    }

    /// Whether leases granted under `self` may serve `next`: the same
    /// budget held to the same caps.
    fn same_budget_terms(&self, next: &KeyPolicy) -> bool {
        self.budget_id == next.budget_id
            && self.budget_daily_cap() == next.budget_daily_cap()
            && self.budget_lifetime_cap() == next.budget_lifetime_cap()
    }
}

#[derive(Default)]
pub struct Policy {
    pub version: i64,
    pub vendors: HashMap<String, Arc<VendorPolicy>>,
    /// Vendors in the policy this proxy cannot serve, with why: reported
    /// to the control plane with every acknowledgement.
    pub vendor_errors: BTreeMap<String, String>,
    /// Keys by hash, for applying updates. Requests look keys up only
    /// through `key_standing`, which takes the same time for any key.
    keys: HashMap<[u8; 32], Arc<KeyPolicy>>,
    key_hash_by_id: HashMap<String, [u8; 32]>,
    /// Every key again, sorted by hash, for `key_standing`'s search.
    by_hash: Vec<Indexed>,
    /// Inbound hooks by id (`crate::hooks`).
    pub hooks: HashMap<String, Arc<crate::hooks::HookPolicy>>,
}

/// A key's entry in the search by hash: what the lookup reads, inline.
#[derive(Clone)]
struct Indexed {
    hash: [u8; 32],
    revoked: bool,
    expires_at: DateTime<Utc>,
    key: Arc<KeyPolicy>,
}

/// What a presented vault key is, as far as the policy knows.
#[derive(Clone, Copy, Debug)]
pub enum KeyStanding<'a> {
    /// Malformed, bad checksum, or not a key this policy holds.
    Unknown,
    Revoked(&'a Arc<KeyPolicy>),
    Expired(&'a Arc<KeyPolicy>),
    Active(&'a Arc<KeyPolicy>),
}

impl Policy {
    /// Looks a presented vault key up and says what it is.
    ///
    /// The same work is done whether the key is unknown, revoked, expired
    /// or valid: the secret is hashed (SHA-256), the hash is searched for
    /// in the keys sorted by hash with a fixed number of steps for the
    /// number of keys (no early exit on a match), the key it lands on is
    /// compared in constant time, and its standing is read whether it
    /// matched or not, from the entry the search already read (so a hit
    /// touches no memory a miss does not). `tests/key_timing.rs` measures it. A malformed key
    /// (bad checksum) is refused before any lookup.
    pub fn key_standing(&self, presented: &str, now: DateTime<Utc>) -> KeyStanding<'_> {
        if !secret::is_well_formed(SecretKind::VaultKey, presented) || self.by_hash.is_empty() {
            return KeyStanding::Unknown;
        }
        let hash = secret::hash(presented);
        let (mut base, mut size) = (0, self.by_hash.len());
        while size > 1 {
            let half = size / 2;
            if self.by_hash[base + half].hash <= hash {
                base += half;
            }
            size -= half;
        }
        let at = &self.by_hash[base];
        let matched: bool = at.hash.ct_eq(&hash).into();
        let (revoked, expired) = (at.revoked, at.expires_at <= now);
        match () {
            _ if !matched => KeyStanding::Unknown,
            _ if revoked => KeyStanding::Revoked(&at.key),
            _ if expired => KeyStanding::Expired(&at.key),
            _ => KeyStanding::Active(&at.key),
        }
    }
}

impl Policy {
    /// Serves `v` from now on, or, when this proxy cannot, drops it and
    /// records why (never serving an older version of it instead).
    fn apply_vendor(&mut self, v: pb::FleetVendor, prices: &Catalog) {
        let name = v.name.clone();
        match vendor_policy(v, prices) {
            Ok(vp) => {
                self.vendors.insert(name.clone(), Arc::new(vp));
                self.vendor_errors.remove(&name);
            }
            Err(e) => {
                tracing::error!(vendor = %name, error = %e, "vendor cannot be served; reported to the control plane");
                self.vendors.remove(&name);
                self.vendor_errors.insert(name, e);
            }
        }
    }
}

/// Shared, swappable policy.
pub struct PolicyCache {
    current: ArcSwap<Policy>,
    prices: Catalog,
    ready: tokio::sync::watch::Sender<bool>,
    /// The version of each update once it is applied (and the request path
    /// sees it), for acknowledging it to the control plane.
    applied: tokio::sync::watch::Sender<i64>,
    /// Keys learned by asking the control plane (`lookup`), by hash, each
    /// with the version its answer was read at: it stands in for the
    /// stream only until the policy reaches that version, which then holds
    /// the key as answered or newer.
    looked_up: std::sync::Mutex<LookedUp>,
}

/// Keys learned from the control plane by hash, each with the version
/// until which it stands in for the policy.
type LookedUp = HashMap<[u8; 32], (Arc<KeyPolicy>, i64)>;

/// The vendor as the request path needs it, or why this proxy cannot serve
/// it. Every rule here is the control plane's too (shared in
/// `keycap_proto`), so a refusal means version skew or a stored vendor from
/// before a rule: it is reported to the control plane with the next
/// acknowledgement and shown in the vendor's admin reads.
fn vendor_policy(v: pb::FleetVendor, prices: &Catalog) -> Result<VendorPolicy, String> {
    crate::upstream::check_base_url(&v.base_url, v.allow_private_upstream)?;
    let rates = v.currency_rates.into_iter().collect();
    let pricing = pricing::model_for(&v.profile, &rates, prices, &v.prices_json, &v.base_url)
        .map_err(|e| format!("cannot be priced: {e}"))?;
    // model_for accepted the profile (and a generic vendor's rules), so
    // both parse.
    let profile = Profile::parse(&v.profile).ok_or("unknown profile")?;
    let own_header = match profile {
        Profile::Generic => {
            GenericRules::from_json(&v.prices_json)
                .map_err(|e| e.to_string())?
                .credential_header
        }
        _ => None,
    };
    let injection = CredentialInjection::new(profile, own_header.as_deref(), &v.credential)
        .map_err(|e| format!("credential: {e}"))?;
    let credential_header = HeaderName::from_bytes(injection.header.as_bytes())
        .map_err(|_| "credential header is not a header name".to_string())?;
    let mut credential = HeaderValue::from_str(&injection.value)
        .map_err(|_| "credential: cannot be a header value".to_string())?;
    credential.set_sensitive(true);
    Ok(VendorPolicy {
        name: v.name,
        profile: v.profile,
        base_url: v.base_url,
        credential_header,
        credential,
        credential_version: v.credential_version,
        pricing,
        allow_private_upstream: v.allow_private_upstream,
        forward_trace_context: v.forward_trace_context,
        scrub: Arc::new(CredentialScrub::new(&injection.secrets)),
    })
}

fn key_policy(k: pb::FleetKey) -> Option<KeyPolicy> {
    let hash: [u8; 32] = k.key_hash.as_slice().try_into().ok()?;
    let endpoints = EndpointSet::parse(&k.allowed_endpoints).ok()?;
    let cap = |v: i64| (v > 0).then_some(Micros(v));
    // Limits this proxy cannot read drop the key (it is then refused as
    // unknown) rather than serve it with fewer limits than it was given.
    let limits = (|| {
        let rate = network::parse_rate_limit(k.rate_limit_per_minute)?;
        let cidrs = network::parse_cidrs(&k.allowed_cidrs)?;
        let zone = match k.zone.as_str() {
            "" => None,
            z => Some(network::parse_zone(z)?),
        };
        Ok::<_, network::NetworkError>((rate, cidrs, zone))
    })();
    let (rate_limit_per_minute, allowed_cidrs, zone) = match limits {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(key = %k.id, error = %e, "key limits unreadable; key refused");
            return None;
        }
    };
    let budget_id = if k.budget_id.is_empty() {
        k.id.clone()
    } else {
        k.budget_id
    };
    Some(KeyPolicy {
        id: k.id,
        budget_id,
        hash,
        vendor: k.vendor,
        endpoints,
        daily_cap: Micros(k.daily_cap_micros),
        per_call_cap: cap(k.per_call_cap_micros),
        lifetime_cap: cap(k.lifetime_cap_micros),
        expires_at: k.expires_at.as_ref().and_then(from_proto)?,
        agent_run_label: k.agent_run_label,
        revoked: k.revoked,
        rate_limit_per_minute,
        allowed_cidrs,
        zone,
        approval_above: cap(k.approval_above_micros),
        observe_ceiling: cap(k.observe_ceiling_micros),
    })
}

impl PolicyCache {
    pub fn new(prices: Catalog) -> Arc<Self> {
        let (ready, _) = tokio::sync::watch::channel(false);
        let (applied, _) = tokio::sync::watch::channel(0);
        Arc::new(PolicyCache {
            current: ArcSwap::from_pointee(Policy::default()),
            prices,
            ready,
            applied,
            looked_up: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Moves after every applied update (even one that left the version
    /// where it was) to the version the proxy now refuses keys by.
    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<i64> {
        self.applied.subscribe()
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.current.load()
    }

    pub fn version(&self) -> i64 {
        self.current.load().version
    }

    /// Resolves once the first snapshot has been applied.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Applies one update from the control plane. Returns the budgets no
    /// usable key spends any more (their keys revoked or removed) and those
    /// now held to other caps (a key switched from observe mode), so their
    /// leases can be handed back.
    pub fn apply(&self, update: pb::PolicyUpdate) -> Vec<String> {
        let mut gone = Vec::new();
        let mut rebudgeted = Vec::new();
        let next = match update.update {
            Some(pb::policy_update::Update::Snapshot(s)) => {
                let mut p = Policy {
                    version: update.version,
                    ..Policy::default()
                };
                for v in s.vendors {
                    p.apply_vendor(v, &self.prices);
                }
                for k in s.keys {
                    if let Some(kp) = key_policy(k) {
                        p.key_hash_by_id.insert(kp.id.clone(), kp.hash);
                        p.keys.insert(kp.hash, Arc::new(kp));
                    }
                }
                crate::hooks::apply(&mut p.hooks, s.hooks, Vec::new());
                let old = self.current.load();
                for (id, hash) in &p.key_hash_by_id {
                    let before = old.key_hash_by_id.get(id).and_then(|h| old.keys.get(h));
                    if let (Some(before), Some(now)) = (before, p.keys.get(hash)) {
                        if !before.same_budget_terms(now) {
                            rebudgeted.push(now.budget_id.clone());
                        }
                    }
                }
                gone.extend(
                    old.key_hash_by_id
                        .keys()
                        .filter(|id| !p.key_hash_by_id.contains_key(*id))
                        .cloned(),
                );
                p
            }
            Some(pb::policy_update::Update::Delta(d)) => {
                let old = self.current.load();
                let mut p = Policy {
                    version: update.version.max(old.version),
                    vendors: old.vendors.clone(),
                    vendor_errors: old.vendor_errors.clone(),
                    keys: old.keys.clone(),
                    key_hash_by_id: old.key_hash_by_id.clone(),
                    by_hash: Vec::new(),
                    hooks: old.hooks.clone(),
                };
                crate::hooks::apply(&mut p.hooks, d.upsert_hooks, d.removed_hooks);
                for name in d.removed_vendors {
                    p.vendors.remove(&name);
                    p.vendor_errors.remove(&name);
                }
                for v in d.upsert_vendors {
                    p.apply_vendor(v, &self.prices);
                }
                for id in d.removed_keys {
                    if let Some(h) = p.key_hash_by_id.remove(&id) {
                        p.keys.remove(&h);
                    }
                    gone.push(id);
                }
                for k in d.upsert_keys {
                    if let Some(kp) = key_policy(k) {
                        if kp.revoked {
                            gone.push(kp.id.clone());
                        }
                        // Held to other caps now (a switch from observe
                        // mode): leases granted under the old ones go back.
                        if let Some(old) = p.key_hash_by_id.get(&kp.id).and_then(|h| p.keys.get(h))
                        {
                            if !old.same_budget_terms(&kp) {
                                rebudgeted.push(kp.budget_id.clone());
                            }
                        }
                        p.key_hash_by_id.insert(kp.id.clone(), kp.hash);
                        p.keys.insert(kp.hash, Arc::new(kp));
                    }
                }
                p
            }
            // A heartbeat changes nothing (the watch loop reads it for
            // the replica's liveness).
            Some(pb::policy_update::Update::Heartbeat(_)) | None => return gone,
        };
        let mut next = next;
        next.by_hash = next
            .keys
            .values()
            .map(|k| Indexed {
                hash: k.hash,
                revoked: k.revoked,
                expires_at: k.expires_at,
                key: k.clone(),
            })
            .collect();
        next.by_hash.sort_unstable_by_key(|e| e.hash);
        let mut gone = gone_budgets(&gone, &self.current.load(), &next);
        gone.extend(rebudgeted);
        gone.sort();
        gone.dedup();
        let version = next.version;
        self.current.store(Arc::new(next));
        self.looked_up
            .lock()
            .expect("looked-up keys")
            .retain(|_, (_, until)| *until > version);
        self.ready.send_replace(true);
        // After the store: whoever reads this version acknowledges a policy
        // the request path already uses.
        self.applied.send_replace(version);
        gone
    }
}

/// The budgets of the `gone` keys that no usable key of `next` still
/// spends: a rolled key's revocation leaves the lease pool to its
/// successor, which spends the same budget.
fn gone_budgets(gone: &[String], old: &Policy, next: &Policy) -> Vec<String> {
    if gone.is_empty() {
        return Vec::new();
    }
    let budget_of = |id: &String| {
        [next, old]
            .into_iter()
            .find_map(|p| p.key_hash_by_id.get(id).and_then(|h| p.keys.get(h)))
            .map_or_else(|| id.clone(), |k| k.budget_id.clone())
    };
    let live: std::collections::HashSet<&str> = next
        .keys
        .values()
        .filter(|k| !k.revoked)
        .map(|k| k.budget_id.as_str())
        .collect();
    let mut budgets: Vec<String> = gone
        .iter()
        .map(budget_of)
        .filter(|b| !live.contains(b.as_str()))
        .collect();
    budgets.sort();
    budgets.dedup();
    budgets
}

impl PolicyCache {
    /// A key learned from the control plane (see `looked_up`), valid while
    /// the policy is below `version`. Once the policy is at or past it, the
    /// policy's own entry is the answer.
    pub fn adopt(&self, key: pb::FleetKey, version: i64) -> Option<Arc<KeyPolicy>> {
        let key = Arc::new(key_policy(key)?);
        let policy = self.current.load();
        if version <= policy.version {
            return policy.keys.get(&key.hash).cloned();
        }
        let mut looked_up = self.looked_up.lock().expect("looked-up keys");
        looked_up.insert(key.hash, (key.clone(), version));
        // An update applied between the read above and the insert may
        // already cover the answer: then the policy's word stands.
        let now = self.current.load();
        if version <= now.version {
            looked_up.remove(&key.hash);
            return now.keys.get(&key.hash).cloned();
        }
        Some(key)
    }

    /// A key learned from the control plane that the policy does not hold
    /// yet.
    pub fn looked_up(&self, hash: &[u8; 32]) -> Option<Arc<KeyPolicy>> {
        let version = self.current.load().version;
        self.looked_up
            .lock()
            .expect("looked-up keys")
            .get(hash)
            .filter(|(_, until)| *until > version)
            .map(|(k, _)| k.clone())
    }

    /// Forgets the applied version so the next watch asks for a snapshot.
    /// Keys learned from the control plane are forgotten too: each stood in
    /// only below a version, which means nothing once the version restarts.
    pub fn reset_version(&self) {
        self.looked_up.lock().expect("looked-up keys").clear();
        let old = self.current.load();
        self.current.store(Arc::new(Policy {
            version: 0,
            vendors: old.vendors.clone(),
            vendor_errors: old.vendor_errors.clone(),
            keys: old.keys.clone(),
            key_hash_by_id: old.key_hash_by_id.clone(),
            by_hash: old.by_hash.clone(),
            hooks: old.hooks.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vendor(profile: &str, credential: &str) -> pb::FleetVendor {
        pb::FleetVendor {
            name: "v".into(),
            profile: profile.into(),
            base_url: "https://vendor.example".into(),
            credential: credential.into(),
            ..Default::default()
        }
    }

    fn fleet_key(id: &str, secret: &str, revoked: bool) -> pb::FleetKey {
        pb::FleetKey {
            id: id.into(),
            key_hash: secret::hash(secret).to_vec(),
            vendor: "v".into(),
            allowed_endpoints: vec!["POST /x".into()],
            daily_cap_micros: 1,
            expires_at: Some(keycap_proto::time::to_proto(
                Utc::now() + chrono::Duration::hours(1),
            )),
            revoked,
            ..Default::default()
        }
    }

    fn limited_key(cidrs: &[&str], zone: &str, rate: u32) -> pb::FleetKey {
        pb::FleetKey {
            id: "key_1".into(),
            key_hash: vec![7; 32],
            vendor: "v".into(),
            allowed_endpoints: vec!["POST /x".into()],
            daily_cap_micros: 1,
            expires_at: Some(keycap_proto::time::to_proto(Utc::now())),
            allowed_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            zone: zone.into(),
            rate_limit_per_minute: rate,
            ..Default::default()
        }
    }

    fn standing_of(cache: &PolicyCache, secret: &str) -> &'static str {
        match cache.load().key_standing(secret, Utc::now()) {
            KeyStanding::Unknown => "unknown",
            KeyStanding::Revoked(_) => "revoked",
            KeyStanding::Expired(_) => "expired",
            KeyStanding::Active(_) => "active",
        }
    }

    #[test]
    fn key_standing_follows_snapshots_and_deltas() {
        let cache = PolicyCache::new(Catalog::builtin());
        let (a, b) = (
            secret::generate(SecretKind::VaultKey, "live"),
            secret::generate(SecretKind::VaultKey, "live"),
        );
        assert_eq!(standing_of(&cache, &a), "unknown", "empty policy");
        let update = |version, update| pb::PolicyUpdate {
            version,
            update: Some(update),
        };
        cache.apply(update(
            1,
            pb::policy_update::Update::Snapshot(pb::PolicySnapshot {
                vendors: vec![],
                keys: vec![fleet_key("a", &a, false)],
                ..Default::default()
            }),
        ));
        assert_eq!(standing_of(&cache, &a), "active");
        assert_eq!(standing_of(&cache, &b), "unknown");
        // A bad checksum is unknown before any lookup.
        let mut forged = a.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'x' { b'y' } else { b'x' };
        assert_eq!(
            standing_of(&cache, std::str::from_utf8(&forged).unwrap()),
            "unknown"
        );
        cache.apply(update(
            2,
            pb::policy_update::Update::Delta(pb::PolicyDelta {
                upsert_keys: vec![fleet_key("a", &a, true), fleet_key("b", &b, false)],
                ..Default::default()
            }),
        ));
        assert_eq!(standing_of(&cache, &a), "revoked");
        assert_eq!(standing_of(&cache, &b), "active");
        cache.apply(update(
            3,
            pb::policy_update::Update::Delta(pb::PolicyDelta {
                removed_keys: vec!["b".into()],
                ..Default::default()
            }),
        ));
        assert_eq!(standing_of(&cache, &b), "unknown");
        assert_eq!(standing_of(&cache, &a), "revoked");
    }

    #[test]
    fn a_rolled_keys_revocation_leaves_the_lease_pool_to_its_successor() {
        let cache = PolicyCache::new(Catalog::builtin());
        let (a, b) = (
            secret::generate(SecretKind::VaultKey, "live"),
            secret::generate(SecretKind::VaultKey, "live"),
        );
        let delta = |version, keys| pb::PolicyUpdate {
            version,
            update: Some(pb::policy_update::Update::Delta(pb::PolicyDelta {
                upsert_keys: keys,
                ..Default::default()
            })),
        };
        let successor = |revoked| pb::FleetKey {
            budget_id: "a".into(),
            ..fleet_key("b", &b, revoked)
        };
        cache.apply(delta(1, vec![fleet_key("a", &a, false), successor(false)]));
        let policy = cache.current.load();
        let key_b = policy.keys.get(&secret::hash(&b)).unwrap();
        assert_eq!(
            key_b.budget_id, "a",
            "the successor spends the first key's budget"
        );
        // The rolled key goes; its successor spends on from the same pool.
        let gone = cache.apply(delta(2, vec![fleet_key("a", &a, true)]));
        assert!(gone.is_empty(), "{gone:?}");
        assert_eq!(standing_of(&cache, &a), "revoked");
        // Once no key spends the budget, its lease goes back.
        let gone = cache.apply(delta(3, vec![successor(true)]));
        assert_eq!(gone, vec!["a".to_string()]);
    }

    #[test]
    fn a_switch_from_observe_mode_hands_the_budgets_leases_back() {
        let cache = PolicyCache::new(Catalog::builtin());
        let a = secret::generate(SecretKind::VaultKey, "live");
        let observing = pb::FleetKey {
            observe_ceiling_micros: 50,
            ..fleet_key("a", &a, false)
        };
        let delta = |version, keys| pb::PolicyUpdate {
            version,
            update: Some(pb::policy_update::Update::Delta(pb::PolicyDelta {
                upsert_keys: keys,
                ..Default::default()
            })),
        };
        assert!(cache.apply(delta(1, vec![observing.clone()])).is_empty());
        // The same key again changes nothing of its budget.
        assert!(cache.apply(delta(2, vec![observing.clone()])).is_empty());
        let key = cache
            .current
            .load()
            .keys
            .get(&secret::hash(&a))
            .unwrap()
            .clone();
        assert_eq!(key.budget_daily_cap(), Micros(50));
        assert_eq!(key.budget_lifetime_cap(), None);
        // Switched: its leases were granted under the ceiling.
        let gone = cache.apply(delta(3, vec![fleet_key("a", &a, false)]));
        assert_eq!(gone, vec!["a".to_string()]);
        // So too when the switch arrives in a snapshot.
        assert!(cache.apply(delta(4, vec![observing.clone()]))[..] == ["a".to_string()]);
        let snapshot = cache.apply(pb::PolicyUpdate {
            version: 5,
            update: Some(pb::policy_update::Update::Snapshot(pb::PolicySnapshot {
                keys: vec![fleet_key("a", &a, false)],
                ..Default::default()
            })),
        });
        assert_eq!(snapshot, vec!["a".to_string()]);
    }

    #[test]
    fn every_applied_update_is_announced_after_the_request_path_sees_it() {
        let cache = PolicyCache::new(Catalog::builtin());
        let a = secret::generate(SecretKind::VaultKey, "live");
        let mut applied = cache.subscribe_applied();
        let delta = |version, keys| pb::PolicyUpdate {
            version,
            update: Some(pb::policy_update::Update::Delta(pb::PolicyDelta {
                upsert_keys: keys,
                ..Default::default()
            })),
        };
        cache.apply(delta(4, vec![fleet_key("a", &a, false)]));
        assert!(applied.has_changed().unwrap());
        assert_eq!(*applied.borrow_and_update(), 4);
        let gone = cache.apply(delta(5, vec![fleet_key("a", &a, true)]));
        assert_eq!(gone, vec!["a".to_string()], "its lease is to be retired");
        // Whoever is told 5 finds the key refused already.
        assert_eq!(*applied.borrow_and_update(), 5);
        assert_eq!(standing_of(&cache, &a), "revoked");
        // A resumed stream's first update may bring no change: it is
        // announced all the same, so the new stream is acknowledged.
        cache.apply(delta(5, vec![]));
        assert!(applied.has_changed().unwrap());
        assert_eq!(*applied.borrow_and_update(), 5);
    }

    #[test]
    fn key_limits_arrive_parsed_and_unreadable_ones_drop_the_key() {
        let k = key_policy(limited_key(&["10.0.0.0/8"], "eu", 60)).unwrap();
        assert_eq!(
            k.allowed_cidrs,
            network::parse_cidrs(&["10.0.0.0/8"]).unwrap()
        );
        assert_eq!(k.zone.as_deref(), Some("eu"));
        assert_eq!(k.rate_limit_per_minute, Some(60));
        let open = key_policy(limited_key(&[], "", 0)).unwrap();
        assert!(open.allowed_cidrs.is_empty());
        assert_eq!((open.zone, open.rate_limit_per_minute), (None, None));
        // Served with fewer limits than it was given would be worse than
        // refused as unknown.
        assert!(key_policy(limited_key(&["10.0.0.0/33"], "", 0)).is_none());
        assert!(key_policy(limited_key(&[], "EU", 0)).is_none());
        assert!(key_policy(limited_key(&[], "", u32::MAX)).is_none());
    }

    #[test]
    fn credentials_go_in_the_profile_header() {
        let prices = Catalog::builtin();
        let v = vendor_policy(vendor("twilio", "AC123:secret12"), &prices).unwrap();
        assert_eq!(v.credential_header, http::header::AUTHORIZATION);
        assert_eq!(v.credential, "Basic QUMxMjM6c2VjcmV0MTI=");
        assert!(v.credential.is_sensitive());
        let v = vendor_policy(vendor("stripe", "sk_test_1"), &prices).unwrap();
        assert_eq!(v.credential, "Bearer sk_test_1");
        let v = vendor_policy(vendor("anthropic", "sk-ant-12"), &prices).unwrap();
        assert_eq!(v.credential_header, "x-api-key");
        assert_eq!(v.credential, "sk-ant-12");
        // A Basic credential that is not USER:PASSWORD would only ever be
        // refused upstream: the vendor is refused here instead.
        let e = vendor_policy(vendor("twilio", "AC123"), &prices).unwrap_err();
        assert!(e.contains("credential"), "{e}");
    }

    #[test]
    fn a_vendor_this_proxy_cannot_serve_is_recorded_until_it_can() {
        let cache = PolicyCache::new(Catalog::builtin());
        let mut bad = vendor("stripe", "sk_test_1");
        bad.currency_rates = [("usd".to_string(), "2".to_string())].into();
        cache.apply(pb::PolicyUpdate {
            version: 1,
            update: Some(pb::policy_update::Update::Snapshot(pb::PolicySnapshot {
                vendors: vec![bad],
                keys: vec![],
                ..Default::default()
            })),
        });
        let p = cache.load();
        assert!(!p.vendors.contains_key("v"));
        let why = p.vendor_errors.get("v").expect("error recorded");
        assert!(why.contains("usd"), "{why}");
        drop(p);
        cache.apply(pb::PolicyUpdate {
            version: 2,
            update: Some(pb::policy_update::Update::Delta(pb::PolicyDelta {
                upsert_vendors: vec![vendor("stripe", "sk_test_1")],
                ..Default::default()
            })),
        });
        let p = cache.load();
        assert!(p.vendors.contains_key("v"));
        assert!(p.vendor_errors.is_empty());
    }
}
