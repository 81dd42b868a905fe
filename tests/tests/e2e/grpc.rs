//! The control plane's gRPC surface, called directly with tonic clients the
//! way SDKs (admin services) and proxies (fleet service) call it.
//!
//! Each test starts its own `keycap-control` on SQLite and talks to it over
//! 127.0.0.1 only; no proxy runs, so the fleet stream and spend reports seen
//! here are exactly what the test sent and received. Stream reads are bounded
//! by `POLICY_TIMEOUT`; nothing sleeps in place of synchronisation.

use std::collections::BTreeMap;
use std::time::Duration;

use keycap_proto::pb::{
    self, fleet_service_client::FleetServiceClient, key_service_client::KeyServiceClient,
    policy_update::Update, vendor_service_client::VendorServiceClient,
};
use keycap_proto::secret;
use keycap_tests::harness::{next_policy_update, Control, ControlOpts, POLICY_TIMEOUT};
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status, Streaming};

/// The real vendor credential. Admin reads must never carry it; the fleet
/// stream must.
const CREDENTIAL: &str = "sk_live_51KeycapGrpcE2eCredentialOnlyForTheFleet";
const VENDOR: &str = "stripe";
/// Nothing listens here; no test forwards a call.
const BASE_URL: &str = "http://127.0.0.1:9/stripe";
const ENDPOINT: &str = "POST /v1/payment_intents";
const DAILY_CAP: i64 = 10_000_000;
const NODE: &str = "grpc-e2e-node";

// --- helpers -------------------------------------------------------------------

/// A control plane and one gRPC connection to it.
struct Grpc {
    control: Control,
    channel: Channel,
}

impl Grpc {
    async fn start() -> Grpc {
        let control = Control::start(ControlOpts::sqlite()).await;
        let channel = Endpoint::from_shared(control.url())
            .expect("control plane URL")
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .expect("gRPC connection to the control plane");
        Grpc { control, channel }
    }

    fn admin_token(&self) -> &str {
        &self.control.opts.admin_token
    }

    fn fleet_token(&self) -> &str {
        &self.control.opts.fleet_token
    }

    fn vendors(&self) -> VendorServiceClient<Channel> {
        VendorServiceClient::new(self.channel.clone())
    }

    fn keys(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel.clone())
    }

    fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::new(self.channel.clone())
    }

    /// `msg` with the admin token.
    fn admin<T>(&self, msg: T) -> Request<T> {
        bearer(msg, self.admin_token())
    }

    /// `msg` with the fleet token.
    fn as_fleet<T>(&self, msg: T) -> Request<T> {
        bearer(msg, self.fleet_token())
    }

    /// Registers `VENDOR` with `CREDENTIAL`; returns the response.
    async fn put_vendor(&self) -> pb::PutVendorResponse {
        self.vendors()
            .put_vendor(
                self.admin(pb::PutVendorRequest {
                    name: VENDOR.into(),
                    profile: "stripe".into(),
                    base_url: BASE_URL.into(),
                    credential: CREDENTIAL.into(),
                    currency_rates: BTreeMap::from([("eur".to_string(), "1.08".to_string())])
                        .into_iter()
                        .collect(),
                    prices_json: String::new(),
                    ack_timeout_ms: 0,
                    forward_trace_context: false,
                    rotate_after: String::new(),
                }),
            )
            .await
            .expect("PutVendor")
            .into_inner()
    }

    /// Mints a key on `VENDOR` with a run label; returns the response.
    async fn create_key(&self, label: &str) -> pb::CreateKeyResponse {
        let r = self
            .keys()
            .create_key(self.admin(key_request(label)))
            .await
            .unwrap_or_else(|s| panic!("CreateKey {label}: {s:?}"))
            .into_inner();
        assert!(r.secret.starts_with("kc_"), "secret {:?}", r.secret);
        r
    }

    async fn get_key(&self, id: &str) -> pb::VaultKey {
        self.keys()
            .get_key(self.admin(pb::GetKeyRequest { id: id.into() }))
            .await
            .unwrap_or_else(|s| panic!("GetKey {id}: {s:?}"))
            .into_inner()
            .key
            .expect("GetKey answers with a key")
    }

    /// Every key, active or not.
    async fn all_keys(&self) -> Vec<pb::VaultKey> {
        self.keys()
            .list_keys(self.admin(pb::ListKeysRequest {
                include_inactive: true,
                ..Default::default()
            }))
            .await
            .expect("ListKeys")
            .into_inner()
            .keys
    }

    /// Opens WatchPolicy with the fleet token.
    async fn watch(&self, from_version: i64) -> Streaming<pb::PolicyUpdate> {
        self.fleet()
            .watch_policy(self.as_fleet(pb::WatchPolicyRequest {
                node_id: NODE.into(),
                from_version,
            }))
            .await
            .unwrap_or_else(|s| panic!("WatchPolicy from {from_version}: {s:?}"))
            .into_inner()
    }
}

/// `msg` with `authorization: Bearer <token>`.
fn bearer<T>(msg: T, token: &str) -> Request<T> {
    with_authorization(msg, Some(&format!("Bearer {token}")))
}

/// `msg` with a raw `authorization` value, or none.
fn with_authorization<T>(msg: T, value: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(v) = value {
        let v: MetadataValue<_> = v.parse().expect("ASCII authorization value");
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// A valid CreateKey request on `VENDOR`.
fn key_request(label: &str) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        vendor: VENDOR.into(),
        allowed_endpoints: vec![ENDPOINT.into()],
        daily_cap_micros: DAILY_CAP,
        per_call_cap_micros: 0,
        lifetime_cap_micros: 0,
        expires_in_seconds: 7200,
        agent_run_label: label.into(),
        metadata: Default::default(),
        ..Default::default()
    }
}

/// The next message of a policy stream, within `POLICY_TIMEOUT`.
async fn next_update(stream: &mut Streaming<pb::PolicyUpdate>, what: &str) -> pb::PolicyUpdate {
    match tokio::time::timeout(POLICY_TIMEOUT, next_policy_update(stream)).await {
        Ok(Ok(Some(u))) => u,
        Ok(Ok(None)) => panic!("{what}: the policy stream ended"),
        Ok(Err(s)) => panic!("{what}: the policy stream failed: {s:?}"),
        Err(_) => panic!("{what}: no policy update within {POLICY_TIMEOUT:?}"),
    }
}

/// The snapshot of `u`; panics (showing `u`) if it is a delta.
#[track_caller]
fn snapshot(u: &pb::PolicyUpdate, what: &str) -> pb::PolicySnapshot {
    match &u.update {
        Some(Update::Snapshot(s)) => s.clone(),
        _ => panic!("{what}: expected a snapshot, got {u:?}"),
    }
}

/// The delta of `u`; panics (showing `u`) if it is a snapshot.
#[track_caller]
fn delta(u: &pb::PolicyUpdate, what: &str) -> pb::PolicyDelta {
    match &u.update {
        Some(Update::Delta(d)) => d.clone(),
        _ => panic!("{what}: expected a delta, got {u:?}"),
    }
}

/// Asserts `d` changes exactly the keys `secrets` name (in any order), with
/// `revoked` as given, and nothing else.
#[track_caller]
fn assert_delta_keys(d: &pb::PolicyDelta, secrets: &[&str], revoked: bool, what: &str) {
    assert!(
        d.upsert_vendors.is_empty() && d.removed_vendors.is_empty() && d.removed_keys.is_empty(),
        "{what}: delta changes more than keys: {d:?}"
    );
    let mut got: Vec<Vec<u8>> = d.upsert_keys.iter().map(|k| k.key_hash.clone()).collect();
    let mut want: Vec<Vec<u8>> = secrets.iter().map(|s| secret::hash(s).to_vec()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{what}: delta keys differ: {d:?}");
    for k in &d.upsert_keys {
        assert_eq!(k.revoked, revoked, "{what}: revoked flag of {k:?}");
    }
}

/// Asserts `text` (a Debug rendering) and `bytes` (the wire encoding) of an
/// admin response never carry the vendor credential.
#[track_caller]
fn assert_no_credential(what: &str, debug: String, bytes: Vec<u8>) {
    assert!(
        !debug.contains(CREDENTIAL),
        "{what} carries the vendor credential: {debug}"
    );
    assert!(
        !bytes
            .windows(CREDENTIAL.len())
            .any(|w| w == CREDENTIAL.as_bytes()),
        "{what}: the encoded response carries the vendor credential"
    );
}

fn today() -> String {
    keycap_proto::time::utc_day(chrono::Utc::now())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn spend_event(id: &str, lease_id: &str, key_id: &str, cost: i64) -> pb::SpendEvent {
    pb::SpendEvent {
        event_id: id.into(),
        lease_id: lease_id.into(),
        key_id: key_id.into(),
        vendor: VENDOR.into(),
        method: "POST".into(),
        path: "/v1/payment_intents".into(),
        upstream_status: 200,
        reserved_micros: cost,
        cost_micros: cost,
        outcome: "settled".into(),
        at: Some(keycap_proto::time::to_proto(chrono::Utc::now())),
        detail_json: "{}".into(),
        day: today(),
        ..Default::default()
    }
}

// --- policy stream ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_policy_sends_a_snapshot_then_key_deltas() {
    let g = Grpc::start().await;
    assert!(g.put_vendor().await.created);
    let existing = g.create_key("grpc/stream/existing").await;
    let existing_view = existing.key.clone().expect("key in CreateKeyResponse");

    let mut stream = g.watch(0).await;
    let first = next_update(&mut stream, "first message").await;
    let snap = snapshot(&first, "first message");
    assert!(first.version > 0, "snapshot version {}", first.version);
    assert!(
        !format!("{snap:?}").contains(&existing.secret),
        "the snapshot carries a key secret, not only its hash"
    );

    // The vendor, with the credential a proxy needs to inject.
    assert_eq!(snap.vendors.len(), 1, "{snap:?}");
    let v = &snap.vendors[0];
    assert_eq!(
        (v.name.as_str(), v.profile.as_str(), v.base_url.as_str()),
        (VENDOR, "stripe", BASE_URL)
    );
    assert_eq!(v.credential, CREDENTIAL);
    assert_eq!(
        v.currency_rates.get("eur").map(String::as_str),
        Some("1.08")
    );

    // The existing key, found the way a proxy finds it: by SHA-256.
    let hash = secret::hash(&existing.secret).to_vec();
    let k = snap
        .keys
        .iter()
        .find(|k| k.key_hash == hash)
        .unwrap_or_else(|| panic!("existing key not in the snapshot by hash: {snap:?}"));
    assert_eq!(k.id, existing_view.id);
    assert_eq!(k.vendor, VENDOR);
    assert_eq!(k.allowed_endpoints, vec![ENDPOINT.to_string()]);
    assert_eq!(k.daily_cap_micros, DAILY_CAP);
    assert_eq!(k.agent_run_label, "grpc/stream/existing");
    // Compared with a read, not the create response: that one carries the
    // clock at nanoseconds, the store keeps microseconds.
    assert_eq!(k.expires_at, g.get_key(&k.id).await.expires_at);
    assert!(!k.revoked);
    assert_eq!(snap.keys.len(), 1, "{snap:?}");

    // A new key arrives as a delta at a higher version.
    let fresh = g.create_key("grpc/stream/fresh").await;
    let fresh_id = fresh.key.as_ref().expect("key").id.clone();
    let created = next_update(&mut stream, "after CreateKey").await;
    let d = delta(&created, "after CreateKey");
    assert!(
        created.version > first.version,
        "delta version {} not above snapshot version {}",
        created.version,
        first.version
    );
    assert_delta_keys(&d, &[&fresh.secret], false, "after CreateKey");
    assert_eq!(d.upsert_keys[0].id, fresh_id);

    // Revoking it sends the key again, revoked, at a higher version still.
    // This stream never acknowledges what it applied, so the revocation
    // returns after its wait, naming the node.
    let revoke = |ack_timeout_ms| {
        let mut keys = g.keys();
        let req = g.admin(pb::RevokeKeyRequest {
            id: fresh_id.clone(),
            ack_timeout_ms,
        });
        async move { keys.revoke_key(req).await }
    };
    let r = revoke(300).await.expect("RevokeKey").into_inner();
    let revoked = r.key.expect("RevokeKey answers with the key");
    assert_eq!(revoked.status, pb::KeyStatus::Revoked as i32);
    let after_revoke = next_update(&mut stream, "after RevokeKey").await;
    let d = delta(&after_revoke, "after RevokeKey");
    assert!(
        after_revoke.version > created.version,
        "revocation version {} not above {}",
        after_revoke.version,
        created.version
    );
    assert_delta_keys(&d, &[&fresh.secret], true, "after RevokeKey");
    assert_eq!(d.upsert_keys[0].id, fresh_id);
    assert_eq!(
        r.confirmation,
        Some(pb::FleetConfirmation {
            version: after_revoke.version,
            confirmed_nodes: vec![],
            unconfirmed_nodes: vec![NODE.to_string()],
            unconfirmed_lease_micros: 0,
        }),
        "a watcher that never acknowledged"
    );

    // Once the node acknowledges the version it applied, revoking again
    // (which changes nothing) reports it confirmed; a late, lower
    // acknowledgement takes nothing back.
    for version in [after_revoke.version, created.version] {
        g.fleet()
            .ack_policy(g.as_fleet(pb::AckPolicyRequest {
                node_id: NODE.into(),
                version,
                ..Default::default()
            }))
            .await
            .expect("AckPolicy");
    }
    let again = revoke(0).await.expect("RevokeKey again").into_inner();
    assert_eq!(again.key.expect("key").revoked_at, revoked.revoked_at);
    assert_eq!(
        again.confirmation,
        Some(pb::FleetConfirmation {
            version: after_revoke.version,
            confirmed_nodes: vec![NODE.to_string()],
            unconfirmed_nodes: vec![],
            unconfirmed_lease_micros: 0,
        })
    );
    let s = revoke(60_001).await.expect_err("a wait over a minute");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("ack_timeout_ms"), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_policy_resumes_with_only_the_changes_it_missed() {
    let g = Grpc::start().await;
    g.put_vendor().await;
    g.create_key("grpc/resume/a").await;

    let mut stream = g.watch(0).await;
    let snap = next_update(&mut stream, "first message").await;
    snapshot(&snap, "first message");
    let b = g.create_key("grpc/resume/b").await;
    let seen = next_update(&mut stream, "after creating b").await;
    assert_delta_keys(
        &delta(&seen, "after creating b"),
        &[&b.secret],
        false,
        "after creating b",
    );
    let v = seen.version;
    drop(stream);

    // Changed while no proxy listens.
    let c = g.create_key("grpc/resume/c").await;

    let mut resumed = g.watch(v).await;
    let first = next_update(&mut resumed, "first message after resuming").await;
    let d = delta(&first, "first message after resuming");
    assert!(
        first.version > v,
        "resumed at {v}, got version {}",
        first.version
    );
    assert_delta_keys(&d, &[&c.secret], false, "first message after resuming");

    // The resumed stream stays live.
    let e = g.create_key("grpc/resume/e").await;
    let next = next_update(&mut resumed, "after creating e").await;
    assert!(next.version > first.version);
    assert_delta_keys(
        &delta(&next, "after creating e"),
        &[&e.secret],
        false,
        "after creating e",
    );
    drop(resumed);

    // Resuming from further back brings everything after that point, and
    // nothing from before it (key a).
    let mut older = g.watch(snap.version).await;
    let u = next_update(&mut older, "resuming from the snapshot version").await;
    assert_eq!(u.version, next.version);
    assert_delta_keys(
        &delta(&u, "resuming from the snapshot version"),
        &[&b.secret, &c.secret, &e.secret],
        false,
        "resuming from the snapshot version",
    );
    drop(older);

    // A proxy that is up to date gets an empty delta, not a snapshot.
    let mut current = g.watch(next.version).await;
    let u = next_update(&mut current, "resuming at the head").await;
    assert_eq!(u.version, next.version);
    assert_eq!(
        delta(&u, "resuming at the head"),
        pb::PolicyDelta::default()
    );
}

/// A proxy can hold a version this control plane has never reached: its
/// database was restored from a backup, or `keycap dev` was started over a
/// fresh data dir. Resuming from it would skip every later change whose
/// version is not above it, revocations included; it gets a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_policy_from_a_version_the_log_never_reached_still_delivers_changes() {
    let g = Grpc::start().await;
    g.put_vendor().await;
    let mut stream = g.watch(0).await;
    let head = next_update(&mut stream, "first message").await.version;
    drop(stream);

    let mut ahead = g.watch(head + 1000).await;
    let first = next_update(&mut ahead, "first message from ahead of the head").await;
    let k = g.create_key("grpc/ahead").await;
    let hash = secret::hash(&k.secret).to_vec();
    let next = tokio::time::timeout(POLICY_TIMEOUT, next_policy_update(&mut ahead)).await;
    let delivered = match &next {
        Ok(Ok(Some(u))) => match &u.update {
            Some(Update::Delta(d)) => d.upsert_keys.iter().any(|fk| fk.key_hash == hash),
            Some(Update::Snapshot(s)) => s.keys.iter().any(|fk| fk.key_hash == hash),
            Some(Update::Heartbeat(_)) | None => false,
        },
        _ => false,
    };
    assert!(
        delivered,
        "a watcher that resumed from {} (the log ends at {head}) was first told version {} \
         ({:?}) and then did not get a key created afterwards within {POLICY_TIMEOUT:?}: {next:?}",
        head + 1000,
        first.version,
        first.update.as_ref().map(|u| match u {
            Update::Snapshot(_) => "snapshot",
            Update::Delta(_) => "delta",
            Update::Heartbeat(_) => "heartbeat",
        }),
    );
}

// --- fleet auth ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_calls_need_the_fleet_token() {
    let g = Grpc::start().await;
    g.put_vendor().await;
    let key = g.create_key("grpc/fleet-auth").await;
    let key_id = key.key.expect("key").id;
    let lease_id = unique("lease");
    let event = spend_event(&unique("evt"), &lease_id, &key_id, 123_000);
    let grant = pb::GrantLeaseRequest {
        grant_id: unique("grant"),
        lease_id: lease_id.clone(),
        key_id: key_id.clone(),
        node_id: NODE.into(),
        day: today(),
        requested_micros: 1_000_000,
        minimum_micros: 1,
    };
    let report = pb::ReportSpendRequest {
        node_id: NODE.into(),
        events: vec![event.clone()],
        ..Default::default()
    };

    let wrong = format!("Bearer {}", keycap_tests::harness::fleet_token());
    let admin = format!("Bearer {}", g.admin_token());
    let upper = format!("bearer {}", g.fleet_token().to_uppercase());
    let bare = g.fleet_token().to_string();
    let refused: [(&str, Option<&str>); 5] = [
        ("no token", None),
        ("a wrong fleet token", Some(&wrong)),
        ("the admin token", Some(&admin)),
        ("the fleet token in the wrong case", Some(&upper)),
        ("the fleet token without a scheme", Some(&bare)),
    ];
    let mut fleet = g.fleet();
    for (what, auth) in refused {
        let s = fleet
            .watch_policy(with_authorization(
                pb::WatchPolicyRequest {
                    node_id: NODE.into(),
                    from_version: 0,
                },
                auth,
            ))
            .await
            .err()
            .unwrap_or_else(|| panic!("WatchPolicy with {what} was accepted"));
        assert_eq!(
            s.code(),
            Code::Unauthenticated,
            "WatchPolicy, {what}: {s:?}"
        );

        let s = fleet
            .grant_lease(with_authorization(grant.clone(), auth))
            .await
            .err()
            .unwrap_or_else(|| panic!("GrantLease with {what} was accepted"));
        assert_eq!(s.code(), Code::Unauthenticated, "GrantLease, {what}: {s:?}");

        let s = fleet
            .ack_policy(with_authorization(
                pb::AckPolicyRequest {
                    node_id: NODE.into(),
                    version: 1,
                    ..Default::default()
                },
                auth,
            ))
            .await
            .err()
            .unwrap_or_else(|| panic!("AckPolicy with {what} was accepted"));
        assert_eq!(s.code(), Code::Unauthenticated, "AckPolicy, {what}: {s:?}");

        let s = fleet
            .report_spend(with_authorization(report.clone(), auth))
            .await
            .err()
            .unwrap_or_else(|| panic!("ReportSpend with {what} was accepted"));
        assert_eq!(
            s.code(),
            Code::Unauthenticated,
            "ReportSpend, {what}: {s:?}"
        );
        assert!(!s.message().contains(g.fleet_token()));
    }

    // None of the refused calls left a trace: the lease is new and the
    // event applies now, once.
    let k = g.get_key(&key_id).await;
    assert_eq!((k.spent_today_micros, k.calls_today), (0, 0), "{k:?}");
    let granted = fleet
        .grant_lease(g.as_fleet(grant))
        .await
        .expect("GrantLease with the fleet token")
        .into_inner();
    assert!(granted.granted_micros > 0, "{granted:?}");
    assert_eq!(granted.lease_total_micros, granted.granted_micros);
    let r = fleet
        .report_spend(g.as_fleet(report))
        .await
        .expect("ReportSpend with the fleet token")
        .into_inner();
    assert_eq!((r.applied, r.duplicates), (1, 0));
    let mut stream = g.watch(0).await;
    snapshot(
        &next_update(&mut stream, "with the fleet token").await,
        "with the fleet token",
    );
}

/// A proxy whose clock is days off asks for a lease on another day's
/// budget: refused, naming the field and the control plane's day, and
/// nothing is granted; the same grant for today is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_for_another_day_is_refused() {
    let g = Grpc::start().await;
    g.put_vendor().await;
    let key_id = g.create_key("grpc/lease-day").await.key.expect("key").id;
    let mut fleet = g.fleet();
    let two_days_ahead =
        keycap_proto::time::utc_day(chrono::Utc::now() + chrono::Duration::days(2));
    let grant = |day: String| pb::GrantLeaseRequest {
        grant_id: unique("grant"),
        lease_id: unique("lease"),
        key_id: key_id.clone(),
        node_id: NODE.into(),
        day,
        requested_micros: 1_000_000,
        minimum_micros: 1,
    };
    let s = fleet
        .grant_lease(g.as_fleet(grant(two_days_ahead.clone())))
        .await
        .expect_err("a lease two days ahead");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().contains("day") && s.message().contains(&today()),
        "{s:?}"
    );
    let granted = fleet
        .grant_lease(g.as_fleet(grant(today())))
        .await
        .expect("a lease for today")
        .into_inner();
    assert_eq!(granted.granted_micros, 1_000_000, "{granted:?}");
}

// --- spend reports ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_spend_applies_each_event_once() {
    let g = Grpc::start().await;
    g.put_vendor().await;
    let key_id = g.create_key("grpc/spend").await.key.expect("key").id;
    let mut fleet = g.fleet();

    let lease_id = unique("lease");
    let grant = pb::GrantLeaseRequest {
        grant_id: unique("grant"),
        lease_id: lease_id.clone(),
        key_id: key_id.clone(),
        node_id: NODE.into(),
        day: today(),
        requested_micros: 2_000_000,
        minimum_micros: 1,
    };
    let g1 = fleet
        .grant_lease(g.as_fleet(grant.clone()))
        .await
        .expect("GrantLease")
        .into_inner();
    assert!(
        g1.granted_micros > 0 && g1.granted_micros <= 2_000_000,
        "{g1:?}"
    );
    assert_eq!(g1.lease_total_micros, g1.granted_micros);
    assert_eq!(g1.unleased_micros, DAILY_CAP - g1.granted_micros, "{g1:?}");
    // The same grant again is the same answer, not a second grant.
    let again = fleet
        .grant_lease(g.as_fleet(grant))
        .await
        .expect("GrantLease retried")
        .into_inner();
    assert_eq!(again, g1);

    let costs = [120_000, 250_000, 30_000];
    let total: i64 = costs.iter().sum();
    let events: Vec<pb::SpendEvent> = costs
        .iter()
        .map(|&c| spend_event(&unique("evt"), &lease_id, &key_id, c))
        .collect();
    let batch = pb::ReportSpendRequest {
        node_id: NODE.into(),
        events: events.clone(),
        ..Default::default()
    };
    let r = fleet
        .report_spend(g.as_fleet(batch.clone()))
        .await
        .expect("ReportSpend")
        .into_inner();
    assert_eq!((r.applied, r.duplicates), (3, 0), "first report");
    let r = fleet
        .report_spend(g.as_fleet(batch))
        .await
        .expect("ReportSpend retried")
        .into_inner();
    assert_eq!((r.applied, r.duplicates), (0, 3), "identical retry");

    let k = g.get_key(&key_id).await;
    assert_eq!(k.spent_today_micros, total, "{k:?}");
    assert_eq!(k.calls_today, 3, "{k:?}");
    assert_eq!(k.spent_lifetime_micros, total, "{k:?}");
    assert_eq!(k.remaining_today_micros, DAILY_CAP - total, "{k:?}");
    // REST reads the same numbers.
    let rest = g
        .control
        .admin()
        .get(&format!("/vault/keys/{key_id}"))
        .await
        .expect(200);
    assert_eq!(rest["spent_today_micros"], total, "{rest}");
    assert_eq!(rest["calls_today"], 3, "{rest}");

    // A batch mixing a new event with an old one applies only the new one.
    let new = spend_event(&unique("evt"), &lease_id, &key_id, 5_000);
    let r = fleet
        .report_spend(g.as_fleet(pb::ReportSpendRequest {
            node_id: NODE.into(),
            events: vec![events[1].clone(), new],
            ..Default::default()
        }))
        .await
        .expect("ReportSpend mixed")
        .into_inner();
    assert_eq!((r.applied, r.duplicates), (1, 1), "mixed batch");
    let k = g.get_key(&key_id).await;
    assert_eq!(
        (k.spent_today_micros, k.calls_today),
        (total + 5_000, 4),
        "{k:?}"
    );

    // An event from a proxy whose clock runs two hours fast: the batch is
    // answered failed_precondition (the proxy keeps it and retries, where
    // invalid_argument would make it drop the event) and nothing of it is
    // applied; dated right, the same event is taken.
    let mut fast = spend_event(&unique("evt"), &lease_id, &key_id, 7_000);
    fast.at = Some(keycap_proto::time::to_proto(
        chrono::Utc::now() + chrono::Duration::hours(2),
    ));
    let batch = |e: pb::SpendEvent| pb::ReportSpendRequest {
        node_id: NODE.into(),
        events: vec![e],
        ..Default::default()
    };
    let refused = fleet
        .report_spend(g.as_fleet(batch(fast.clone())))
        .await
        .expect_err("an event dated two hours ahead");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("ahead of the ledger's clock"),
        "{refused:?}"
    );
    assert_eq!(g.get_key(&key_id).await.calls_today, 4);
    fast.at = Some(keycap_proto::time::to_proto(chrono::Utc::now()));
    let r = fleet
        .report_spend(g.as_fleet(batch(fast)))
        .await
        .expect("ReportSpend dated right")
        .into_inner();
    assert_eq!((r.applied, r.duplicates), (1, 0));
}

// --- admin auth -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_admin_token_and_say_nothing_more() {
    let g = Grpc::start().await;
    g.put_vendor().await;

    let wrong = format!("Bearer {}", keycap_tests::harness::admin_token());
    let fleet = format!("Bearer {}", g.fleet_token());
    let basic = format!("Basic {}", g.admin_token());
    let refused: [(&str, Option<&str>); 5] = [
        ("no token", None),
        ("a wrong admin token", Some(&wrong)),
        ("the fleet token", Some(&fleet)),
        ("the admin token under another scheme", Some(&basic)),
        ("an empty bearer", Some("Bearer ")),
    ];
    let mut statuses: Vec<(String, Status)> = Vec::new();
    for (what, auth) in refused {
        let calls: [(&str, Result<(), Status>); 4] = [
            (
                "ListVendors",
                g.vendors()
                    .list_vendors(with_authorization(pb::ListVendorsRequest {}, auth))
                    .await
                    .map(drop),
            ),
            (
                "GetVendor",
                g.vendors()
                    .get_vendor(with_authorization(
                        pb::GetVendorRequest {
                            name: VENDOR.into(),
                        },
                        auth,
                    ))
                    .await
                    .map(drop),
            ),
            (
                "CreateKey",
                g.keys()
                    .create_key(with_authorization(key_request("grpc/admin-auth"), auth))
                    .await
                    .map(drop),
            ),
            (
                "ListKeys",
                g.keys()
                    .list_keys(with_authorization(pb::ListKeysRequest::default(), auth))
                    .await
                    .map(drop),
            ),
        ];
        for (call, result) in calls {
            let s = result
                .err()
                .unwrap_or_else(|| panic!("{call} with {what} was accepted"));
            assert_eq!(s.code(), Code::Unauthenticated, "{call}, {what}: {s:?}");
            statuses.push((format!("{call}, {what}"), s));
        }
    }
    // Every refusal reads the same: nothing tells a missing token from a
    // wrong one, or which token was offered.
    let (first_what, first) = &statuses[0];
    assert!(!first.message().is_empty());
    for (what, s) in &statuses[1..] {
        assert_eq!(
            (s.message(), s.details()),
            (first.message(), first.details()),
            "{what} is refused differently from {first_what}"
        );
    }
    assert!(
        g.all_keys().await.is_empty(),
        "a refused CreateKey minted a key"
    );
}

// --- vendors -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendors_round_trip_over_grpc_without_their_credential() {
    let g = Grpc::start().await;
    let mut vendors = g.vendors();

    let put = g.put_vendor().await;
    assert!(put.created);
    assert_no_credential("PutVendor", format!("{put:?}"), put.encode_to_vec());
    let v = put.vendor.expect("PutVendor answers with the vendor");
    assert_eq!(
        (v.name.as_str(), v.profile.as_str(), v.base_url.as_str()),
        (VENDOR, "stripe", BASE_URL)
    );
    assert!(v.created_at.is_some() && v.updated_at.is_some());

    let got = vendors
        .get_vendor(g.admin(pb::GetVendorRequest {
            name: VENDOR.into(),
        }))
        .await
        .expect("GetVendor")
        .into_inner();
    assert_no_credential("GetVendor", format!("{got:?}"), got.encode_to_vec());
    assert_eq!(got.vendor.as_ref(), Some(&v));

    // An update without a credential keeps the stored one.
    let updated = vendors
        .put_vendor(g.admin(pb::PutVendorRequest {
            name: VENDOR.into(),
            profile: "stripe".into(),
            base_url: "http://127.0.0.1:9/stripe-v2".into(),
            credential: String::new(),
            currency_rates: Default::default(),
            prices_json: String::new(),
            ack_timeout_ms: 0,
            forward_trace_context: true,
            rotate_after: String::new(),
        }))
        .await
        .expect("PutVendor update")
        .into_inner();
    assert!(!updated.created);
    let uv = updated.vendor.expect("vendor");
    assert_eq!(uv.base_url, "http://127.0.0.1:9/stripe-v2");
    assert!(
        uv.forward_trace_context,
        "the vendor's trace forwarding is kept"
    );
    assert_eq!(uv.created_at, v.created_at);
    let mut stream = g.watch(0).await;
    let snap = snapshot(&next_update(&mut stream, "snapshot").await, "snapshot");
    assert_eq!(snap.vendors.len(), 1, "{snap:?}");
    assert_eq!(snap.vendors[0].credential, CREDENTIAL);
    drop(stream);

    let listed = vendors
        .list_vendors(g.admin(pb::ListVendorsRequest {}))
        .await
        .expect("ListVendors")
        .into_inner();
    assert_no_credential("ListVendors", format!("{listed:?}"), listed.encode_to_vec());
    let names: Vec<&str> = listed.vendors.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, [VENDOR]);

    // A vendor an active key uses cannot go.
    let key = g.create_key("grpc/vendors").await;
    let s = vendors
        .delete_vendor(g.admin(pb::DeleteVendorRequest {
            name: VENDOR.into(),
            ack_timeout_ms: 0,
        }))
        .await
        .expect_err("DeleteVendor with an active key");
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    g.keys()
        .revoke_key(g.admin(pb::RevokeKeyRequest {
            id: key.key.expect("key").id,
            ..Default::default()
        }))
        .await
        .expect("RevokeKey");

    vendors
        .delete_vendor(g.admin(pb::DeleteVendorRequest {
            name: VENDOR.into(),
            ack_timeout_ms: 0,
        }))
        .await
        .expect("DeleteVendor");
    let s = vendors
        .get_vendor(g.admin(pb::GetVendorRequest {
            name: VENDOR.into(),
        }))
        .await
        .expect_err("GetVendor after DeleteVendor");
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = vendors
        .delete_vendor(g.admin(pb::DeleteVendorRequest {
            name: VENDOR.into(),
            ack_timeout_ms: 0,
        }))
        .await
        .expect_err("DeleteVendor twice");
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let listed = vendors
        .list_vendors(g.admin(pb::ListVendorsRequest {}))
        .await
        .expect("ListVendors")
        .into_inner();
    assert!(listed.vendors.is_empty(), "{listed:?}");
}

// --- bad input -----------------------------------------------------------------------------------

/// Invalid CreateKey requests: what is wrong, the request, and the gRPC
/// field it is wrong in.
fn bad_key_requests() -> Vec<(&'static str, pb::CreateKeyRequest, &'static str)> {
    let valid = key_request("grpc/bad-input");
    let with = |f: fn(&mut pb::CreateKeyRequest)| {
        let mut r = valid.clone();
        f(&mut r);
        r
    };
    vec![
        (
            "negative daily cap",
            with(|r| r.daily_cap_micros = -5_000_000),
            "daily_cap_micros",
        ),
        (
            "zero daily cap",
            with(|r| r.daily_cap_micros = 0),
            "daily_cap_micros",
        ),
        (
            "absurd daily cap",
            with(|r| r.daily_cap_micros = i64::MAX),
            "daily_cap_micros",
        ),
        (
            "negative per-call cap",
            with(|r| r.per_call_cap_micros = -1),
            "per_call_cap_micros",
        ),
        (
            "absurd lifetime cap",
            with(|r| r.lifetime_cap_micros = 1_000_000_000 * 1_000_000 + 1),
            "lifetime_cap_micros",
        ),
        (
            "unknown vendor",
            with(|r| r.vendor = "nosuchvendor".into()),
            "vendor",
        ),
        (
            "malformed vendor",
            with(|r| r.vendor = "Stripe/../x".into()),
            "vendor",
        ),
        (
            "no endpoints",
            with(|r| r.allowed_endpoints.clear()),
            "allowed_endpoints",
        ),
        (
            "bad method",
            with(|r| r.allowed_endpoints = vec!["FETCH /v1/x".into()]),
            "allowed_endpoints",
        ),
        (
            "zero expiry",
            with(|r| r.expires_in_seconds = 0),
            "expires_in_seconds",
        ),
        (
            "negative expiry",
            with(|r| r.expires_in_seconds = -60),
            "expires_in_seconds",
        ),
        (
            "expiry past 366 days",
            with(|r| r.expires_in_seconds = 367 * 24 * 3600),
            "expires_in_seconds",
        ),
        (
            "endless expiry",
            with(|r| r.expires_in_seconds = i64::MAX),
            "expires_in_seconds",
        ),
        (
            "empty run label",
            with(|r| r.agent_run_label.clear()),
            "agent_run_label",
        ),
    ]
}

/// What part of a gRPC field name any sensible message for it contains
/// ("daily" for `daily_cap_micros`, "expires_in" for `expires_in_seconds`).
fn field_stem(field: &str) -> &str {
    field
        .strip_suffix("_cap_micros")
        .or_else(|| field.strip_suffix("_seconds"))
        .unwrap_or(field)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_key_refuses_bad_input_and_creates_nothing() {
    let g = Grpc::start().await;
    g.put_vendor().await;
    // One valid key, so "unchanged" is not trivially "empty".
    let valid = g.create_key("grpc/bad-input/valid").await;
    let before = g.all_keys().await;
    assert_eq!(before.len(), 1);

    let mut keys = g.keys();
    for (what, req, field) in bad_key_requests() {
        let s = keys
            .create_key(g.admin(req))
            .await
            .err()
            .unwrap_or_else(|| panic!("CreateKey with {what} was accepted"));
        let code_ok = s.code() == Code::InvalidArgument
            || (what == "unknown vendor" && s.code() == Code::NotFound);
        assert!(code_ok, "{what}: {s:?}");
        assert!(
            s.message().contains(field_stem(field)),
            "{what}: the message does not name {field}: {:?}",
            s.message()
        );
    }

    for (what, id) in [("unknown", "key_doesnotexist"), ("empty", "")] {
        let s = keys
            .get_key(g.admin(pb::GetKeyRequest { id: id.into() }))
            .await
            .expect_err("GetKey of a key that does not exist");
        assert_eq!(s.code(), Code::NotFound, "GetKey, {what} id: {s:?}");
        let s = keys
            .revoke_key(g.admin(pb::RevokeKeyRequest {
                id: id.into(),
                ..Default::default()
            }))
            .await
            .expect_err("RevokeKey of a key that does not exist");
        assert_eq!(s.code(), Code::NotFound, "RevokeKey, {what} id: {s:?}");
    }

    assert_eq!(g.all_keys().await, before);
    assert_eq!(
        g.get_key(&valid.key.expect("key").id).await.status,
        pb::KeyStatus::Active as i32
    );
}

/// A gRPC client sent `daily_cap_micros` and `expires_in_seconds`; an error
/// should name those fields, not the REST API's `daily_usd_cap` and
/// `expires_in` (and call the amount micro-dollars, as the client sent it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_key_errors_name_the_grpc_field() {
    let g = Grpc::start().await;
    g.put_vendor().await;
    let mut wrong = Vec::new();
    for (what, req, field) in bad_key_requests() {
        let s = g
            .keys()
            .create_key(g.admin(req))
            .await
            .err()
            .unwrap_or_else(|| panic!("CreateKey with {what} was accepted"));
        if !s.message().starts_with(&format!("{field}: ")) {
            wrong.push(format!("{what}: wanted {field}, got {:?}", s.message()));
        }
    }
    assert!(
        wrong.is_empty(),
        "messages naming another field:\n{}",
        wrong.join("\n")
    );

    // Checks against a parent key name the gRPC fields too.
    let parent = g.create_key("trees").await.key.expect("key");
    let mut child = key_request("trees/1");
    child.parent_id = parent.id.clone();
    child.expires_in_seconds = 3600;
    child.daily_cap_micros = DAILY_CAP + 1;
    let s = g
        .keys()
        .create_key(g.admin(child.clone()))
        .await
        .expect_err("a child wider than its parent");
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().starts_with("daily_cap_micros: "), "{s:?}");
    child.daily_cap_micros = DAILY_CAP;
    let minted = g
        .keys()
        .create_key(g.admin(child))
        .await
        .expect("a child within its parent")
        .into_inner();
    assert_eq!(minted.key.expect("key").parent_id, parent.id);
}

// --- reflection ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_keycap_services() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };

    let g = Grpc::start().await;
    let mut client = ServerReflectionClient::new(g.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("ServerReflectionInfo")
        .into_inner();
    let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("a reflection answer in time")
        .expect("reflection stream")
        .expect("one reflection answer");
    let services: Vec<String> = match answer.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    };
    for want in [
        "keycap.v1.VendorService",
        "keycap.v1.KeyService",
        "keycap.v1.AuditService",
        "keycap.v1.FleetService",
    ] {
        assert!(
            services.iter().any(|s| s == want),
            "{want} not listed: {services:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_control_plane_even_with_a_proxy_stream_open() {
    // A policy stream never ends on its own; a graceful shutdown that waited
    // for it would leave the control plane running until SIGKILL.
    let mut g = Grpc::start().await;
    let mut stream = g.watch(0).await;
    snapshot(&next_update(&mut stream, "snapshot").await, "snapshot");

    let status = g
        .control
        .process_mut()
        .terminate(keycap_tests::harness::within(Duration::from_secs(30)))
        .await
        .expect("keycap-control exits within its shutdown grace after SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    // The stream ends with the process instead of hanging.
    let end = tokio::time::timeout(POLICY_TIMEOUT, next_policy_update(&mut stream))
        .await
        .expect("the policy stream ends once the control plane is gone");
    assert!(
        !matches!(end, Ok(Some(_))),
        "no policy update after shutdown: {end:?}"
    );
}
