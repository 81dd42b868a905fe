//! The money invariant across a fleet: one PostgreSQL, two control-plane
//! replicas over it, three proxies each given both replicas, the mock
//! vendor (see `keycap_tests::fleet`). One key is hammered through all three
//! proxies at once. The cap is checked at the vendor, over every charge that
//! reached it whether or not it was answered; the audit is matched to the
//! vendor's charges by count and amount; every refusal must be well formed.
//! Then the same while a proxy is SIGKILLed, while a replica is SIGKILLed
//! and restarted, and while no replica can be reached.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use keycap_tests::fleet::{self, Charge, Fleet, FleetOpts};
use keycap_tests::mock::HoldAt;
use sqlx::Connection;

use super::*;

/// The key's daily cap.
const CAP_USD: i64 = 20;
const CAP_CENTS: i64 = CAP_USD * 100;
/// Charges in one hammering, and how many are in flight at once.
const CALLS: usize = 480;
const CONCURRENCY: usize = 96;
/// How long a hammering may take to reach the point a test acts at.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Charge `i` asks for 45 to 55 cents: about forty fit under the cap, and
/// the amounts differ, so the audit is matched to the vendor's charges by
/// amount as well as by count.
fn cents(i: usize) -> i64 {
    45 + (i * 7 % 11) as i64
}

async fn start_fleet() -> Option<Fleet> {
    let db = pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the test")?;
    Some(Fleet::start(db, &FleetOpts::default()).await)
}

/// What a hammering may answer besides 200 and `daily_cap_exceeded`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// This proxy was SIGKILLed: charges through it may go unanswered.
    ProxyKilled(usize),
    /// No replica answers: a proxy whose lease cannot cover a charge
    /// refuses it `budget_unavailable` (fail closed).
    NoControlPlane,
}

/// What a hammering's answers came to.
#[derive(Debug, Default)]
struct Tally {
    /// Amounts (cents) of the charges answered 200, sorted.
    admitted: Vec<i64>,
    admitted_by: [usize; 3],
    capped: usize,
    unavailable: usize,
    unanswered_by: [usize; 3],
}

/// Checks every answer: a 200 is the charge asked for; a refusal is a
/// well-formed `daily_cap_exceeded` that says too little remains for this
/// charge, or, only under `fault`, the fail-closed refusal or no answer.
#[track_caller]
fn tally(charges: &[Charge], fault: Fault) -> Tally {
    let mut t = Tally::default();
    for c in charges {
        let r = match &c.answer {
            Ok(r) => r,
            Err(e) => {
                assert_eq!(
                    fault,
                    Fault::ProxyKilled(c.proxy),
                    "a charge through proxy {} got no answer: {e}",
                    c.proxy
                );
                t.unanswered_by[c.proxy] += 1;
                continue;
            }
        };
        match r.status {
            200 => {
                assert_eq!(r.json()["amount"], c.cents, "{}", r.text);
                t.admitted.push(c.cents);
                t.admitted_by[c.proxy] += 1;
            }
            429 => {
                let body =
                    assert_cap_refusal_of(r, CAP_USD as f64, c.sent.into(), c.received.into());
                let remaining = body["remaining_usd"].as_f64().expect("remaining_usd");
                let remaining_micros = (remaining * 1e6).round() as i64;
                assert!(
                    (0..c.cents * 10_000).contains(&remaining_micros),
                    "a {} cent charge refused although {body} says enough remains",
                    c.cents
                );
                t.capped += 1;
            }
            503 if fault == Fault::NoControlPlane => {
                r.expect_error(503, "budget_unavailable");
                assert_eq!(r.header("retry-after"), Some("1"), "{}", r.text);
                t.unavailable += 1;
            }
            s => panic!(
                "a {} cent charge through proxy {} was answered {s}: {}",
                c.cents, c.proxy, r.text
            ),
        }
    }
    t.admitted.sort_unstable();
    t
}

/// Amounts (cents) of two tallies' admitted charges, sorted.
fn admitted_in(tallies: &[&Tally]) -> Vec<i64> {
    let mut all: Vec<i64> = tallies
        .iter()
        .flat_map(|t| t.admitted.iter().copied())
        .collect();
    all.sort_unstable();
    all
}

/// The cap, checked at the vendor: every charge that reached it, answered
/// or not, adds up to at most the cap. Returns their amounts, sorted.
#[track_caller]
fn reached_vendor_within_cap(fleet: &Fleet) -> Vec<i64> {
    let mut reached = fleet.mock.payment_intent_amounts();
    let total: i64 = reached.iter().sum();
    assert!(
        total <= CAP_CENTS,
        "{total} cents of charges reached the vendor under a {CAP_CENTS} cent cap"
    );
    assert!(fleet.mock.forwarded_stripe_amount() <= total);
    reached.sort_unstable();
    reached
}

/// The key's call entries once exactly `n` are there, as amounts in cents,
/// sorted. Each is a settled charge. The proxies' refusal records (one per
/// proxy, reason and minute, written once a minute closes) are not calls.
async fn audited(admin: &Api, key_id: &str, n: usize) -> Vec<i64> {
    let query = format!("key_id={key_id}&limit=1000");
    let calls = |all: Vec<Value>| -> Vec<Value> {
        all.into_iter()
            .filter(|e| e["outcome"] != "refused")
            .collect()
    };
    let entries = wait_for(within(SPEND_TIMEOUT), || async {
        let e = calls(admin.audit(&query).await);
        (e.len() == n).then_some(e)
    })
    .await
    .unwrap_or_else(|| panic!("audit {query:?} never had {n} calls"));
    let mut cents: Vec<i64> = entries
        .iter()
        .map(|e| {
            // A call cut off by a killed proxy is reported at its
            // reservation when the proxy restarts on its spool.
            assert!(
                e["outcome"] == "settled" || e["outcome"] == "settled_at_reservation",
                "{e}"
            );
            let micros = e["cost_micros"].as_i64().expect("cost_micros");
            assert_eq!(micros % 10_000, 0, "{e}");
            micros / 10_000
        })
        .collect();
    cents.sort_unstable();
    cents
}

/// Waits until the key's spend today is the sum of `charges` (cents) over
/// as many calls.
async fn wait_spend(admin: &Api, key_id: &str, charges: &[i64]) {
    let total: i64 = charges.iter().sum();
    admin
        .wait_key_spend(key_id, total * 10_000, charges.len() as i64)
        .await;
}

/// Every charge in `reached` (cents, sorted) has exactly one audit entry, of
/// its amount; the key's spend today is their sum; the ledger holds the cap.
async fn assert_audited_exactly(fleet: &Fleet, admin: &Api, key_id: &str, reached: &[i64]) {
    assert_eq!(
        audited(admin, key_id, reached.len()).await,
        reached,
        "one audit entry per charge the vendor received"
    );
    wait_spend(admin, key_id, reached).await;
    assert_ledger_within_cap(fleet, key_id).await;
}

/// The money invariant as the ledger holds it: settled spend plus what
/// leases still hold (granted, not yet reported) stays within the cap.
async fn assert_ledger_within_cap(fleet: &Fleet, key_id: &str) {
    let mut db = sqlx::PgConnection::connect(&fleet.db.url)
        .await
        .expect("connect to the fleet's database");
    let (spent, leased): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE((SELECT SUM(spent) FROM key_spend_daily \
                          WHERE key_id = $1 AND day = $2), 0)::BIGINT, \
                COALESCE((SELECT SUM(GREATEST(granted - reported, 0)) FROM leases \
                          WHERE key_id = $1 AND day = $2), 0)::BIGINT",
    )
    .bind(key_id)
    .bind(chrono::Utc::now().format("%Y-%m-%d").to_string())
    .fetch_one(&mut db)
    .await
    .expect("read the key's spend and leases");
    assert!(
        spent + leased <= CAP_CENTS * 10_000,
        "ledger: {spent} micros spent and {leased} leased under a {CAP_CENTS} cent cap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_hammered_through_three_proxies_never_passes_its_cap() {
    let Some(fleet) = start_fleet().await else {
        return;
    };
    let key = fleet.mint(1, json!(CAP_USD), "fleet/hammer").await;
    let charges = fleet::charges(
        &fleet.agents(&key.secret),
        CALLS,
        CONCURRENCY,
        cents,
        Arc::default(),
    )
    .await;
    let t = tally(&charges, Fault::None);
    assert!(t.capped > 0, "the cap never bound");
    for (i, n) in t.admitted_by.iter().enumerate() {
        assert!(*n > 0, "proxy {i} admitted nothing: {t:?}");
    }

    let reached = reached_vendor_within_cap(&fleet);
    assert_eq!(
        reached, t.admitted,
        "the vendor received exactly the charges answered 200"
    );
    assert_audited_exactly(&fleet, &fleet.admin(0), &key.id, &reached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_load_cannot_break_the_cap() {
    let Some(mut fleet) = start_fleet().await else {
        return;
    };
    let key = fleet.mint(1, json!(CAP_USD), "fleet/proxy-killed").await;
    let agents = fleet.agents(&key.secret);
    // Every admitted charge is held at the vendor, so the proxy dies with
    // calls in flight: reserved and forwarded, not yet answered or settled.
    let hold = fleet.mock.hold("/v1/payment_intents", HoldAt::Response);
    let answered = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let (agents, answered) = (agents.clone(), answered.clone());
        async move { fleet::charges(&agents, CALLS, CONCURRENCY, cents, answered).await }
    });
    // Mid-load: every charge is either refused already or held at the
    // vendor, so the budget is all reserved and nothing is settled.
    let held = wait_until(within(LOAD_TIMEOUT), || async {
        answered.load(Ordering::SeqCst) + fleet.mock.calls().len() == CALLS
    })
    .await;
    assert!(held, "the load never reached the vendor's hold");
    let killed = 2;
    fleet.proxies[killed].process_mut().kill().await;
    hold.release();
    let during = tally(&load.await.expect("load task"), Fault::ProxyKilled(killed));
    assert!(
        during.unanswered_by[killed] > 0,
        "the killed proxy had no call in flight: {during:?}"
    );

    // It comes back (same node id, new leases) and serves again, while the
    // budget its lost calls reserved still counts as spent.
    fleet.proxies[killed].restart().await;
    let after = tally(
        &fleet::charges(&agents, CALLS / 4, CONCURRENCY, cents, Arc::default()).await,
        Fault::None,
    );

    let reached = reached_vendor_within_cap(&fleet);
    let admitted = admitted_in(&[&during, &after]);
    // Every charge answered 200 reached the vendor; the only others that
    // did were in flight on the killed proxy.
    let mut unmatched = reached.clone();
    for c in &admitted {
        let i = unmatched
            .iter()
            .position(|r| r == c)
            .unwrap_or_else(|| panic!("a {c} cent charge answered 200 never reached the vendor"));
        unmatched.remove(i);
    }
    assert_eq!(
        unmatched.len(),
        during.unanswered_by[killed],
        "charges that reached the vendor unanswered are those the killed proxy had in flight"
    );

    // Restarted on its spool, the killed proxy reported the calls it had in
    // flight, at their reservation (for a Stripe charge, its amount): every
    // charge the vendor received has exactly one audit entry.
    assert_audited_exactly(&fleet, &fleet.admin(0), &key.id, &reached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_and_restarted_mid_load_hands_its_proxies_to_the_other() {
    let Some(mut fleet) = start_fleet().await else {
        return;
    };
    let (killed, other) = (0, 1);
    let key = fleet
        .mint(other, json!(CAP_USD), "fleet/replica-killed")
        .await;
    let agents = fleet.agents(&key.secret);
    // Leases from both replicas first. Fifteen charges fit with room to
    // spare even with every proxy's lease full.
    let warm = tally(
        &fleet::charges(&agents, 15, 15, cents, Arc::default()).await,
        Fault::None,
    );
    assert_eq!(warm.admitted.len(), 15, "{warm:?}");

    fleet.controls[killed].kill().await;
    // The proxies that watched the killed replica follow the other one: a
    // key made there reaches all three.
    let probe = fleet.mint(other, json!(1), "fleet/probe").await;
    // Its `/vault` relay follows too.
    assert_eq!(Fleet::first_choice(0), killed);
    fleet.proxies[0]
        .api(Some(&fleet.controls[other].opts.admin_token))
        .get(&format!("/vault/keys/{}", probe.id))
        .await
        .expect(200);

    // Hammer while the killed replica comes back: proxies that asked it for
    // leases ask the other, and nothing fails closed, since one replica
    // answered throughout.
    let load = tokio::spawn({
        let agents = agents.clone();
        async move { fleet::charges(&agents, CALLS, CONCURRENCY, cents, Arc::default()).await }
    });
    let under_way = wait_until(within(LOAD_TIMEOUT), || async {
        fleet.mock.calls().len() >= 15 + 8 || load.is_finished()
    })
    .await;
    assert!(under_way, "the load never got under way");
    fleet.controls[killed].restart().await;
    let main = tally(&load.await.expect("load task"), Fault::None);

    let reached = reached_vendor_within_cap(&fleet);
    assert_eq!(
        reached,
        admitted_in(&[&warm, &main]),
        "the vendor received exactly the charges answered 200"
    );
    let admin = fleet.admin(killed);
    assert_audited_exactly(&fleet, &admin, &key.id, &reached).await;

    // The restarted replica's changes reach every proxy, wherever each
    // watches now.
    admin
        .delete(&format!("/vault/keys/{}", probe.id))
        .await
        .expect(200);
    for p in &fleet.proxies {
        let revoked = wait_until(within(harness::POLICY_TIMEOUT), || async {
            probe_key(&p.url(), "stripe", &probe.secret)
                .await
                .as_deref()
                == Some("key_revoked")
        })
        .await;
        assert!(revoked, "{} never saw the revocation", p.node_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_replica_reachable_proxies_spend_only_their_leases_and_report_later() {
    let Some(mut fleet) = start_fleet().await else {
        return;
    };
    let key = fleet.mint(0, json!(CAP_USD), "fleet/outage").await;
    let agents = fleet.agents(&key.secret);
    // One charge through each proxy: each now holds a lease.
    let warm = tally(
        &fleet::charges(&agents, 3, 3, cents, Arc::default()).await,
        Fault::None,
    );
    assert_eq!(warm.admitted_by, [1, 1, 1]);

    for c in &mut fleet.controls {
        c.kill().await;
    }
    let outage = tally(
        &fleet::charges(&agents, CALLS / 2, CONCURRENCY, cents, Arc::default()).await,
        Fault::NoControlPlane,
    );
    for (i, n) in outage.admitted_by.iter().enumerate() {
        assert!(
            *n > 0,
            "proxy {i} served nothing from its lease: {outage:?}"
        );
    }
    assert!(outage.unavailable > 0, "nothing failed closed: {outage:?}");
    assert_eq!(
        outage.capped, 0,
        "with no replica to ask, no proxy can know the cap is spent"
    );

    for c in &mut fleet.controls {
        c.restart().await;
    }
    // Spend held while the replicas were away is delivered once each.
    let reached = reached_vendor_within_cap(&fleet);
    assert_eq!(reached, admitted_in(&[&warm, &outage]));
    let admin = fleet.admin(1);
    assert_audited_exactly(&fleet, &admin, &key.id, &reached).await;

    // And the proxies draw fresh leases again, up to the cap.
    let after = tally(
        &fleet::charges(&agents, CALLS / 2, CONCURRENCY, cents, Arc::default()).await,
        Fault::None,
    );
    assert!(!after.admitted.is_empty(), "{after:?}");
    let reached = reached_vendor_within_cap(&fleet);
    assert_eq!(reached, admitted_in(&[&warm, &outage, &after]));
    assert_audited_exactly(&fleet, &admin, &key.id, &reached).await;
}
