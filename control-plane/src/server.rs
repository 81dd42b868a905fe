//! Wiring: opens the store, builds `Control`, and serves gRPC (with
//! reflection) and the REST mapping on one listener. gRPC requests are told
//! apart by content type inside the combined router.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use keycap_proto::pb;
use keycap_proto::secret::{self, SecretKind};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::config::ControlConfig;
use crate::crypto::Sealer;
use crate::grpc::Api;
use crate::service::Control;
use crate::store::{PgStore, SqliteStore, Store, TimedStore};
use crate::tls::{FleetIdentity, PeerCertificate, ServerTls};
use tracing::Instrument as _;

/// Opens the store a database URL names: `postgres://` / `postgresql://`
/// for PostgreSQL, `sqlite:` (or a plain file path) for SQLite. Runs
/// migrations.
pub async fn open_store(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> =
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Arc::new(TimedStore(PgStore::connect(url).await?))
        } else {
            Arc::new(TimedStore(SqliteStore::connect(url).await?))
        };
    store.migrate().await?;
    Ok(store)
}

/// Builds `Control` from configuration: store, master key, tokens.
pub async fn build(config: &ControlConfig) -> anyhow::Result<Arc<Control>> {
    let postgres = config.database_url.starts_with("postgres://")
        || config.database_url.starts_with("postgresql://");
    if config.audit_retention_days.is_some() && !postgres {
        anyhow::bail!(
            "--audit-retention-days needs PostgreSQL: SQLite keeps the audit ledger in one table"
        );
    }
    let store = open_store(&config.database_url).await?;
    let mut sealer = match (&config.master_key, &config.master_key_file) {
        (Some(k), _) => Sealer::from_key_text(k)?,
        (None, Some(path)) => Sealer::from_key_file(path)?,
        (None, None) => anyhow::bail!(
            "a master key is required: set KEYCAP_MASTER_KEY or KEYCAP_MASTER_KEY_FILE"
        ),
    };
    for text in &config.previous_master_keys {
        sealer = sealer.with_previous(&Sealer::from_key_text(text)?);
    }
    for path in &config.previous_master_key_files {
        sealer = sealer.with_previous(&Sealer::from_key_file(path)?);
    }
    if config.fleet_token.len() < 24 {
        anyhow::bail!("KEYCAP_FLEET_TOKEN must be at least 24 characters");
    }
    let control = Control::new(
        store,
        sealer,
        &config.fleet_token,
        &config.key_env,
        Duration::from_millis(config.ack_timeout_ms),
        if config.allow_private_upstreams {
            tracing::warn!(
                "--allow-private-upstreams: vendors may point at loopback, private and \
                 link-local addresses and plain http; for tests and keycap dev only"
            );
            crate::domain::UpstreamPolicy::AllowPrivate
        } else {
            crate::domain::UpstreamPolicy::PublicHttps
        },
    )
    .await?;
    control.follow_changes(
        Duration::from_millis(config.change_poll_ms),
        config.change_log_keep,
    );
    control.heartbeat_fleet();
    control.retire_rolled_keys_periodically();
    control.configure_approvals(crate::service::ApprovalSettings {
        ttl: Duration::from_secs(config.approvals.ttl_secs),
        public_url: config.approvals.public_url.clone(),
    });
    if config.no_webhook_deliveries {
        tracing::warn!(
            "--no-webhook-deliveries: alert events are stored, not posted, by this replica"
        );
    } else {
        control.deliver_webhooks(
            if config.allow_private_webhooks {
                tracing::warn!(
                    "--allow-private-webhooks: alert webhooks may go to loopback, private and \
                     link-local addresses"
                );
                crate::webhook::delivery::Destinations::AllowPrivate
            } else {
                crate::webhook::delivery::Destinations::PublicOnly
            },
            Duration::from_millis(config.webhook_timeout_ms),
        )?;
    }
    control.sweep_alerts_every(Duration::from_millis(config.rotation_check_ms));
    // Cheap (an indexed read of versions in grace), so a grace ends on time.
    control.retire_credentials_every(Duration::from_secs(1));
    control.checkpoint_ledger_periodically();
    control.maintain_ledger_periodically(config.audit_retention_days);
    if let Some(token) = &config.admin_token {
        if !secret::is_well_formed(SecretKind::AdminToken, token) {
            anyhow::bail!(
                "KEYCAP_ADMIN_TOKEN is not a keycap admin token (kcadm_<env>_... with its \
                 checksum); make one with `keycap admin-token generate`"
            );
        }
        control.record_bootstrap_token(token).await?;
    } else {
        // Not an error: tokens from earlier starts stay valid. But a first
        // start without one leaves an admin API nobody can call.
        tracing::warn!(
            "no KEYCAP_ADMIN_TOKEN given: only admin tokens stored by earlier starts are accepted"
        );
    }
    Ok(control)
}

/// The combined gRPC + REST router. `fleet` says whether fleet calls must
/// also carry a client certificate naming the node.
pub fn router(control: Arc<Control>, fleet: FleetIdentity) -> axum::Router {
    let api = Api::new(control.clone(), fleet);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keycap_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("embedded descriptor set is valid");
    let grpc = tonic::service::Routes::new(
        pb::vendor_service_server::VendorServiceServer::new(api.clone())
            .max_decoding_message_size(crate::rest::MAX_PRICE_FILE_BYTES),
    )
    .add_service(pb::key_service_server::KeyServiceServer::new(api.clone()))
    .add_service(pb::audit_service_server::AuditServiceServer::new(
        api.clone(),
    ))
    .add_service(pb::admin_token_service_server::AdminTokenServiceServer::new(api.clone()))
    .add_service(pb::webhook_service_server::WebhookServiceServer::new(
        api.clone(),
    ))
    .add_service(pb::approval_service_server::ApprovalServiceServer::new(
        api.clone(),
    ))
    .add_service(pb::simulate_service_server::SimulateServiceServer::new(
        api.clone(),
    ))
    .add_service(pb::fleet_hook_service_server::FleetHookServiceServer::new(
        api.clone(),
    ))
    .add_service(pb::suggest_service_server::SuggestServiceServer::new(
        api.clone(),
    ))
    .add_service(pb::credential_service_server::CredentialServiceServer::new(
        api.clone(),
    ))
    .add_service(pb::fleet_service_server::FleetServiceServer::new(api))
    .add_service(reflection)
    .prepare()
    .into_axum_router()
    .layer(axum::middleware::from_fn(grpc_span));
    // REST routes first; everything else is gRPC (whose fallback answers
    // `unimplemented`).
    crate::rest::router(control.clone())
        .merge(crate::ui::router(control))
        .fallback_service(grpc)
}

/// One server span per gRPC call, continuing the caller's W3C trace from
/// its metadata (a proxy's lease grant joins the agent's call this way).
/// Named by service and method, only for keycap's own services, so an
/// unknown path cannot mint span names; counted and timed in `metrics`.
async fn grpc_span(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = req.uri().path().to_string();
    let (service, method) = crate::metrics::rpc_names(&path);
    let started = std::time::Instant::now();
    let span = tracing::info_span!(
        "grpc call",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    keycap_telemetry::continue_trace(&span, req.headers());
    let resp = next.run(req).instrument(span.clone()).await;
    // A failed unary call answers trailers-only: its status is a header.
    let code = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
    span.record("rpc.grpc.status_code", code);
    crate::metrics::METRICS.rpc(&path, code, started.elapsed());
    resp
}

/// How long calls in flight may finish after a shutdown signal. Policy
/// streams never finish on their own, so without a bound a control plane
/// with a proxy attached would never exit.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves until `shutdown` resolves, then stops accepting, lets calls in
/// flight finish for at most `SHUTDOWN_GRACE` and runs the alert checks
/// their spend left waiting (`Control::finish_alert_checks`). With `tls`,
/// every connection is TLS; each handshake runs in its connection's own
/// task (a failed or slow one holds up nobody else), and a client
/// certificate it verified is put into every request's extensions as a
/// `PeerCertificate`.
pub async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let fleet = tls.as_ref().map_or(FleetIdentity::TokenOnly, |t| t.fleet);
    let mut app = router(control.clone(), fleet);
    if tls.is_some() {
        // Dashboard session cookies are `Secure` under TLS.
        app = app.layer(axum::Extension(crate::ui::Tls));
    }
    let acceptor = tls.map(|t| TlsAcceptor::from(t.config));
    tracing::info!(
        addr = %listener.local_addr()?,
        tls = acceptor.is_some(),
        client_certificates = fleet == FleetIdentity::ClientCertificate,
        "keycap-control listening"
    );
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (app, builder, watcher) = (app.clone(), builder.clone(), graceful.watcher());
        let Some(acceptor) = acceptor.clone() else {
            tokio::spawn(serve_connection(builder, watcher, stream, app, None));
            continue;
        };
        tokio::spawn(async move {
            let Some(stream) = keycap_proto::tls::accept(&acceptor, stream).await else {
                return;
            };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| PeerCertificate(leaf.clone().into_owned()));
            serve_connection(builder, watcher, stream, app, peer).await
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("shutdown grace over; closing open streams");
    }
    // Spend already answered may still wait for its alert checks.
    control.finish_alert_checks(SHUTDOWN_GRACE).await;
    Ok(())
}

/// Serves one accepted connection (HTTP/1.1 or HTTP/2, plain or TLS).
async fn serve_connection<I>(
    builder: auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    app: axum::Router,
    peer: Option<PeerCertificate>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = app.map_request(move |mut req: http::Request<hyper::body::Incoming>| {
        if let Some(peer) = &peer {
            req.extensions_mut().insert(peer.clone());
        }
        req
    });
    let conn = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn audit_retention_is_refused_on_sqlite() {
        let config = ControlConfig {
            metrics_listen: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            database_url: "sqlite::memory:".into(),
            master_key: Some(crate::crypto::Sealer::generate_key_text()),
            master_key_file: None,
            previous_master_keys: Vec::new(),
            previous_master_key_files: Vec::new(),
            admin_token: None,
            fleet_token: secret::generate(SecretKind::FleetToken, "test"),
            key_env: "test".into(),
            change_poll_ms: 250,
            change_log_keep: 100_000,
            ack_timeout_ms: 2000,
            audit_retention_days: Some(30),
            allow_private_upstreams: false,
            allow_private_webhooks: false,
            webhook_timeout_ms: 10_000,
            rotation_check_ms: 60_000,
            no_webhook_deliveries: false,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            approvals: Default::default(),
        };
        let err = build(&config).await.err().expect("refused");
        assert!(err.to_string().contains("needs PostgreSQL"), "{err}");
        let config = ControlConfig {
            audit_retention_days: None,
            ..config
        };
        assert!(build(&config).await.is_ok());
    }
}
