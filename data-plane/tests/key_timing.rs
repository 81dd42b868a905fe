//! Key lookup takes the same time whether the presented key is unknown,
//! revoked, expired or valid.
//!
//! Method: many rounds, each timing one batch of lookups of every class in
//! a fresh random order, so whatever else the machine is doing falls on
//! all classes alike. Each class is then compared with the valid keys
//! round by round: if neither is faster, each wins about half the rounds,
//! and a sign test says how far the count is from half (z, in standard
//! deviations). Preemption and interrupts only add noise to single rounds,
//! which a sign test shrugs off. A control case shows the same method does
//! catch a lookup that skips work for unknown keys.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use chrono::{Duration, Utc};
use keycap_proto::pb;
use keycap_proto::secret::{self, SecretKind};
use keycap_proto::time::to_proto;
use keycap_proxy::policy::{KeyStanding, Policy, PolicyCache};
use keycap_proxy::pricing::Catalog;
use rand::seq::SliceRandom;

/// A sign test this many deviations from even says the classes differ
/// (about one chance in a million by luck).
const LEAK_Z: f64 = 5.0;
const KEYS_PER_CLASS: usize = 256;
const BATCH: usize = 16;
const ROUNDS: usize = 500;
/// How many measurements a class must stay past LEAK_Z in to be judged
/// leaky.
const MEASUREMENTS: usize = 3;

struct Keys {
    unknown: Vec<String>,
    revoked: Vec<String>,
    expired: Vec<String>,
    valid: Vec<String>,
}

fn policy_with_keys() -> (Arc<PolicyCache>, Keys) {
    let now = Utc::now();
    let mk = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| secret::generate(SecretKind::VaultKey, "live"))
            .collect()
    };
    let keys = Keys {
        unknown: mk(KEYS_PER_CLASS),
        revoked: mk(KEYS_PER_CLASS),
        expired: mk(KEYS_PER_CLASS),
        valid: mk(KEYS_PER_CLASS),
    };
    let fleet_key = |i: usize, s: &str, revoked: bool, expires: Duration| pb::FleetKey {
        id: format!("key_{i}"),
        key_hash: secret::hash(s).to_vec(),
        vendor: "stripe".into(),
        allowed_endpoints: vec!["POST /v1/charges".into()],
        daily_cap_micros: 1_000_000,
        expires_at: Some(to_proto(now + expires)),
        agent_run_label: "timing".into(),
        revoked,
        ..Default::default()
    };
    let mut fleet_keys = Vec::new();
    for (i, s) in keys.revoked.iter().enumerate() {
        fleet_keys.push(fleet_key(i, s, true, Duration::hours(1)));
    }
    for (i, s) in keys.expired.iter().enumerate() {
        fleet_keys.push(fleet_key(1000 + i, s, false, Duration::hours(-1)));
    }
    for (i, s) in keys.valid.iter().enumerate() {
        fleet_keys.push(fleet_key(2000 + i, s, false, Duration::hours(1)));
    }
    let cache = PolicyCache::new(Catalog::builtin());
    cache.apply(pb::PolicyUpdate {
        version: 1,
        update: Some(pb::policy_update::Update::Snapshot(pb::PolicySnapshot {
            vendors: vec![],
            keys: fleet_keys,
            ..Default::default()
        })),
    });
    (cache, keys)
}

/// A key in its own cache line, so no class gets more keys that straddle
/// two lines than another (that alone shows up in the sign test).
#[repr(align(64))]
struct Slot([u8; 64], usize);

impl Slot {
    fn new(key: &str) -> Slot {
        let mut bytes = [0u8; 64];
        bytes[..key.len()].copy_from_slice(key.as_bytes());
        Slot(bytes, key.len())
    }

    fn key(&self) -> &str {
        std::str::from_utf8(&self.0[..self.1]).expect("ASCII key")
    }
}

/// Nanoseconds per batch, per class, over interleaved rounds.
fn measure(classes: &[&[String]], lookup: &dyn Fn(&str) -> bool) -> Vec<Vec<f64>> {
    let classes: Vec<Vec<Slot>> = classes
        .iter()
        .map(|keys| keys.iter().map(|k| Slot::new(k)).collect())
        .collect();
    let mut rng = rand::thread_rng();
    let mut samples = vec![Vec::with_capacity(ROUNDS); classes.len()];
    let mut order: Vec<usize> = (0..classes.len()).collect();
    for round in 0..ROUNDS {
        order.shuffle(&mut rng);
        for &c in &order {
            let keys = &classes[c];
            let start = Instant::now();
            for i in 0..BATCH {
                black_box(lookup(black_box(
                    keys[(round * BATCH + i) % keys.len()].key(),
                )));
            }
            samples[c].push(start.elapsed().as_nanos() as f64);
        }
    }
    samples
}

/// Sign-test z of each class against the last: how far from half the
/// rounds in which the class was faster than the last one.
fn z_against_last(samples: &[Vec<f64>]) -> Vec<f64> {
    let last = samples.last().expect("classes");
    samples[..samples.len() - 1]
        .iter()
        .map(|c| {
            let decided: Vec<bool> = c
                .iter()
                .zip(last)
                .filter(|(a, b)| a != b)
                .map(|(a, b)| a < b)
                .collect();
            let n = decided.len() as f64;
            let faster = decided.iter().filter(|f| **f).count() as f64;
            (faster - n / 2.0) / (n.sqrt() / 2.0)
        })
        .collect()
}

fn standing(policy: &Policy, key: &str) -> u8 {
    match policy.key_standing(key, Utc::now()) {
        KeyStanding::Unknown => 0,
        KeyStanding::Revoked(_) => 1,
        KeyStanding::Expired(_) => 2,
        KeyStanding::Active(_) => 3,
    }
}

#[test]
fn unknown_revoked_expired_and_valid_keys_take_the_same_time() {
    let (cache, keys) = policy_with_keys();
    let policy = cache.load();
    // The classes are what they claim to be.
    assert_eq!(standing(&policy, &keys.unknown[0]), 0);
    assert_eq!(standing(&policy, &keys.revoked[0]), 1);
    assert_eq!(standing(&policy, &keys.expired[0]), 2);
    assert_eq!(standing(&policy, &keys.valid[0]), 3);

    let classes: [&[String]; 4] = [&keys.unknown, &keys.revoked, &keys.expired, &keys.valid];
    let lookup = |k: &str| standing(&policy, k) == 3;
    // Warm up caches and the branch predictor before measuring.
    measure(&classes, &lookup);
    // A leak is systematic: it shows in every measurement. A machine busy
    // with other work can push one measurement past the limit, so a class
    // is judged leaky only when it stays past it over MEASUREMENTS runs.
    let mut smallest = [f64::INFINITY; 3];
    for _ in 0..MEASUREMENTS {
        let z = z_against_last(&measure(&classes, &lookup));
        println!(
            "sign-test z against valid keys: unknown {:.2}, revoked {:.2}, expired {:.2}",
            z[0], z[1], z[2]
        );
        for (s, z) in smallest.iter_mut().zip(&z) {
            *s = s.min(z.abs());
        }
        if smallest.iter().all(|z| *z < LEAK_Z) {
            break;
        }
    }
    for (name, z) in ["unknown", "revoked", "expired"].iter().zip(&smallest) {
        assert!(
            *z < LEAK_Z,
            "{name} keys are looked up in measurably different time from valid ones (z >= {z:.2} in each of {MEASUREMENTS} runs)"
        );
    }
}

#[test]
fn the_method_catches_a_lookup_that_skips_work_for_unknown_keys() {
    let (cache, keys) = policy_with_keys();
    let policy = cache.load();
    let classes: [&[String]; 2] = [&keys.unknown, &keys.valid];
    // A lookup that answers an unknown key before hashing it a second
    // time, as a map probe with an early exit would.
    let leaky = |k: &str| {
        let s = standing(&policy, k);
        s != 0 && black_box(secret::hash(k))[0] < 255 && s == 3
    };
    measure(&classes, &leaky);
    let z = z_against_last(&measure(&classes, &leaky));
    println!(
        "leaky lookup, sign-test z of unknown against valid: {:.2}",
        z[0]
    );
    assert!(
        z[0] > LEAK_Z,
        "a lookup doing less work for unknown keys went unnoticed (z = {:.2})",
        z[0]
    );
}
