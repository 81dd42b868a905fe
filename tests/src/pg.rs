//! A fresh, empty PostgreSQL database per caller, dropped when the caller is
//! done.
//!
//! With `DATABASE_URL` set, each database is created on that server (the
//! URL's user must be allowed to `CREATE DATABASE`). Without it, a throwaway
//! cluster is started from the installed server binaries (`initdb`,
//! `pg_ctl`, found in `PATH` or `/usr/lib/postgresql/*/bin`) in a temporary
//! directory, listening on a free 127.0.0.1 port with trust auth; every
//! caller in the process shares it, and the last `PgDatabase` dropped stops
//! it and removes the directory (under `/dev/shm` when it has room).
//! `initdb` and `postgres` refuse to run as root, so under uid 0 they run
//! as the `postgres` system user. A watchdog process stops the server and
//! removes the directories if the test process dies without cleaning up.
//!
//! This module never skips on its own: without `DATABASE_URL` and without
//! server binaries `fresh_database` fails with `NoPostgres`. Callers that
//! may skip outside CI use `fresh_database_or_skip`, which still fails when
//! `CI` is set.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::{Connection, PgConnection};

/// A database of its own for one caller. `url` connects to it; dropping the
/// value drops the database (and, for the last user of a throwaway cluster,
/// stops the cluster).
pub struct PgDatabase {
    pub url: String,
    name: String,
    admin_url: String,
    // Dropped after the database: keeps the throwaway cluster up until then.
    _cluster: Option<Arc<Cluster>>,
}

impl fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgDatabase")
            .field("url", &self.url)
            .finish()
    }
}

/// No PostgreSQL to test against: `DATABASE_URL` is unset and no server
/// binaries were found.
#[derive(Debug)]
pub struct NoPostgres(String);

impl fmt::Display for NoPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoPostgres {}

/// Creates an empty database for the caller (see module docs).
pub async fn fresh_database() -> anyhow::Result<PgDatabase> {
    let (admin_url, cluster) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => (url, None),
        _ => {
            let cluster = tokio::task::spawn_blocking(shared_cluster)
                .await
                .context("starting a throwaway PostgreSQL cluster")??;
            (cluster.admin_url.clone(), Some(cluster))
        }
    };
    let name = format!("keycap_t_{:016x}", rand::random::<u64>());
    let mut conn = PgConnection::connect(&admin_url)
        .await
        .with_context(|| format!("connecting to {}", redact(&admin_url)))?;
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .with_context(|| format!("CREATE DATABASE {name}"))?;
    conn.close().await.ok();
    Ok(PgDatabase {
        url: with_database(&admin_url, &name)?,
        name,
        admin_url,
        _cluster: cluster,
    })
}

/// Like `fresh_database`, but `Ok(None)` (with a note on stderr) when there
/// is no PostgreSQL at all and `CI` is not set. Under CI a missing
/// PostgreSQL is an error, never a skip.
pub async fn fresh_database_or_skip() -> anyhow::Result<Option<PgDatabase>> {
    match fresh_database().await {
        Ok(db) => Ok(Some(db)),
        Err(e) if e.downcast_ref::<NoPostgres>().is_some() && !in_ci() => {
            eprintln!("SKIPPING PostgreSQL test: {e:#} (set CI=true to make this an error)");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Drop may run inside a Tokio runtime, which cannot block on another
        // one; a short-lived thread with its own runtime can.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || drop_database(&admin_url, &name)).join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop test database {}: {e:#}", self.name),
            Err(_) => eprintln!("warning: dropping test database {} panicked", self.name),
        }
    }
}

fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut conn =
            tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(admin_url))
                .await
                .context("timed out connecting")??;
        // FORCE: pools of the test may still hold connections.
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await?;
        conn.close().await.ok();
        Ok(())
    })
}

/// `url` with its database name replaced by `name` (query kept).
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority = base
        .find("://")
        .map(|i| i + 3)
        .context("DATABASE_URL is not a postgres:// URL")?;
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut out = format!("{}/{name}", &base[..path]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// A URL without its password, for error messages.
fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[start..];
    let host_at = rest.find('/').unwrap_or(rest.len());
    match rest[..host_at].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}{}:***{}", &url[..start], &rest[..colon], &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

// --- throwaway cluster --------------------------------------------------

/// The cluster every caller in this process shares while any of them holds
/// a database in it.
static CLUSTER: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());

fn shared_cluster() -> anyhow::Result<Arc<Cluster>> {
    let mut slot = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(cluster) = slot.upgrade() {
        return Ok(cluster);
    }
    let cluster = Arc::new(Cluster::start()?);
    *slot = Arc::downgrade(&cluster);
    Ok(cluster)
}

/// The installed server binaries and how to run them: directly, or as the
/// `postgres` user when this process is root (initdb and postgres refuse
/// to run as root).
#[derive(Clone)]
struct Server {
    bin: PathBuf,
    run_as: RunAs,
}

#[derive(Clone, Copy)]
enum RunAs {
    Me,
    Runuser,
    Su,
}

impl Server {
    fn find() -> anyhow::Result<Server> {
        let bin = find_bin_dir().ok_or_else(|| {
            NoPostgres(
                "no PostgreSQL to test against: DATABASE_URL is not set and no server binaries \
                 (initdb, pg_ctl, postgres) were found in PATH or /usr/lib/postgresql/*/bin"
                    .to_string(),
            )
        })?;
        let run_as = if !is_root()? {
            RunAs::Me
        } else if which("runuser").is_some() {
            RunAs::Runuser
        } else {
            RunAs::Su
        };
        Ok(Server { bin, run_as })
    }

    /// A new temporary directory the server user owns, with a watchdog
    /// that removes it (stopping any server in it) should this process die
    /// without cleaning up.
    fn owned_dir(&self) -> anyhow::Result<tempfile::TempDir> {
        let dir = tempfile::Builder::new()
            .prefix("keycap-pg-")
            .tempdir_in(base_dir())?;
        if !matches!(self.run_as, RunAs::Me) {
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .status()
                .context("running chown")?;
            if !status.success() {
                bail!(
                    "could not give {} to the postgres user",
                    dir.path().display()
                );
            }
        }
        self.spawn_watchdog(dir.path());
        Ok(dir)
    }

    /// Runs `program` (a server binary name, or a path) in `cwd`, failing
    /// with its output when it fails.
    fn run(&self, program: &str, args: &[&str], cwd: &Path) -> anyhow::Result<()> {
        let out = self
            .command(program, args)?
            .current_dir(cwd)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} exited with {}:\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn command(&self, program: &str, args: &[&str]) -> anyhow::Result<Command> {
        let server_binary = self.bin.join(program);
        let exe = if server_binary.is_file() {
            path_str(&server_binary)?
        } else {
            program
        };
        Ok(match self.run_as {
            RunAs::Me => {
                let mut c = Command::new(exe);
                c.args(args);
                c
            }
            RunAs::Runuser => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--", exe]).args(args);
                c
            }
            RunAs::Su => {
                let line = std::iter::once(exe)
                    .chain(args.iter().copied())
                    .map(shell_quote)
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut c = Command::new("su");
                c.args(["postgres", "-s", "/bin/sh", "-c", &line]);
                c
            }
        })
    }

    /// Once this process is gone, stops any server in `dir/data` and removes
    /// `dir`; exits early when `dir` is removed by `Drop`. It runs from the
    /// moment the directory exists, so no window leaks a server; the second
    /// stop catches a server whose start was still under way.
    fn spawn_watchdog(&self, dir: &Path) {
        let data = dir.join("data");
        let Ok(stop) = self.command(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "stop", "-m", "immediate"],
        ) else {
            return;
        };
        let stop_line = std::iter::once(stop.get_program())
            .chain(stop.get_args())
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ");
        let dir = shell_quote(&dir.to_string_lossy());
        let script = format!(
            "while kill -0 {pid} 2>/dev/null && [ -d {dir} ]; do sleep 1; done; \
             if [ -d {dir} ]; then cd /; {stop_line} >/dev/null 2>&1; sleep 2; \
             {stop_line} >/dev/null 2>&1; rm -rf {dir}; fi",
            pid = std::process::id(),
        );
        let spawned = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            eprintln!("warning: no watchdog for the test PostgreSQL directory: {e}");
        }
    }
}

/// An initdb'ed data directory copied for each cluster after the first in
/// a process: copying is several times faster than initdb, and tests run one
/// after another start several clusters. A process that starts only one
/// (e.g. under cargo-nextest, one process per test) never makes it. Never
/// dropped; its watchdog removes it when the process exits.
struct Template {
    data: PathBuf,
    _dir: tempfile::TempDir,
}

static TEMPLATE: Mutex<Option<Arc<Template>>> = Mutex::new(None);
static CLUSTERS_STARTED: AtomicUsize = AtomicUsize::new(0);

/// Creates `data` for a new cluster: initdb for the first cluster of the
/// process, a copy of the template after that.
fn init_data(server: &Server, data: &Path, cwd: &Path) -> anyhow::Result<()> {
    if CLUSTERS_STARTED.fetch_add(1, Ordering::SeqCst) == 0 {
        return initdb(server, data, cwd);
    }
    let template = {
        let mut slot = TEMPLATE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match slot.as_ref() {
            Some(t) => t.clone(),
            None => {
                let dir = server.owned_dir()?;
                let data = dir.path().join("data");
                initdb(server, &data, dir.path())?;
                let t = Arc::new(Template { data, _dir: dir });
                *slot = Some(t.clone());
                t
            }
        }
    };
    server
        .run(
            "cp",
            &["-a", path_str(&template.data)?, path_str(data)?],
            cwd,
        )
        .context("copying the template data directory")
}

fn initdb(server: &Server, data: &Path, cwd: &Path) -> anyhow::Result<()> {
    server
        .run(
            "initdb",
            &[
                "-D",
                path_str(data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            cwd,
        )
        .context("initdb failed")
}

/// Where cluster directories go: RAM-backed `/dev/shm` when it has room
/// (initdb and copies are several times faster there), else the temp dir.
fn base_dir() -> PathBuf {
    const NEEDED_KIB: u64 = 1024 * 1024;
    let shm = Path::new("/dev/shm");
    let free_kib = Command::new("df")
        .args(["-Pk", "/dev/shm"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .nth(1)?
                .split_whitespace()
                .nth(3)?
                .parse::<u64>()
                .ok()
        });
    match free_kib {
        Some(kib) if kib >= NEEDED_KIB && shm.is_dir() => shm.to_path_buf(),
        _ => std::env::temp_dir(),
    }
}

struct Cluster {
    admin_url: String,
    server: Server,
    data: PathBuf,
    running: bool,
    // Removed on drop, after the server has stopped.
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> anyhow::Result<Cluster> {
        let server = Server::find()?;
        let dir = server.owned_dir()?;
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        init_data(&server, &data, dir.path())?;
        let mut cluster = Cluster {
            admin_url: String::new(),
            server,
            data,
            running: false,
            dir,
        };

        // Another process may take the port between our probe and the
        // server's bind; try a few.
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port()?;
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k '{}' -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
                path_str(cluster.dir.path())?
            );
            let started = cluster.server.run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&cluster.data)?,
                    "-l",
                    path_str(&log)?,
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    &opts,
                    "start",
                ],
                cluster.dir.path(),
            );
            match started {
                Ok(()) => {
                    cluster.running = true;
                    cluster.admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                    return Ok(cluster);
                }
                Err(e) => last_err = Some(e),
            }
        }
        let server_log = std::fs::read_to_string(&log).unwrap_or_default();
        Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("pg_ctl start failed"))
            .context(format!(
                "could not start PostgreSQL; server log:\n{server_log}"
            )))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let data = self.data.to_string_lossy().into_owned();
        let stopped = self.server.run(
            "pg_ctl",
            &["-D", &data, "stop", "-m", "immediate", "-w"],
            self.dir.path(),
        );
        if let Err(e) = stopped {
            eprintln!("warning: could not stop the test PostgreSQL cluster: {e:#}");
        }
        // `dir` is removed when the field drops.
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn is_root() -> anyhow::Result<bool> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: from `PATH`
/// (following symlinks to the real directory), else the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let complete = |d: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(initdb) = which("initdb") {
        if let Some(dir) = initdb
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            if complete(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| complete(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:1", "x").unwrap(),
            "postgres://h:1/x"
        );
        assert!(with_database("not a url", "x").is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
