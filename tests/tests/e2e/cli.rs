//! The `keycap` CLI's habits, run as the real binary: `--format table`
//! next to the JSON printed when piped, the vendor credential
//! read from standard input (`--credential -`), `vendor get` and `vendor
//! delete`, revocation saying that it waits for the proxies, errors named by
//! keycap's stable code, and shell completions without a control plane.
//! Included from `e2e.rs`.

use keycap_tests::harness::{keycap_cli, keycap_cli_with_stdin, Stack};
use keycap_tests::mock::MockVendor;
use serde_json::json;

use super::rust_client::chat;
use super::OPENAI_CREDENTIAL;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_from_stdin_reaches_the_vendor_and_vendor_get_and_delete_work() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(OPENAI_CREDENTIAL).await;
    let url = stack.control.url();
    let token = stack.control.opts.admin_token.clone();
    let put = [
        "vendor",
        "put",
        "cli-openai",
        "--profile",
        "openai",
        "--base-url",
        &mock.url(),
        "--credential",
        "-",
    ];
    let empty = keycap_cli_with_stdin(&url, &token, &put, Some("")).await;
    assert!(!empty.status.success());
    assert!(
        empty.stderr.contains("standard input held no credential"),
        "{}",
        empty.stderr
    );

    let stdin = format!("{OPENAI_CREDENTIAL}\n");
    let out = keycap_cli_with_stdin(&url, &token, &put, Some(&stdin)).await;
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.json()["created"], true);

    // The mock answers only the real credential: the one read from stdin.
    let key = stack
        .mint(&json!({
            "vendor": "cli-openai", "daily_usd_cap": 5, "expires_in": "1h",
            "allowed_endpoints": ["POST /v1/chat/completions"], "agent_run_label": "cli/stdin",
        }))
        .await;
    stack
        .agent(&key.secret)
        .post_json("/cli-openai/v1/chat/completions", &chat())
        .await
        .expect(200);

    // Piped, the default is JSON (as above); --format table is for people.
    let listed = keycap_cli(&url, &token, &["vendor", "list", "--format", "table"]).await;
    assert!(listed.status.success(), "{}", listed.stderr);
    // Columns are aligned: a cell starts where its header does.
    let mut lines = listed.stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("name "), "{}", listed.stdout);
    let profile = header.find(" profile ").expect("a profile column") + 1;
    assert!(
        lines.any(|l| l.starts_with("cli-openai ")
            && l.get(profile..).is_some_and(|c| c.starts_with("openai "))),
        "{}",
        listed.stdout
    );
    let one = keycap_cli(
        &url,
        &token,
        &["--format", "table", "vendor", "get", "cli-openai"],
    )
    .await;
    assert!(
        one.stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["profile", "openai"])),
        "{}",
        one.stdout
    );

    let got = keycap_cli(&url, &token, &["vendor", "get", "cli-openai"]).await;
    assert!(got.status.success(), "{}", got.stderr);
    assert_eq!(got.json()["profile"], "openai");
    assert!(!got.stdout.contains(OPENAI_CREDENTIAL));

    let revoke = keycap_cli(&url, &token, &["key", "revoke", &key.id]).await;
    assert!(revoke.status.success(), "{}", revoke.stderr);
    assert!(
        revoke.stderr.contains("waiting for the proxies to confirm"),
        "{}",
        revoke.stderr
    );
    assert_eq!(revoke.json()["confirmation"]["all_confirmed"], true);

    let deleted = keycap_cli(&url, &token, &["vendor", "delete", "cli-openai"]).await;
    assert!(deleted.status.success(), "{}", deleted.stderr);
    assert_eq!(deleted.json()["deleted"], "cli-openai");
    assert_eq!(deleted.json()["confirmation"]["all_confirmed"], true);

    let gone = keycap_cli(&url, &token, &["vendor", "get", "cli-openai"]).await;
    assert!(!gone.status.success());
    assert!(gone.stderr.contains("not_found: "), "{}", gone.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_completions_need_no_control_plane() {
    // Nothing listens on port 9: completions never connect.
    let out = keycap_cli("http://127.0.0.1:9", "unused", &["completions", "bash"]).await;
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("_keycap()"), "{}", out.stdout);
    for word in ["vendor", "revoke", "completions"] {
        assert!(out.stdout.contains(word), "{word} missing from the script");
    }
}
