//! Control-plane replicas over one PostgreSQL: a change made through one
//! reaches proxies watching another through LISTEN/NOTIFY, not polling.

use keycap_tests::harness::{Control, Proxy};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_reaches_proxies_of_another_without_polling() {
    let Some(db) = pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the test")
    else {
        return;
    };
    let mut opts = ControlOpts::postgres(&db.url);
    // Polling this slow cannot be what delivers a change within the test.
    opts.args = vec!["--change-poll-ms".into(), "600000".into()];
    let a = Control::start(opts.clone()).await;
    let b = Control::start(opts.clone()).await;
    let proxy = Proxy::start(&b.url(), &opts.fleet_token, "replica-b-proxy").await;

    // The vendor and the key are made through replica A after the proxy
    // took its snapshot from B: only B's change feed can bring them.
    let _mock = stripe_on(&a).await;
    let key = a
        .admin()
        .post_json(
            "/vault/keys",
            &stripe_key_body(json!(5), &["POST /v1/payment_intents"], "replicas/1"),
        )
        .await
        .expect(201);
    let secret = key["key"].as_str().expect("key").to_string();
    harness::assert_all_confirmed(&key);
    let r = Api::new(&proxy.url(), Some(&secret))
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    let id = key["id"].as_str().expect("key id");
    a.admin()
        .delete(&format!("/vault/keys/{id}"))
        .await
        .expect(200);
    let revoked = wait_until(within(harness::POLICY_TIMEOUT), || async {
        probe_key(&proxy.url(), "stripe", &secret).await.as_deref() == Some("key_revoked")
    })
    .await;
    assert!(
        revoked,
        "a revocation through replica A never reached B's proxy"
    );
}

/// (lowest, highest) version in the change log.
async fn change_log_span(db: &pg::PgDatabase) -> (i64, i64) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    sqlx::query_as("SELECT COALESCE(MIN(version), 0), COALESCE(MAX(version), 0) FROM change_log")
        .fetch_one(&mut conn)
        .await
        .expect("read the change log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_resuming_from_a_trimmed_version_takes_a_snapshot() {
    let Some(db) = pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the test")
    else {
        return;
    };
    let mut opts = ControlOpts::postgres(&db.url);
    opts.args = [
        "--change-log-keep",
        "1",
        "--change-poll-ms",
        "20",
        "--revoke-ack-timeout-ms",
        "200",
    ]
    .map(String::from)
    .to_vec();
    let mut a = Control::start(opts.clone()).await;
    let b = Control::start(opts.clone()).await;
    let proxy = Proxy::start(&a.url(), &opts.fleet_token, "trimmed-proxy").await;
    let _mock = stripe_on(&a).await;
    let mint = |control: &Control, label: &str| {
        let admin = control.admin();
        let body = stripe_key_body(json!(5), &["POST /v1/payment_intents"], label);
        async move {
            let key = admin.post_json("/vault/keys", &body).await.expect(201);
            (
                key["id"].as_str().expect("id").to_string(),
                key["key"].as_str().expect("key").to_string(),
            )
        }
    };
    let (gone_id, gone) = mint(&a, "trimmed/1").await;
    let (_, seen) = change_log_span(&db).await;

    // The proxy's replica dies. Through the other, the key is revoked and
    // another minted, and the log is trimmed past everything the proxy saw.
    a.kill().await;
    b.admin()
        .delete(&format!("/vault/keys/{gone_id}"))
        .await
        .expect(200);
    let (_, fresh) = mint(&b, "trimmed/2").await;
    assert!(
        wait_until(within(harness::POLICY_TIMEOUT), || async {
            change_log_span(&db).await.0 > seen + 1
        })
        .await,
        "the change log was not trimmed"
    );

    // Back on its replica, the proxy cannot resume from its version: it
    // takes a snapshot, which has the revocation (a key the proxy knows is
    // never looked up, so only the stream can bring it) and the new key.
    a.restart().await;
    assert!(
        wait_until(within(harness::POLICY_TIMEOUT), || async {
            probe_key(&proxy.url(), "stripe", &gone).await.as_deref() == Some("key_revoked")
        })
        .await,
        "the revocation did not reach the proxy"
    );
    assert_eq!(
        probe_key(&proxy.url(), "stripe", &fresh).await.as_deref(),
        Some(harness::PROBE_LIVE)
    );
}
