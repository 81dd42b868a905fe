//! Acknowledged revocation across a fleet: two control-plane replicas over
//! one PostgreSQL and three proxies split between them. A revocation made
//! through either replica returns once every connected proxy has applied
//! it, so the very next call through any proxy is refused; a proxy that
//! cannot confirm (stopped with SIGSTOP) is named in the answer after the
//! timeout and its lease of the key is fenced.
//!
//! Nothing here waits for a refusal that the revocation's answer promised:
//! those calls are made once, right after it returns.

use keycap_tests::harness::{Control, Proxy};
use sqlx::{Connection, PgConnection};

use super::*;

/// Two replicas over a fresh PostgreSQL database (`a_args` added to the
/// first's flags) and three proxies: the first on replica A, the others on
/// replica B. Fields drop in order: the processes go before the database.
struct Fleet {
    proxies: Vec<Proxy>,
    a: Control,
    b: Control,
    mock: MockVendor,
    db: pg::PgDatabase,
}

impl Fleet {
    /// `None` when there is no PostgreSQL to test against (never under CI).
    async fn start(a_args: &[&str], names: [&str; 3]) -> Option<Fleet> {
        let db = pg::fresh_database_or_skip()
            .await
            .expect("a PostgreSQL database for the test")?;
        let opts = ControlOpts::postgres(&db.url);
        let mut a_opts = opts.clone();
        a_opts.args = a_args.iter().map(|s| s.to_string()).collect();
        let a = Control::start(a_opts).await;
        let b = Control::start(opts.clone()).await;
        let mut proxies = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            let control = if i == 0 { &a } else { &b };
            proxies.push(Proxy::start(&control.url(), &opts.fleet_token, name).await);
        }
        let mock = stripe_on(&a).await;
        Some(Fleet {
            proxies,
            a,
            b,
            mock,
            db,
        })
    }

    fn node_ids(&self) -> BTreeSet<String> {
        self.proxies.iter().map(|p| p.node_id.clone()).collect()
    }

    /// Mints a key through `admin` and charges $1 once through every
    /// proxy, so each holds a lease of it with budget left ($50 a day is
    /// leased to each in a first slice of four calls: $4, more than a
    /// sixteenth of the cap).
    async fn key_in_use(&self, admin: &Api, label: &str) -> (String, String) {
        let key = admin
            .post_json(
                "/vault/keys",
                &stripe_key_body(json!(50), &["POST /v1/payment_intents"], label),
            )
            .await
            .expect(201);
        let secret = key["key"].as_str().expect("key").to_string();
        harness::assert_all_confirmed(&key);
        for p in &self.proxies {
            let r = charge(p, &secret).await;
            assert_eq!(r.status, 200, "{}: {}", p.node_id, r.text);
        }
        (key["id"].as_str().expect("id").to_string(), secret)
    }
}

/// `DELETE /vault/keys/{id}` through `control`: the revoked key with its
/// confirmation.
async fn revoke_key(control: &Control, id: &str) -> Value {
    control
        .admin()
        .delete(&format!("/vault/keys/{id}"))
        .await
        .expect(200)
}

async fn charge(proxy: &Proxy, secret: &str) -> Resp {
    Api::new(&proxy.url(), Some(secret))
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
}

/// Every proxy refuses the key now: one call each, no retry.
async fn assert_refused_by_all(proxies: &[Proxy], secret: &str, what: &str) {
    for p in proxies {
        let r = charge(p, secret).await;
        assert_eq!(
            r.error_code().as_deref(),
            Some("key_revoked"),
            "{what}: {} answered {} {} right after the revocation returned",
            p.node_id,
            r.status,
            r.text
        );
        assert_eq!(r.status, 401, "{what}: {}", r.text);
    }
}

/// A USD amount: a number over REST, a decimal string from the CLI.
fn usd(v: &Value) -> f64 {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not an amount: {v}"))
}

fn names(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of node ids: {v}"))
        .iter()
        .map(|n| n.as_str().expect("node id").to_string())
        .collect()
}

#[track_caller]
fn assert_all_confirmed(confirmation: &Value, nodes: &BTreeSet<String>) {
    assert_eq!(confirmation["all_confirmed"], true, "{confirmation}");
    assert_eq!(
        &names(&confirmation["confirmed_nodes"]),
        nodes,
        "{confirmation}"
    );
    assert!(names(&confirmation["unconfirmed_nodes"]).is_empty());
    assert_eq!(
        usd(&confirmation["unconfirmed_lease_usd"]),
        0.0,
        "{confirmation}"
    );
}

/// (node, closed, fenced) of every lease of `key_id`.
async fn leases(db: &pg::PgDatabase, key_id: &str) -> Vec<(String, bool, bool)> {
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    sqlx::query_as(
        "SELECT node_id, closed, fenced_at IS NOT NULL FROM leases \
         WHERE key_id = $1 ORDER BY node_id",
    )
    .bind(key_id)
    .fetch_all(&mut conn)
    .await
    .expect("read leases")
}

/// What `node`'s leases of `key_id` hold beyond what was reported spent.
async fn unreported(db: &pg::PgDatabase, key_id: &str, node: &str) -> i64 {
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(GREATEST(granted - reported, 0)), 0)::BIGINT FROM leases \
         WHERE key_id = $1 AND node_id = $2",
    )
    .bind(key_id)
    .bind(node)
    .fetch_one(&mut conn)
    .await
    .expect("read leases")
}

/// Waits until every lease of `key_id` held by `nodes` was handed back.
async fn assert_leases_returned(db: &pg::PgDatabase, key_id: &str, nodes: &BTreeSet<String>) {
    let returned = wait_until(within(harness::POLICY_TIMEOUT), || async {
        leases(db, key_id)
            .await
            .iter()
            .all(|(node, closed, _)| *closed || !nodes.contains(node))
    })
    .await;
    assert!(
        returned,
        "proxies that applied the revocation kept their leases: {:?}",
        leases(db, key_id).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_returns_once_every_proxy_refuses_the_key() {
    let Some(fleet) = Fleet::start(&[], ["ack-a-1", "ack-b-1", "ack-b-2"]).await else {
        return;
    };
    let db = &fleet.db;
    let nodes = fleet.node_ids();

    // One key, revoked through replica A: B's proxies must confirm through
    // the database.
    let (id, secret) = fleet.key_in_use(&fleet.a.admin(), "ack/key").await;
    let out = revoke_key(&fleet.a, &id).await;
    assert_eq!(out["status"], "revoked", "{out}");
    assert_all_confirmed(&out["confirmation"], &nodes);
    assert_refused_by_all(&fleet.proxies, &secret, "RevokeKey through A").await;
    assert_leases_returned(db, &id, &nodes).await;

    // A run of two keys, revoked through replica B.
    let run = [
        fleet.key_in_use(&fleet.b.admin(), "ack/run").await,
        fleet.key_in_use(&fleet.b.admin(), "ack/run").await,
    ];
    let out = fleet
        .b
        .admin()
        .post_json("/vault/keys/revoke", &json!({"agent_run_label": "ack/run"}))
        .await
        .expect(200);
    assert_eq!(out["revoked"], 2, "{out}");
    assert_all_confirmed(&out["confirmation"], &nodes);
    for (id, secret) in &run {
        assert_refused_by_all(&fleet.proxies, secret, "RevokeRun through B").await;
        assert_leases_returned(db, id, &nodes).await;
    }

    // Revoking again changes nothing and still answers for every proxy.
    let again = revoke_key(&fleet.b, &id).await;
    assert_all_confirmed(&again["confirmation"], &nodes);
    assert_eq!(
        again["confirmation"]["version"], out["confirmation"]["version"],
        "nothing changed since the run was revoked"
    );
    // One charge per key and proxy, and no refused call, reached the
    // vendor.
    assert_eq!(fleet.mock.calls().len(), 3 * 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_cannot_confirm_is_named_and_its_lease_fenced() {
    let Some(fleet) = Fleet::start(
        &["--revoke-ack-timeout-ms", "300"],
        ["stall-a-1", "stall-b-1", "stall-b-2"],
    )
    .await
    else {
        return;
    };
    let db = &fleet.db;
    let nodes = fleet.node_ids();
    let (id, secret) = fleet.key_in_use(&fleet.a.admin(), "stall/key").await;
    let (run_id, run_secret) = fleet.key_in_use(&fleet.a.admin(), "stall/run").await;
    let stalled = &fleet.proxies[1];
    let live: BTreeSet<String> = nodes
        .iter()
        .filter(|n| **n != stalled.node_id)
        .cloned()
        .collect();

    // The proxy hangs with its policy stream (on replica B) still open.
    stalled.process().pause();
    let asked = Instant::now();
    let out = revoke_key(&fleet.a, &id).await;
    let waited = asked.elapsed();
    let c = &out["confirmation"];
    assert_eq!(out["status"], "revoked", "{out}");
    assert_eq!(c["all_confirmed"], false, "{c}");
    assert_eq!(
        names(&c["unconfirmed_nodes"]),
        BTreeSet::from([stalled.node_id.clone()])
    );
    assert_eq!(names(&c["confirmed_nodes"]), live, "{c}");
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}, before --revoke-ack-timeout-ms"
    );
    // Its lease holds what it was granted and has not spent: at most a
    // first slice (four calls' worth) less its one call, less whatever an
    // idle give-back returned before it stopped. That, and no more, is
    // what it could still spend, as the ledger says.
    let held = usd(&c["unconfirmed_lease_usd"]);
    assert!(held <= 4.0 - 1.0, "{c}");
    assert_eq!(
        (held * 1_000_000.0).round() as i64,
        unreported(db, &id, &stalled.node_id).await,
        "{c}"
    );
    let fenced: Vec<String> = leases(db, &id)
        .await
        .into_iter()
        .filter(|(_, _, fenced)| *fenced)
        .map(|(node, _, _)| node)
        .collect();
    assert_eq!(
        fenced,
        vec![stalled.node_id.clone()],
        "only its lease is fenced"
    );
    let running: Vec<&Proxy> = fleet
        .proxies
        .iter()
        .filter(|p| p.node_id != stalled.node_id)
        .collect();
    for p in &running {
        let r = charge(p, &secret).await;
        r.expect_error(401, "key_revoked");
    }

    // The CLI says so and fails, with the per-call wait.
    let cli = keycap_cli(
        &fleet.b.url(),
        &fleet.b.opts.admin_token,
        &[
            "key",
            "revoke",
            "--run-label",
            "stall/run",
            "--ack-timeout",
            "200ms",
        ],
    )
    .await;
    assert!(!cli.status.success(), "{}", cli.stdout);
    assert!(
        cli.stderr.contains(&stalled.node_id) && cli.stderr.contains("did not confirm"),
        "{}",
        cli.stderr
    );
    let printed: Value = serde_json::from_str(&cli.stdout).expect("the CLI printed JSON");
    assert_eq!(printed["revoked_ids"], json!([run_id]), "{printed}");
    assert_eq!(
        names(&printed["confirmation"]["unconfirmed_nodes"]),
        BTreeSet::from([stalled.node_id.clone()])
    );
    assert!(leases(db, &run_id)
        .await
        .iter()
        .any(|(node, _, fenced)| *node == stalled.node_id && *fenced));

    // Resumed, it applies what it missed and hands its leases back; the
    // revocations, asked again, are confirmed everywhere.
    stalled.process().resume();
    for s in [&secret, &run_secret] {
        let refused = wait_until(within(harness::POLICY_TIMEOUT), || async {
            probe_key(&stalled.url(), "stripe", s).await.as_deref() == Some("key_revoked")
        })
        .await;
        assert!(refused, "the resumed proxy still accepts a revoked key");
    }
    assert_leases_returned(db, &id, &nodes).await;
    let again = revoke_key(&fleet.a, &id).await;
    assert_all_confirmed(&again["confirmation"], &nodes);
    let cli = keycap_cli(
        &fleet.a.url(),
        &fleet.a.opts.admin_token,
        &["key", "revoke", "--run-label", "stall/run"],
    )
    .await;
    assert!(cli.status.success(), "{}", cli.stderr);
    assert_all_confirmed(&cli.json()["confirmation"], &nodes);
    assert_eq!(
        fleet.mock.calls().len(),
        2 * 3,
        "no refused call was forwarded"
    );
}
