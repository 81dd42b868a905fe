//! `keycap-proxy`: runs one data-plane node.

use clap::Parser;

#[derive(Parser)]
#[command(name = "keycap-proxy", version, about = "keycap data-plane proxy")]
struct Cli {
    #[command(flatten)]
    config: keycap_proxy::config::ProxyConfig,
    /// How log lines are written: text, or JSON with trace and span ids.
    #[arg(long, value_enum, env = "KEYCAP_LOG_FORMAT", default_value = "text")]
    log_format: keycap_telemetry::LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = keycap_telemetry::init("keycap-proxy", cli.log_format, "info")?;
    let listener = tokio::net::TcpListener::bind(cli.config.listen).await?;
    // Registered before anything serves, so a SIGTERM from the first
    // moment starts a drain instead of killing the process.
    let shutdown = shutdown_signal()?;
    let served = keycap_proxy::run(cli.config, listener, shutdown).await;
    telemetry.shutdown();
    served
}

/// Ctrl-C or SIGTERM (what `docker stop` and Kubernetes send): either
/// starts the drain in `keycap_proxy::run`.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! { _ = term.recv() => {}, _ = interrupt.recv() => {} }
    })
}
