//! `ingest-bench`: the fleet ingest benchmark (BENCHMARKS.md, "Fleet
//! ingest"). One `keycap-control` replica on PostgreSQL; N simulated
//! proxies, each on its own gRPC connection, send `ReportSpend` batches of
//! synthetic spend events (fresh event ids, one lease per proxy, and one key
//! per proxy or `--keys-per-proxy` of them)
//! in closed loops for a while. Prints the events applied per second, and
//! the CPU per event of the replica process and of the PostgreSQL backends
//! serving its database (`/proc/<pid>/stat` utime + stime before and after
//! the run), hash chain and dedupe included. Checks at the end that every
//! event sent was applied once and that the whole chain verifies.
//!
//! Not a test: it prints numbers and judges none of them. `bench/ingest.sh`
//! builds the release binaries and runs it; `--smoke` runs a second on the
//! debug build (part of `scripts/test`). The load generator runs in this
//! process, on the same two cores as the replica and PostgreSQL.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use keycap_proto::pb::{self, fleet_service_client::FleetServiceClient};
use keycap_tests::harness::{Control, ControlOpts};
use keycap_tests::pg;
use serde_json::json;
use sqlx::Connection;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(name = "ingest-bench", about = "keycap fleet ingest benchmark")]
struct Cli {
    /// Simulated proxies, each with its own connection and one batch in
    /// flight.
    #[arg(long, default_value_t = 16)]
    proxies: usize,
    /// Keys each simulated proxy spreads its events over, round robin (a
    /// fleet serving many agents settles many keys per batch).
    #[arg(long, default_value_t = 1)]
    keys_per_proxy: usize,
    /// A webhook endpoint asks for `cap.threshold` alerts, so every report
    /// is checked against the thresholds of the keys it touched (none is
    /// crossed: the caps are far above the run's spend).
    #[arg(long)]
    alerts: bool,
    /// Spend events per ReportSpend call.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Seconds of measured load (after a warm-up of a second).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// A second or two with small settings: does the bench still run?
    #[arg(long)]
    smoke: bool,
    /// Days of ledger already kept before the run: each past UTC day's
    /// partition is filled with `--history-rows` entries first, as a
    /// ledger with that retention holds (written unchained, as entries from
    /// before the chain are, so the verify at the end still covers every
    /// entry the run appends).
    #[arg(long, default_value_t = 0)]
    history_days: u32,
    /// Entries per past day with `--history-days`.
    #[arg(long, default_value_t = 100_000)]
    history_rows: u32,
    /// Events without a trace id, as a fleet that neither exports traces
    /// nor gets a traceparent from its agents reports them.
    #[arg(long)]
    untraced: bool,
    /// After the run, also measure PostgreSQL's floor: its CPU to store
    /// and index the run's entries by COPY alone (`floor`), with the
    /// ledger's indexes and with only those dedupe needs.
    #[arg(long)]
    floor: bool,
}

/// Fills the partitions of the `days` UTC days before today with `rows`
/// entries each, spread over the bench's keys, seqs 1.., and moves the
/// ledger head past them (its hash stays the genesis hash, as after entries
/// written before the chain). Returns the entries written.
async fn write_history(
    pg: &mut sqlx::PgConnection,
    keys: &[String],
    days: u32,
    rows: u32,
) -> anyhow::Result<i64> {
    let mut written = 0i64;
    for d in (1..=days).rev() {
        let day = (chrono::Utc::now() - chrono::Duration::days(i64::from(d))).date_naive();
        sqlx::query("SELECT keycap_audit_partition($1)")
            .bind(day)
            .execute(&mut *pg)
            .await?;
        let start = day
            .and_hms_opt(0, 0, 0)
            .context("midnight")?
            .and_utc()
            .timestamp_micros();
        sqlx::query(
            "INSERT INTO audit (seq, event_id, key_id, agent_run_label, vendor, method, path, \
             upstream_status, reserved, cost, outcome, at, node_id, lease_id, day, detail_json, \
             trace_id, context, logged_at) \
             SELECT $1 + g, 'history-' || ($1 + g), k.id, 'ingest/history', 'stripe', 'POST', \
                    '/v1/payment_intents', 200, 10000, 10000, 'settled', \
                    $2 + (g - 1) * (86400000000 / $3), 'ingest-proxy-history', 'lease-history', $4, \
                    '{\"amount\":1,\"currency\":\"usd\"}', lpad(to_hex($1 + g), 32, '0'), \
                    '{\"tenant\":\"t1\"}', $2 + (g - 1) * (86400000000 / $3) \
             FROM generate_series(1, $3) g \
             JOIN unnest($5::text[]) WITH ORDINALITY AS k(id, n) ON k.n = 1 + g % $6",
        )
        .bind(written)
        .bind(start)
        .bind(i64::from(rows))
        .bind(day.format("%Y-%m-%d").to_string())
        .bind(keys)
        .bind(keys.len() as i64)
        .execute(&mut *pg)
        .await?;
        written += i64::from(rows);
    }
    sqlx::query("UPDATE ledger_head SET seq = $1 WHERE id = 1")
        .bind(written)
        .execute(&mut *pg)
        .await?;
    sqlx::query("ANALYZE audit").execute(&mut *pg).await?;
    Ok(written)
}

/// CPU time a process (or thread group) has used, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The machine's CPU ticks so far, busy and idle (idle and I/O wait),
/// from the first line of `/proc/stat`.
fn machine_ticks() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(ticks.len() >= 5, "short /proc/stat");
    let idle = ticks[3] + ticks[4];
    Ok((ticks.iter().sum::<u64>() - idle, idle))
}

fn ticks_per_second() -> f64 {
    // USER_HZ is 100 on every Linux this runs on; `getconf CLK_TCK` says.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The server processes serving `database` (its backends), by pid.
async fn backends(admin: &mut sqlx::PgConnection, database: &str) -> anyhow::Result<Vec<u32>> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_all(admin)
    .await?;
    Ok(pids.into_iter().map(|p| p as u32).collect())
}

/// PostgreSQL's own processes that write for every database: the WAL
/// writer, the checkpointer and the background writer.
async fn server_processes(admin: &mut sqlx::PgConnection) -> anyhow::Result<Vec<u32>> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE backend_type IN ('walwriter', 'checkpointer', 'background writer')",
    )
    .fetch_all(admin)
    .await?;
    Ok(pids.into_iter().map(|p| p as u32).collect())
}

fn sum_ticks(pids: &[u32]) -> BTreeMap<u32, u64> {
    pids.iter()
        .filter_map(|&p| cpu_ticks(p).map(|t| (p, t)))
        .collect()
}

/// What each simulated proxy sends.
#[derive(Clone, Copy)]
struct Load {
    /// Events per call.
    batch: usize,
    /// Whether each event carries a trace id.
    traced: bool,
}

/// Event `n` of proxy `proxy`, whose run drew the random `run`: its id is
/// shaped as a proxy's (`SpendReporter::next_event_id`), so the ledger's
/// `event_id` index holds keys of the real length.
fn event(proxy: usize, run: u128, n: u64, key_id: &str, day: &str, traced: bool) -> pb::SpendEvent {
    pb::SpendEvent {
        event_id: format!("ev_{run:032x}{n:016x}"),
        lease_id: format!("lease-{proxy}"),
        key_id: key_id.to_string(),
        vendor: "stripe".into(),
        method: "POST".into(),
        path: "/v1/payment_intents".into(),
        upstream_status: 200,
        reserved_micros: 10_000,
        cost_micros: 10_000,
        outcome: "settled".into(),
        at: Some(keycap_proto::time::to_proto(chrono::Utc::now())),
        detail_json: r#"{"amount":1,"currency":"usd"}"#.into(),
        day: day.to_string(),
        trace_id: if traced {
            format!("{:032x}", n + 1)
        } else {
            String::new()
        },
        context: [("tenant".to_string(), format!("t{}", n % 7))].into(),
        ..Default::default()
    }
}

/// One simulated proxy: sends batches until `stop`, counting the events
/// the replica applied.
async fn proxy(
    i: usize,
    channel: Channel,
    token: String,
    key_ids: Vec<String>,
    load: Load,
    stop: Arc<std::sync::atomic::AtomicBool>,
    applied: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let mut client = FleetServiceClient::new(channel);
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let node_id = format!("ingest-proxy-{i}");
    let run: u128 = rand::random();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let events: Vec<pb::SpendEvent> = (0..load.batch)
            .map(|k| {
                let n = n + k as u64;
                let key_id = &key_ids[n as usize % key_ids.len()];
                event(i, run, n, key_id, &day, load.traced)
            })
            .collect();
        n += load.batch as u64;
        let mut req = tonic::Request::new(pb::ReportSpendRequest {
            node_id: node_id.clone(),
            events,
            spool_depth: 0,
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let answer = client.report_spend(req).await?.into_inner();
        ensure!(
            answer.applied as usize == load.batch && answer.duplicates == 0,
            "proxy {i}: {answer:?} for {} fresh events",
            load.batch
        );
        applied.fetch_add(load.batch as u64, Ordering::Relaxed);
    }
    Ok(n)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if cli.smoke {
        cli.proxies = cli.proxies.min(4);
        cli.batch = cli.batch.min(100);
        cli.seconds = 1;
        cli.floor = true;
    }
    let db = pg::fresh_database().await?;
    let database = db
        .url
        .rsplit('/')
        .next()
        .and_then(|s| s.split('?').next())
        .context("database name")?
        .to_string();
    let mut opts = ControlOpts::postgres(&db.url);
    opts.log_level = Some("warn".into());
    if cli.alerts {
        opts.args.push("--allow-private-webhooks".into());
    }
    let control = Control::start(opts).await;
    let replica_pid = control.process().id().context("replica pid")?;
    let admin = control.admin();
    let r = admin
        .put_json(
            "/vault/vendors/stripe",
            &json!({"profile": "stripe", "base_url": "http://127.0.0.1:9/stripe",
                    "credential": "sk_live_51KeycapIngestBenchCredentialNeverSent"}),
        )
        .await;
    ensure!(r.status == 201, "register the vendor: {}", r.text);
    if cli.alerts {
        admin
            .post_json(
                "/vault/webhooks",
                &json!({"url": "http://127.0.0.1:9/alerts", "events": ["cap.threshold"],
                        "thresholds": [50, 80, 100]}),
            )
            .await
            .expect(201);
    }
    let mut keys = Vec::new();
    for i in 0..cli.proxies * cli.keys_per_proxy.max(1) {
        let r = admin
            .post_json(
                "/vault/keys",
                &json!({
                    "vendor": "stripe",
                    "daily_usd_cap": 1_000_000_000,
                    "allowed_endpoints": ["POST /v1/payment_intents"],
                    "expires_in": "2h",
                    "agent_run_label": format!("ingest/{i}"),
                }),
            )
            .await;
        let body = r.expect(201);
        keys.push(body["id"].as_str().context("key id")?.to_string());
    }

    let mut pg_admin = sqlx::PgConnection::connect(&db.url).await?;
    let history = if cli.history_days > 0 {
        let t = Instant::now();
        let n = write_history(&mut pg_admin, &keys, cli.history_days, cli.history_rows).await?;
        println!(
            "ingest: {n} entries of history over {} past days written in {:.1} s",
            cli.history_days,
            t.elapsed().as_secs_f64()
        );
        n
    } else {
        0
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let applied = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, key_ids) in keys.chunks(cli.keys_per_proxy.max(1)).enumerate() {
        let channel = Endpoint::from_shared(control.url())?.connect().await?;
        tasks.push(tokio::spawn(proxy(
            i,
            channel,
            control.opts.fleet_token.clone(),
            key_ids.to_vec(),
            Load {
                batch: cli.batch,
                traced: !cli.untraced,
            },
            stop.clone(),
            applied.clone(),
        )));
    }

    // Warm-up: connections made, statements prepared, pool filled.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hz = ticks_per_second();
    let pg_pids = backends(&mut pg_admin, &database).await?;
    let server_pids = server_processes(&mut pg_admin).await?;
    let before_server = sum_ticks(&server_pids);
    let before_replica = cpu_ticks(replica_pid).context("replica stat")?;
    let before_pg = sum_ticks(&pg_pids);
    let before_me = cpu_ticks(std::process::id()).context("own stat")?;
    let before_events = applied.load(Ordering::Relaxed);
    let before_machine = machine_ticks()?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(cli.seconds)).await;
    let events = applied.load(Ordering::Relaxed) - before_events;
    let took = started.elapsed();
    let replica = cpu_ticks(replica_pid).context("replica stat")? - before_replica;
    let me = cpu_ticks(std::process::id()).context("own stat")? - before_me;
    let machine = machine_ticks()?;
    let (busy, idle) = (machine.0 - before_machine.0, machine.1 - before_machine.1);
    // Backends that started during the run count whole; none should.
    let after_pids = backends(&mut pg_admin, &database).await?;
    let after_pg = sum_ticks(&after_pids);
    let pg: u64 = after_pg
        .iter()
        .map(|(pid, t)| t - before_pg.get(pid).copied().unwrap_or(0))
        .sum();
    let server: u64 = sum_ticks(&server_pids)
        .iter()
        .map(|(pid, t)| t - before_server.get(pid).copied().unwrap_or(*t))
        .sum();
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for t in tasks {
        sent += t.await??;
    }

    let per_event = |ticks: u64| ticks as f64 / hz * 1e6 / events.max(1) as f64;
    println!(
        "ingest: {} proxies, batches of {}{}, {:.1} s: {} events, {:.0} events/s (goal >= 100,000)",
        cli.proxies,
        cli.batch,
        if cli.untraced { " (untraced)" } else { "" },
        took.as_secs_f64(),
        events,
        events as f64 / took.as_secs_f64()
    );
    println!(
        "ingest: CPU per event: replica {:.2} us (goal <= 5), PostgreSQL backends {:.2} us \
         (goal <= 10; {} backends), load generator {:.2} us",
        per_event(replica),
        per_event(pg),
        after_pg.len(),
        per_event(me)
    );
    println!(
        "ingest: CPU per event of PostgreSQL's own processes (WAL writer, checkpointer, \
         background writer; not in the backends' figure): {:.2} us",
        per_event(server)
    );
    println!(
        "ingest: the machine's cores were {:.1}% idle during the run",
        100.0 * idle as f64 / (busy + idle).max(1) as f64
    );

    // Every event sent is in the ledger once, and the chain holds.
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit")
        .fetch_one(&mut pg_admin)
        .await?;
    ensure!(
        (rows - history) as u64 == sent,
        "{rows} ledger entries for {sent} events sent and {history} of history"
    );
    let v = admin.get("/vault/audit/verify").await.expect(200);
    ensure!(v["ok"] == json!(true), "the chain does not verify: {v}");
    println!(
        "ingest: ledger holds {rows} entries; verify ok, head seq {}",
        v["head_seq"]
    );
    if cli.floor {
        print_floors(&db.url, history, cli.batch, hz).await?;
    }
    Ok(())
}

/// The audit table's indexes that appending in order and the exact dedupe
/// need; the others serve queries (docs/ledger.md, "Index costs").
const APPEND_INDEXES: [&str; 2] = ["audit_pkey", "audit_event_id"];

/// `--floor`: PostgreSQL's floor (`floor`) with every index of the audit
/// table, with only `APPEND_INDEXES`, and with those and each other index.
async fn print_floors(url: &str, after: i64, batch: usize, hz: f64) -> anyhow::Result<()> {
    let mut admin = sqlx::PgConnection::connect(url).await?;
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT CAST(indexrelid AS REGCLASS)::TEXT, pg_get_indexdef(indexrelid) FROM pg_index \
         WHERE indrelid = CAST('audit' AS REGCLASS) ORDER BY 1",
    )
    .fetch_all(&mut admin)
    .await?;
    let (append, query): (Vec<_>, Vec<_>) = indexes
        .iter()
        .partition(|(name, _)| APPEND_INDEXES.contains(&name.as_str()));
    ensure!(
        append.len() == APPEND_INDEXES.len(),
        "the audit table lacks one of {APPEND_INDEXES:?}"
    );
    let definitions =
        |set: &[&(String, String)]| -> Vec<String> { set.iter().map(|(_, d)| d.clone()).collect() };
    let mut runs = vec![
        (
            "every index".to_string(),
            definitions(&indexes.iter().collect::<Vec<_>>()),
        ),
        (APPEND_INDEXES.join(" and "), definitions(&append)),
    ];
    for q in &query {
        let mut set = append.clone();
        set.push(q);
        runs.push((format!("those and {}", q.0), definitions(&set)));
    }
    for (label, set) in runs {
        let (entries, us) = floor(url, after, batch, &set, hz).await?;
        println!(
            "ingest: PostgreSQL floor, {label}: {us:.2} us of backend CPU per entry \
             ({entries} entries by COPY alone, {batch} per transaction, {FLOOR_SESSIONS} sessions)"
        );
    }
    Ok(())
}

/// Sessions writing the floor at once. The replica writes up to three
/// batches at once (`ingest::IN_FLIGHT`); the floors in BENCHMARKS.md were
/// measured with two.
const FLOOR_SESSIONS: usize = 2;

/// The signature, flags and (empty) header extension that open binary
/// COPY data.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// What PostgreSQL spends, with nothing of keycap's around it, to store and
/// index the entries the run appended (those after seq `after`): they are
/// read back as binary COPY rows (not measured) and written by COPY into a
/// twin of the audit table with the `indexes` (definitions of the audit
/// table's), `batch` rows per transaction,
/// from `FLOOR_SESSIONS` sessions at once. No dedupe lookup, no settle, no
/// ledger head: the least an append of those rows costs. Returns the
/// entries written and the backends' CPU per entry in µs.
async fn floor(
    url: &str,
    after: i64,
    batch: usize,
    indexes: &[String],
    hz: f64,
) -> anyhow::Result<(usize, f64)> {
    use tokio_stream::StreamExt;

    let mut admin = sqlx::PgConnection::connect(url).await?;
    let (first, last): (i64, i64) =
        sqlx::query_as("SELECT MIN(logged_at), MAX(logged_at) FROM audit WHERE seq > $1")
            .bind(after)
            .fetch_one(&mut admin)
            .await?;
    sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS ingest_floor; \
         CREATE TABLE ingest_floor (LIKE audit INCLUDING DEFAULTS) PARTITION BY RANGE (logged_at); \
         CREATE TABLE ingest_floor_run PARTITION OF ingest_floor \
         FOR VALUES FROM ({first}) TO ({})",
        last + 1
    ))
    .execute(&mut admin)
    .await?;
    for definition in indexes {
        let twin = definition
            .replacen(" ON ONLY public.audit ", " ON ingest_floor ", 1)
            .replacen(" INDEX audit_", " INDEX ingest_floor_", 1);
        ensure!(
            twin.contains(" ON ingest_floor ") && twin.contains(" INDEX ingest_floor_"),
            "unexpected index definition: {definition}"
        );
        sqlx::raw_sql(&twin).execute(&mut admin).await?;
    }

    let mut data = Vec::new();
    let mut out = admin
        .copy_out_raw(&format!(
            "COPY (SELECT * FROM audit WHERE seq > {after} ORDER BY seq) TO STDOUT (FORMAT binary)"
        ))
        .await?;
    while let Some(chunk) = out.next().await {
        data.extend_from_slice(&chunk?);
    }
    drop(out);
    let rows = copy_rows(&data)?;
    let batches: Arc<Vec<Vec<u8>>> = Arc::new(
        rows.chunks(batch.max(1))
            .map(|chunk| {
                let mut b = COPY_HEADER.to_vec();
                chunk.iter().for_each(|row| b.extend_from_slice(row));
                b.extend_from_slice(&(-1i16).to_be_bytes());
                b
            })
            .collect(),
    );

    let mut sessions = Vec::new();
    for _ in 0..FLOOR_SESSIONS {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        sessions.push((conn, pid as u32));
    }
    let pids: Vec<u32> = sessions.iter().map(|(_, pid)| *pid).collect();
    let before = sum_ticks(&pids);
    let mut tasks = Vec::new();
    for (s, (mut conn, _)) in sessions.into_iter().enumerate() {
        let batches = batches.clone();
        tasks.push(tokio::spawn(async move {
            for b in batches.iter().skip(s).step_by(FLOOR_SESSIONS) {
                let mut copy = conn
                    .copy_in_raw("COPY ingest_floor FROM STDIN (FORMAT binary)")
                    .await?;
                copy.send(b.as_slice()).await?;
                copy.finish().await?;
            }
            anyhow::Ok(conn)
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await??);
    }
    let ticks: u64 = sum_ticks(&pids)
        .iter()
        .map(|(pid, t)| t - before.get(pid).copied().unwrap_or(0))
        .sum();
    let written: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ingest_floor")
        .fetch_one(&mut admin)
        .await?;
    ensure!(
        written as usize == rows.len(),
        "the floor wrote {written} of {} rows",
        rows.len()
    );
    sqlx::raw_sql("DROP TABLE ingest_floor")
        .execute(&mut admin)
        .await?;
    Ok((
        rows.len(),
        ticks as f64 / hz * 1e6 / rows.len().max(1) as f64,
    ))
}

/// The rows of binary COPY data, each as its bytes (field count, then
/// each field's length and bytes), without the header and trailer.
fn copy_rows(data: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    ensure!(
        data.starts_with(COPY_HEADER),
        "not binary COPY data with an empty header extension"
    );
    let be16 = |at: usize| -> anyhow::Result<i16> {
        let b = data.get(at..at + 2).context("COPY data cut short")?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    };
    let be32 = |at: usize| -> anyhow::Result<i32> {
        let b = data.get(at..at + 4).context("COPY data cut short")?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut rows = Vec::new();
    let mut at = COPY_HEADER.len();
    loop {
        let fields = be16(at)?;
        if fields == -1 {
            return Ok(rows);
        }
        let start = at;
        at += 2;
        for _ in 0..fields {
            let len = be32(at)?;
            at += 4 + usize::try_from(len.max(0))?;
        }
        ensure!(at <= data.len(), "COPY data cut short");
        rows.push(&data[start..at]);
    }
}
