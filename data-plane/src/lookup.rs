//! Vault keys this proxy does not hold yet, asked of the control plane.
//!
//! Owns the one question a proxy may ask about a presented key its policy
//! does not have: "is there a key with this hash?". A key minted while this
//! proxy's policy stream lagged (its replica froze, it was reconnecting)
//! then works on its first call instead of being refused `invalid_key`.
//!
//! It must never become a way to probe for keys or to load the control
//! plane: only well-formed keys (valid checksum) are asked about, and only
//! by hash; one question per key at a time (single flight); at most
//! `LOOKUPS_PER_SECOND` questions per proxy (beyond that a key is refused as
//! unknown at once, as it was before lookups existed); a key found missing
//! is not asked about again for `MISS_MEMORY`. The agent gets the same 401
//! for a key the control plane does not know as for any unknown key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use keycap_proto::pb;
use keycap_proto::secret::{self, SecretKind};
use tonic::Status;

use crate::fleet::Fleet;
use crate::policy::{KeyPolicy, PolicyCache};

/// Questions one proxy may ask per second (and at once, after a quiet
/// second).
const LOOKUPS_PER_SECOND: u32 = 20;
/// How long a key the control plane did not know is refused without asking
/// again.
const MISS_MEMORY: Duration = Duration::from_secs(2);
/// Most remembered misses; past it the memory starts over.
const MAX_MISSES: usize = 4096;

/// Where lookups go; a trait so the single-flight and rate rules can be
/// tested without a control plane.
#[async_trait]
pub trait KeySource: Send + Sync + 'static {
    async fn lookup_key(&self, key_hash: [u8; 32]) -> Result<pb::LookupKeyResponse, Status>;
}

#[async_trait]
impl KeySource for Fleet {
    async fn lookup_key(&self, key_hash: [u8; 32]) -> Result<pb::LookupKeyResponse, Status> {
        Fleet::lookup_key(self, key_hash).await
    }
}

type Answer = Shared<BoxFuture<'static, Option<Arc<KeyPolicy>>>>;

pub struct KeyLookup {
    source: Arc<dyn KeySource>,
    cache: Arc<PolicyCache>,
    state: Mutex<State>,
}

struct State {
    in_flight: HashMap<[u8; 32], Answer>,
    misses: HashMap<[u8; 32], Instant>,
    /// Questions left in the current second, and when it began.
    allowance: u32,
    window: Instant,
}

impl KeyLookup {
    pub fn new(source: Arc<dyn KeySource>, cache: Arc<PolicyCache>) -> Arc<Self> {
        Arc::new(KeyLookup {
            source,
            cache,
            state: Mutex::new(State {
                in_flight: HashMap::new(),
                misses: HashMap::new(),
                allowance: LOOKUPS_PER_SECOND,
                window: Instant::now(),
            }),
        })
    }

    /// The key `presented` is, if the control plane knows it (revoked and
    /// expired keys included, so they are refused as such). `None` for a
    /// malformed key, an unknown one, or when the question cannot be asked
    /// now (rate, control plane away): the caller refuses it as unknown.
    pub async fn find(&self, presented: &str) -> Option<Arc<KeyPolicy>> {
        if !secret::is_well_formed(SecretKind::VaultKey, presented) {
            return None;
        }
        let hash = secret::hash(presented);
        if let Some(key) = self.cache.looked_up(&hash) {
            return Some(key);
        }
        let answer = self.ask(hash, Instant::now())?;
        let found = answer.await;
        let mut st = self.state.lock().expect("lookup state");
        st.in_flight.remove(&hash);
        if found.is_none() {
            if st.misses.len() >= MAX_MISSES {
                st.misses.clear();
            }
            st.misses.insert(hash, Instant::now());
        }
        found
    }

    /// The question about `hash` in flight, or a new one if the rules allow.
    fn ask(&self, hash: [u8; 32], now: Instant) -> Option<Answer> {
        let mut st = self.state.lock().expect("lookup state");
        if let Some(answer) = st.in_flight.get(&hash) {
            return Some(answer.clone());
        }
        if st
            .misses
            .get(&hash)
            .is_some_and(|at| now.duration_since(*at) < MISS_MEMORY)
        {
            return None;
        }
        if now.duration_since(st.window) >= Duration::from_secs(1) {
            st.window = now;
            st.allowance = LOOKUPS_PER_SECOND;
        }
        if st.allowance == 0 {
            tracing::debug!("key lookups used up for this second; unknown key refused");
            return None;
        }
        st.allowance -= 1;
        let (source, cache) = (self.source.clone(), self.cache.clone());
        let answer = async move {
            match source.lookup_key(hash).await {
                Ok(resp) => resp.key.and_then(|k| cache.adopt(k, resp.version)),
                Err(s) => {
                    tracing::warn!(code = ?s.code(), "cannot look a key up; refused as unknown");
                    None
                }
            }
        }
        .boxed()
        .shared();
        st.in_flight.insert(hash, answer.clone());
        Some(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::Catalog;
    use chrono::Utc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers every lookup after `release` is notified, counting them.
    struct Held {
        asked: AtomicUsize,
        release: tokio::sync::Notify,
        known: Option<pb::FleetKey>,
    }

    #[async_trait]
    impl KeySource for Held {
        async fn lookup_key(&self, _: [u8; 32]) -> Result<pb::LookupKeyResponse, Status> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            self.release.notified().await;
            Ok(pb::LookupKeyResponse {
                key: self.known.clone(),
                version: 7,
            })
        }
    }

    fn fleet_key(secret: &str) -> pb::FleetKey {
        pb::FleetKey {
            id: "key_new".into(),
            key_hash: secret::hash(secret).to_vec(),
            vendor: "v".into(),
            allowed_endpoints: vec!["POST /x".into()],
            daily_cap_micros: 1,
            expires_at: Some(keycap_proto::time::to_proto(
                Utc::now() + chrono::Duration::hours(1),
            )),
            ..Default::default()
        }
    }

    fn lookup(known: Option<pb::FleetKey>) -> (Arc<KeyLookup>, Arc<Held>, Arc<PolicyCache>) {
        let held = Arc::new(Held {
            asked: AtomicUsize::new(0),
            release: tokio::sync::Notify::new(),
            known,
        });
        let cache = PolicyCache::new(Catalog::builtin());
        (KeyLookup::new(held.clone(), cache.clone()), held, cache)
    }

    #[tokio::test]
    async fn concurrent_calls_with_one_unknown_key_ask_once() {
        let secret = secret::generate(SecretKind::VaultKey, "live");
        let (lookup, held, _) = lookup(Some(fleet_key(&secret)));
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let (l, s) = (lookup.clone(), secret.clone());
                tokio::spawn(async move { l.find(&s).await })
            })
            .collect();
        while held.asked.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Every call is waiting on the one question.
        held.release.notify_waiters();
        for c in calls {
            let key = c.await.unwrap().expect("the key is found");
            assert_eq!(key.id, "key_new");
        }
        assert_eq!(held.asked.load(Ordering::SeqCst), 1);
        // Learned: the next call does not ask.
        assert!(lookup.find(&secret).await.is_some());
        assert_eq!(held.asked.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn malformed_keys_are_never_asked_about_and_misses_are_remembered() {
        let (lookup, held, _) = lookup(None);
        let secret = secret::generate(SecretKind::VaultKey, "live");
        let mut tampered = secret.clone();
        tampered.pop();
        tampered.push(if secret.ends_with('A') { 'B' } else { 'A' });
        assert!(lookup.find(&tampered).await.is_none());
        assert!(lookup.find("kc_live_short").await.is_none());
        assert_eq!(held.asked.load(Ordering::SeqCst), 0);

        let asking = {
            let (l, s) = (lookup.clone(), secret.clone());
            tokio::spawn(async move { l.find(&s).await })
        };
        while held.asked.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        held.release.notify_waiters();
        assert!(asking.await.unwrap().is_none());
        // Not asked again while the miss is remembered.
        assert!(lookup.find(&secret).await.is_none());
        assert_eq!(held.asked.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn random_keys_cannot_make_a_proxy_ask_more_than_its_rate() {
        let (lookup, held, _) = lookup(None);
        // Every question waits, so none completes within the second.
        let calls: Vec<_> = (0..3 * LOOKUPS_PER_SECOND)
            .map(|_| {
                let l = lookup.clone();
                let s = secret::generate(SecretKind::VaultKey, "live");
                tokio::spawn(async move { l.find(&s).await })
            })
            .collect();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            held.asked.load(Ordering::SeqCst),
            LOOKUPS_PER_SECOND as usize
        );
        held.release.notify_waiters();
        for c in calls {
            assert!(c.await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn a_looked_up_key_gives_way_to_the_policy_once_it_catches_up() {
        let secret = secret::generate(SecretKind::VaultKey, "live");
        let (lookup, held, cache) = lookup(Some(fleet_key(&secret)));
        let asking = {
            let (l, s) = (lookup.clone(), secret.clone());
            tokio::spawn(async move { l.find(&s).await })
        };
        while held.asked.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        held.release.notify_waiters();
        assert!(asking.await.unwrap().is_some());
        assert!(cache.looked_up(&secret::hash(&secret)).is_some());
        // A stream that starts over from a snapshot (version 0) does not
        // bring an old answer back to life.
        cache.reset_version();
        assert!(cache.looked_up(&secret::hash(&secret)).is_none());
        assert!(cache.adopt(fleet_key(&secret), 7).is_some());
        // The stream reaches the answer's version with the key revoked:
        // the stream's word wins.
        let mut revoked = fleet_key(&secret);
        revoked.revoked = true;
        cache.apply(pb::PolicyUpdate {
            version: 7,
            update: Some(pb::policy_update::Update::Snapshot(pb::PolicySnapshot {
                vendors: vec![],
                keys: vec![revoked],
                ..Default::default()
            })),
        });
        assert!(cache.looked_up(&secret::hash(&secret)).is_none());
        match cache.load().key_standing(&secret, Utc::now()) {
            crate::policy::KeyStanding::Revoked(k) => assert_eq!(k.id, "key_new"),
            other => panic!("expected the stream's revocation, got {other:?}"),
        }
    }
}
