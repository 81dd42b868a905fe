//! Wiring: opens the store, builds `Control`, and serves gRPC (with
//! reflection) and the REST mapping on one listener. gRPC requests are told
//! apart by content type inside the combined router.

use std::future::Future;
use std::sync::Arc;

use keycap_proto::pb;
use keycap_proto::secret::{self, SecretKind};
use tokio::net::TcpListener;

use crate::config::ControlConfig;
use crate::crypto::Sealer;
use crate::grpc::Api;
use crate::service::Control;
use crate::store::{PgStore, SqliteStore, Store};

/// Opens the store a database URL names: `postgres://` / `postgresql://`
/// for PostgreSQL, `sqlite:` (or a plain file path) for SQLite. Runs
/// migrations.
pub async fn open_store(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> =
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Arc::new(PgStore::connect(url).await?)
        } else {
            Arc::new(SqliteStore::connect(url).await?)
        };
    store.migrate().await?;
    Ok(store)
}

/// Builds `Control` from configuration: store, master key, tokens.
pub async fn build(config: &ControlConfig) -> anyhow::Result<Arc<Control>> {
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
    let control = Control::new(store, sealer, &config.fleet_token, &config.key_env).await?;
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

/// The combined gRPC + REST router.
pub fn router(control: Arc<Control>) -> axum::Router {
    let api = Api::new(control.clone());
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(keycap_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("embedded descriptor set is valid");
    let grpc = tonic::service::Routes::new(pb::vendor_service_server::VendorServiceServer::new(
        api.clone(),
    ))
    .add_service(pb::key_service_server::KeyServiceServer::new(api.clone()))
    .add_service(pb::audit_service_server::AuditServiceServer::new(
        api.clone(),
    ))
    .add_service(pb::admin_token_service_server::AdminTokenServiceServer::new(api.clone()))
    .add_service(pb::fleet_service_server::FleetServiceServer::new(api))
    .add_service(reflection)
    .prepare()
    .into_axum_router();
    // REST routes first; everything else is gRPC (whose fallback answers
    // `unimplemented`).
    crate::rest::router(control).fallback_service(grpc)
}

/// How long calls in flight may finish after a shutdown signal. Policy
/// streams never finish on their own, so without a bound a control plane
/// with a proxy attached would never exit.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves until `shutdown` resolves, then lets calls in flight finish for
/// at most `SHUTDOWN_GRACE`.
pub async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "keycap-control listening");
    let (signalled, stopping) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(control)).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = signalled.send(());
    });
    tokio::select! {
        done = server => done?,
        _ = async {
            if stopping.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => tracing::info!("shutdown grace over; closing open streams"),
    }
    Ok(())
}
