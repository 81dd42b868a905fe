//! `keycap-proxy`: runs one data-plane node.

use clap::Parser;

#[derive(Parser)]
#[command(name = "keycap-proxy", version, about = "keycap data-plane proxy")]
struct Cli {
    #[command(flatten)]
    config: keycap_proxy::config::ProxyConfig,
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
    let listener = tokio::net::TcpListener::bind(cli.config.listen).await?;
    keycap_proxy::run(cli.config, listener, shutdown_signal()).await
}

/// Ctrl-C or SIGTERM (what `docker stop` and Kubernetes send): either
/// starts the drain in `keycap_proxy::run`.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
