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

pub mod admission;
pub mod approval;
pub mod body;
pub mod budget;
pub mod check;
pub mod client_addr;
pub mod config;
pub mod context;
pub mod edge;
pub mod spool;
pub use keycap_proto::endpoint;
// What each vendor means (pricing, settlement streams, refusal envelopes)
// lives in keycap-vendors, shared with the control plane.
pub use keycap_vendors::{body_headers, envelope, pricing, sse};
pub mod error;
pub mod fleet;
pub mod hooks;
pub mod idempotency;
pub mod lookup;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod refusals;
pub mod scrub;
pub mod spend;
pub mod target;
pub mod tightening;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::config::ProxyConfig;
use crate::pricing::{load_table, Catalog, TokenPrices, TwilioPrices};

/// After shutdown is asked for: how long calls in flight get to finish, and
/// then how long undelivered spend events get to reach the control plane.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Requests one HTTP/2 connection may have open at once. Each can hold a
/// head and a body in memory, so this bounds what one connection (one
/// `--max-connections` slot) holds; agents rarely run more in parallel.
const H2_MAX_STREAMS: u32 = 100;

/// Starts a proxy on `listener` and serves until `shutdown` resolves, then
/// stops accepting, lets calls in flight finish (up to a grace period) and
/// delivers their spend events before returning.
///
/// Agents are served by `serve_threads` threads, each running its own
/// single-threaded runtime with its own connections and upstream pool and
/// accepting from the shared listener, so a call's client side, vendor side
/// and settlement run on one thread without waking another. Policy, budget
/// and spend delivery are shared and run on the caller's runtime.
pub async fn run(
    config: ProxyConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // With a spool and no --node-id, the id kept in the spool: a restart
    // must be the same node to find the leases its previous run held.
    let node_id = match (&config.node_id, &config.spool_dir) {
        (None, Some(dir)) => spool::remembered_node_id(dir)?,
        _ => config.node_id(),
    };
    let mut prices = Catalog::builtin();
    if let Some(path) = &config.openai_prices {
        prices.openai = Arc::new(load_table(path, TokenPrices::from_json)?);
    }
    if let Some(path) = &config.anthropic_prices {
        prices.anthropic = Arc::new(load_table(path, TokenPrices::from_json)?);
    }
    if let Some(path) = &config.twilio_prices {
        prices.twilio = load_table(path, TwilioPrices::from_json)?;
    }
    let tls = config.tls()?;
    let cache = policy::PolicyCache::new(prices);
    let fleet = fleet::Fleet::new(
        &config.control_urls,
        &config.fleet_token,
        &node_id,
        tls.control.clone(),
    )?;
    let budget = budget::Budget::new(Arc::new(fleet.clone()), &node_id);
    let lookup = lookup::KeyLookup::new(Arc::new(fleet.clone()), cache.clone());
    let approvals: Arc<dyn approval::ApprovalDesk> = Arc::new(fleet.clone());
    // Whether what a previous run left is settled: its spend delivered and
    // its leases handed back. `/healthz` waits for it.
    let spooled = config.spool_dir.is_some();
    let (settled_tx, settled) = watch::channel(!spooled);
    let spool = match &config.spool_dir {
        Some(dir) => {
            let (spool, recovered) = spool::Spool::open(dir, budget.run())?;
            let spool = Arc::new(spool);
            fleet.report_spool_depth(spool.clone());
            let previous_run = recovered.previous_run.clone();
            let (sink, replayed, previous) = (fleet.clone(), spool.clone(), budget.clone());
            tokio::spawn(async move {
                spend::replay(recovered, Arc::new(sink), replayed).await;
                // Everything the previous run spent is reported now: the
                // rest of its leases goes back instead of waiting out
                // their hour.
                if let Some(run) = previous_run {
                    previous.return_previous_run(&run).await;
                }
                let _ = settled_tx.send(true);
            });
            Some(spool)
        }
        None => {
            tracing::warn!("no --spool-dir: spend not yet delivered is lost if this proxy dies");
            None
        }
    };
    let (spend, delivery) = spend::SpendReporter::start(Arc::new(fleet.clone()), spool);
    let gone_budget = budget.clone();
    tokio::spawn(fleet::acknowledge_policy(
        fleet.clone(),
        cache.subscribe_applied(),
        cache.clone(),
    ));
    let control = fleet.replicas().clone();
    let readiness = proxy::Readiness {
        policy: cache.clone(),
        previous_run_settled: settled,
        control_plane_connected: {
            let fleet = fleet.clone();
            Arc::new(move || fleet.connected())
        },
        budget: budget.clone(),
    };
    tokio::spawn(fleet::watch_policy(fleet, cache.clone(), move |gone| {
        let b = gone_budget.clone();
        tokio::spawn(async move {
            for id in gone {
                b.forget_key(&id).await;
            }
        });
    }));
    let threads = match config.serve_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    tracing::info!(addr = %listener.local_addr()?, node = %node_id, threads, "keycap-proxy listening");
    let listener = listener.into_std()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    // Every thread's state is built before any thread serves, so a slow
    // step (loading the system's root certificates) never leaves a proxy
    // half started while agents are already being answered.
    let idempotency = idempotency::IdempotencyMemory::new();
    let tightening = tightening::Tightening::new();
    let rate_limiter = ratelimit::RateLimiter::new();
    let refusals = refusals::RefusalTally::new();
    let (refusals_stop, refusals_stopped) = watch::channel(false);
    let refusal_reports = tokio::spawn(refusals::report(
        refusals.clone(),
        spend.clone(),
        refusals_stopped,
    ));
    let metrics = metrics::Metrics::new(
        cache.clone(),
        metrics::Gauges {
            leases: {
                let budget = budget.clone();
                Arc::new(move || budget.held(chrono::Utc::now()))
            },
            pending_spend: spend.pending(),
            control_plane_connected: readiness.control_plane_connected.clone(),
        },
    );
    if let Some(addr) = config.metrics_listen {
        let metrics_listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %metrics_listener.local_addr()?, "metrics listening");
        let mut stop = stop_rx.clone();
        let ready = readiness.clone();
        tokio::spawn(metrics::serve(
            metrics_listener,
            metrics.clone(),
            Arc::new(move || ready.check()),
            async move {
                let _ = stop.wait_for(|stopping| *stopping).await;
            },
        ));
    }
    let unauthenticated = admission::UnauthenticatedShare::of(config.max_connections);
    let proxies = (0..threads)
        .map(|_| {
            Ok(Arc::new(proxy::Proxy {
                policy: cache.clone(),
                readiness: readiness.clone(),
                lookup: lookup.clone(),
                approvals: approvals.clone(),
                budget: budget.clone(),
                spend: spend.clone(),
                vendors: proxy::VendorClients::new(tls.upstream.clone()),
                control_client: proxy::http_client(tls.control.clone()),
                control: control.clone(),
                node_id: node_id.clone(),
                max_body_bytes: config.max_body_bytes,
                body_pace: config.body_pace(),
                unauthenticated: unauthenticated.clone(),
                max_response_bytes: config.max_response_bytes,
                upstream_timeout: Duration::from_secs(config.upstream_timeout_secs),
                idempotency: idempotency.clone(),
                tightening: tightening.clone(),
                zone: config.zone.clone(),
                trusted_proxies: config.trusted_proxies.clone(),
                rate_limiter: rate_limiter.clone(),
                refusals: refusals.clone(),
                metrics: metrics.clone(),
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let limits = ConnLimits {
        header_read_timeout: Duration::from_secs(config.header_read_timeout_secs),
        slots: Arc::new(Semaphore::new(
            usize::try_from(config.max_connections)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS),
        )),
    };
    let acceptor = tls.listener.map(tokio_rustls::TlsAcceptor::from);
    for (i, proxy) in proxies.into_iter().enumerate() {
        let listener = listener.try_clone()?;
        let acceptor = acceptor.clone();
        let limits = limits.clone();
        let stop = stop_rx.clone();
        let ended = ended_tx.clone();
        std::thread::Builder::new()
            .name(format!("keycap-serve-{i}"))
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(serve(listener, acceptor, proxy, limits, stop)));
                let _ = ended.send(served);
            })?;
    }
    // From here only the serving threads hold reporters: once they have
    // ended, delivery drains the queue and stops.
    drop((spend, ended_tx, listener));
    let outcome = tokio::select! {
        _ = shutdown => Ok(()),
        ended = ended_rx.recv() => match ended {
            Some(Err(e)) => Err(e),
            _ => Err(anyhow::anyhow!("a serving thread stopped")),
        },
    };
    let _ = stop_tx.send(true);
    while ended_rx.recv().await.is_some() {}
    // No call is refused any more: the refusals counted in the running
    // minute go to the ledger with the rest of the spend.
    let _ = refusals_stop.send(true);
    if let Err(e) = refusal_reports.await {
        tracing::error!(error = %e, "refusal reports did not finish");
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, delivery)
        .await
        .is_err()
    {
        if spooled {
            tracing::warn!(
                "control plane unreachable at shutdown; spend not yet delivered stays in the \
                 spool and is delivered when this proxy starts again"
            );
        } else {
            tracing::warn!("control plane unreachable at shutdown; spend events still queued are lost (no --spool-dir)");
        }
    }
    outcome
}

/// What every serving thread shares about agent connections.
#[derive(Clone)]
struct ConnLimits {
    header_read_timeout: Duration,
    /// One permit per open connection (`--max-connections`): a thread
    /// takes one before it accepts, so connections past the cap wait in
    /// the listen backlog instead of being read.
    slots: Arc<Semaphore>,
}

/// One serving thread: accepts until told to stop, then gives connections
/// in flight up to `SHUTDOWN_GRACE` to finish.
async fn serve(
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    proxy: Arc<proxy::Proxy>,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(edge::MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(edge::H2_MAX_HEADER_LIST)
        .max_concurrent_streams(H2_MAX_STREAMS);
    // Every connection's task holds a sender: once all are gone (and ours
    // is dropped), `recv` answers None.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    loop {
        let slot = tokio::select! {
            slot = limits.slots.clone().acquire_owned() => slot?,
            _ = stop.wait_for(|stopping| *stopping) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|stopping| *stopping) => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            proxy: proxy.clone(),
            peer,
            builder: builder.clone(),
            stop: stop.clone(),
            header_read_timeout: limits.header_read_timeout,
        };
        let tls = tls.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            match tls {
                None => conn.serve(stream).await,
                Some(tls) => {
                    if let Some(s) = keycap_proto::tls::accept(&tls, stream).await {
                        conn.serve(s).await
                    }
                }
            }
            drop((slot, open));
        });
    }
    drop((listener, open_tx));
    if tokio::time::timeout(SHUTDOWN_GRACE, open_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("calls still in flight at shutdown were cut off");
    }
    Ok(())
}

/// One accepted agent connection, ready to be served once its transport
/// (plain or TLS) is.
struct Conn {
    proxy: Arc<proxy::Proxy>,
    peer: std::net::SocketAddr,
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    stop: watch::Receiver<bool>,
    header_read_timeout: Duration,
}

impl Conn {
    /// Serves requests whose heads were checked first (HTTP/1 by `edge`
    /// before hyper parses them, HTTP/2 once decoded), until the
    /// connection ends. It is shut down gracefully (HTTP/2: GOAWAY, and
    /// open streams finish) when the proxy stops or when it has had no
    /// request in flight for the header read timeout; if it then stays
    /// open that long again with nothing in flight (an HTTP/2 client that
    /// never answers the shutdown's PING), it is dropped.
    async fn serve<S>(self, io: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (io, edge) = edge::CheckedConn::new(io, self.header_read_timeout);
        let (proxy, peer) = (self.proxy, self.peer);
        let activity = admission::Activity::new();
        let requests = activity.clone();
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let in_flight = requests.begin();
            let version = req.version();
            let refusal = if version == http::Version::HTTP_2 {
                edge::check_h2_head(&req)
            } else {
                edge.refusal_for_next()
            };
            let proxy = proxy.clone();
            async move {
                let resp = match refusal {
                    Some(r) => r.into_response(version),
                    None => proxy.handle(req, peer).await?,
                };
                Ok::<_, std::convert::Infallible>(
                    resp.map(|b| admission::InFlightBody::new(b, in_flight).boxed_unsync()),
                )
            }
        });
        let conn = self.builder.serve_connection(TokioIo::new(io), svc);
        let mut conn = std::pin::pin!(conn);
        let idle = activity.idle_for(self.header_read_timeout);
        let mut idle = std::pin::pin!(idle);
        let mut stop = self.stop;
        let mut closing = false;
        loop {
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = stop.wait_for(|stopping| *stopping), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = &mut idle => {
                    if closing {
                        return;
                    }
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    idle.set(activity.idle_for(self.header_read_timeout));
                }
            }
        }
    }
}
