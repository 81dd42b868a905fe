//! `keycap dev`: control plane, proxy and the sandbox vendor in one process
//! on an embedded SQLite data dir. Generates what production would take from
//! an operator — master key, admin token, fleet token — and keeps the first
//! two in the data dir (mode 0600) so restarts keep working.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use keycap_control::config::ControlConfig;
use keycap_control::crypto::Sealer;
use keycap_control::scope::VendorScope;
use keycap_control::service::PutVendor;
use keycap_proto::secret::{self, SecretKind};
use keycap_proxy::config::ProxyConfig;
use tokio::net::TcpListener;

use crate::sandbox;

#[derive(clap::Args)]
pub struct DevArgs {
    /// Where the SQLite database, master key and admin token live.
    #[arg(long, env = "KEYCAP_DATA_DIR", default_value = ".keycap-dev")]
    data_dir: PathBuf,
    /// Proxy address agents call.
    #[arg(long, env = "KEYCAP_PROXY_LISTEN", default_value = "127.0.0.1:8080")]
    proxy_listen: SocketAddr,
    /// Control plane address (gRPC + REST).
    #[arg(long, env = "KEYCAP_CONTROL_LISTEN", default_value = "127.0.0.1:8081")]
    control_listen: SocketAddr,
    /// Sandbox vendor address.
    #[arg(long, env = "KEYCAP_SANDBOX_LISTEN", default_value = "127.0.0.1:8082")]
    sandbox_listen: SocketAddr,
    /// Address for the proxy's Prometheus metrics (`GET /metrics`); none
    /// when unset.
    #[arg(long, env = "KEYCAP_PROXY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// How long the proxy waits for a vendor's response headers.
    #[arg(long, env = "KEYCAP_UPSTREAM_TIMEOUT_SECS", default_value_t = 60)]
    upstream_timeout_secs: u64,
    /// How log lines are written: text, or JSON with trace and span ids.
    #[arg(long, value_enum, env = "KEYCAP_LOG_FORMAT", default_value = "text")]
    log_format: keycap_telemetry::LogFormat,
    /// Store alert events without posting them or resolving webhook hosts
    /// (the OpenAPI fuzz registers endpoints with made-up hosts).
    #[arg(long, env = "KEYCAP_NO_WEBHOOK_DELIVERIES")]
    no_webhook_deliveries: bool,
}

/// Reads a secret file, or creates it with `make()` (mode 0600).
fn secret_file(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    if path.exists() {
        return Ok(std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string());
    }
    let value = make();
    std::fs::write(path, format!("{value}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(value)
}

/// Runs `keycap dev`. `admin_token` is the CLI's `--admin-token` (or
/// `KEYCAP_ADMIN_TOKEN`); without one, the token kept in the data dir is
/// used, or generated there on first run.
pub async fn run(args: DevArgs, admin_token: Option<String>) -> anyhow::Result<()> {
    // Both planes in one process, so one service name for their spans.
    let _telemetry = keycap_telemetry::init("keycap-dev", args.log_format, "warn")?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let dir = args.data_dir.canonicalize()?;
    let master_key_file = dir.join("master.key");
    secret_file(&master_key_file, Sealer::generate_key_text)?;
    let admin_token = match admin_token {
        Some(t) if !t.is_empty() => t,
        _ => secret_file(&dir.join("admin-token"), || {
            secret::generate(SecretKind::AdminToken, "dev")
        })?,
    };
    let fleet_token = secret::generate(SecretKind::FleetToken, "dev");

    let control_listener = TcpListener::bind(args.control_listen)
        .await
        .with_context(|| format!("control plane cannot listen on {}", args.control_listen))?;
    let proxy_listener = TcpListener::bind(args.proxy_listen)
        .await
        .with_context(|| format!("proxy cannot listen on {}", args.proxy_listen))?;
    let sandbox_listener = TcpListener::bind(args.sandbox_listen)
        .await
        .with_context(|| format!("sandbox cannot listen on {}", args.sandbox_listen))?;
    let control_addr = control_listener.local_addr()?;
    let proxy_addr = proxy_listener.local_addr()?;
    let sandbox_addr = sandbox_listener.local_addr()?;

    let config = ControlConfig {
        metrics_listen: None,
        listen: control_addr,
        database_url: format!("sqlite:{}", dir.join("keycap.db").display()),
        master_key: None,
        master_key_file: Some(master_key_file),
        admin_token: Some(admin_token.clone()),
        fleet_token: fleet_token.clone(),
        key_env: "dev".to_string(),
        change_poll_ms: 250,
        change_log_keep: 100_000,
        ack_timeout_ms: 2000,
        audit_retention_days: None,
        // The sandbox vendor is plain http on loopback.
        allow_private_upstreams: true,
        // A receiver on this machine is what a developer tries first.
        allow_private_webhooks: true,
        webhook_timeout_ms: 10_000,
        rotation_check_ms: 60_000,
        no_webhook_deliveries: args.no_webhook_deliveries,
        previous_master_keys: Vec::new(),
        previous_master_key_files: Vec::new(),
        // `keycap dev` stays on plain loopback.
        tls_cert: None,
        tls_key: None,
        client_ca: None,
        approvals: Default::default(),
    };
    let control = keycap_control::server::build(&config).await?;
    control
        .put_vendor(
            &VendorScope::All,
            PutVendor::new(
                "sandbox",
                "stripe",
                &format!("http://{sandbox_addr}"),
                Some(sandbox::SANDBOX_CREDENTIAL),
                &BTreeMap::new(),
                "",
            )?,
            // No proxy is connected yet: the one started below loads it.
            Some(std::time::Duration::ZERO),
        )
        .await
        .map_err(|e| anyhow::anyhow!("registering the sandbox vendor: {e}"))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(async move {
        let _ = axum::serve(sandbox_listener, sandbox::router()).await;
    });
    let control_task = tokio::spawn(keycap_control::server::serve(
        control_listener,
        control,
        None,
        stopped(stop_rx.clone()),
    ));
    let proxy_config = ProxyConfig {
        listen: proxy_addr,
        metrics_listen: args.metrics_listen,
        control_urls: vec![format!("http://{control_addr}")],
        fleet_token,
        node_id: Some("dev".to_string()),
        openai_prices: None,
        anthropic_prices: None,
        twilio_prices: None,
        max_body_bytes: 1 << 20,
        max_response_bytes: 16 << 20,
        upstream_timeout_secs: args.upstream_timeout_secs,
        serve_threads: 0,
        zone: None,
        trusted_proxies: Vec::new(),
        tls_cert: None,
        tls_key: None,
        control_ca: None,
        tls_client_cert: None,
        tls_client_key: None,
        upstream_ca: None,
        header_read_timeout_secs: 10,
        max_connections: 4096,
        body_read_timeout_secs: 30,
        body_min_bytes_per_sec: 1024,
        body_rate_grace_secs: 5,
        spool_dir: Some(dir.join("proxy-spool")),
    };
    let proxy_task = tokio::spawn(keycap_proxy::run(
        proxy_config,
        proxy_listener,
        stopped(stop_rx),
    ));

    print_banner(&dir, &admin_token, proxy_addr, control_addr);

    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        r = control_task => { r??; }
        r = proxy_task => { r??; }
    }
    let _ = stop_tx.send(true);
    Ok(())
}

fn print_banner(dir: &Path, admin_token: &str, proxy: SocketAddr, control: SocketAddr) {
    println!(
        r#"keycap dev is running
  proxy (agents call this):  http://{proxy}
  control plane (gRPC+REST): http://{control}
  data dir:                  {dir}
  admin token:               {admin_token}

Try it with the built-in sandbox vendor (a local Stripe look-alike):

  export KEYCAP_ADMIN_TOKEN={admin_token}
  # mint a key capped at $5 a day
  KEY=$(curl -s -X POST http://{proxy}/vault/keys \
    -H "Authorization: Bearer $KEYCAP_ADMIN_TOKEN" -H 'Content-Type: application/json' \
    -d '{{"vendor":"sandbox","daily_usd_cap":5,"allowed_endpoints":["POST /v1/payment_intents"],"expires_in":"1h","agent_run_label":"demo/1"}}' \
    | sed -E 's/.*"key":"([^"]+)".*/\1/')
  # a $3 charge goes through ...
  curl -s http://{proxy}/sandbox/v1/payment_intents -H "Authorization: Bearer $KEY" -d amount=300 -d currency=usd -d confirm=true
  # ... a second one would cross the cap and is refused before it leaves (429)
  curl -s http://{proxy}/sandbox/v1/payment_intents -H "Authorization: Bearer $KEY" -d amount=300 -d currency=usd -d confirm=true
  # what the run spent
  curl -s "http://{proxy}/vault/spend?agent_run_label=demo/1" -H "Authorization: Bearer $KEYCAP_ADMIN_TOKEN"
"#,
        dir = dir.display()
    );
}
