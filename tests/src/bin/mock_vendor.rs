//! `keycap-mock-vendor`: the end-to-end tests' mock vendor as a standalone
//! server, for benchmarks and manual runs against a local keycap.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "keycap-mock-vendor",
    about = "A Stripe- and OpenAI-like mock vendor that checks the injected credential"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// The credential keycap must inject (`Authorization: Bearer <credential>`).
    #[arg(long, env = "KEYCAP_MOCK_CREDENTIAL", hide_env_values = true)]
    credential: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    println!(
        "keycap-mock-vendor listening on http://{}",
        listener.local_addr()?
    );
    keycap_tests::mock::serve(listener, &cli.credential, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
