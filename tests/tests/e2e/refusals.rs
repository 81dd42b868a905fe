//! Refused calls in the audit ledger, reports and exports, end to end:
//! real binaries, the proxy refusing real calls, the control plane's REST
//! API, gRPC and the CLI. Included from `e2e.rs`.

use std::collections::BTreeMap;

use chrono::Timelike;
use keycap_proto::pb;
use keycap_tests::harness::{
    wait_for, wait_until, within, ControlOpts, ProxyOpts, Stack, SPEND_TIMEOUT,
};
use keycap_tests::mock::MockVendor;
use prost::Message;
use serde_json::{json, Value};

use super::{dollar_charge, keycap_cli, stack_with_stripe, stripe_key_body, STRIPE_CREDENTIAL};

/// Stops the proxy as an operator does (SIGTERM): it reports the refusals
/// of the running minute with its last spend.
async fn stop_proxy(stack: &mut Stack) {
    let status = stack
        .proxy
        .process_mut()
        .terminate(within(std::time::Duration::from_secs(30)))
        .await
        .expect("the proxy stops");
    assert!(status.success(), "{status:?}");
}

/// Every refusal entry of `key_id`, waiting until they stand for `calls`
/// refused calls in all.
async fn refusals_of(stack: &Stack, key_id: &str, calls: i64) -> Vec<Value> {
    let query = format!("outcome=refused&key_id={key_id}&limit=1000");
    let got = wait_for(within(SPEND_TIMEOUT), || {
        let admin = stack.admin.clone();
        let query = query.clone();
        async move {
            let entries = admin.audit(&query).await;
            let counted: i64 = entries
                .iter()
                .map(|e| e["refused_calls"].as_i64().unwrap_or(0))
                .sum();
            (counted >= calls).then_some(entries)
        }
    })
    .await;
    got.unwrap_or_else(|| panic!("refusals of {key_id} never reached {calls} calls"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_refusals_is_one_entry_per_key_reason_and_minute() {
    let (mut stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "storm/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    dollar_charge(&agent).await.expect(200);
    // 500 calls outside the key's allowlist, 25 at a time.
    let mut refused = 0;
    for _ in 0..20 {
        let calls: Vec<_> = (0..25)
            .map(|_| {
                let agent = agent.clone();
                tokio::spawn(async move { agent.get("/stripe/v1/customers").await })
            })
            .collect();
        for c in calls {
            c.await.unwrap().expect_error(403, "endpoint_not_allowed");
            refused += 1;
        }
    }
    assert_eq!(refused, 500);
    assert!(mock.calls().iter().all(|c| !c.path.contains("customers")));
    stop_proxy(&mut stack).await;

    let entries = refusals_of(&stack, &key.id, 500).await;
    // At most one entry per key, reason and minute, counting every call.
    let mut per_minute: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for e in &entries {
        assert_eq!(e["outcome"], "refused");
        assert_eq!(e["refusal_reason"], "endpoint_not_allowed");
        assert_eq!(e["cost_micros"], 0);
        assert_eq!(e["agent_run_label"], "storm/1");
        assert_eq!(e["vendor"], "stripe");
        let at = e["at"].as_str().unwrap();
        assert!(at.ends_with(":00.000000Z"), "a minute's start: {at}");
        let slot = (
            e["key_id"].as_str().unwrap().to_string(),
            e["refusal_reason"].as_str().unwrap().to_string(),
            at.to_string(),
        );
        assert!(per_minute
            .insert(slot, e["refused_calls"].as_i64().unwrap())
            .is_none());
    }
    assert!(
        entries.len() <= 2,
        "500 calls within a minute or two: {entries:?}"
    );
    assert_eq!(per_minute.values().sum::<i64>(), 500);

    // They spend nothing and are no calls of the key's; the ledger holds.
    let k = stack.key(&key.id).await;
    assert_eq!(
        (k["spent_today_micros"].clone(), k["calls_today"].clone()),
        (json!(1_000_000), json!(1))
    );
    let v = stack.admin.get("/vault/audit/verify").await.expect(200);
    assert_eq!(v["ok"], true, "{v}");

    // Reported with the spend.
    let r = stack
        .admin
        .get("/vault/spend?group_by=key&top=5")
        .await
        .expect(200);
    assert_eq!(r["groups"][0]["key_id"], key.id.as_str(), "{r}");
    assert_eq!(r["groups"][0]["total_micros"], 1_000_000);
    assert_eq!(r["groups"][0]["calls"], 1);
    assert_eq!(r["groups"][0]["refused_calls"], 500);
}

/// The refused-call counts of `key_id`'s refusal records in a proxy's
/// spool, in the order written, read as the spool's record format says
/// (data-plane/src/spool.rs: a tag byte, then a length-delimited
/// `SpendEvent`; a torn record ends a segment).
fn spooled_refusals(dir: &std::path::Path, key_id: &str) -> Vec<i64> {
    let mut segments: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .expect("spool directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("spend-"))
        })
        .collect();
    segments.sort();
    let mut counts = Vec::new();
    for path in segments {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let mut rest = bytes.as_slice();
        while let Some((_tag, after)) = rest.split_first() {
            let mut cursor = after;
            let Ok(event) = pb::SpendEvent::decode_length_delimited(&mut cursor) else {
                break;
            };
            rest = cursor;
            if event.key_id == key_id && event.outcome == "refused" {
                counts.push(event.refused_calls);
            }
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_a_proxy_killed_mid_minute_reach_the_ledger_after_its_restart() {
    let spool = tempfile::tempdir().unwrap();
    let opts = ProxyOpts::new("refusing").flag("spool-dir", spool.path().display());
    let mut stack = Stack::start_with_proxy(ControlOpts::sqlite(), opts).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "killed/1",
        ))
        .await;
    // Early enough in a minute that the kill comes before it is over: the
    // dead run never reports the window itself.
    assert!(
        wait_until(within(std::time::Duration::from_secs(30)), || async {
            chrono::Utc::now().second() < 40
        })
        .await
    );
    let agent = stack.agent(&key.secret);
    const REFUSED: i64 = 30;
    for _ in 0..REFUSED {
        agent
            .get("/stripe/v1/customers")
            .await
            .expect_error(403, "endpoint_not_allowed");
    }
    // The running window reaches the spool within a checkpoint interval,
    // with every call counted.
    let checkpointed = wait_until(within(SPEND_TIMEOUT), || async {
        spooled_refusals(spool.path(), &key.id).last() == Some(&REFUSED)
    })
    .await;
    assert!(
        checkpointed,
        "spooled: {:?}",
        spooled_refusals(spool.path(), &key.id)
    );
    stack.proxy.process_mut().kill().await;
    assert!(
        stack
            .audit(&format!("outcome=refused&key_id={}", key.id))
            .await
            .is_empty(),
        "the killed run reported nothing of the window"
    );

    // The next run on the spool delivers the window, once.
    stack.proxy.restart().await;
    let entries = refusals_of(&stack, &key.id, REFUSED).await;
    stop_proxy(&mut stack).await;
    let after_stop = stack
        .audit(&format!("outcome=refused&key_id={}", key.id))
        .await;
    assert_eq!(after_stop, entries, "nothing more once the proxy stopped");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["refused_calls"], REFUSED);
    assert_eq!(entries[0]["refusal_reason"], "endpoint_not_allowed");
    assert!(
        entries[0]["at"].as_str().unwrap().ends_with(":00.000000Z"),
        "a minute's start: {}",
        entries[0]["at"]
    );
    let v = stack.admin.get("/vault/audit/verify").await.expect(200);
    assert_eq!(v["ok"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_of_a_known_key_is_recorded_with_its_reason() {
    let (mut stack, mock) = stack_with_stripe().await;
    let body = |label: &str, extra: Value| {
        let mut b = stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents", "POST /v1/transfers"],
            label,
        );
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let mut expected: Vec<(String, &str)> = Vec::new();

    let revoked = stack.mint(&body("why/revoked", json!({}))).await;
    stack
        .admin
        .delete(&format!("/vault/keys/{}", revoked.id))
        .await
        .expect(200);
    dollar_charge(&stack.agent(&revoked.secret))
        .await
        .expect_error(401, "key_revoked");
    expected.push((revoked.id, "key_revoked"));

    let expired = stack
        .create_key(&body("why/expired", json!({"expires_in": 1})))
        .await;
    let expires_at: chrono::DateTime<chrono::Utc> = expired.body["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Its one call comes once the key has expired (`expires_at` is shown
    // to the second, so a second later).
    let past = wait_until(within(std::time::Duration::from_secs(20)), || async {
        chrono::Utc::now() > expires_at + chrono::TimeDelta::seconds(1)
    })
    .await;
    assert!(past);
    dollar_charge(&stack.agent(&expired.secret))
        .await
        .expect_error(401, "key_expired");
    expected.push((expired.id, "key_expired"));

    let allow = stack.mint(&body("why/allowlist", json!({}))).await;
    stack
        .agent(&allow.secret)
        .get("/stripe/v1/customers")
        .await
        .expect_error(403, "endpoint_not_allowed");
    expected.push((allow.id, "endpoint_not_allowed"));

    let net = stack
        .mint(&body(
            "why/network",
            json!({"allowed_cidrs": ["10.0.0.0/8"]}),
        ))
        .await;
    dollar_charge(&stack.agent(&net.secret))
        .await
        .expect_error(403, "ip_not_allowed");
    expected.push((net.id, "ip_not_allowed"));

    let zoned = stack
        .create_key(&body("why/zone", json!({"zone": "eu"})))
        .await;
    dollar_charge(&stack.agent(&zoned.secret))
        .await
        .expect_error(403, "zone_mismatch");
    expected.push((zoned.id, "zone_mismatch"));

    let rate = stack
        .mint(&body("why/rate", json!({"rate_limit_per_minute": 1})))
        .await;
    let agent = stack.agent(&rate.secret);
    dollar_charge(&agent).await.expect(200);
    dollar_charge(&agent)
        .await
        .expect_error(429, "rate_limited");
    expected.push((rate.id, "rate_limited"));

    let per_call = stack
        .mint(&body("why/per-call", json!({"per_call_usd_cap": "0.50"})))
        .await;
    dollar_charge(&stack.agent(&per_call.secret))
        .await
        .expect_error(403, "per_call_cap_exceeded");
    expected.push((per_call.id, "per_call_cap_exceeded"));

    let daily = stack
        .mint(&body("why/daily", json!({"daily_usd_cap": 1})))
        .await;
    let agent = stack.agent(&daily.secret);
    dollar_charge(&agent).await.expect(200);
    dollar_charge(&agent)
        .await
        .expect_error(429, "daily_cap_exceeded");
    expected.push((daily.id, "daily_cap_exceeded"));

    let lifetime = stack
        .mint(&body("why/lifetime", json!({"lifetime_usd_cap": 1})))
        .await;
    let agent = stack.agent(&lifetime.secret);
    dollar_charge(&agent).await.expect(200);
    dollar_charge(&agent)
        .await
        .expect_error(403, "lifetime_cap_exceeded");
    expected.push((lifetime.id, "lifetime_cap_exceeded"));

    let pricing = stack.mint(&body("why/pricing", json!({}))).await;
    stack
        .agent(&pricing.secret)
        .post_form(
            "/stripe/v1/transfers",
            "amount=100&currency=usd&destination=acct_1",
        )
        .await
        .expect_error(400, "unpriceable_request");
    expected.push((pricing.id, "unpriceable_request"));

    // A call with no key the proxy knows leaves no entry.
    stack
        .agent("kc_live_not_a_key")
        .get("/stripe/v1/customers")
        .await
        .expect_error(401, "invalid_key");
    assert!(mock.calls().iter().all(|c| !c.path.contains("transfers")));

    stop_proxy(&mut stack).await;
    for (key_id, reason) in &expected {
        let entries = refusals_of(&stack, key_id, 1).await;
        let reasons: Vec<&str> = entries
            .iter()
            .map(|e| e["refusal_reason"].as_str().unwrap())
            .collect();
        assert_eq!(reasons, [*reason], "{key_id}");
        assert_eq!(entries[0]["refused_calls"], 1);
    }
    let all = stack.audit("outcome=refused&limit=1000").await;
    assert_eq!(
        all.len(),
        expected.len(),
        "nothing else was recorded: {all:?}"
    );
    // One reason's refusals, as an operator asks for them.
    let daily_only = stack
        .audit("outcome=refused&refusal_reason=daily_cap_exceeded")
        .await;
    assert_eq!(daily_only.len(), 1);
    let v = stack.admin.get("/vault/audit/verify").await.expect(200);
    assert_eq!(v["ok"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_reports_and_exports_over_rest_and_the_cli() {
    let (mut stack, _mock) = stack_with_stripe().await;
    let a = stack
        .mint(&stripe_key_body(
            json!(1),
            &["POST /v1/payment_intents"],
            "report/a",
        ))
        .await;
    let b = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "report/b",
        ))
        .await;
    let agent_a = stack.agent(&a.secret);
    dollar_charge(&agent_a).await.expect(200);
    dollar_charge(&agent_a)
        .await
        .expect_error(429, "daily_cap_exceeded");
    let agent_b = stack.agent(&b.secret);
    for _ in 0..3 {
        dollar_charge(&agent_b).await.expect(200);
    }
    stop_proxy(&mut stack).await;
    refusals_of(&stack, &a.id, 1).await;
    stack.wait_audit("outcome=settled", 4).await;

    // REST: by vendor and day over a range, with totals.
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let r = stack
        .admin
        .get("/vault/spend?group_by=vendor,day&from=2020-01-01&to=2100-01-01T00:00:00Z")
        .await
        .expect(200);
    assert_eq!(r["group_by"], json!(["vendor", "day"]));
    assert_eq!(
        r["groups"],
        json!([{
            "vendor": "stripe", "day": today, "total_usd": 4.0, "total_micros": 4_000_000,
            "calls": 4, "refused_calls": 1, "would_refuse_calls": 0, "would_refuse_usd": 0.0,
        }]),
        "{r}"
    );
    assert_eq!(
        (r["total_micros"].clone(), r["calls"].clone()),
        (json!(4_000_000), json!(4))
    );
    assert_eq!(r["refused_calls"], 1);
    assert_eq!(r["more"], false);
    // Top 1 by run label; the totals still cover both.
    let top = stack
        .admin
        .get("/vault/spend?group_by=run_label&top=1")
        .await
        .expect(200);
    assert_eq!(top["groups"].as_array().unwrap().len(), 1);
    assert_eq!(top["groups"][0]["agent_run_label"], "report/b");
    assert_eq!(top["groups"][0]["total_micros"], 3_000_000);
    assert_eq!(
        (top["more"].clone(), top["total_micros"].clone()),
        (json!(true), json!(4_000_000))
    );
    // Nothing in a range before the calls.
    let none = stack
        .admin
        .get("/vault/spend?group_by=key&to=2020-01-01")
        .await
        .expect(200);
    assert_eq!(
        (none["groups"].clone(), none["calls"].clone()),
        (json!([]), json!(0))
    );
    // The per-run answer is as it was.
    let run = stack
        .admin
        .get("/vault/spend?agent_run_label=report/a")
        .await
        .expect(200);
    assert_eq!(
        run,
        json!({"agent_run_label": "report/a", "total_usd": 1.0, "total_micros": 1_000_000,
               "calls": 1, "vendors": [{"vendor": "stripe", "total_usd": 1.0,
               "total_micros": 1_000_000, "calls": 1}]})
    );
    // Bad input is named.
    for (query, field) in [
        ("group_by=color", "group_by"),
        ("group_by=key,key", "group_by"),
        ("group_by=key&from=yesterday", "from"),
        ("group_by=key&top=0", "top"),
        ("group_by=key&from=2030-01-02&to=2030-01-01", "from"),
        ("format=jsonl&from=nope", "from"),
    ] {
        let path = if query.starts_with("format") {
            format!("/vault/audit/export?{query}")
        } else {
            format!("/vault/spend?{query}")
        };
        let e = stack
            .admin
            .get(&path)
            .await
            .expect_error(400, "invalid_request");
        assert!(e.to_string().contains(field), "{query}: {e}");
    }

    // The CLI, as an operator runs it.
    let url = stack.control.url();
    let token = stack.control.opts.admin_token.clone();
    let cli = keycap_cli(&url, &token, &["spend", "--by", "key", "--since", "7d"]).await;
    let out = cli.json();
    let groups = out["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{out}");
    assert_eq!(groups[0]["key_id"], b.id.as_str());
    assert_eq!(
        (groups[0]["total_usd"].as_f64(), groups[0]["calls"].clone()),
        (Some(3.0), json!(3))
    );
    assert_eq!(groups[1]["key_id"], a.id.as_str());
    assert_eq!(groups[1]["refused_calls"], 1);
    assert_eq!(out["refused_calls"], 1);
    let old = keycap_cli(&url, &token, &["spend", "--run-label", "report/b"]).await;
    assert_eq!(old.json()["calls"], 3);

    // An export through gRPC, written to a file, verifies on its own.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let file_arg = file.to_str().unwrap();
    let cli = keycap_cli(
        &url,
        &token,
        &[
            "audit", "export", "--format", "jsonl", "--from", "1d", "-o", file_arg,
        ],
    )
    .await;
    assert!(cli.status.success(), "{}", cli.stderr);
    let text = std::fs::read_to_string(&file).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 5, "4 calls and 1 refusal");
    assert!(rows
        .iter()
        .any(|r| r["outcome"] == "refused" && r["refused_calls"] == 1));
    let rest = stack.admin.get("/vault/audit/export?format=jsonl").await;
    assert_eq!(rest.text, text, "the same bytes over REST and gRPC");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/verify_ledger.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let head = rows.last().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "OK 5 entries, head seq {} hash {}",
            head["seq"],
            head["hash"].as_str().unwrap()
        )
    );
    // CSV to standard output; a range that ends before the calls is empty.
    let csv = keycap_cli(&url, &token, &["audit", "export", "--format", "csv"]).await;
    assert_eq!(csv.stdout.lines().count(), 6, "a header and 5 records");
    assert!(csv.stdout.starts_with("seq,event_id,key_id,"));
    let empty = keycap_cli(
        &url,
        &token,
        &["audit", "export", "--to", "2020-01-01", "-o", file_arg],
    )
    .await;
    assert!(empty.status.success(), "{}", empty.stderr);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "");
}
