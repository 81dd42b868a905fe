//! keycap-proxy: the data plane.
//!
//! A hyper reverse proxy that takes an agent's call to `/{vendor}/{path}`,
//! checks its vault key against the policy streamed from the control plane,
//! prices the call and reserves that amount against the key's budget lease
//! *before* forwarding, injects the vendor's real credential, streams the
//! response back, settles the real cost and reports a spend event. It never
//! forwards a call it could not price or authenticate.
//!
//! Reading order: `target` (where a request may go), `endpoint` (what a key
//! may call), `pricing` (what a call costs), then the request path.

#![forbid(unsafe_code)]

pub mod body;
pub mod budget;
pub mod config;
pub use keycap_proto::endpoint;
pub mod error;
pub mod fleet;
pub mod policy;
pub mod pricing;
pub mod proxy;
pub mod spend;
pub mod sse;
pub mod target;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::config::ProxyConfig;
use crate::pricing::OpenAiPrices;

/// Starts a proxy on `listener` and serves until `shutdown` resolves.
pub async fn run(
    config: ProxyConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node_id = config.node_id();
    let prices = match &config.openai_prices {
        Some(path) => OpenAiPrices::load(path)?,
        None => OpenAiPrices::builtin(),
    };
    let cache = policy::PolicyCache::new(Arc::new(prices));
    let fleet = fleet::Fleet::new(&config.control_url, &config.fleet_token, &node_id)?;
    let budget = budget::Budget::new(Arc::new(fleet.clone()), &node_id);
    let spend = spend::SpendReporter::start(Arc::new(fleet.clone()));
    let gone_budget = budget.clone();
    tokio::spawn(fleet::watch_policy(fleet, cache.clone(), move |gone| {
        let b = gone_budget.clone();
        tokio::spawn(async move {
            for id in gone {
                b.forget_key(&id).await;
            }
        });
    }));
    let proxy = Arc::new(proxy::Proxy {
        policy: cache,
        budget,
        spend,
        client: proxy::http_client()?,
        control_url: config.control_url.clone(),
        node_id: node_id.clone(),
        max_body_bytes: config.max_body_bytes,
        max_response_bytes: config.max_response_bytes,
        upstream_timeout: Duration::from_secs(config.upstream_timeout_secs),
    });
    tracing::info!(addr = %listener.local_addr()?, node = %node_id, "keycap-proxy listening");
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
            _ = &mut shutdown => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| proxy.clone().handle(req));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024);
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}
