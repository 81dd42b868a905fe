//! The webhook outbox in the store, on both backends (`sqlite::<case>`,
//! `postgres::<case>` as in `tests/store.rs`): an event is raised once per
//! what it is about however many callers race, deliveries of an endpoint
//! are claimed in order and by one worker at a time, a lease that runs out
//! passes the delivery on, and attempts are kept.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{Duration, Utc};
use keycap_control::domain::{Profile, Vendor, VendorName};
use keycap_control::store::{Store, VendorWrite};
use keycap_control::webhook::{
    Attempt, AttemptOutcome, EndpointRequest, EventType, NewWebhookEndpoint, WebhookEvent,
};

store_suite!(
    endpoints_round_trip,
    an_event_is_raised_once_however_many_race,
    an_endpoint_gets_its_deliveries_in_order,
    one_worker_holds_a_delivery_until_its_lease_runs_out,
    concurrent_workers_never_claim_the_same_delivery,
    a_credential_keeps_its_set_time_until_replaced,
);

async fn endpoint(s: &dyn Store, url: &str) -> String {
    let new = NewWebhookEndpoint::new(
        &EndpointRequest {
            url: url.into(),
            events: vec!["cap.threshold".into(), "key.revoked".into()],
            thresholds: vec![80, 50],
            run_label: "run-a".into(),
            format: "slack".into(),
            ..Default::default()
        },
        Utc::now(),
    )
    .unwrap();
    s.insert_webhook_endpoint(&new.endpoint, b"sealed")
        .await
        .unwrap();
    new.endpoint.id
}

fn event() -> WebhookEvent {
    WebhookEvent::new(
        EventType::CapThreshold,
        Utc::now(),
        serde_json::json!({"k": 1}),
    )
}

fn attempt(status: Option<i32>) -> Attempt {
    Attempt {
        attempt: 0,
        at: Utc::now(),
        status,
        error: if status == Some(200) {
            String::new()
        } else {
            "refused".into()
        },
        duration_ms: 3,
    }
}

async fn endpoints_round_trip(s: Arc<dyn Store>) {
    let id = endpoint(&*s, "https://hooks.example.com/a").await;
    let got = s.get_webhook_endpoint(&id).await.unwrap().unwrap();
    assert_eq!(got.url, "https://hooks.example.com/a");
    assert_eq!(got.thresholds, vec![50, 80]);
    assert_eq!(
        got.events,
        vec![EventType::CapThreshold, EventType::KeyRevoked]
    );
    assert_eq!(got.run_label.as_deref(), Some("run-a"));
    assert_eq!(got.format.as_str(), "slack");
    assert_eq!(s.list_webhook_endpoints().await.unwrap(), vec![got]);
    // Deleting takes its deliveries with it.
    s.enqueue_webhook_event(&event(), None, std::slice::from_ref(&id), Utc::now())
        .await
        .unwrap();
    s.delete_webhook_endpoint(&id).await.unwrap();
    assert!(s.get_webhook_endpoint(&id).await.unwrap().is_none());
    assert!(s.delete_webhook_endpoint(&id).await.is_err());
    assert!(s.webhook_deliveries(&id, 10).await.unwrap().is_empty());
}

async fn an_event_is_raised_once_however_many_race(s: Arc<dyn Store>) {
    let a = endpoint(&*s, "https://a.example.com/").await;
    let b = endpoint(&*s, "https://b.example.com/").await;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let (s, targets) = (s.clone(), vec![a.clone(), b.clone()]);
        tasks.push(tokio::spawn(async move {
            s.enqueue_webhook_event(
                &event(),
                Some("cap.threshold|key|k1|daily|2026-12-06|80"),
                &targets,
                Utc::now(),
            )
            .await
            .unwrap()
        }));
    }
    let mut stored = 0;
    for t in tasks {
        stored += usize::from(t.await.unwrap());
    }
    assert_eq!(stored, 1, "exactly one of the racing callers raises it");
    let da = s.webhook_deliveries(&a, 10).await.unwrap();
    let db = s.webhook_deliveries(&b, 10).await.unwrap();
    assert_eq!((da.len(), db.len()), (1, 1));
    assert_eq!(
        da[0].event_id, db[0].event_id,
        "one event id for every endpoint"
    );
    assert_eq!(da[0].state, "pending");
    // Another threshold is another event.
    assert!(s
        .enqueue_webhook_event(
            &event(),
            Some("cap.threshold|key|k1|daily|2026-12-06|50"),
            std::slice::from_ref(&a),
            Utc::now()
        )
        .await
        .unwrap());
}

async fn an_endpoint_gets_its_deliveries_in_order(s: Arc<dyn Store>) {
    let a = endpoint(&*s, "https://a.example.com/").await;
    let b = endpoint(&*s, "https://b.example.com/").await;
    let (e1, e2) = (event(), event());
    let now = Utc::now();
    s.enqueue_webhook_event(&e1, None, &[a.clone(), b.clone()], now)
        .await
        .unwrap();
    s.enqueue_webhook_event(&e2, None, std::slice::from_ref(&a), now)
        .await
        .unwrap();
    let later = now + Duration::seconds(1);
    let lease = later + Duration::seconds(30);
    // One head per endpoint: e1 to a and to b, not e2 (behind e1 at a).
    let claimed = s
        .claim_webhook_deliveries("w1", later, lease, 10)
        .await
        .unwrap();
    let got: BTreeSet<(String, String)> = claimed
        .iter()
        .map(|c| (c.endpoint_id.clone(), c.event_id.clone()))
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([(a.clone(), e1.id.clone()), (b.clone(), e1.id.clone())])
    );
    assert_eq!(claimed[0].payload, e1.payload());
    assert_eq!(claimed[0].sealed_secret, b"sealed");
    // a's e1 fails: retried later; e2 waits behind it meanwhile.
    let at_a = claimed.iter().find(|c| c.endpoint_id == a).unwrap();
    let retry_at = later + Duration::seconds(5);
    assert!(s
        .finish_webhook_attempt(
            at_a.seq,
            "w1",
            &attempt(Some(500)),
            AttemptOutcome::Retry(retry_at)
        )
        .await
        .unwrap());
    assert!(s
        .claim_webhook_deliveries("w1", later + Duration::seconds(2), lease, 10)
        .await
        .unwrap()
        .is_empty());
    let again = s
        .claim_webhook_deliveries("w1", retry_at, retry_at + Duration::seconds(30), 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].event_id.as_str(), again[0].attempts),
        (e1.id.as_str(), 1)
    );
    assert!(s
        .finish_webhook_attempt(
            again[0].seq,
            "w1",
            &attempt(Some(200)),
            AttemptOutcome::Delivered
        )
        .await
        .unwrap());
    let next = s
        .claim_webhook_deliveries("w1", retry_at, retry_at + Duration::seconds(30), 10)
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].event_id, e2.id);
    // Attempts are kept, newest delivery first.
    let listed = s.webhook_deliveries(&a, 10).await.unwrap();
    assert_eq!(listed[1].event_id, e1.id);
    assert_eq!(listed[1].state, "delivered");
    let statuses: Vec<_> = listed[1]
        .attempts
        .iter()
        .map(|t| (t.attempt, t.status))
        .collect();
    assert_eq!(statuses, vec![(1, Some(500)), (2, Some(200))]);
    assert_eq!(listed[1].attempts[0].error, "refused");
    assert!(listed[1].next_attempt_at.is_none());
}

async fn one_worker_holds_a_delivery_until_its_lease_runs_out(s: Arc<dyn Store>) {
    let a = endpoint(&*s, "https://a.example.com/").await;
    let e = event();
    let now = Utc::now();
    s.enqueue_webhook_event(&e, None, std::slice::from_ref(&a), now)
        .await
        .unwrap();
    let first = s
        .claim_webhook_deliveries("dead", now, now + Duration::seconds(10), 10)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert!(s
        .claim_webhook_deliveries(
            "w2",
            now + Duration::seconds(9),
            now + Duration::seconds(40),
            10
        )
        .await
        .unwrap()
        .is_empty());
    // The first worker died: once its lease runs out another takes over.
    let second = s
        .claim_webhook_deliveries(
            "w2",
            now + Duration::seconds(11),
            now + Duration::seconds(40),
            10,
        )
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].event_id, e.id);
    // The dead worker's late answer is not recorded over w2's claim.
    assert!(!s
        .finish_webhook_attempt(
            first[0].seq,
            "dead",
            &attempt(Some(200)),
            AttemptOutcome::Delivered
        )
        .await
        .unwrap());
    assert!(s
        .finish_webhook_attempt(
            second[0].seq,
            "w2",
            &attempt(Some(200)),
            AttemptOutcome::Delivered
        )
        .await
        .unwrap());
    assert_eq!(
        s.webhook_deliveries(&a, 10).await.unwrap()[0].state,
        "delivered"
    );
}

async fn concurrent_workers_never_claim_the_same_delivery(s: Arc<dyn Store>) {
    let mut endpoints = Vec::new();
    for i in 0..20 {
        endpoints.push(endpoint(&*s, &format!("https://h{i}.example.com/")).await);
    }
    let now = Utc::now();
    s.enqueue_webhook_event(&event(), None, &endpoints, now)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..6 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..5 {
                let got = s
                    .claim_webhook_deliveries(&format!("w{w}"), now, now + Duration::seconds(60), 3)
                    .await
                    .unwrap();
                mine.extend(got.into_iter().map(|c| c.seq));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: BTreeSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "a delivery was claimed twice");
    assert_eq!(all.len(), 20);
}

async fn a_credential_keeps_its_set_time_until_replaced(s: Arc<dyn Store>) {
    let t0 = Utc::now() - Duration::days(100);
    let vendor = |at: chrono::DateTime<Utc>, rotate: Option<Duration>| Vendor {
        name: VendorName::parse("stripe").unwrap(),
        profile: Profile::Stripe,
        base_url: "https://stripe.example.com".into(),
        currency_rates: Default::default(),
        prices: String::new(),
        forward_trace_context: false,
        created_at: at,
        updated_at: at,
        credential_set_at: at,
        rotate_after: rotate,
    };
    let write = |v: Vendor, sealed: Option<&[u8]>, version: i64| VendorWrite {
        vendor: v,
        sealed_credential: sealed.map(<[u8]>::to_vec),
        credential_version: version,
    };
    let (stored, _) = s
        .put_vendor(write(vendor(t0, Some(Duration::days(90))), Some(b"c1"), 1))
        .await
        .unwrap();
    assert_eq!(
        stored.credential_set_at.timestamp_micros(),
        t0.timestamp_micros()
    );
    assert!(stored.rotation_overdue(Utc::now()));
    // An update that keeps the credential keeps its age.
    let t1 = t0 + Duration::days(50);
    let (kept, _) = s
        .put_vendor(write(vendor(t1, Some(Duration::days(90))), None, 0))
        .await
        .unwrap();
    assert_eq!(
        kept.credential_set_at.timestamp_micros(),
        t0.timestamp_micros()
    );
    let read = s.get_vendor("stripe").await.unwrap().unwrap();
    assert_eq!(read.credential_set_at, kept.credential_set_at);
    assert_eq!(read.rotate_after, Some(Duration::days(90)));
    // A new credential starts again; clearing rotate_after stops the clock.
    let t2 = Utc::now();
    let (fresh, _) = s
        .put_vendor(write(vendor(t2, None), Some(b"c2"), 2))
        .await
        .unwrap();
    assert_eq!(
        fresh.credential_set_at.timestamp_micros(),
        t2.timestamp_micros()
    );
    let read = s.get_vendor("stripe").await.unwrap().unwrap();
    assert_eq!(read.rotate_after, None);
    assert!(!read.rotation_overdue(Utc::now() + Duration::days(1000)));
}
