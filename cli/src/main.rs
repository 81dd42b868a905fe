//! `keycap`: the admin CLI (over gRPC) and `keycap dev`, which runs the
//! control plane, a proxy and a sandbox vendor in one process.

use std::collections::HashMap;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use keycap_client::{pb, AdminClient};
use keycap_control::answers;
use keycap_control::rest::webhooks as hooks;
use keycap_proto::prices::{self, litellm};
use keycap_proto::secret::{self, SecretKind};
use keycap_proto::time::to_proto;
use keycap_proto::Micros;
use serde_json::{json, Value};

mod approval;
mod credential;
mod dev;
mod observe;
mod sandbox;
mod simulate;

#[derive(Parser)]
#[command(
    name = "keycap",
    version,
    about = "Scoped, capped, revocable vault keys for AI agents"
)]
struct Cli {
    /// Control plane address.
    #[arg(
        long,
        env = "KEYCAP_CONTROL_URL",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    control_url: String,
    /// Admin token.
    #[arg(
        long,
        env = "KEYCAP_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    admin_token: Option<String>,
    /// PEM CA bundle trusted for an `https://` control plane (default: the
    /// system's roots).
    #[arg(long, env = "KEYCAP_CA", global = true)]
    ca: Option<std::path::PathBuf>,
    /// How answers are printed: `table` for people, `json` (the REST
    /// mapping's shapes) for scripts. Default: table on a terminal, json
    /// when piped. `audit export` writes `jsonl` (default) or `csv`.
    #[arg(long, value_enum, env = "KEYCAP_FORMAT", global = true)]
    format: Option<Format>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run control plane, proxy and a sandbox vendor on an embedded SQLite
    /// data dir.
    Dev(dev::DevArgs),
    /// Manage vendors.
    #[command(subcommand)]
    Vendor(VendorCmd),
    /// Manage vault keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Spend: of one agent run per vendor (`--run-label` alone), or a
    /// report grouped by run label, key, vendor and/or UTC day over a time
    /// range, with call and refusal counts (`--by key --since 7d`).
    Spend(SpendArgs),
    /// Audit entries, newest first.
    Audit(AuditArgs),
    /// Operator tasks on the control plane.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Manage admin tokens (scoped, optionally vendor-restricted).
    #[command(subcommand, name = "admin-token")]
    AdminToken(AdminTokenCmd),
    /// Alert webhooks: endpoints keycap posts signed events to.
    #[command(subcommand)]
    Webhook(WebhookCmd),
    /// Calls held for a person's approval: list, show, approve, deny.
    #[command(subcommand)]
    Approval(approval::ApprovalCmd),
    /// LLM price tables.
    #[command(subcommand)]
    Prices(PricesCmd),
    /// Dry run: what the proxy would do with one call of a key (allowed or
    /// the refusal and its rule, the price quote, what the key has left),
    /// without forwarding or reserving anything.
    Simulate(simulate::SimulateArgs),
    /// Print a shell completion script, e.g.
    /// `keycap completions bash > /etc/bash_completion.d/keycap`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum PricesCmd {
    /// Convert LiteLLM's model price file
    /// (model_prices_and_context_window_backup.json, in the `litellm`
    /// Python package) into a keycap price table, and print what was left
    /// out and why. Offline unless --remote.
    Import(PricesImportArgs),
}

#[derive(Args)]
struct PricesImportArgs {
    /// LiteLLM's price file.
    file: std::path::PathBuf,
    /// Whose entries to convert: openai or anthropic.
    #[arg(long, required_unless_present = "remote")]
    vendor: Option<String>,
    /// Write the table here (default: standard output, the report to
    /// standard error).
    #[arg(long, conflicts_with = "remote")]
    out: Option<std::path::PathBuf>,
    /// The table being replaced, for what LiteLLM does not list (image
    /// token bounds); default: the table shipped with keycap.
    #[arg(long, conflicts_with = "remote")]
    base: Option<std::path::PathBuf>,
    /// The table's date (default: today, UTC).
    #[arg(long = "as-of", conflicts_with = "remote")]
    as_of: Option<String>,
    /// The table's source note, e.g. the litellm version the file came from.
    #[arg(long, conflicts_with = "remote")]
    source: Option<String>,
    /// Have the control plane convert the file and store the table as this
    /// vendor's prices (needs vendors:write and credentials:write).
    #[arg(long, requires = "vendor_name")]
    remote: bool,
    /// The vendor whose prices --remote replaces.
    #[arg(long = "vendor-name", requires = "remote")]
    vendor_name: Option<String>,
}

#[derive(Subcommand)]
enum WebhookCmd {
    /// Register an endpoint; prints its signing secret (shown only now).
    Add {
        /// http(s) URL, without user:password@.
        url: String,
        /// Event types (repeatable or comma separated), e.g.
        /// cap.threshold,key.revoked; default: every type.
        #[arg(long = "event", value_delimiter = ',')]
        events: Vec<String>,
        /// Cap thresholds in percent (comma separated); default 50,80,100.
        #[arg(long, value_delimiter = ',')]
        thresholds: Vec<u32>,
        /// Only events about this run label.
        #[arg(long = "run-label")]
        run_label: Option<String>,
        /// Only events about this key.
        #[arg(long = "key-id")]
        key_id: Option<String>,
        /// Signing secret (16-256 characters); default: one is drawn.
        #[arg(long, env = "KEYCAP_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Payload shape: keycap (the JSON event) or slack (an
        /// incoming-webhook message).
        #[arg(long = "payload", default_value = "keycap")]
        payload: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Every endpoint.
    List,
    /// Delete an endpoint and its deliveries.
    Delete { id: String },
    /// Queue a webhook.test event for an endpoint.
    Test { id: String },
    /// An endpoint's deliveries, newest first, with every attempt.
    Deliveries {
        id: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Re-wrap every vendor credential's data key under the primary master
    /// key of the control plane answering (after it was given a new one).
    RotateKek,
}

#[derive(Subcommand)]
enum AdminTokenCmd {
    /// Mint an admin token within your own token's scopes and vendors;
    /// prints the token once.
    Create {
        #[arg(long)]
        name: String,
        /// Scope, e.g. keys:issue (repeatable or comma-separated); "admin"
        /// for all.
        #[arg(long = "scope", required = true, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Restrict the token to this vendor (repeatable or comma-separated);
        /// none means every vendor.
        #[arg(long = "vendor", value_delimiter = ',')]
        vendors: Vec<String>,
        /// Lifetime, e.g. 30d, 12h; never expires when omitted.
        #[arg(long = "expires-in")]
        expires_in: Option<String>,
    },
    /// List admin tokens (never their text).
    List {
        /// Include revoked and expired tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke an admin token by id (the bootstrap token too, once another
    /// token with every scope exists).
    Revoke { id: String },
    /// Print a fresh admin token for --admin-token / KEYCAP_ADMIN_TOKEN
    /// (offline; nothing is stored until keycap-control starts with it).
    Generate {
        /// Environment tag in the token (kcadm_<env>_...).
        #[arg(long, default_value = "live")]
        env: String,
    },
}

#[derive(Subcommand)]
enum VendorCmd {
    /// Create or update a vendor.
    Put {
        name: String,
        #[arg(long)]
        profile: String,
        #[arg(long)]
        base_url: String,
        /// The real API key, or `-` to read it from standard input (so it
        /// stays out of shell history), or set KEYCAP_VENDOR_CREDENTIAL.
        #[arg(long, env = "KEYCAP_VENDOR_CREDENTIAL", hide_env_values = true)]
        credential: Option<String>,
        /// Currency rate as CODE=USD_PER_UNIT, e.g. eur=1.08 (repeatable).
        #[arg(long = "rate")]
        rates: Vec<String>,
        /// A JSON price table replacing the prices shipped with keycap for
        /// this vendor (the profile's table format; see docs/pricing.md).
        #[arg(long)]
        prices_file: Option<std::path::PathBuf>,
        /// Forward the agent's W3C trace context (traceparent, tracestate)
        /// to this vendor; without it both are stripped.
        #[arg(long)]
        forward_trace_context: bool,
        /// How long the credential may be used before it is due for
        /// rotation, e.g. 90d (an alert fires once it is); default: never.
        #[arg(long = "rotate-after")]
        rotate_after: Option<String>,
    },
    /// List vendors.
    List,
    /// Show one vendor (never its credential), with the proxies that cannot
    /// serve it.
    Get { name: String },
    /// Delete a vendor; its keys stop working once the proxies confirm.
    Delete { name: String },
    /// A vendor's credential versions: add (stage), probe, promote, list
    /// (docs/rotation.md).
    #[command(subcommand)]
    Credential(credential::CredentialCmd),
}

// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum KeyCmd {
    /// Mint a vault key; prints the secret once.
    Create {
        #[arg(long)]
        vendor: String,
        /// Daily cap in USD, e.g. 500 or 12.50.
        #[arg(long = "daily-usd-cap")]
        daily_usd_cap: String,
        #[arg(long = "per-call-usd-cap")]
        per_call_usd_cap: Option<String>,
        #[arg(long = "lifetime-usd-cap")]
        lifetime_usd_cap: Option<String>,
        /// Allowed endpoint "METHOD /path" with * globs (repeatable).
        #[arg(long = "allow", required = true)]
        allow: Vec<String>,
        /// Lifetime, e.g. 2h, 30m, 7d.
        #[arg(long = "expires-in")]
        expires_in: String,
        #[arg(long = "run-label")]
        run_label: String,
        /// Metadata as key=value (repeatable).
        #[arg(long = "meta")]
        meta: Vec<String>,
        /// Calls per minute the key may make through each proxy (0: no limit).
        #[arg(long = "rate-limit-per-minute", default_value_t = 0)]
        rate_limit_per_minute: u32,
        /// Client network the key may be used from, e.g. 10.0.0.0/8
        /// (repeatable or comma-separated; none: any address).
        #[arg(long = "allow-cidr", value_delimiter = ',')]
        allow_cidr: Vec<String>,
        /// Zone whose proxies alone serve the key (none: any proxy).
        #[arg(long)]
        zone: Option<String>,
        /// Mint the key under this key (a budget tree): same vendor, caps,
        /// expiry and endpoints within the parent's; its spend also counts
        /// against the parent's caps.
        #[arg(long)]
        parent: Option<String>,
        /// Calls reserving more than this many USD need a person's
        /// approval (docs/approvals.md); a child keeps its parent's or a
        /// lower one.
        #[arg(long = "approval-above-usd")]
        approval_above_usd: Option<String>,
        /// `observe`: forward the calls the caps, endpoints and rate limit
        /// would refuse and mark them in the audit, holding the key to
        /// --observe-ceiling-usd a day (docs/observe.md). Default: enforce.
        #[arg(long, value_parser = ["enforce", "observe"])]
        mode: Option<String>,
        /// Observe mode's hard daily ceiling in USD (required with --mode observe).
        #[arg(long = "observe-ceiling-usd")]
        observe_ceiling_usd: Option<String>,
    },
    /// List keys.
    List {
        #[arg(long = "run-label")]
        run_label: Option<String>,
        #[arg(long)]
        vendor: Option<String>,
        /// Include revoked and expired keys.
        #[arg(long)]
        all: bool,
    },
    /// Show a key with its spend today.
    Get { id: String },
    /// Revoke one key, or every key of a run label, and wait until every
    /// connected proxy confirms it refuses them. Exits non-zero, naming
    /// them, if some proxies did not confirm.
    Revoke {
        id: Option<String>,
        #[arg(long = "run-label", conflicts_with = "id")]
        run_label: Option<String>,
        /// How long to wait for the proxies, e.g. 500ms or 5s, at most 60s
        /// (default: the control plane's --ack-timeout-ms).
        #[arg(long = "ack-timeout")]
        ack_timeout: Option<String>,
    },
    /// Issuer tokens: each may only mint child keys of one key.
    #[command(subcommand)]
    IssuerToken(IssuerTokenCmd),
    /// Suggest an enforcing policy (a create-key body under `suggested`)
    /// from the key's forwarded calls: endpoint templates, daily and
    /// per-call caps from the observed maxima plus a margin.
    Suggest(simulate::SuggestArgs),
    /// Switch a key in observe mode to enforcing, in place (same id, secret
    /// and budget); prints it once every connected proxy enforces it.
    Enforce(observe::EnforceArgs),
    /// Roll a key: mint a successor with the same policy that spends the
    /// same budget (printed with its secret, once, when every proxy serves
    /// it); the key keeps working for --grace, then is revoked.
    Roll {
        id: String,
        /// How long the rolled key keeps working, e.g. 90s, 10m, 1h; at
        /// most 24h (default 10m).
        #[arg(long)]
        grace: Option<String>,
    },
}

#[derive(Subcommand)]
enum IssuerTokenCmd {
    /// Mint an issuer token for an active key; prints the token once. It
    /// mints children of that key (POST /vault/keys with it as the bearer
    /// token) and nothing else.
    Create {
        /// The key whose children it mints.
        key_id: String,
        #[arg(long)]
        name: String,
        /// Lifetime, e.g. 30d, 12h; as long as its key when omitted.
        #[arg(long = "expires-in")]
        expires_in: Option<String>,
    },
    /// List a key's issuer tokens (never their text).
    List {
        key_id: String,
        /// Include revoked and expired tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke an issuer token by id.
    Revoke { id: String },
}

#[derive(Args)]
struct SpendArgs {
    /// Alone: the run's spend per vendor. With a report: only this run.
    #[arg(long = "run-label")]
    run_label: Option<String>,
    /// Group by any of run_label, key, vendor, day (comma-separated or
    /// repeated).
    #[arg(long = "by", value_delimiter = ',')]
    by: Vec<String>,
    /// Start: a time back from now (`7d`, `12h`, `30m`), an RFC 3339 time
    /// or a UTC day (YYYY-MM-DD).
    #[arg(long)]
    since: Option<String>,
    /// End (exclusive), in the same forms as --since.
    #[arg(long)]
    until: Option<String>,
    /// Only the top N groups by spend.
    #[arg(long)]
    top: Option<i32>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AuditArgs {
    #[command(subcommand)]
    action: Option<AuditAction>,
    #[arg(long = "key-id")]
    key_id: Option<String>,
    #[arg(long = "run-label")]
    run_label: Option<String>,
    #[arg(long)]
    vendor: Option<String>,
    /// RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// RFC 3339 time.
    #[arg(long)]
    until: Option<String>,
    /// Only entries with this outcome (`refused`: the recorded refusals).
    #[arg(long)]
    outcome: Option<String>,
    /// Only refusals with this error code (e.g. daily_cap_exceeded).
    #[arg(long = "refusal-reason")]
    refusal_reason: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: i32,
    /// The `next_cursor` of a previous listing.
    #[arg(long)]
    page: Option<String>,
}

#[derive(Subcommand)]
enum AuditAction {
    /// Recompute the ledger's hash chain (and hold it against the latest
    /// checkpoint keycap signed, and a kept one with --checkpoint); names
    /// the first broken entry and exits 1 if there is one.
    Verify {
        /// Start at this seq, trusting the prev_hash stored with it.
        #[arg(long)]
        from: Option<i64>,
        /// A checkpoint kept from earlier, SEQ:HASH (the hash as 64 hex
        /// digits, as `keycap audit checkpoints` lists it): the entry SEQ
        /// must still be in the ledger with that hash.
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// List the ledger's signed checkpoints, newest first: keep copies
    /// outside the database, for `verify --checkpoint` later.
    Checkpoints {
        /// How many (1..1000).
        #[arg(long, default_value_t = 100)]
        limit: i32,
    },
    /// Write the ledger with its chain fields (JSON Lines or CSV), oldest
    /// first, streamed; `docs/verify_ledger.py` checks either on its own.
    ///
    /// `--format jsonl` (the default) or `--format csv`.
    Export {
        /// Entries at or after this time (RFC 3339, a UTC day, or a time
        /// back from now such as 7d).
        #[arg(long)]
        from: Option<String>,
        /// Entries before this time, in the same forms.
        #[arg(long)]
        to: Option<String>,
        /// Write here instead of standard output.
        #[arg(short = 'o', long = "output")]
        output: Option<std::path::PathBuf>,
    },
}

/// A time as the CLI takes it: a span back from now (`7d`, `12h`, `30m`,
/// `45s`), an RFC 3339 time, or a UTC day (its midnight).
fn parse_when(
    field: &str,
    s: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Some(unit) = s.chars().last().filter(|c| "dhms".contains(*c)) {
        if let Ok(n) = s[..s.len() - 1].parse::<i64>() {
            let span = match unit {
                'd' => chrono::TimeDelta::try_days(n),
                'h' => chrono::TimeDelta::try_hours(n),
                'm' => chrono::TimeDelta::try_minutes(n),
                _ => chrono::TimeDelta::try_seconds(n),
            };
            if let Some(t) = span
                .filter(|_| n >= 0)
                .and_then(|d| now.checked_sub_signed(d))
            {
                return Ok(t);
            }
        }
    }
    if let Ok(day) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(day.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .with_context(|| {
            format!("--{field} {s:?} is not a span back from now (7d, 12h, 30m), an RFC 3339 time or a day YYYY-MM-DD")
        })
}

fn usd(m: i64) -> String {
    Micros(m).to_string()
}

/// The JSON shapes below are the REST mapping's (`keycap_control::answers`),
/// built from the gRPC answers: the CLI prints what `/vault/*` answers.
fn to_json(v: impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn key_json(k: &pb::VaultKey) -> Value {
    to_json(answers::KeyAnswer::from(k))
}

/// Says on stderr which proxies did not confirm a creation or vendor write
/// in time. Not an error: the change is made, and a proxy that has not
/// applied it yet asks the control plane for a key it does not know.
/// The first line of standard input, for `--credential -`: the secret never
/// appears in the command line or the shell's history.
fn credential_from_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("--credential -: cannot read standard input")?;
    let credential = line.trim_end_matches(['\r', '\n']).to_string();
    if credential.is_empty() {
        bail!("--credential -: standard input held no credential");
    }
    Ok(credential)
}

fn warn_unconfirmed(what: &str, c: Option<&pb::FleetConfirmation>) {
    if let Some(c) = c.filter(|c| !c.unconfirmed_nodes.is_empty()) {
        eprintln!(
            "warning: {what}, but {} of {} proxies did not confirm they serve it yet: {}",
            c.unconfirmed_nodes.len(),
            c.unconfirmed_nodes.len() + c.confirmed_nodes.len(),
            c.unconfirmed_nodes.join(", ")
        );
    }
}

fn confirmation_json(c: Option<&pb::FleetConfirmation>) -> Value {
    c.map(|c| to_json(answers::ConfirmationAnswer::from(c)))
        .unwrap_or(Value::Null)
}

fn admin_token_json(t: &pb::AdminToken) -> Value {
    to_json(answers::AdminTokenAnswer::from(t))
}

fn issuer_token_json(t: &pb::IssuerToken) -> Value {
    to_json(answers::IssuerTokenAnswer::from(t))
}

/// `--expires-in` of a token: 0 on the wire means "no expiry of its own",
/// so a lifetime under a second must not become that.
fn token_lifetime_secs(expires_in: Option<String>) -> anyhow::Result<i64> {
    Ok(match expires_in {
        Some(e) => match humantime::parse_duration(&e)
            .with_context(|| format!("--expires-in {e:?} is not a duration like 30d"))?
            .as_secs()
        {
            0 => bail!("--expires-in {e:?} is under a second; leave it out for no expiry"),
            secs => secs as i64,
        },
        None => 0,
    })
}

fn vendor_json(v: &pb::Vendor) -> Value {
    to_json(answers::VendorAnswer::from(v))
}

fn parse_usd(field: &str, s: &str) -> anyhow::Result<i64> {
    Micros::parse_usd(s)
        .map(|m| m.0)
        .with_context(|| format!("--{field}"))
}

fn pairs(field: &str, items: &[String]) -> anyhow::Result<HashMap<String, String>> {
    items
        .iter()
        .map(|i| {
            i.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--{field} {i:?} is not key=value"))
        })
        .collect()
}

fn read_price_file(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `keycap prices import` without --remote: the table to --out (or
/// standard output), the report to standard output (or standard error).
fn import_prices_offline(args: &PricesImportArgs) -> anyhow::Result<()> {
    let name = args.vendor.as_deref().unwrap_or_default();
    let Some(vendor) = litellm::LlmVendor::parse(name) else {
        bail!("--vendor must be openai or anthropic, not {name:?}");
    };
    let text = read_price_file(&args.file)?;
    let base_text = match &args.base {
        Some(path) => read_price_file(path)?,
        None => match vendor {
            litellm::LlmVendor::Openai => prices::shipped::OPENAI.to_string(),
            litellm::LlmVendor::Anthropic => prices::shipped::ANTHROPIC.to_string(),
        },
    };
    let base = prices::TokenPrices::from_json(&base_text).context("--base")?;
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let as_of = args.as_of.as_deref().unwrap_or(&today);
    if chrono::NaiveDate::parse_from_str(as_of, "%Y-%m-%d").is_err() {
        bail!("--as-of {as_of:?} is not a date like 2026-11-30");
    }
    let import = litellm::import(
        &text,
        vendor,
        &litellm::ImportOptions {
            as_of,
            source: args.source.as_deref(),
            base: Some(&base),
        },
    )?;
    let report = serde_json::to_string_pretty(&import.report)?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, import.table.to_json())
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("{report}");
        }
        None => {
            print!("{}", import.table.to_json());
            eprintln!("{report}");
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Json,
    Table,
    /// JSON Lines: for `audit export` (other answers print as json).
    Jsonl,
    /// For `audit export` (other answers print as json).
    Csv,
}

/// The format every answer is printed in, chosen once in `main`.
static FORMAT: std::sync::OnceLock<Format> = std::sync::OnceLock::new();
/// The `--format` given, if any (an export's default differs).
static FORMAT_ASKED: std::sync::OnceLock<Option<Format>> = std::sync::OnceLock::new();

fn print(v: Value) {
    match FORMAT.get().copied().unwrap_or(Format::Json) {
        Format::Json | Format::Jsonl | Format::Csv => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
        }
        Format::Table => print!("{}", table(&v)),
    }
}

/// Columns a table shows at most; `--format json` has every field.
const TABLE_COLUMNS: usize = 8;

/// The columns a table leads with, when a row has them.
const TABLE_FIRST: [&str; 12] = [
    "id",
    "name",
    "seq",
    "at",
    "vendor",
    "profile",
    "status",
    "outcome",
    "agent_run_label",
    "daily_usd_cap",
    "spent_today_usd",
    "cost_usd",
];

/// A list of objects as one row each under the first object's plain
/// fields; an object as field/value rows; a wrapper object holding one list
/// (`{"keys": [...]}`) as that list.
fn table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = match v {
        Value::Array(items) => {
            let Some(Value::Object(first)) = items.first() else {
                return items.iter().map(|i| format!("{}\n", cell(i))).collect();
            };
            // What names a row comes first, then what a person looks for;
            // the rest in field order.
            let mut columns: Vec<&String> = first
                .iter()
                .filter(|(_, v)| !v.is_object())
                .map(|(k, _)| k)
                .collect();
            columns.sort_by_key(|c| {
                TABLE_FIRST
                    .iter()
                    .position(|f| f == c)
                    .unwrap_or(TABLE_FIRST.len())
            });
            columns.truncate(TABLE_COLUMNS);
            let mut rows = vec![columns.iter().map(|c| c.to_string()).collect()];
            rows.extend(
                items
                    .iter()
                    .map(|i| columns.iter().map(|c| cell(&i[c.as_str()])).collect()),
            );
            rows
        }
        Value::Object(fields) => {
            if let (1, Some(list @ Value::Array(_))) = (fields.len(), fields.values().next()) {
                return table(list);
            }
            fields
                .iter()
                .map(|(k, v)| vec![k.clone(), cell(v)])
                .collect()
        }
        other => return format!("{}\n", cell(other)),
    };
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One value as table text: strings bare, lists comma-joined, null empty.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let format = cli.format.unwrap_or_else(|| {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            Format::Table
        } else {
            Format::Json
        }
    });
    let _ = FORMAT.set(format);
    let _ = FORMAT_ASKED.set(cli.format);
    if let Command::Completions { shell } = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "keycap", &mut std::io::stdout());
        return Ok(());
    }
    if let Command::Dev(args) = cli.command {
        return dev::run(args, cli.admin_token).await;
    }
    if let Command::Prices(PricesCmd::Import(args)) = &cli.command {
        if !args.remote {
            return import_prices_offline(args);
        }
    }
    if let Command::AdminToken(AdminTokenCmd::Generate { env }) = &cli.command {
        if env.is_empty() || env.len() > 16 || !env.bytes().all(|b| b.is_ascii_lowercase()) {
            bail!("--env must be 1-16 lowercase letters");
        }
        println!("{}", secret::generate(SecretKind::AdminToken, env));
        return Ok(());
    }
    let Some(token) = cli.admin_token.as_deref() else {
        bail!("an admin token is required: --admin-token or KEYCAP_ADMIN_TOKEN");
    };
    let mut c = AdminClient::connect(&cli.control_url, token, cli.ca.as_deref()).await?;
    let result = run(&mut c, cli.command).await;
    if let Err(e) = &result {
        if let Some(s) = e.downcast_ref::<tonic::Status>() {
            // keycap's stable code, as in REST bodies and the SDKs' errors.
            let code = s
                .metadata()
                .get("keycap-error")
                .and_then(|v| v.to_str().ok());
            match code {
                Some(code) => bail!("{code}: {}", s.message()),
                None => bail!("{:?}: {}", s.code(), s.message()),
            }
        }
    }
    result
}

async fn run(c: &mut AdminClient, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev(_)
        | Command::Completions { .. }
        | Command::AdminToken(AdminTokenCmd::Generate { .. }) => {
            unreachable!("handled before connecting")
        }
        Command::Webhook(cmd) => webhook(c, cmd).await?,
        Command::Simulate(args) => simulate::run(c, args).await?,
        Command::Approval(cmd) => print(approval::run(c, cmd).await?),
        Command::Prices(PricesCmd::Import(args)) => {
            let text = read_price_file(&args.file)?;
            // Only what an LLM vendor can use goes over the wire; the
            // control plane converts it with the same parser.
            let litellm_json = litellm::vendor_entries(
                &text,
                &[litellm::LlmVendor::Openai, litellm::LlmVendor::Anthropic],
            )?;
            let r = c
                .vendors
                .import_vendor_prices(pb::ImportVendorPricesRequest {
                    name: args.vendor_name.unwrap_or_default(),
                    litellm_json,
                })
                .await?
                .into_inner();
            let report = r.report.unwrap_or_default();
            print(json!({
                "vendor": r.vendor.as_ref().map(vendor_json),
                "report": {
                    "as_of": report.as_of,
                    "entries": report.entries,
                    "models": report.models,
                    "embeddings": report.embeddings,
                    "images": report.images,
                    "skipped": report.skipped.iter()
                        .map(|s| json!({"name": s.name, "reason": s.reason}))
                        .collect::<Vec<_>>(),
                    "unused_prices": report.unused_prices.iter()
                        .map(|u| json!({"kind": u.kind, "reason": u.reason, "entries": u.entries}))
                        .collect::<Vec<_>>(),
                },
            }));
        }
        Command::AdminToken(AdminTokenCmd::Create {
            name,
            scopes,
            vendors,
            expires_in,
        }) => {
            let expires_in_seconds = token_lifetime_secs(expires_in)?;
            let r = c
                .admin_tokens
                .create_admin_token(pb::CreateAdminTokenRequest {
                    name,
                    scopes,
                    vendors,
                    expires_in_seconds,
                })
                .await?
                .into_inner();
            let mut out = r
                .token
                .as_ref()
                .map(admin_token_json)
                .unwrap_or(Value::Null);
            out["token"] = json!(r.secret);
            print(out);
        }
        Command::AdminToken(AdminTokenCmd::List { all }) => {
            let r = c
                .admin_tokens
                .list_admin_tokens(pb::ListAdminTokensRequest {
                    include_inactive: all,
                })
                .await?
                .into_inner();
            print(json!({
                "admin_tokens": r.tokens.iter().map(admin_token_json).collect::<Vec<_>>(),
            }));
        }
        Command::AdminToken(AdminTokenCmd::Revoke { id }) => {
            let r = c
                .admin_tokens
                .revoke_admin_token(pb::RevokeAdminTokenRequest { id })
                .await?
                .into_inner();
            print(
                r.token
                    .as_ref()
                    .map(admin_token_json)
                    .unwrap_or(Value::Null),
            );
        }
        Command::Vendor(VendorCmd::Put {
            name,
            profile,
            base_url,
            credential,
            rates,
            prices_file,
            forward_trace_context,
            rotate_after,
        }) => {
            let prices_json = match prices_file {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("--prices-file {}", path.display()))?,
                None => String::new(),
            };
            let credential = match credential.as_deref() {
                Some("-") => credential_from_stdin()?,
                other => other.unwrap_or_default().to_string(),
            };
            let r = c
                .vendors
                .put_vendor(pb::PutVendorRequest {
                    name,
                    profile,
                    base_url,
                    credential,
                    currency_rates: pairs("rate", &rates)?,
                    prices_json,
                    ack_timeout_ms: 0,
                    forward_trace_context,
                    rotate_after: rotate_after.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let mut out = r.vendor.as_ref().map(vendor_json).unwrap_or(Value::Null);
            out["created"] = json!(r.created);
            out["confirmation"] = confirmation_json(r.confirmation.as_ref());
            print(out);
            warn_unconfirmed("vendor written", r.confirmation.as_ref());
        }
        Command::Admin(AdminCmd::RotateKek) => {
            let r = c
                .vendors
                .rotate_kek(pb::RotateKekRequest {})
                .await?
                .into_inner();
            print(json!({
                "kek_id": r.kek_id,
                "rewrapped": r.rewrapped,
                "already_current": r.already_current,
                "failed_vendors": r.failed_vendors,
            }));
            if !r.failed_vendors.is_empty() {
                bail!(
                    "not rotated: the credentials of {} cannot be opened by this control plane \
                     (is a previous master key missing from its configuration?)",
                    r.failed_vendors.join(", ")
                );
            }
        }
        Command::Vendor(VendorCmd::Get { name }) => {
            let r = c
                .vendors
                .get_vendor(pb::GetVendorRequest { name })
                .await?
                .into_inner();
            print(r.vendor.as_ref().map(vendor_json).unwrap_or(Value::Null));
        }
        Command::Vendor(VendorCmd::Delete { name }) => {
            eprintln!("deleting vendor {name}: waiting for the proxies to stop serving it...");
            let r = c
                .vendors
                .delete_vendor(pb::DeleteVendorRequest {
                    name: name.clone(),
                    ack_timeout_ms: 0,
                })
                .await?
                .into_inner();
            print(json!({
                "deleted": name,
                "confirmation": confirmation_json(r.confirmation.as_ref()),
            }));
            warn_unconfirmed("vendor deleted", r.confirmation.as_ref());
        }
        Command::Vendor(VendorCmd::Credential(cmd)) => credential::run(c, cmd).await?,
        Command::Vendor(VendorCmd::List) => {
            let r = c
                .vendors
                .list_vendors(pb::ListVendorsRequest {})
                .await?
                .into_inner();
            print(json!({"vendors": r.vendors.iter().map(vendor_json).collect::<Vec<_>>()}));
        }
        Command::Key(KeyCmd::Create {
            vendor,
            daily_usd_cap,
            per_call_usd_cap,
            lifetime_usd_cap,
            allow,
            expires_in,
            run_label,
            meta,
            rate_limit_per_minute,
            allow_cidr,
            zone,
            parent,
            approval_above_usd,
            mode,
            observe_ceiling_usd,
        }) => {
            let expires = humantime::parse_duration(&expires_in).with_context(|| {
                format!("--expires-in {expires_in:?} is not a duration like 2h")
            })?;
            let r = c
                .keys
                .create_key(pb::CreateKeyRequest {
                    vendor,
                    allowed_endpoints: allow,
                    daily_cap_micros: parse_usd("daily-usd-cap", &daily_usd_cap)?,
                    per_call_cap_micros: per_call_usd_cap
                        .map(|s| parse_usd("per-call-usd-cap", &s))
                        .transpose()?
                        .unwrap_or(0),
                    lifetime_cap_micros: lifetime_usd_cap
                        .map(|s| parse_usd("lifetime-usd-cap", &s))
                        .transpose()?
                        .unwrap_or(0),
                    expires_in_seconds: expires.as_secs() as i64,
                    agent_run_label: run_label,
                    metadata: pairs("meta", &meta)?,
                    rate_limit_per_minute,
                    allowed_cidrs: allow_cidr,
                    zone: zone.unwrap_or_default(),
                    parent_id: parent.unwrap_or_default(),
                    ack_timeout_ms: 0,
                    approval_above_micros: approval_above_usd
                        .map(|s| parse_usd("approval-above-usd", &s))
                        .transpose()?
                        .unwrap_or(0),
                    mode: mode.unwrap_or_default(),
                    observe_ceiling_micros: observe_ceiling_usd
                        .map(|s| parse_usd("observe-ceiling-usd", &s))
                        .transpose()?
                        .unwrap_or(0),
                })
                .await?
                .into_inner();
            let mut out = r.key.as_ref().map(key_json).unwrap_or(Value::Null);
            out["key"] = json!(r.secret);
            out["confirmation"] = confirmation_json(r.confirmation.as_ref());
            print(out);
            warn_unconfirmed("key created", r.confirmation.as_ref());
        }
        Command::Key(KeyCmd::Roll { id, grace }) => {
            let r = c
                .keys
                .roll_key(pb::RollKeyRequest {
                    id,
                    grace: grace.unwrap_or_default(),
                    ack_timeout_ms: 0,
                })
                .await?
                .into_inner();
            let mut out = r.key.as_ref().map(key_json).unwrap_or(Value::Null);
            out["key"] = json!(r.secret);
            out["confirmation"] = confirmation_json(r.confirmation.as_ref());
            out["rolled"] = r.rolled.as_ref().map(key_json).unwrap_or(Value::Null);
            print(out);
            warn_unconfirmed("key rolled", r.confirmation.as_ref());
        }
        Command::Key(KeyCmd::List {
            run_label,
            vendor,
            all,
        }) => {
            let r = c
                .keys
                .list_keys(pb::ListKeysRequest {
                    agent_run_label: run_label.unwrap_or_default(),
                    vendor: vendor.unwrap_or_default(),
                    include_inactive: all,
                })
                .await?
                .into_inner();
            print(json!({"keys": r.keys.iter().map(key_json).collect::<Vec<_>>()}));
        }
        Command::Key(KeyCmd::Suggest(args)) => simulate::suggest(c, args).await?,
        Command::Key(KeyCmd::Enforce(args)) => observe::enforce(c, args).await?,
        Command::Key(KeyCmd::Get { id }) => {
            let r = c.keys.get_key(pb::GetKeyRequest { id }).await?.into_inner();
            print(r.key.as_ref().map(key_json).unwrap_or(Value::Null));
        }
        Command::Key(KeyCmd::IssuerToken(IssuerTokenCmd::Create {
            key_id,
            name,
            expires_in,
        })) => {
            let r = c
                .keys
                .create_issuer_token(pb::CreateIssuerTokenRequest {
                    key_id,
                    name,
                    expires_in_seconds: token_lifetime_secs(expires_in)?,
                })
                .await?
                .into_inner();
            let mut out = r
                .token
                .as_ref()
                .map(issuer_token_json)
                .unwrap_or(Value::Null);
            out["token"] = json!(r.secret);
            print(out);
        }
        Command::Key(KeyCmd::IssuerToken(IssuerTokenCmd::List { key_id, all })) => {
            let r = c
                .keys
                .list_issuer_tokens(pb::ListIssuerTokensRequest {
                    key_id,
                    include_inactive: all,
                })
                .await?
                .into_inner();
            print(json!({
                "issuer_tokens": r.tokens.iter().map(issuer_token_json).collect::<Vec<_>>(),
            }));
        }
        Command::Key(KeyCmd::IssuerToken(IssuerTokenCmd::Revoke { id })) => {
            let r = c
                .keys
                .revoke_issuer_token(pb::RevokeIssuerTokenRequest { id })
                .await?
                .into_inner();
            print(
                r.token
                    .as_ref()
                    .map(issuer_token_json)
                    .unwrap_or(Value::Null),
            );
        }
        Command::Key(KeyCmd::Revoke {
            id,
            run_label,
            ack_timeout,
        }) => {
            let ack_timeout_ms = match ack_timeout {
                Some(t) => {
                    let d = humantime::parse_duration(&t).with_context(|| {
                        format!("--ack-timeout {t:?} is not a duration like 5s")
                    })?;
                    match u32::try_from(d.as_millis()) {
                        Ok(ms) if (1..=60_000).contains(&ms) => ms,
                        _ => bail!("--ack-timeout must be between 1ms and 60s"),
                    }
                }
                None => 0,
            };
            eprintln!("revoking: waiting for the proxies to confirm they refuse the key...");
            let confirmation = match (id, run_label) {
                (Some(id), None) => {
                    let r = c
                        .keys
                        .revoke_key(pb::RevokeKeyRequest { id, ack_timeout_ms })
                        .await?
                        .into_inner();
                    let mut out = r.key.as_ref().map(key_json).unwrap_or(Value::Null);
                    out["confirmation"] = confirmation_json(r.confirmation.as_ref());
                    print(out);
                    r.confirmation
                }
                (None, Some(label)) => {
                    let r = c
                        .keys
                        .revoke_run(pb::RevokeRunRequest {
                            agent_run_label: label.clone(),
                            ack_timeout_ms,
                        })
                        .await?
                        .into_inner();
                    print(json!({
                        "agent_run_label": label,
                        "revoked": r.revoked_ids.len(),
                        "revoked_ids": r.revoked_ids,
                        "confirmation": confirmation_json(r.confirmation.as_ref()),
                    }));
                    r.confirmation
                }
                _ => bail!("give a key id or --run-label"),
            };
            if let Some(c) = confirmation.filter(|c| !c.unconfirmed_nodes.is_empty()) {
                bail!(
                    "revoked, but {} of {} proxies did not confirm they refuse it: {}. \
                     Their leases of the revoked keys are fenced; they can still spend at \
                     most {} USD with them until they apply the revocation or the leases \
                     expire. Revoke again to see whether they have caught up",
                    c.unconfirmed_nodes.len(),
                    c.unconfirmed_nodes.len() + c.confirmed_nodes.len(),
                    c.unconfirmed_nodes.join(", "),
                    usd(c.unconfirmed_lease_micros)
                );
            }
        }
        Command::Spend(a)
            if a.by.is_empty() && a.since.is_none() && a.until.is_none() && a.top.is_none() =>
        {
            let Some(run_label) = a.run_label else {
                bail!("give --run-label for a run's spend, or --by/--since/--until/--top for a report");
            };
            let r = c
                .audit
                .spend_summary(pb::SpendSummaryRequest {
                    agent_run_label: run_label,
                })
                .await?
                .into_inner();
            print(to_json(answers::SpendAnswer::from(&r)));
        }
        Command::Spend(a) => {
            let now = chrono::Utc::now();
            let when = |field: &str, s: Option<String>| -> anyhow::Result<_> {
                s.map(|s| parse_when(field, &s, now)).transpose()
            };
            let bounds = (when("since", a.since)?, when("until", a.until)?);
            let r = c
                .audit
                .spend_report(pb::SpendReportRequest {
                    group_by: a.by,
                    from: bounds.0.map(to_proto),
                    to: bounds.1.map(to_proto),
                    top: a.top.unwrap_or(0),
                    agent_run_label: a.run_label.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print(to_json(answers::SpendReportAnswer::from_pb(&r, &bounds)));
        }
        Command::Audit(AuditArgs {
            action: Some(AuditAction::Export { from, to, output }),
            ..
        }) => {
            let now = chrono::Utc::now();
            let when = |field: &str, s: Option<String>| -> anyhow::Result<_> {
                s.map(|s| parse_when(field, &s, now).map(to_proto))
                    .transpose()
            };
            let mut stream = c
                .audit
                .export_audit(pb::ExportAuditRequest {
                    // Only csv differs from the default; `json` or a
                    // `table` from KEYCAP_FORMAT export JSON Lines.
                    format: if FORMAT_ASKED.get().copied().flatten() == Some(Format::Csv) {
                        "csv"
                    } else {
                        "jsonl"
                    }
                    .into(),
                    from: when("from", from)?,
                    to: when("to", to)?,
                })
                .await?
                .into_inner();
            // A chunk at a time: memory stays flat whatever the ledger's
            // length.
            let mut out: Box<dyn std::io::Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            while let Some(chunk) = stream.message().await? {
                out.write_all(&chunk.data)?;
            }
            out.flush()?;
        }
        Command::Audit(AuditArgs {
            action: Some(AuditAction::Checkpoints { limit }),
            ..
        }) => {
            let r = c
                .audit
                .list_checkpoints(pb::ListCheckpointsRequest { limit })
                .await?
                .into_inner();
            print(to_json(answers::CheckpointList {
                checkpoints: r.checkpoints.iter().map(Into::into).collect(),
            }));
        }
        Command::Audit(AuditArgs {
            action: Some(AuditAction::Verify { from, checkpoint }),
            ..
        }) => {
            let r = c
                .audit
                .verify_audit(pb::VerifyAuditRequest {
                    from_seq: from.unwrap_or(0),
                    checkpoint: checkpoint.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print(to_json(answers::VerifyAnswer::from(&r)));
            if !r.ok {
                anyhow::bail!(
                    "the audit ledger is broken at seq {}: {}",
                    r.broken_seq,
                    r.broken_message
                );
            }
        }
        Command::Audit(a) => {
            let time = |field: &str, s: Option<String>| -> anyhow::Result<_> {
                s.map(|s| {
                    chrono::DateTime::parse_from_rfc3339(&s)
                        .map(|t| to_proto(t.with_timezone(&chrono::Utc)))
                        .with_context(|| format!("--{field} {s:?} is not an RFC 3339 time"))
                })
                .transpose()
            };
            let r = c
                .audit
                .query_audit(pb::QueryAuditRequest {
                    key_id: a.key_id.unwrap_or_default(),
                    agent_run_label: a.run_label.unwrap_or_default(),
                    vendor: a.vendor.unwrap_or_default(),
                    since: time("since", a.since)?,
                    until: time("until", a.until)?,
                    page_size: a.limit,
                    page_token: a.page.unwrap_or_default(),
                    outcome: a.outcome.unwrap_or_default(),
                    refusal_reason: a.refusal_reason.unwrap_or_default(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            print(to_json(answers::AuditPage::from(&r)));
        }
    }
    Ok(())
}

async fn webhook(c: &mut AdminClient, cmd: WebhookCmd) -> anyhow::Result<()> {
    match cmd {
        WebhookCmd::Add {
            url,
            events,
            thresholds,
            run_label,
            key_id,
            secret,
            payload,
            description,
        } => {
            let r = c
                .webhooks
                .create_webhook(pb::CreateWebhookRequest {
                    url,
                    secret: secret.unwrap_or_default(),
                    events,
                    thresholds,
                    run_label: run_label.unwrap_or_default(),
                    key_id: key_id.unwrap_or_default(),
                    format: payload,
                    description,
                })
                .await?
                .into_inner();
            let webhook = r
                .webhook
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("the control plane answered without the webhook"))?;
            print(to_json(hooks::CreatedWebhook {
                webhook: webhook.into(),
                secret: r.secret,
            }));
        }
        WebhookCmd::List => {
            let r = c
                .webhooks
                .list_webhooks(pb::ListWebhooksRequest {})
                .await?
                .into_inner();
            print(to_json(hooks::WebhookList {
                webhooks: r.webhooks.iter().map(hooks::WebhookJson::from).collect(),
            }));
        }
        WebhookCmd::Delete { id } => {
            c.webhooks
                .delete_webhook(pb::DeleteWebhookRequest { id: id.clone() })
                .await?;
            print(to_json(hooks::Deleted { deleted: true }));
        }
        WebhookCmd::Test { id } => {
            let r = c
                .webhooks
                .test_webhook(pb::TestWebhookRequest { id })
                .await?
                .into_inner();
            print(to_json(hooks::TestQueued {
                event_id: r.event_id,
            }));
        }
        WebhookCmd::Deliveries { id, limit } => {
            let r = c
                .webhooks
                .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest { id, limit })
                .await?
                .into_inner();
            print(to_json(hooks::DeliveryList {
                deliveries: r.deliveries.iter().map(hooks::DeliveryJson::from).collect(),
            }));
        }
    }
    Ok(())
}
