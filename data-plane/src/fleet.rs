//! The proxy's side of the fleet API: authenticated gRPC clients to the
//! control-plane replicas, the policy watch loop (reconnect with backoff,
//! resume from the last applied version) and the lease calls the budget
//! makes.
//!
//! A proxy may be given several replicas. Calls go to one of them (the
//! current replica) until it stops answering; then they move to the next in
//! the operator's order. A policy stream that falls silent (no heartbeat for
//! `STREAM_STALL`) counts as a replica that stopped answering. While away
//! from its first replica (its home), the proxy checks every `HOME_RETRY`
//! whether home serves again and moves back, opening the new stream before
//! it drops the old one, so it is never without a registered stream. Lease
//! grants, returns and spend reports carry ids the control plane applies
//! once, so a call retried on another replica after a lost answer is never
//! applied twice. This module never retries a call the control plane
//! answered with a refusal.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keycap_proto::pb::{self, fleet_service_client::FleetServiceClient};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tracing::Instrument as _;

use crate::policy::PolicyCache;

/// How long a lease grant or return may take before the replica counts as
/// unavailable for it.
const LEASE_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a spend report (up to a thousand events, one transaction) may
/// take before it is resent, possibly to another replica.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on an otherwise silent connection, so a replica that went
/// away without closing it (a partition, a stopped host) ends the policy
/// stream instead of leaving it open and mute forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// A policy stream silent this long, after it has shown it sends
/// heartbeats (a quarter second apart), belongs to a replica that stopped:
/// a frozen process or a partition that leaves the connection open.
const STREAM_STALL: Duration = Duration::from_secs(1);
/// How long a replica gets to open a policy stream and send its first
/// message (a heartbeat, sent at once) before it counts as away.
const STREAM_OPEN: Duration = Duration::from_secs(3);
/// While on another replica, how often the proxy tries its home replica
/// again, so a fleet that failed over spreads back once home returns.
const HOME_RETRY: Duration = Duration::from_secs(5);
/// How long the home replica gets to answer a check, and then to open the
/// stream the proxy moves to: while it opens, the old stream is not read.
const HOME_SWITCH: Duration = Duration::from_millis(500);
/// How long a key lookup may take; the agent waits for it.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct FleetAuth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for FleetAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        // The control plane's spans for this call join the caller's trace.
        keycap_telemetry::inject_grpc(req.metadata_mut());
        Ok(req)
    }
}

pub type Client = FleetServiceClient<InterceptedService<Channel, FleetAuth>>;

/// The control-plane replicas, in the operator's order, and which one calls
/// go to now. Cheap to clone; clones share the current replica.
#[derive(Clone)]
pub struct Replicas<C> {
    members: Arc<[C]>,
    current: Arc<AtomicUsize>,
}

impl<C: Clone> Replicas<C> {
    /// Replicas in this order, the first one current. Needs at least one.
    pub fn new(members: Vec<C>) -> Self {
        assert!(!members.is_empty(), "at least one control-plane replica");
        Replicas {
            members: members.into(),
            current: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Moves calls to replica `i` (the policy stream moved there).
    pub fn set_current(&self, i: usize) {
        self.current
            .store(i % self.members.len(), Ordering::Relaxed);
    }

    /// The replica calls go to now, with its index.
    pub fn current(&self) -> (usize, C) {
        let i = self.current.load(Ordering::Relaxed) % self.members.len();
        (i, self.members[i].clone())
    }

    /// Replica `failed` did not answer: later calls start at the one after
    /// it. When another caller has already moved on from `failed`, nothing
    /// changes, so many calls failing on one replica move the fleet client
    /// one step, not one step each.
    pub fn fail_over(&self, failed: usize) {
        let next = (failed + 1) % self.members.len();
        let _ = self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Runs `call` on the current replica and, each time it fails with an
    /// error `unavailable` says is the replica's absence rather than an
    /// answer, on the next one, trying every replica at most once. Returns
    /// the first answer, or the last replica's error.
    pub async fn call<T, E, F, Fut>(
        &self,
        mut call: F,
        unavailable: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (start, _) = self.current();
        let n = self.members.len();
        let mut tried = 0;
        loop {
            let i = (start + tried) % n;
            match call(self.members[i].clone()).await {
                Err(e) if unavailable(&e) && tried + 1 < n => {
                    self.fail_over(i);
                    tried += 1;
                }
                Err(e) => {
                    if unavailable(&e) {
                        self.fail_over(i);
                    }
                    return Err(e);
                }
                ok => return ok,
            }
        }
    }
}

/// Whether a failed fleet call says the replica is away (not reachable, not
/// answering in time, its connection cut) rather than answering: only then
/// is the same call worth sending to another replica. `Internal` counts as
/// away too: a replica whose database connection broke says so, and another
/// one may still reach the database; the call applies once either way.
pub fn replica_unavailable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
    )
}

/// One replica: its URL (for the `/vault/*` relay and logs) and a lazily
/// connected fleet client.
#[derive(Clone)]
pub struct Replica {
    pub url: Arc<str>,
    client: Client,
    /// The same channel and credentials, for `FleetHookService`.
    hook_client: HookClient,
}

pub type HookClient =
    pb::fleet_hook_service_client::FleetHookServiceClient<InterceptedService<Channel, FleetAuth>>;

impl Replica {
    /// This replica's inbound-hook calls (`crate::hooks`).
    pub fn hook_client(&self) -> HookClient {
        self.hook_client.clone()
    }
}

/// A cheap-to-clone handle on the control plane's fleet API.
#[derive(Clone)]
pub struct Fleet {
    replicas: Replicas<Replica>,
    pub node_id: String,
    /// Whether a policy stream from some replica is open and beating: the
    /// proxy's connection to the control plane (readiness, metrics).
    connected: Arc<AtomicBool>,
    /// The spend spool, once opened: its depth goes with every spend report.
    spool: Arc<std::sync::OnceLock<Arc<crate::spool::Spool>>>,
}

impl Fleet {
    /// A lazily connected channel to each of `control_urls`: over `tls`
    /// (which carries this node's client certificate, if it has one) when
    /// the URL is `https://`, plain HTTP/2 otherwise.
    pub fn new(
        control_urls: &[String],
        fleet_token: &str,
        node_id: &str,
        tls: rustls::ClientConfig,
    ) -> anyhow::Result<Self> {
        let mut value: tonic::metadata::MetadataValue<_> =
            format!("Bearer {fleet_token}").parse()?;
        value.set_sensitive(true);
        let auth = FleetAuth(value);
        let mut replicas = Vec::with_capacity(control_urls.len());
        for url in control_urls {
            let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            // gRPC needs HTTP/2, so only `h2` is offered by ALPN.
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http2()
                .wrap_connector(http);
            let channel = Endpoint::from_shared(url.clone())?
                .connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .connect_with_connector_lazy(connector);
            replicas.push(Replica {
                url: url.as_str().into(),
                hook_client:
                    pb::fleet_hook_service_client::FleetHookServiceClient::with_interceptor(
                        channel.clone(),
                        auth.clone(),
                    ),
                client: FleetServiceClient::with_interceptor(channel, auth.clone()),
            });
        }
        anyhow::ensure!(!replicas.is_empty(), "no control-plane URL");
        Ok(Fleet {
            replicas: Replicas::new(replicas),
            node_id: node_id.to_string(),
            connected: Arc::default(),
            spool: Arc::default(),
        })
    }

    /// Whether a replica's policy stream is open now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Reports `spool`'s depth with every spend report from now on (every
    /// clone of this `Fleet` does).
    pub fn report_spool_depth(&self, spool: Arc<crate::spool::Spool>) {
        let _ = self.spool.set(spool);
    }

    /// The current replica's client.
    pub fn client(&self) -> Client {
        self.replicas.current().1.client
    }

    /// Replica `i`'s URL, for logs.
    fn url(&self, i: usize) -> &str {
        &self.replicas.members[i].url
    }

    /// Asks the control plane for the key whose secret hashes to
    /// `key_hash` (see `lookup`).
    pub async fn lookup_key(&self, key_hash: [u8; 32]) -> Result<pb::LookupKeyResponse, Status> {
        self.call("lookup_key", |mut c| {
            let mut r = Request::new(pb::LookupKeyRequest {
                node_id: self.node_id.clone(),
                key_hash: key_hash.to_vec(),
            });
            r.set_timeout(LOOKUP_TIMEOUT);
            async move { Ok(c.lookup_key(r).await?.into_inner()) }
        })
        .await
    }

    /// The leases granted to this node that still count against caps.
    pub async fn list_leases(&self) -> Result<Vec<pb::NodeLease>, Status> {
        self.call("list_leases", |mut c| {
            let mut r = Request::new(pb::ListLeasesRequest {
                node_id: self.node_id.clone(),
            });
            r.set_timeout(LEASE_CALL_TIMEOUT);
            async move { Ok(c.list_leases(r).await?.into_inner().leases) }
        })
        .await
    }

    /// Holds a call for approval (see `approval`).
    pub async fn request_approval(
        &self,
        mut req: pb::RequestApprovalRequest,
    ) -> Result<pb::RequestApprovalResponse, Status> {
        req.node_id = self.node_id.clone();
        self.call("request_approval", |mut c| {
            let mut r = Request::new(req.clone());
            r.set_timeout(LEASE_CALL_TIMEOUT);
            async move { Ok(c.request_approval(r).await?.into_inner()) }
        })
        .await
    }

    /// Uses an approval for a retry (see `approval`). A call that fails
    /// with the replica unavailable may have used it anyway: asked again
    /// (here, on the next replica) under the same event id, the control
    /// plane answers that this call used it; any other call is refused.
    pub async fn consume_approval(
        &self,
        mut req: pb::ConsumeApprovalRequest,
    ) -> Result<pb::ConsumeApprovalResponse, Status> {
        req.node_id = self.node_id.clone();
        self.call("consume_approval", |mut c| {
            let mut r = Request::new(req.clone());
            r.set_timeout(LEASE_CALL_TIMEOUT);
            async move { Ok(c.consume_approval(r).await?.into_inner()) }
        })
        .await
    }

    pub fn replicas(&self) -> &Replicas<Replica> {
        &self.replicas
    }

    /// Runs a fleet call on the current replica, moving to the next while
    /// replicas are unavailable.
    async fn call<T, F, Fut>(&self, what: &'static str, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.replicas
            .call(
                |r: Replica| {
                    let fut = call(r.client);
                    async move {
                        let out = fut.await;
                        if let Err(s) = &out {
                            if replica_unavailable(s) {
                                tracing::warn!(replica = %r.url, call = what, code = ?s.code(), "control-plane replica unavailable");
                            }
                        }
                        out
                    }
                },
                replica_unavailable,
            )
            .await
    }
}

/// Follows the control plane's policy stream forever: applies the snapshot
/// and deltas, hands keys that went away to `on_gone`, and when the stream
/// breaks, falls silent or cannot be opened moves to the next replica, with
/// capped exponential backoff, resuming from the last applied version.
/// Away from its home replica (the first), it moves back once home serves
/// again.
pub async fn watch_policy(
    fleet: Fleet,
    cache: Arc<PolicyCache>,
    on_gone: impl Fn(Vec<String>) + Send + Sync + 'static,
) {
    let apply = |update: pb::PolicyUpdate| {
        if matches!(update.update, Some(pb::policy_update::Update::Heartbeat(_))) {
            return;
        }
        let gone = cache.apply(update);
        if !gone.is_empty() {
            on_gone(gone);
        }
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        let (mut replica, _) = fleet.replicas().current();
        match open_stream(&fleet, replica, cache.version(), STREAM_OPEN).await {
            Ok((mut stream, first)) => {
                backoff = Duration::from_millis(50);
                fleet.set_connected(true);
                // Silence is judged once the stream has shown it beats and
                // has brought its first update: a large snapshot may take
                // longer than a second to arrive on a slow link.
                let mut watch = StallWatch::default();
                watch.saw(&first);
                apply(first);
                let mut home_retry =
                    tokio::time::interval_at(tokio::time::Instant::now() + HOME_RETRY, HOME_RETRY);
                // A check that home answers, run while this stream is read.
                let mut probe: Option<futures_util::future::BoxFuture<'static, bool>> = None;
                loop {
                    let away = replica != HOME;
                    let message = async {
                        if watch.armed() {
                            tokio::time::timeout(STREAM_STALL, stream.message()).await
                        } else {
                            Ok(stream.message().await)
                        }
                    };
                    tokio::select! {
                        next = message => match next {
                            Ok(Ok(Some(update))) => {
                                watch.saw(&update);
                                apply(update);
                            }
                            Ok(Ok(None)) => break,
                            Ok(Err(s)) => {
                                if s.code() == Code::OutOfRange {
                                    // Our version is gone from the log:
                                    // start over from a snapshot.
                                    cache.reset_version();
                                }
                                tracing::warn!(replica = %fleet.url(replica), code = ?s.code(), "policy stream ended");
                                break;
                            }
                            Err(_) => {
                                tracing::warn!(replica = %fleet.url(replica), silent_ms = STREAM_STALL.as_millis() as u64, "policy stream fell silent; the replica counts as away");
                                break;
                            }
                        },
                        _ = home_retry.tick(), if away && probe.is_none() => {
                            probe = Some(Box::pin(home_answers(fleet.clone(), cache.clone())));
                        }
                        answers = async { probe.as_mut().expect("probe").await }, if probe.is_some() => {
                            probe = None;
                            if !answers {
                                continue;
                            }
                            // Make before break: the old stream stays open
                            // (and unread, so nothing interleaves) until
                            // home has sent its first message.
                            if let Ok((home, first)) = open_stream(&fleet, HOME, cache.version(), HOME_SWITCH).await {
                                tracing::info!(replica = %fleet.url(HOME), "policy stream back on the home replica");
                                fleet.replicas().set_current(HOME);
                                stream = home;
                                replica = HOME;
                                watch = StallWatch::default();
                                watch.saw(&first);
                                apply(first);
                            }
                        }
                    }
                }
            }
            Err(s) => {
                if s.code() == Code::OutOfRange {
                    cache.reset_version();
                }
                tracing::warn!(replica = %fleet.url(replica), code = ?s.code(), message = s.message(), "cannot watch policy")
            }
        }
        fleet.set_connected(false);
        // The next replica takes over, from the version applied here.
        fleet.replicas().fail_over(replica);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// What a policy stream has shown so far: silence counts against it only
/// once it has sent a heartbeat (so the replica sends them) and its first
/// update.
#[derive(Default)]
struct StallWatch {
    beats: bool,
    updated: bool,
}

impl StallWatch {
    fn saw(&mut self, update: &pb::PolicyUpdate) {
        if is_heartbeat(update) {
            self.beats = true;
        } else {
            self.updated = true;
        }
    }

    fn armed(&self) -> bool {
        self.beats && self.updated
    }
}

/// The replica a proxy prefers: the first the operator named.
const HOME: usize = 0;

fn is_heartbeat(update: &pb::PolicyUpdate) -> bool {
    matches!(update.update, Some(pb::policy_update::Update::Heartbeat(_)))
}

/// Whether the home replica answers a fleet call now: the proxy's applied
/// version acknowledged there (harmless: versions only rise), within
/// `HOME_SWITCH`.
async fn home_answers(fleet: Fleet, policy: Arc<PolicyCache>) -> bool {
    let mut client = fleet.replicas.members[HOME].client.clone();
    let mut req = Request::new(ack_request(&fleet, policy.version(), &policy));
    req.set_timeout(HOME_SWITCH);
    matches!(
        tokio::time::timeout(HOME_SWITCH, client.ack_policy(req)).await,
        Ok(Ok(_))
    )
}

/// Opens a policy stream on replica `i` from `from_version` and reads its
/// first message, within `within`.
async fn open_stream(
    fleet: &Fleet,
    i: usize,
    from_version: i64,
    within: Duration,
) -> Result<(tonic::Streaming<pb::PolicyUpdate>, pb::PolicyUpdate), Status> {
    let mut client = fleet.replicas().members[i].client.clone();
    let req = pb::WatchPolicyRequest {
        node_id: fleet.node_id.clone(),
        from_version,
    };
    let opened = async {
        let mut stream = client.watch_policy(req).await?.into_inner();
        match stream.message().await? {
            Some(first) => Ok((stream, first)),
            None => Err(Status::unavailable("the policy stream ended at once")),
        }
    };
    tokio::time::timeout(within, opened)
        .await
        .map_err(|_| Status::deadline_exceeded(format!("no answer within {within:?}")))?
}

/// Tells the control plane the policy version this proxy has applied (see
/// `PolicyCache::subscribe_applied`), so a change returns once every proxy
/// serves it. Runs beside the watch loop and never holds it up: versions
/// applied while an acknowledgement is on its way collapse into the latest,
/// which is retried with capped backoff until it lands. A newer version
/// drops the acknowledgement in flight and goes to the current replica at
/// once, so one sent to a replica that stopped answering (the stream has
/// moved on) does not hold up the next. Each acknowledgement also carries
/// every vendor the applied policy holds that this proxy cannot serve
/// (`Policy::vendor_errors`), so the admin API shows them.
pub async fn acknowledge_policy(
    fleet: Fleet,
    mut applied: tokio::sync::watch::Receiver<i64>,
    policy: Arc<PolicyCache>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut pending = None;
    loop {
        let version = match pending {
            Some(v) => v,
            None => {
                if applied.changed().await.is_err() {
                    return;
                }
                *applied.borrow_and_update()
            }
        };
        pending = Some(version);
        let mut req = Request::new(ack_request(&fleet, version, &policy));
        req.set_timeout(Duration::from_secs(2));
        let mut client = fleet.client();
        let outcome = tokio::select! {
            sent = client.ack_policy(req) => sent,
            changed = applied.changed() => {
                if changed.is_err() {
                    return;
                }
                pending = Some(*applied.borrow_and_update());
                continue;
            }
        };
        match outcome {
            Ok(_) => {
                pending = None;
                backoff = Duration::from_millis(50);
            }
            // A control plane from before acknowledgements (during a
            // rolling upgrade): retrying cannot help; the next update tries
            // again.
            Err(s) if s.code() == Code::Unimplemented => {
                tracing::debug!(
                    version,
                    "the control plane takes no policy acknowledgements"
                );
                pending = None;
            }
            Err(s) => {
                tracing::warn!(code = ?s.code(), version, "cannot acknowledge the policy version");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    changed = applied.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        pending = Some(*applied.borrow_and_update());
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The acknowledgement of `version`, with the vendors the applied policy
/// holds that this proxy cannot serve: each acknowledgement replaces what
/// the control plane shows for this node.
fn ack_request(fleet: &Fleet, version: i64, policy: &PolicyCache) -> pb::AckPolicyRequest {
    pb::AckPolicyRequest {
        node_id: fleet.node_id.clone(),
        version,
        vendor_errors: policy
            .load()
            .vendor_errors
            .iter()
            .map(|(vendor, error)| pb::VendorLoadError {
                vendor: vendor.clone(),
                error: error.clone(),
            })
            .collect(),
    }
}

/// What the budget needs from the control plane; a trait so the budget's
/// tests can use an in-memory ledger.
#[async_trait]
pub trait LeaseSource: Send + Sync + 'static {
    async fn grant(&self, req: pb::GrantLeaseRequest) -> Result<pb::GrantLeaseResponse, Status>;
    async fn give_back(&self, lease_id: &str, spent_micros: i64) -> Result<(), Status>;
    /// Gives back what an open lease holds beyond `keep_micros`, if its
    /// total grant is still `granted_micros`; the lease stays open.
    async fn shrink(
        &self,
        lease_id: &str,
        granted_micros: i64,
        keep_micros: i64,
    ) -> Result<(), Status>;
    /// The leases granted to this node that still count against caps.
    async fn held(&self) -> Result<Vec<pb::NodeLease>, Status>;
}

#[async_trait]
impl LeaseSource for Fleet {
    async fn grant(&self, req: pb::GrantLeaseRequest) -> Result<pb::GrantLeaseResponse, Status> {
        let span = tracing::info_span!(
            "lease grant",
            otel.name = "keycap.v1.FleetService/GrantLease",
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = "keycap.v1.FleetService",
            rpc.method = "GrantLease",
            keycap.key_id = %req.key_id,
        );
        self.call("grant_lease", |mut c| {
            let mut r = Request::new(req.clone());
            r.set_timeout(LEASE_CALL_TIMEOUT);
            async move { Ok(c.grant_lease(r).await?.into_inner()) }
        })
        .instrument(span)
        .await
    }

    async fn give_back(&self, lease_id: &str, spent_micros: i64) -> Result<(), Status> {
        self.call("return_lease", |mut c| {
            let mut r = Request::new(pb::ReturnLeaseRequest {
                lease_id: lease_id.to_string(),
                spent_micros,
                node_id: self.node_id.clone(),
                ..Default::default()
            });
            r.set_timeout(LEASE_CALL_TIMEOUT);
            async move { c.return_lease(r).await.map(drop) }
        })
        .await
    }

    async fn shrink(
        &self,
        lease_id: &str,
        granted_micros: i64,
        keep_micros: i64,
    ) -> Result<(), Status> {
        self.call("shrink_lease", |mut c| {
            let mut r = Request::new(pb::ReturnLeaseRequest {
                lease_id: lease_id.to_string(),
                spent_micros: keep_micros,
                node_id: self.node_id.clone(),
                keep_open: true,
                granted_micros,
            });
            r.set_timeout(LEASE_CALL_TIMEOUT);
            async move { c.return_lease(r).await.map(drop) }
        })
        .await
    }

    async fn held(&self) -> Result<Vec<pb::NodeLease>, Status> {
        self.list_leases().await
    }
}

/// Where spend events go; a trait so delivery can be tested without a
/// control plane.
#[async_trait]
pub trait SpendSink: Send + Sync + 'static {
    async fn report(&self, events: Vec<pb::SpendEvent>) -> Result<(), Status>;
}

#[async_trait]
impl SpendSink for Fleet {
    async fn report(&self, events: Vec<pb::SpendEvent>) -> Result<(), Status> {
        self.call("report_spend", |mut c| {
            let mut r = Request::new(pb::ReportSpendRequest {
                node_id: self.node_id.clone(),
                events: events.clone(),
                spool_depth: self.spool.get().map_or(0, |s| s.depth() as i64),
            });
            r.set_timeout(REPORT_TIMEOUT);
            async move { c.report_spend(r).await.map(drop) }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Three replicas answering as scripted: `true` answers, `false` is
    /// away. Records which replica each attempt went to.
    struct Scripted {
        up: Mutex<[bool; 3]>,
        tried: Mutex<Vec<usize>>,
    }

    impl Scripted {
        fn new(up: [bool; 3]) -> Self {
            Scripted {
                up: Mutex::new(up),
                tried: Mutex::new(Vec::new()),
            }
        }

        async fn call(&self, replicas: &Replicas<usize>) -> Result<usize, Status> {
            replicas
                .call(
                    |i| async move {
                        self.tried.lock().unwrap().push(i);
                        if self.up.lock().unwrap()[i] {
                            Ok(i)
                        } else {
                            Err(Status::unavailable("connection refused"))
                        }
                    },
                    replica_unavailable,
                )
                .await
        }

        fn tried(&self) -> Vec<usize> {
            std::mem::take(&mut self.tried.lock().unwrap())
        }
    }

    #[tokio::test]
    async fn calls_stay_on_a_replica_until_it_fails_then_move_to_the_next() {
        let replicas = Replicas::new(vec![0, 1, 2]);
        let s = Scripted::new([true, true, true]);
        assert_eq!(s.call(&replicas).await.unwrap(), 0);
        assert_eq!(s.call(&replicas).await.unwrap(), 0);
        assert_eq!(s.tried(), [0, 0]);

        // The first replica dies: the same call is retried on the second,
        // and later calls start there.
        s.up.lock().unwrap()[0] = false;
        assert_eq!(s.call(&replicas).await.unwrap(), 1);
        assert_eq!(s.call(&replicas).await.unwrap(), 1);
        assert_eq!(s.tried(), [0, 1, 1]);

        // It comes back; calls do not move back while the second answers.
        s.up.lock().unwrap()[0] = true;
        assert_eq!(s.call(&replicas).await.unwrap(), 1);

        // The second and third die: the list wraps around to the first.
        *s.up.lock().unwrap() = [true, false, false];
        s.tried();
        assert_eq!(s.call(&replicas).await.unwrap(), 0);
        assert_eq!(s.tried(), [1, 2, 0]);
    }

    #[tokio::test]
    async fn with_every_replica_away_each_is_tried_once_and_the_error_returned() {
        let replicas = Replicas::new(vec![0, 1, 2]);
        let s = Scripted::new([false, false, false]);
        let e = s.call(&replicas).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert_eq!(s.tried(), [0, 1, 2]);
        // The next call starts after the last one tried.
        let _ = s.call(&replicas).await;
        assert_eq!(s.tried(), [0, 1, 2]);
    }

    #[tokio::test]
    async fn an_answer_is_never_sent_to_another_replica() {
        let replicas = Replicas::new(vec![0, 1]);
        let tried = Mutex::new(Vec::new());
        let e = replicas
            .call(
                |i| {
                    tried.lock().unwrap().push(i);
                    async { Err::<(), _>(Status::permission_denied("not this node")) }
                },
                replica_unavailable,
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert_eq!(*tried.lock().unwrap(), [0]);
        assert_eq!(replicas.current().0, 0, "a refusal does not move calls");
    }

    #[test]
    fn concurrent_failures_of_one_replica_move_calls_one_step() {
        let replicas = Replicas::new(vec![0, 1, 2]);
        // Many calls in flight on replica 0 all fail: one step, to 1.
        for _ in 0..5 {
            replicas.fail_over(0);
        }
        assert_eq!(replicas.current().0, 1);
        // A late failure report from 0 does not skip the healthy 1.
        replicas.fail_over(0);
        assert_eq!(replicas.current().0, 1);
        replicas.fail_over(1);
        replicas.fail_over(2);
        assert_eq!(replicas.current().0, 0, "wraps around");
        let single = Replicas::new(vec![0]);
        single.fail_over(0);
        assert_eq!(single.current().0, 0);
    }

    #[test]
    fn only_a_replica_s_absence_is_retried_elsewhere() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Unknown,
            Code::Internal,
        ] {
            assert!(replica_unavailable(&Status::new(code, "")), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::FailedPrecondition,
            Code::OutOfRange,
        ] {
            assert!(!replica_unavailable(&Status::new(code, "")), "{code:?}");
        }
    }
}
