//! `keycap-otlp-sink ADDR`: an OTLP/gRPC trace collector on ADDR (on
//! 127.0.0.1) that counts the spans it is sent and keeps none, for
//! bench/run.sh's runs with tracing on. Prints the count every second
//! while it grows, so the bench can say how many spans a run exported.

use std::time::Duration;

use keycap_tests::otlp::SpanCounter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: keycap-otlp-sink ADDR (e.g. 127.0.0.1:4317)"))?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let counter = SpanCounter::default();
    let serving = tokio::spawn(counter.clone().serve(listener));
    println!("otlp sink on {addr}");
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
