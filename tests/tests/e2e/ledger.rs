//! The audit ledger end to end: calls through the proxy become chained
//! entries that the control plane verifies over REST and gRPC, and that an
//! export verifies on its own. Included from `e2e.rs`.

use std::time::Duration;

use keycap_proto::pb;
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

use super::{dollar_charge, keycap_cli, stack_with_stripe, stripe_key_body};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_become_a_chain_that_verifies_over_rest_and_grpc() {
    let (stack, _mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "ledger/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    for _ in 0..3 {
        dollar_charge(&agent).await.expect(200);
    }
    let entries = stack.wait_audit("agent_run_label=ledger/1", 3).await;
    // Newest first; each links to the one before it.
    assert_eq!(entries[0]["prev_hash"], entries[1]["hash"]);
    assert_eq!(entries[1]["prev_hash"], entries[2]["hash"]);
    assert_eq!(entries[2]["prev_hash"], "0".repeat(64));

    let v = stack.admin.get("/vault/audit/verify").await.expect(200);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["checked"], 3);
    assert_eq!(v["head_seq"], entries[0]["seq"]);
    assert_eq!(v["head_hash"], entries[0]["hash"]);
    assert_eq!(v["broken"], serde_json::Value::Null);
    let from = entries[1]["seq"].as_i64().unwrap();
    let part = stack
        .admin
        .get(&format!("/vault/audit/verify?from={from}"))
        .await
        .expect(200);
    assert_eq!(
        (part["ok"].clone(), part["checked"].clone()),
        (json!(true), json!(2))
    );
    stack
        .admin
        .get("/vault/audit/verify?from=0")
        .await
        .expect_error(400, "invalid_request");
    // Held against a checkpoint an auditor kept: the head as it is now
    // holds; a hash the ledger never had names that entry.
    let head_seq = entries[0]["seq"].as_i64().unwrap();
    let kept = format!("{head_seq}:{}", entries[0]["hash"].as_str().unwrap());
    let held = stack
        .admin
        .get(&format!("/vault/audit/verify?checkpoint={kept}"))
        .await
        .expect(200);
    assert_eq!(held["ok"], true, "{held}");
    let forged = format!("{head_seq}:{}", "ab".repeat(32));
    let held = stack
        .admin
        .get(&format!("/vault/audit/verify?checkpoint={forged}"))
        .await
        .expect(200);
    assert_eq!(
        (held["ok"].clone(), held["broken"]["seq"].clone()),
        (json!(false), json!(head_seq)),
        "{held}"
    );
    stack
        .admin
        .get("/vault/audit/verify?checkpoint=3:nothex")
        .await
        .expect_error(400, "invalid_request");
    // Empty, as an unset gRPC field: no kept checkpoint.
    let none = stack
        .admin
        .get("/vault/audit/verify?checkpoint=")
        .await
        .expect(200);
    assert_eq!(none["ok"], true, "{none}");

    let channel = Endpoint::from_shared(stack.control.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let token: MetadataValue<_> = format!("Bearer {}", stack.control.opts.admin_token)
        .parse()
        .unwrap();
    let mut audit = pb::audit_service_client::AuditServiceClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", token.clone());
            Ok(req)
        },
    );
    let r = audit
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(r.ok);
    assert_eq!(r.checked, 3);
    let head: String = r.head_hash.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(head, entries[0]["hash"].as_str().unwrap());
    assert_eq!(r.broken_seq, 0);

    // An export verifies on its own with the documented script.
    let export = stack.admin.get("/vault/audit/export?format=jsonl").await;
    assert_eq!(export.status, 200);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, export.text).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/verify_ledger.py");
    let verified = |path: &std::path::Path| {
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let whole = format!(
        "OK 3 entries, head seq {} hash {}",
        entries[0]["seq"],
        entries[0]["hash"].as_str().unwrap()
    );
    assert_eq!(verified(&path), whole);
    let csv = stack.admin.get("/vault/audit/export?format=csv").await;
    assert_eq!(csv.status, 200);
    let lines: Vec<&str> = csv.text.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three records");
    assert!(lines[0].starts_with("seq,event_id,key_id,"));
    let csv_path = dir.path().join("audit.csv");
    std::fs::write(&csv_path, &csv.text).unwrap();
    assert_eq!(
        verified(&csv_path),
        whole,
        "the CSV export verifies on its own too"
    );
    let future = stack
        .admin
        .get("/vault/audit/export?from=2100-01-01T00:00:00Z")
        .await;
    assert_eq!(future.text, "", "nothing after the range's start");
    stack
        .admin
        .get("/vault/audit/export?format=xml")
        .await
        .expect_error(400, "invalid_request");

    // The CLI, as an operator runs it.
    let cli = keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &["audit", "verify"],
    )
    .await;
    let out = cli.json();
    assert_eq!(out["ok"], true);
    assert_eq!(out["checked"], 3);
    assert_eq!(out["head_hash"], entries[0]["hash"]);
    let cli = keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &["audit", "verify", "--from", &from.to_string()],
    )
    .await;
    assert_eq!(cli.json()["checked"], 2);
    let cli = keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &["audit", "verify", "--checkpoint", &kept],
    )
    .await;
    assert!(cli.status.success(), "{}", cli.stderr);
    let cli = keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &["audit", "verify", "--checkpoint", &forged],
    )
    .await;
    assert!(!cli.status.success());
    assert!(
        cli.stderr
            .contains(&format!("the audit ledger is broken at seq {head_seq}")),
        "{}",
        cli.stderr
    );
    // Checkpoints to keep, as the CLI lists them (none may be signed yet:
    // a replica signs one a minute).
    let cli = keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &["audit", "checkpoints", "--limit", "5"],
    )
    .await;
    assert!(cli.status.success(), "{}", cli.stderr);
    for cp in cli.json()["checkpoints"].as_array().expect("a list") {
        assert!(cp["seq"].as_i64().unwrap() <= head_seq, "{cp}");
        assert_eq!(cp["hash"].as_str().unwrap().len(), 64, "{cp}");
    }
}
