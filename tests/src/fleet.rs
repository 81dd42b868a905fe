//! A keycap fleet on one machine, for the fleet end-to-end tests and the
//! fleet benchmark: one PostgreSQL database, two control-plane replicas over
//! it, three proxies each given both replicas (their first choice spread
//! between the two), and the mock vendor registered as `stripe`. And the
//! load that drives it: Stripe charges sent through every proxy at once,
//! with a bound on how many are in flight, each one's answer kept.
//!
//! Processes are started and stopped only through `harness`; what a run
//! must show is for the caller to assert.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::harness::{
    assert_all_confirmed, Api, Control, ControlOpts, MintedKey, Proxy, ProxyOpts, Resp,
};
use crate::mock::MockVendor;
use crate::pg::PgDatabase;

/// The credential the mock vendor accepts.
pub const STRIPE_CREDENTIAL: &str = "sk_live_51KeycapFleetStripeCredentialDoNotLeak";
/// Where a charge goes, through a proxy.
pub const CHARGE_PATH: &str = "/stripe/v1/payment_intents";

/// Which replica each proxy talks to first (index into `Fleet::controls`):
/// two of the three start on the first replica, one on the second.
const FIRST_CHOICE: [usize; 3] = [0, 1, 0];

/// How to start a fleet.
#[derive(Clone, Debug, Default)]
pub struct FleetOpts {
    /// `KEYCAP_LOG` for every keycap process (else the harness default).
    pub log_level: Option<String>,
    /// Flags added to every replica's command line.
    pub control_args: Vec<String>,
}

/// A running fleet. Field order is drop order: proxies first, then the
/// replicas, then the database they share.
pub struct Fleet {
    pub proxies: Vec<Proxy>,
    /// Each proxy's `--spool-dir`, kept across its restarts.
    pub spools: Vec<tempfile::TempDir>,
    pub controls: Vec<Control>,
    pub mock: MockVendor,
    pub db: PgDatabase,
}

impl Fleet {
    /// Starts the fleet over `db` (an empty database) and registers the
    /// mock as vendor `stripe`.
    pub async fn start(db: PgDatabase, opts: &FleetOpts) -> Fleet {
        let mut control = ControlOpts::postgres(&db.url);
        control.log_level = opts.log_level.clone();
        control.args.extend(opts.control_args.iter().cloned());
        // One after the other: both would run the migrations.
        let a = Control::start(control.clone()).await;
        let b = Control::start(control.clone()).await;
        let urls = [a.url(), b.url()];
        let spools: Vec<tempfile::TempDir> = (0..3)
            .map(|_| tempfile::tempdir().expect("a spool directory"))
            .collect();
        let start = |i: usize| {
            let first = FIRST_CHOICE[i];
            let ordered = [urls[first].clone(), urls[1 - first].clone()];
            let mut proxy = ProxyOpts::new(&format!("fleet-proxy-{i}"))
                .flag("spool-dir", spools[i].path().display());
            proxy.log_level = opts.log_level.clone();
            let token = control.fleet_token.clone();
            async move { Proxy::start_with_replicas(&ordered, &token, &proxy).await }
        };
        let (p0, p1, p2) = tokio::join!(start(0), start(1), start(2));
        let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
        let fleet = Fleet {
            proxies: vec![p0, p1, p2],
            spools,
            controls: vec![a, b],
            mock,
            db,
        };
        let r = fleet
            .admin(0)
            .put_json(
                "/vault/vendors/stripe",
                &json!({"profile": "stripe", "base_url": fleet.mock.url(), "credential": STRIPE_CREDENTIAL}),
            )
            .await;
        assert_eq!(r.status, 201, "register the mock: {}", r.text);
        fleet
    }

    /// The admin REST API of replica `i`.
    pub fn admin(&self, i: usize) -> Api {
        self.controls[i].admin()
    }

    /// Which replica proxy `i` talks to first.
    pub fn first_choice(i: usize) -> usize {
        FIRST_CHOICE[i]
    }

    /// Creates a Stripe key through replica `via`, asserting every proxy
    /// confirmed it; the first call needs no wait.
    pub async fn mint(&self, via: usize, daily_usd_cap: Value, label: &str) -> MintedKey {
        let r = self
            .admin(via)
            .post_json(
                "/vault/keys",
                &json!({
                    "vendor": "stripe",
                    "daily_usd_cap": daily_usd_cap,
                    "allowed_endpoints": ["POST /v1/payment_intents"],
                    "expires_in": "2h",
                    "agent_run_label": label,
                }),
            )
            .await;
        let body = r.expect(201);
        let key = MintedKey {
            id: body["id"].as_str().expect("key id").to_string(),
            secret: body["key"].as_str().expect("key secret").to_string(),
            body,
        };
        assert_all_confirmed(&key.body);
        key
    }

    /// An agent with `secret` for each proxy, in proxy order.
    pub fn agents(&self, secret: &str) -> Vec<Api> {
        self.proxies.iter().map(|p| p.api(Some(secret))).collect()
    }
}

/// One charge and what came of it.
#[derive(Debug)]
pub struct Charge {
    /// Which agent (proxy) it went to.
    pub proxy: usize,
    /// The amount asked for, in cents (USD).
    pub cents: i64,
    pub sent: SystemTime,
    pub received: SystemTime,
    /// `Err`: nothing answered (the proxy was killed or not listening).
    pub answer: Result<Resp, String>,
}

impl Charge {
    /// The HTTP status, or `None` when nothing answered.
    pub fn status(&self) -> Option<u16> {
        self.answer.as_ref().ok().map(|r| r.status)
    }

    pub fn latency(&self) -> Duration {
        self.received
            .duration_since(self.sent)
            .unwrap_or(Duration::ZERO)
    }
}

/// Sends one charge of `cents` through `agent`.
pub async fn charge(agent: &Api, proxy: usize, cents: i64) -> Charge {
    let sent = SystemTime::now();
    let answer = agent
        .try_send(
            Method::POST,
            CHARGE_PATH,
            Some((
                "application/x-www-form-urlencoded",
                format!("amount={cents}&currency=usd&confirm=true").into_bytes(),
            )),
            &[],
        )
        .await;
    Charge {
        proxy,
        cents,
        sent,
        received: SystemTime::now(),
        answer,
    }
}

/// Sends `calls` charges, call `i` of `cents(i)` through `agents[i % n]`,
/// with at most `concurrency` in flight; `answered` counts them as they
/// finish (for a caller that acts mid-load). Returns them in call order.
pub async fn charges(
    agents: &[Api],
    calls: usize,
    concurrency: usize,
    cents: impl Fn(usize) -> i64,
    answered: Arc<AtomicUsize>,
) -> Vec<Charge> {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(calls);
    for i in 0..calls {
        let slot = slots.clone().acquire_owned().await.expect("semaphore open");
        let agent = agents[i % agents.len()].clone();
        let proxy = i % agents.len();
        let amount = cents(i);
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let c = charge(&agent, proxy, amount).await;
            drop(slot);
            answered.fetch_add(1, Ordering::SeqCst);
            c
        }));
    }
    let mut out = Vec::with_capacity(calls);
    for t in tasks {
        out.push(t.await.expect("charge task"));
    }
    out
}
