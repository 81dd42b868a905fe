//! `keycap-control`: runs the control plane.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "keycap-control", version, about = "keycap control plane")]
struct Cli {
    #[command(flatten)]
    config: keycap_control::config::ControlConfig,
    /// How log lines are written: text, or JSON with trace and span ids.
    #[arg(long, value_enum, env = "KEYCAP_LOG_FORMAT", default_value = "text")]
    log_format: keycap_telemetry::LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = keycap_telemetry::init("keycap-control", cli.log_format, "info")?;
    let tls = keycap_control::tls::ServerTls::from_config(&cli.config)?;
    let control = keycap_control::server::build(&cli.config).await?;
    let listener = tokio::net::TcpListener::bind(cli.config.listen).await?;
    if let Some(addr) = cli.config.metrics_listen {
        let metrics = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(addr = %metrics.local_addr()?, "metrics listening");
        let router = keycap_control::metrics::router(control.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(metrics, router).await {
                tracing::error!(error = %e, "metrics listener stopped");
            }
        });
    }
    let served = keycap_control::server::serve(listener, control, tls, shutdown_signal()).await;
    telemetry.shutdown();
    served
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
