//! `fleet-bench`: the fleet benchmark (BENCHMARKS.md, "Fleet"). Starts one
//! PostgreSQL database, two control-plane replicas, three proxies and the
//! mock vendor (`keycap_tests::fleet`), then measures in turn:
//!
//! 1. throughput of the three proxies on one key far from its cap, against
//!    the same proxies and key with every call priced $0 (no reservation, no
//!    lease drawn: "no cap at all"), in alternating closed-loop runs;
//! 2. overspend near the cap: hundreds of concurrent charges against a $20
//!    key through all three proxies, repeated; overspend is what reached the
//!    vendor beyond the cap, and the cap left unused is reported too;
//! 3. what a 10 s outage of every replica costs: the same fixed-rate load
//!    with and without the outage, admitted calls compared;
//! 4. revocation latency (see `revocation_latency`).
//!
//! Not a test: it prints numbers and judges none of them. `bench/fleet.sh`
//! builds the release binaries and runs it. Keycap's processes log at
//! `warn`; the load generator (reqwest) and the mock vendor run in this
//! process, on the same cores as everything else.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use keycap_tests::fleet::{self, Charge, Fleet, FleetOpts};
use keycap_tests::harness::{self, Api};
use keycap_tests::pg;
use serde_json::json;

#[derive(Parser)]
#[command(name = "fleet-bench", about = "keycap fleet benchmark")]
struct Cli {
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests in flight during throughput runs, spread over the proxies.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Rounds of (no cap, capped) throughput runs.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Repetitions of the overspend run.
    #[arg(long, default_value_t = 10)]
    overspend_trials: usize,
    /// Requests per second, over all proxies, in the outage runs.
    #[arg(long, default_value_t = 150)]
    outage_rate: u64,
    /// Daily cap (USD) of the key whose leases run dry during the outage.
    #[arg(long, default_value_t = 300)]
    outage_cap_usd: u64,
    /// Revocations timed.
    #[arg(long, default_value_t = 50)]
    revocations: usize,
    /// Steps to run (1 throughput, 2 overspend, 3 outage, 4 revocation).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    steps: Vec<u8>,
    /// Every step once, for a second or two each: proves the bench still
    /// starts and runs (the test command uses it); its numbers mean
    /// nothing.
    #[arg(long)]
    smoke: bool,
}

/// An outage run: seconds of fixed-rate load, and when the outage starts
/// and how long it lasts within it.
#[derive(Clone, Copy)]
struct OutagePlan {
    run: Duration,
    from: Duration,
    len: Duration,
}

const OUTAGE: OutagePlan = OutagePlan {
    run: Duration::from_secs(14),
    from: Duration::from_secs(2),
    len: Duration::from_secs(10),
};
const SMOKE_OUTAGE: OutagePlan = OutagePlan {
    run: Duration::from_secs(3),
    from: Duration::from_millis(500),
    len: Duration::from_secs(2),
};
/// The overspend run: a $20 cap, 480 charges of 45-55 cents, 96 in flight.
const OVERSPEND_CAP_CENTS: i64 = 2_000;
const OVERSPEND_CALLS: usize = 480;
const OVERSPEND_CONCURRENCY: usize = 96;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if cli.smoke {
        cli.seconds = 1;
        cli.rounds = 1;
        cli.overspend_trials = 1;
        cli.revocations = 3;
    }
    println!("keycap fleet bench: {}", machine());
    let db = pg::fresh_database().await?;
    let opts = FleetOpts {
        log_level: Some("warn".into()),
        ..FleetOpts::default()
    };
    let mut fleet = Fleet::start(db, &opts).await;
    println!(
        "fleet: PostgreSQL, 2 control-plane replicas, 3 proxies ({}), mock vendor in this process\n",
        fleet
            .proxies
            .iter()
            .map(|p| p.url())
            .collect::<Vec<_>>()
            .join(", ")
    );

    if cli.steps.contains(&1) {
        throughput(&fleet, &cli).await;
    }
    if cli.steps.contains(&2) {
        overspend(&fleet, &cli).await;
    }
    if cli.steps.contains(&3) {
        outage(&mut fleet, &cli).await;
    }
    if cli.steps.contains(&4) {
        revocation_latency(&fleet, cli.revocations).await;
    }
    Ok(())
}

/// CPU model, cores and memory, from /proc.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / (1 << 20));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, {mem_gib} GiB")
}

/// CPU time (user + system) each part of the fleet has used so far, read
/// from /proc: the proxies, the replicas, every `postgres` process on the
/// machine, and this process (load generator and mock vendor).
#[derive(Clone, Copy, Default)]
struct CpuUse {
    proxies: Duration,
    replicas: Duration,
    postgres: Duration,
    bench: Duration,
}

impl CpuUse {
    fn now(fleet: &Fleet) -> CpuUse {
        let of = |pids: &mut dyn Iterator<Item = u32>| pids.map(cpu_of).sum();
        CpuUse {
            proxies: of(&mut fleet.proxies.iter().filter_map(|p| p.process().id())),
            replicas: of(&mut fleet.controls.iter().filter_map(|c| c.process().id())),
            postgres: of(&mut postgres_pids().into_iter()),
            bench: cpu_of(std::process::id()),
        }
    }

    /// Per request, in microseconds, since `before`.
    fn per_request(&self, before: &CpuUse, requests: usize) -> [f64; 4] {
        let us = |a: Duration, b: Duration| {
            a.saturating_sub(b).as_secs_f64() * 1e6 / requests.max(1) as f64
        };
        [
            us(self.proxies, before.proxies),
            us(self.replicas, before.replicas),
            us(self.postgres, before.postgres),
            us(self.bench, before.bench),
        ]
    }
}

/// Clock ticks per second of /proc/<pid>/stat's times (`getconf CLK_TCK`).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// User + system CPU time of process `pid` (zero if it is gone).
fn cpu_of(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14 and stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / clock_ticks() as f64)
}

fn postgres_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .collect()
}

/// The `q` quantile (0..=1) of sorted `xs`.
fn quantile(xs: &[Duration], q: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    let i = ((xs.len() - 1) as f64 * q).round() as usize;
    xs[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One closed-loop run's outcome.
struct Run {
    ok: usize,
    not_ok: usize,
    elapsed: Duration,
    /// Latencies of the calls answered 200, sorted.
    latencies: Vec<Duration>,
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// `connections` loops, each sending charges of `cents` back to back
/// through one proxy (round robin) until `duration` is up.
async fn closed_loop(agents: &[Api], duration: Duration, connections: usize, cents: i64) -> Run {
    let start = Instant::now();
    let stop = start + duration;
    let loops: Vec<_> = (0..connections)
        .map(|i| {
            let agent = agents[i % agents.len()].clone();
            let proxy = i % agents.len();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut not_ok = 0;
                while Instant::now() < stop {
                    let c = fleet::charge(&agent, proxy, cents).await;
                    match c.status() {
                        Some(200) => latencies.push(c.latency()),
                        _ => not_ok += 1,
                    }
                }
                (latencies, not_ok)
            })
        })
        .collect();
    let mut run = Run {
        ok: 0,
        not_ok: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for l in loops {
        let (latencies, not_ok) = l.await.expect("load loop");
        run.ok += latencies.len();
        run.not_ok += not_ok;
        run.latencies.extend(latencies);
    }
    run.elapsed = start.elapsed();
    run.latencies.sort_unstable();
    run
}

/// Step 1, throughput: three proxies on one key far from its cap ($1,000,000; 1-cent
/// charges, so one lease covers every run) against the same calls priced
/// $0 (`amount=0`): same key, same pricing, forwarding, settlement and
/// audit row, but no reservation and no lease. Runs alternate so drift on
/// the shared machine hits both alike.
async fn throughput(fleet: &Fleet, cli: &Cli) {
    let key = fleet.mint(0, json!(1_000_000), "bench/throughput").await;
    let agents = fleet.agents(&key.secret);
    let duration = Duration::from_secs(cli.seconds);
    // Warm up: connections, the lease, the control planes' caches.
    closed_loop(&agents, Duration::from_secs(2), cli.connections, 1).await;
    fleet.mock.reset();
    println!(
        "1. throughput, 3 proxies, one key, {} connections, {} s per run",
        cli.connections, cli.seconds
    );
    println!(
        "   {:<26} {:>10} {:>8} {:>8} {:>7} | CPU us/request: {:>7} {:>8} {:>8} {:>9}",
        "run",
        "req/s",
        "p50 ms",
        "p99 ms",
        "non-200",
        "proxies",
        "replicas",
        "postgres",
        "load+mock"
    );
    let (mut free, mut capped) = (Vec::new(), Vec::new());
    for round in 1..=cli.rounds {
        // Each round swaps which goes first, so neither always runs on a
        // ledger still busy with the other's audit rows.
        let mut order = [("no cap (priced $0)", 0), ("capped, far from cap", 1)];
        if round % 2 == 0 {
            order.reverse();
        }
        for (name, cents) in order {
            let before = CpuUse::now(fleet);
            let run = closed_loop(&agents, duration, cli.connections, cents).await;
            let cpu = CpuUse::now(fleet).per_request(&before, run.ok + run.not_ok);
            fleet.mock.reset();
            println!(
                "   {:<26} {:>10.0} {:>8.2} {:>8.2} {:>7} | {:>22.0} {:>8.0} {:>8.0} {:>9.0}",
                format!("{name} #{round}"),
                run.per_sec(),
                ms(quantile(&run.latencies, 0.5)),
                ms(quantile(&run.latencies, 0.99)),
                run.not_ok,
                cpu[0],
                cpu[1],
                cpu[2],
                cpu[3]
            );
            if cents == 0 {
                free.push(run.per_sec());
            } else {
                capped.push(run.per_sec());
            }
        }
    }
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let ratio = mean(&capped) / mean(&free);
    println!(
        "   capped / no cap = {:.0} / {:.0} = {ratio:.3} (goal >= 0.9: {})\n",
        mean(&capped),
        mean(&free),
        if ratio >= 0.9 { "met" } else { "not met" }
    );
}

/// Step 2, overspend near the cap: per trial a fresh $20 key, 480 charges of
/// 45-55 cents through the three proxies, 96 in flight. Overspend is what
/// reached the vendor beyond the cap; the cap left unused is budget
/// stranded in leases (or smaller than any remaining charge).
async fn overspend(fleet: &Fleet, cli: &Cli) {
    println!(
        "2. overspend near the cap: {} trials, $20 cap, {OVERSPEND_CALLS} charges of 45-55 cents, {OVERSPEND_CONCURRENCY} in flight",
        cli.overspend_trials
    );
    let mut worst_over = 0;
    let mut used = Vec::new();
    let mut admitted = Vec::new();
    for trial in 0..cli.overspend_trials {
        let key = fleet
            .mint(trial % 2, json!(20), &format!("bench/overspend/{trial}"))
            .await;
        fleet.mock.reset();
        let charges = fleet::charges(
            &fleet.agents(&key.secret),
            OVERSPEND_CALLS,
            OVERSPEND_CONCURRENCY,
            |i| 45 + (i * 7 % 11) as i64,
            Arc::default(),
        )
        .await;
        let reached: i64 = fleet.mock.payment_intent_amounts().iter().sum();
        worst_over = worst_over.max(reached - OVERSPEND_CAP_CENTS);
        used.push(reached);
        admitted.push(charges.iter().filter(|c| c.status() == Some(200)).count());
    }
    fleet.mock.reset();
    let min_used = used.iter().min().copied().unwrap_or(0);
    let max_used = used.iter().max().copied().unwrap_or(0);
    let mean_used = used.iter().sum::<i64>() as f64 / used.len().max(1) as f64;
    println!(
        "   overspend: worst {} cents (goal 0: {})",
        worst_over.max(0),
        if worst_over <= 0 { "met" } else { "NOT MET" }
    );
    println!(
        "   cap used: mean {:.1}%, min {:.1}%, max {:.1}% (stranded: mean ${:.2} of $20); admitted per trial {:?}\n",
        mean_used / OVERSPEND_CAP_CENTS as f64 * 100.0,
        min_used as f64 / OVERSPEND_CAP_CENTS as f64 * 100.0,
        max_used as f64 / OVERSPEND_CAP_CENTS as f64 * 100.0,
        (OVERSPEND_CAP_CENTS as f64 - mean_used) / 100.0,
        admitted
    );
}

/// `rate` charges of `cents` per second through the proxies (round robin)
/// for `duration`, each sent on schedule whether or not earlier ones were
/// answered.
async fn fixed_rate(agents: &[Api], rate: u64, duration: Duration, cents: i64) -> Vec<Charge> {
    let calls = (rate as f64 * duration.as_secs_f64()) as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = Vec::with_capacity(calls);
    for i in 0..calls {
        tick.tick().await;
        let agent = agents[i % agents.len()].clone();
        let proxy = i % agents.len();
        sent.push(tokio::spawn(async move {
            fleet::charge(&agent, proxy, cents).await
        }));
    }
    let mut out = Vec::with_capacity(calls);
    for s in sent {
        out.push(s.await.expect("charge task"));
    }
    out
}

/// What one outage run admitted and refused.
struct OutageRun {
    admitted: usize,
    unavailable: usize,
    other: usize,
    /// From the kill until the first replica answered again.
    outage: Option<Duration>,
}

/// One fixed-rate run of 10-cent charges on a fresh key of `cap_usd`;
/// with `outage`, both replicas are SIGKILLed `plan.from` in and restarted
/// `plan.len` later.
async fn outage_run(
    fleet: &mut Fleet,
    rate: u64,
    cap_usd: u64,
    outage: bool,
    plan: OutagePlan,
) -> OutageRun {
    let key = fleet
        .mint(
            0,
            json!(cap_usd),
            &format!("bench/outage/{cap_usd}/{outage}"),
        )
        .await;
    let agents = fleet.agents(&key.secret);
    let load = tokio::spawn(async move { fixed_rate(&agents, rate, plan.run, 10).await });
    let mut outage_len = None;
    if outage {
        tokio::time::sleep(plan.from).await;
        let down = Instant::now();
        for c in &mut fleet.controls {
            c.kill().await;
        }
        tokio::time::sleep(plan.len).await;
        fleet.controls[0].restart().await;
        outage_len = Some(down.elapsed());
        fleet.controls[1].restart().await;
    }
    let charges = load.await.expect("load task");
    fleet.mock.reset();
    let count = |f: &dyn Fn(&Charge) -> bool| charges.iter().filter(|c| f(c)).count();
    OutageRun {
        admitted: count(&|c| c.status() == Some(200)),
        unavailable: count(&|c| {
            c.answer
                .as_ref()
                .is_ok_and(|r| r.error_code().as_deref() == Some("budget_unavailable"))
        }),
        other: count(&|c| {
            c.status() != Some(200)
                && !c
                    .answer
                    .as_ref()
                    .is_ok_and(|r| r.error_code().as_deref() == Some("budget_unavailable"))
        }),
        outage: outage_len,
    }
}

/// Step 3: what a 10 s outage of every replica refuses that a live control
/// plane would have served: the same fixed-rate load with and without it.
/// Once for a key whose per-proxy leases cannot cover the outage, once for
/// a key far from its cap (its leases can).
async fn outage(fleet: &mut Fleet, cli: &Cli) {
    let plan = if cli.smoke { SMOKE_OUTAGE } else { OUTAGE };
    println!(
        "3. {:?} outage of both replicas: {} req/s of 10-cent charges for {:?}, outage from {:?}",
        plan.len, cli.outage_rate, plan.run, plan.from
    );
    println!(
        "   {:<24} {:>9} {:>9} {:>12} {:>6} {:>9}",
        "key", "outage", "admitted", "unavailable", "other", "outage s"
    );
    for cap in [cli.outage_cap_usd, 1_000_000] {
        let live = outage_run(fleet, cli.outage_rate, cap, false, plan).await;
        let down = outage_run(fleet, cli.outage_rate, cap, true, plan).await;
        for (name, r) in [("no", &live), ("yes", &down)] {
            println!(
                "   {:<24} {:>9} {:>9} {:>12} {:>6} {:>9}",
                format!("${cap} cap"),
                name,
                r.admitted,
                r.unavailable,
                r.other,
                r.outage
                    .map_or_else(|| "-".to_string(), |d| format!("{:.1}", d.as_secs_f64()))
            );
        }
        println!(
            "   ${cap} cap: the outage refused {} requests a live control plane served",
            live.admitted.saturating_sub(down.admitted)
        );
    }
    println!();
}

/// Step 4: revocation latency: the revoke call, which returns once every
/// proxy has confirmed it refuses the key (the goal: p99 under
/// 50 ms), then a probe of each proxy, which must already refuse.
async fn revocation_latency(fleet: &Fleet, n: usize) {
    let mut call = Vec::with_capacity(n);
    let mut after = Vec::with_capacity(n);
    let mut total = Vec::with_capacity(n);
    for i in 0..n {
        let via = i % 2;
        let key = fleet
            .mint(via, json!(1), &format!("bench/revoke/{i}"))
            .await;
        let agents = fleet.agents(&key.secret);
        let start = Instant::now();
        let answer = fleet
            .admin(via)
            .delete(&format!("/vault/keys/{}", key.id))
            .await
            .expect(200);
        let returned = Instant::now();
        let confirmation = &answer["confirmation"];
        assert_eq!(
            confirmation["all_confirmed"], true,
            "a revocation returned unconfirmed: {answer}"
        );
        assert_eq!(
            confirmation["confirmed_nodes"].as_array().map(Vec::len),
            Some(3),
            "{answer}"
        );
        // Confirmed means refusing already: each proxy's first probe after
        // the return must say so.
        let mut first_probes = 0;
        for agent in fleet.agents(&key.secret) {
            if harness::probe(&agent, "stripe").await.as_deref() == Some("key_revoked") {
                first_probes += 1;
            }
        }
        assert_eq!(first_probes, 3, "a confirmed proxy still served the key");
        let refused = Arc::new(AtomicUsize::new(0));
        let polls: Vec<_> = agents
            .into_iter()
            .map(|agent| {
                let refused = refused.clone();
                tokio::spawn(async move {
                    let deadline = Instant::now() + harness::POLICY_TIMEOUT;
                    while Instant::now() < deadline {
                        if harness::probe(&agent, "stripe").await.as_deref() == Some("key_revoked")
                        {
                            refused.fetch_add(1, Ordering::SeqCst);
                            return Instant::now();
                        }
                    }
                    Instant::now()
                })
            })
            .collect();
        let mut last = returned;
        for p in polls {
            last = last.max(p.await.expect("poll task"));
        }
        assert_eq!(
            refused.load(Ordering::SeqCst),
            3,
            "a proxy never refused a revoked key"
        );
        call.push(returned - start);
        after.push(last - returned);
        total.push(last - start);
    }
    for xs in [&mut call, &mut after, &mut total] {
        xs.sort_unstable();
    }
    println!(
        "4. revocation, {n} keys (the call returns once all 3 proxies confirmed; then each is probed)"
    );
    for (name, xs) in [
        ("revoke returns, all confirmed", &call),
        ("then 3 proxies probed again", &after),
        ("call start to probes done", &total),
    ] {
        println!(
            "   {:<28} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
            name,
            ms(quantile(xs, 0.5)),
            ms(quantile(xs, 0.99)),
            ms(xs.last().copied().unwrap_or_default())
        );
    }
}
