//! `keycap-otlp-sink ADDR [--delay-ms N]`: an OTLP/gRPC trace collector on
//! ADDR (on 127.0.0.1) that counts the spans it is sent and keeps none, for
//! bench/run.sh's runs with tracing on. With `--delay-ms` it answers each
//! export only after N milliseconds: a slow collector. Prints the count
//! every second while it grows, so the bench can say how many spans a run
//! exported.

use std::time::Duration;

use keycap_tests::otlp::SpanCounter;

const USAGE: &str = "usage: keycap-otlp-sink ADDR [--delay-ms N] (e.g. 127.0.0.1:4317)";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().ok_or_else(|| anyhow::anyhow!(USAGE))?;
    let delay = match (args.next().as_deref(), args.next()) {
        (None, _) => Duration::ZERO,
        (Some("--delay-ms"), Some(ms)) => Duration::from_millis(
            ms.parse()
                .map_err(|_| anyhow::anyhow!("--delay-ms takes milliseconds; {USAGE}"))?,
        ),
        _ => anyhow::bail!(USAGE),
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let counter = SpanCounter::answering_after(delay);
    let serving = tokio::spawn(counter.clone().serve(listener));
    println!("otlp sink on {addr}, answering after {delay:?}");
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if serving.is_finished() {
            anyhow::bail!("the OTLP server stopped");
        }
        let now = counter.count();
        if now != last {
            println!("spans {now}");
            last = now;
        }
    }
}
