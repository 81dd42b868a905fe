//! `keycap-control`: runs the control plane.

use clap::Parser;

#[derive(Parser)]
#[command(name = "keycap-control", version, about = "keycap control plane")]
struct Cli {
    #[command(flatten)]
    config: keycap_control::config::ControlConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEYCAP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let tls = keycap_control::tls::ServerTls::from_config(&cli.config)?;
    let control = keycap_control::server::build(&cli.config).await?;
    let listener = tokio::net::TcpListener::bind(cli.config.listen).await?;
    keycap_control::server::serve(listener, control, tls, shutdown_signal()).await
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
