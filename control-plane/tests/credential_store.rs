//! Credential versions in the store, on both backends (`sqlite::<case>`,
//! `postgres::<case>` as in `tests/store.rs`): staging takes the next
//! number and serves nothing, a promote moves the active one to previous
//! with its grace (or retires it at once), a rollback within grace works
//! and after it does not, the sweep erases retired material, and a KEK
//! rotation sees every version that still has material.

#[macro_use]
mod common;

use std::sync::Arc;

use chrono::{Duration, Utc};
use keycap_control::credential::{CredentialProbe, CredentialState};
use keycap_control::domain::{Profile, Vendor, VendorName};
use keycap_control::store::{Store, StoreError, VendorWrite};

store_suite!(
    versions_stage_promote_and_retire,
    a_rollback_works_only_within_grace,
    versions_go_with_their_vendor,
);

fn vendor(name: &str) -> Vendor {
    let at = Utc::now();
    Vendor {
        name: VendorName::parse(name).unwrap(),
        profile: Profile::Stripe,
        base_url: "https://stripe.example.com".into(),
        currency_rates: Default::default(),
        prices: String::new(),
        forward_trace_context: false,
        created_at: at,
        updated_at: at,
        credential_set_at: at,
        rotate_after: None,
    }
}

async fn create(s: &dyn Store, name: &str, sealed: &[u8]) {
    s.put_vendor(VendorWrite {
        vendor: vendor(name),
        sealed_credential: Some(sealed.to_vec()),
        credential_version: 1,
    })
    .await
    .unwrap();
}

fn states(v: &[keycap_control::credential::CredentialVersion]) -> Vec<(i64, &'static str)> {
    v.iter().map(|c| (c.version, c.state.as_str())).collect()
}

async fn versions_stage_promote_and_retire(s: Arc<dyn Store>) {
    create(&*s, "stripe", b"sealed-1").await;
    assert_eq!(
        states(&s.list_credentials("stripe").await.unwrap()),
        [(1, "active")]
    );
    let head = s.latest_version().await.unwrap();
    let now = Utc::now();
    let staged = s
        .stage_credential("stripe", 2, b"sealed-2", now)
        .await
        .unwrap();
    assert_eq!((staged.version, staged.state), (2, CredentialState::Staged));
    assert_eq!(
        s.latest_version().await.unwrap(),
        head,
        "a staged version is not served: proxies hear nothing"
    );
    assert_eq!(
        s.get_vendor_credential("stripe").await.unwrap(),
        Some((1, b"sealed-1".to_vec()))
    );
    assert!(matches!(
        s.stage_credential("stripe", 2, b"again", now).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.stage_credential("ghost", 1, b"x", now).await,
        Err(StoreError::NotFound(_))
    ));

    let probe = CredentialProbe {
        ok: false,
        status: Some(401),
        error: "the vendor answered 401".into(),
        at: now,
    };
    let probed = s
        .record_credential_probe("stripe", 2, &probe)
        .await
        .unwrap();
    assert_eq!(
        probed.probe.as_ref().map(|p| (p.ok, p.status)),
        Some((false, Some(401)))
    );

    let promoted = s
        .promote_credential("stripe", 2, Duration::minutes(10), now)
        .await
        .unwrap();
    assert!(promoted.changed);
    assert_eq!(promoted.active.state, CredentialState::Active);
    let previous = promoted.previous.unwrap();
    assert_eq!(
        (previous.version, previous.state),
        (1, CredentialState::Previous)
    );
    assert!(previous.grace_until.is_some());
    assert!(
        s.latest_version().await.unwrap() > head,
        "a promote is served"
    );
    assert_eq!(
        s.get_vendor_credential("stripe").await.unwrap(),
        Some((2, b"sealed-2".to_vec()))
    );
    // Promoting the active one changes nothing.
    let again = s
        .promote_credential("stripe", 2, Duration::minutes(10), now)
        .await
        .unwrap();
    assert!(!again.changed);

    // The KEK rotation sees both versions with material.
    let sealed: Vec<(String, i64)> = s
        .sealed_credentials()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.vendor, c.version))
        .collect();
    assert_eq!(
        sealed,
        [("stripe".to_string(), 1), ("stripe".to_string(), 2)]
    );
    assert!(s
        .replace_sealed_credential("stripe", 1, b"sealed-1", b"rewrapped-1")
        .await
        .unwrap());

    // Not yet due: nothing retires. Due: version 1 retires, material gone.
    assert!(s.retire_credentials(now).await.unwrap().is_empty());
    let later = now + Duration::minutes(11);
    assert_eq!(
        s.retire_credentials(later).await.unwrap(),
        [("stripe".to_string(), 1)]
    );
    assert!(
        s.retire_credentials(later).await.unwrap().is_empty(),
        "once"
    );
    let (v1, material) = s.get_credential("stripe", 1).await.unwrap().unwrap();
    assert_eq!(v1.state, CredentialState::Retired);
    assert!(v1.retired_at.is_some());
    assert_eq!(material, None, "retired material is erased");
    assert_eq!(
        s.sealed_credentials().await.unwrap().len(),
        1,
        "nothing left to re-wrap for a retired version"
    );
    assert!(matches!(
        s.promote_credential("stripe", 1, Duration::zero(), later)
            .await,
        Err(StoreError::Conflict(_))
    ));

    // A promote with no grace retires the one before at once.
    s.stage_credential("stripe", 3, b"sealed-3", later)
        .await
        .unwrap();
    let p = s
        .promote_credential("stripe", 3, Duration::zero(), later)
        .await
        .unwrap();
    assert_eq!(p.previous.unwrap().state, CredentialState::Retired);
    assert_eq!(
        s.get_credential("stripe", 2).await.unwrap().unwrap().1,
        None
    );
    assert_eq!(
        states(&s.list_credentials("stripe").await.unwrap()),
        [(3, "active"), (2, "retired"), (1, "retired")]
    );
    // The vendor's credential age is its active version's.
    let v = s.get_vendor("stripe").await.unwrap().unwrap();
    assert_eq!(
        v.credential_set_at.timestamp_micros(),
        later.timestamp_micros()
    );
}

async fn a_rollback_works_only_within_grace(s: Arc<dyn Store>) {
    create(&*s, "openai", b"sealed-1").await;
    let now = Utc::now();
    s.stage_credential("openai", 2, b"sealed-2", now)
        .await
        .unwrap();
    s.promote_credential("openai", 2, Duration::minutes(5), now)
        .await
        .unwrap();
    // Roll back: version 1 is active again, version 2 previous.
    let back = s
        .promote_credential(
            "openai",
            1,
            Duration::minutes(5),
            now + Duration::minutes(1),
        )
        .await
        .unwrap();
    assert_eq!(back.active.version, 1);
    assert_eq!(back.previous.as_ref().map(|p| p.version), Some(2));
    assert_eq!(
        states(&s.list_credentials("openai").await.unwrap()),
        [(2, "previous"), (1, "active")]
    );
    assert_eq!(
        s.get_vendor_credential("openai").await.unwrap(),
        Some((1, b"sealed-1".to_vec()))
    );
    // Past its grace, a previous version can no longer come back.
    let late = now + Duration::minutes(7);
    assert!(matches!(
        s.promote_credential("openai", 2, Duration::minutes(5), late)
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.promote_credential("openai", 9, Duration::minutes(5), late)
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn versions_go_with_their_vendor(s: Arc<dyn Store>) {
    create(&*s, "resend", b"sealed-1").await;
    s.stage_credential("resend", 2, b"sealed-2", Utc::now())
        .await
        .unwrap();
    s.delete_vendor("resend", Utc::now()).await.unwrap();
    assert!(s.list_credentials("resend").await.unwrap().is_empty());
    assert_eq!(s.get_vendor_credential("resend").await.unwrap(), None);
    // Created again, it starts at version 1.
    create(&*s, "resend", b"sealed-new").await;
    assert_eq!(
        s.get_vendor_credential("resend").await.unwrap(),
        Some((1, b"sealed-new".to_vec()))
    );
}
