//! keycap-control configuration: flags, each also settable through a
//! `KEYCAP_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug)]
pub struct ControlConfig {
    /// Address for gRPC and REST.
    #[arg(
        long = "listen",
        env = "KEYCAP_CONTROL_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    pub listen: SocketAddr,
    /// Address for Prometheus metrics (`GET /metrics`), apart from the
    /// API's; unset: no metrics listener.
    #[arg(long, env = "KEYCAP_CONTROL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// `postgres://...` for PostgreSQL, `sqlite:path` for embedded SQLite.
    #[arg(long, env = "KEYCAP_DATABASE_URL")]
    pub database_url: String,
    /// Key-encryption key for vendor credentials: 64 hex chars or base64 of
    /// 32 bytes.
    #[arg(long, env = "KEYCAP_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// File holding the key-encryption key (instead of --master-key).
    #[arg(long, env = "KEYCAP_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Key-encryption keys being rotated away from (or not yet made primary
    /// on every replica): credentials sealed under them still open. Comma
    /// separated; see README, "Rotating the master key".
    #[arg(
        long = "previous-master-key",
        env = "KEYCAP_PREVIOUS_MASTER_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub previous_master_keys: Vec<String>,
    /// Files each holding a previous key-encryption key (repeatable).
    #[arg(
        long = "previous-master-key-file",
        env = "KEYCAP_PREVIOUS_MASTER_KEY_FILES",
        value_delimiter = ','
    )]
    pub previous_master_key_files: Vec<PathBuf>,
    /// Bootstrap admin token; stored hashed, accepted from then on.
    #[arg(long, env = "KEYCAP_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Token proxies present to the fleet API.
    #[arg(long, env = "KEYCAP_FLEET_TOKEN", hide_env_values = true)]
    pub fleet_token: String,
    /// How often the change log's head is re-read for changes made through
    /// other replicas, in milliseconds. On PostgreSQL, LISTEN/NOTIFY wakes
    /// replicas at once and this is only the fallback.
    #[arg(long, env = "KEYCAP_CHANGE_POLL_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub change_poll_ms: u64,
    /// How many of the newest change-log entries to keep. A proxy that
    /// resumes from a version older than that takes a fresh snapshot.
    #[arg(long, env = "KEYCAP_CHANGE_LOG_KEEP", default_value_t = 100_000,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub change_log_keep: i64,
    /// How long a revocation (RevokeKey, RevokeRun, their REST routes and
    /// the CLI), a key creation and a vendor change wait for every
    /// connected proxy to confirm it serves the change, in milliseconds,
    /// unless the call asks otherwise. Proxies that do not confirm in time
    /// are named in the answer (and, for a revocation, their leases of the
    /// key are fenced).
    #[arg(long, env = "KEYCAP_ACK_TIMEOUT_MS", default_value_t = 2000,
          alias = "revoke-ack-timeout-ms",
          value_parser = clap::value_parser!(u64).range(1..=crate::domain::MAX_ACK_TIMEOUT_MS))]
    pub ack_timeout_ms: u64,
    /// Let vendors' base URLs use plain http and point at loopback,
    /// private, link-local (cloud metadata) and other non-public addresses,
    /// and let proxies connect to such addresses for them. Off by default:
    /// for test vendors on loopback and `keycap dev` only.
    #[arg(long, env = "KEYCAP_ALLOW_PRIVATE_UPSTREAMS")]
    pub allow_private_upstreams: bool,
    /// Drop audit ledger days older than this many days (PostgreSQL only,
    /// where the ledger is partitioned by UTC day), and only once a signed
    /// checkpoint and a completed export of the whole ledger cover them.
    /// Unset: keep everything.
    #[arg(long, env = "KEYCAP_AUDIT_RETENTION_DAYS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub audit_retention_days: Option<u32>,
    /// Let alert webhooks go to loopback, private, link-local and other
    /// non-public addresses. Off by default: a registered URL whose host
    /// resolves to such an address (checked at every delivery) is refused.
    #[arg(long, env = "KEYCAP_ALLOW_PRIVATE_WEBHOOKS")]
    pub allow_private_webhooks: bool,
    /// Store alert events but post none from this replica, and never
    /// resolve a webhook's host: for an instance that must not reach out
    /// (a fuzzing run registers endpoints with made-up hosts). Another
    /// replica without this flag delivers what it stored.
    #[arg(long, env = "KEYCAP_NO_WEBHOOK_DELIVERIES")]
    pub no_webhook_deliveries: bool,
    /// How long one webhook delivery attempt may take (connect, send and
    /// answer), in milliseconds; a replica's claim on a delivery lasts
    /// twice this plus 5 s, after which another replica may retry it.
    #[arg(long, env = "KEYCAP_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub webhook_timeout_ms: u64,
    /// How often a replica sweeps for alerts no request raises (vendor
    /// credentials due for rotation, cap thresholds crossed, cap refusal
    /// bursts), in milliseconds.
    #[arg(long, env = "KEYCAP_ROTATION_CHECK_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub rotation_check_ms: u64,
    /// Environment tag minted into vault keys (kc_<env>_...).
    #[arg(long, env = "KEYCAP_KEY_ENV", default_value = "live")]
    pub key_env: String,
    /// PEM certificate chain for serving gRPC and REST over TLS (with
    /// --tls-key); without both, the listener is plain HTTP.
    #[arg(long, env = "KEYCAP_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "KEYCAP_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle for proxies' client certificates. When set (TLS only),
    /// every fleet call must come over a connection whose client
    /// certificate names the calling node id; admin calls are unaffected.
    #[arg(long, env = "KEYCAP_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    #[command(flatten)]
    pub approvals: ApprovalArgs,
}

/// How the approval gate is offered (docs/approvals.md).
#[derive(clap::Args, Clone, Debug)]
pub struct ApprovalArgs {
    /// How long a call held for approval can be decided and then used, in
    /// seconds.
    #[arg(long = "approval-ttl-secs", env = "KEYCAP_APPROVAL_TTL_SECS",
          default_value_t = crate::approval::DEFAULT_TTL_SECS,
          value_parser = clap::value_parser!(u64).range(1..=7 * 86_400))]
    pub ttl_secs: u64,
    /// The control plane's URL as people reach it (e.g.
    /// https://keycap.example.com), for the dashboard link in an
    /// `approval_required` answer; unset: the link is a path.
    #[arg(long = "public-url", env = "KEYCAP_PUBLIC_URL")]
    pub public_url: Option<String>,
}

impl Default for ApprovalArgs {
    fn default() -> Self {
        ApprovalArgs {
            ttl_secs: crate::approval::DEFAULT_TTL_SECS,
            public_url: None,
        }
    }
}
