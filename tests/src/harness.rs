//! Starts keycap's real binaries as child processes for end-to-end tests,
//! and talks to them over HTTP or HTTPS (certificates from `pki`).
//!
//! It owns the lifecycle of every process a test starts: each listens on
//! 127.0.0.1 on a free port (retried on a port clash), is ready only once its
//! `/healthz` answers 200 within a bounded deadline, writes stdout and stderr
//! to a log file in a temporary directory, and is killed when its handle is
//! dropped. When a test panics, each handle prints the tail of its log so a
//! CI failure can be read without rerunning it. It never sleeps in place of
//! synchronisation: every wait polls a condition until a deadline.
//!
//! The binaries are found next to the test executable
//! (`target/<profile>/`), or in `KEYCAP_BIN_DIR` when set; build them first
//! with `cargo build --workspace --bins`.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::mock::MockVendor;
use crate::pki::CertFiles;

/// How long a process may take to answer its health check. Generous: the
/// suite shares two cores with whatever else the machine is doing.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a policy change may take to reach a running proxy.
pub const POLICY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a spend event may take to show up at the control plane.
pub const SPEND_TIMEOUT: Duration = Duration::from_secs(20);
/// Interval between two evaluations of a polled condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Lines of a process log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;
/// Attempts at starting a process whose port was taken in the meantime.
const START_ATTEMPTS: usize = 4;

// --- waiting ----------------------------------------------------------------

/// The instant `d` from now, as a deadline for `wait_until` / `wait_for`.
pub fn within(d: Duration) -> Instant {
    Instant::now() + d
}

/// Evaluates `probe` until it yields a value or `deadline` passes. Every
/// evaluation starts before the deadline, so a value returned was observed
/// in time. `None` on timeout.
pub async fn wait_for<T, F, Fut>(deadline: Instant, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    loop {
        if Instant::now() > deadline {
            return None;
        }
        if let Some(v) = probe().await {
            return Some(v);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Evaluates `condition` until it holds or `deadline` passes; whether it
/// held.
pub async fn wait_until<F, Fut>(deadline: Instant, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(deadline, || {
        let c = condition();
        async move { c.await.then_some(()) }
    })
    .await
    .is_some()
}

// --- secrets ----------------------------------------------------------------

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// A fresh admin token in keycap's format (keycap-control refuses any
/// other as its bootstrap token).
pub fn admin_token() -> String {
    keycap_proto::secret::generate(keycap_proto::secret::SecretKind::AdminToken, "test")
}

/// A fresh fleet token.
pub fn fleet_token() -> String {
    format!("kcfleet_test_{}", random_hex(20))
}

/// A fresh key-encryption key: 64 hex characters.
pub fn master_key() -> String {
    random_hex(32)
}

// --- binaries and child processes -------------------------------------------

/// The path of one of keycap's binaries (see module docs).
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("KEYCAP_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let exe = std::env::current_exe().expect("current_exe");
            let mut dir = exe
                .parent()
                .expect("test executable has a directory")
                .to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} not found: run `cargo build --workspace --bins` first",
            path.display()
        );
    }
    path
}

/// A command for one of keycap's binaries with no `KEYCAP_*` setting
/// inherited from the environment the tests run in.
fn keycap_command(bin: &str) -> Command {
    let mut cmd = Command::new(bin_path(bin));
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("KEYCAP_") || name_text.starts_with("OTEL_") {
            cmd.env_remove(&name);
        }
    }
    // KEYCAP_TEST_LOG raises (or lowers) the children's log level.
    let level = std::env::var("KEYCAP_TEST_LOG").unwrap_or_else(|_| "info".into());
    cmd.env("KEYCAP_LOG", level).env("NO_COLOR", "1");
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// A child process whose output goes to a log file. Killed on drop; prints
/// the tail of its log when dropped during a panic.
pub struct ChildProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Where this run's output starts in the (appended-to) log file.
    log_start: u64,
}

impl ChildProcess {
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> ChildProcess {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let std_cmd = cmd.as_std();
        // Program and arguments only: secrets travel in the environment.
        let args: Vec<String> = std::iter::once(std_cmd.get_program())
            .chain(std_cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let _ = writeln!(file, "=== starting {name}: {}", args.join(" "));
        let log_start = file.metadata().map(|m| m.len()).unwrap_or(0);
        let err = file.try_clone().expect("clone log file handle");
        cmd.stdout(Stdio::from(file)).stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", args[0]));
        ChildProcess {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            log_start,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The process id while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The last `lines` lines of the log (every run of this process).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether this run wrote `needle` to its log.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log_of_this_run().contains(needle)
    }

    /// What this run (not earlier ones) wrote to the log.
    fn log_of_this_run(&self) -> String {
        let mut out = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            if f.seek(SeekFrom::Start(self.log_start)).is_ok() {
                let _ = f.read_to_string(&mut out);
            }
        }
        out
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Whether this process holds the listening socket of `url`'s port
    /// (Linux: `/proc/net/tcp{,6}` name each listening socket's inode, the
    /// process's descriptors name their sockets'). True where `/proc`
    /// cannot tell.
    fn listens_on_port_of(&self, url: &str) -> bool {
        let (Some(pid), Some(port)) = (
            self.child.as_ref().and_then(Child::id),
            reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.port_or_known_default()),
        ) else {
            return true;
        };
        let mut inodes = BTreeSet::new();
        let mut readable = false;
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            readable = true;
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let local_port = f
                    .get(1)
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|h| u16::from_str_radix(h, 16).ok());
                // State 0A is LISTEN; field 9 the socket's inode.
                if local_port == Some(port) && f.get(3) == Some(&"0A") {
                    inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
                }
            }
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return !readable;
        };
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| inodes.contains(target.to_string_lossy().as_ref()))
        })
    }

    /// Sends SIGTERM (the signal an orchestrator stops a service with) and
    /// waits until `deadline` for the process to exit. Returns its status, or
    /// `None` if it was still running at the deadline.
    pub async fn terminate(&mut self, deadline: Instant) -> Option<ExitStatus> {
        self.signal_term();
        self.wait_exit(deadline).await
    }

    /// Sends SIGTERM and returns at once.
    pub fn signal_term(&self) {
        self.signal("TERM");
    }

    /// SIGSTOP: the process keeps its sockets open but does nothing, like
    /// a host that hangs. Undo with `resume` (a stopped process is still
    /// killed when its handle drops).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Sends the signal kill(1) calls `name` and returns at once.
    fn signal(&self, name: &str) {
        let Some(pid) = self.id() else { return };
        let sent = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("run kill(1)");
        assert!(sent.success(), "kill -{name} {pid} failed");
    }

    /// Waits until `deadline` for the process to exit; its status, or
    /// `None` if it is still running then.
    pub async fn wait_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        tokio::time::timeout_at(deadline.into(), child.wait())
            .await
            .ok()?
            .ok()
    }

    /// SIGKILL, then reap.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- last {LOG_TAIL_LINES} lines of {} ({}) -----\n{}\n----- end of {} log -----",
                self.name,
                self.log.display(),
                self.log_tail(LOG_TAIL_LINES),
                self.name
            );
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// `n` ports that were free a moment ago, none handed out before by this
/// process. Another process may take one before the child binds it;
/// `launch` retries when that happens. Within one test the ports never
/// repeat: children started at once (a fleet's proxies) would otherwise be
/// able to get the same port, and the one that loses the bind could pass
/// for ready while its sibling answers on that port.
pub fn free_ports(n: usize) -> Vec<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().expect("handed-out ports lock");
    // Every listener stays open until all `n` are picked, so the kernel
    // gives distinct ports; those handed out earlier are skipped.
    let mut listeners = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        if handed_out.insert(port) {
            ports.push(port);
        }
        listeners.push(l);
    }
    ports
}

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

fn http_client() -> reqwest::Client {
    http_client_trusting(None)
}

/// Which HTTP version a test client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.1 only, the tests' default.
    Http1,
    /// HTTP/2: with prior knowledge for `http://`; for `https://`, as an
    /// ordinary client does it, offering `h2` and `http/1.1` by ALPN and
    /// speaking whichever the server picks.
    Http2,
}

/// A client that trusts only the CA in the PEM file `ca` (if given) for
/// `https://` URLs, speaking HTTP/1.1.
fn http_client_trusting(ca: Option<&Path>) -> reqwest::Client {
    http_client_with(ca, HttpVersion::Http1, false)
}

/// A client that trusts only `ca` (if given) and speaks `version`;
/// `https` says whether it is for an `https://` base URL.
fn http_client_with(ca: Option<&Path>, version: HttpVersion, https: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).unwrap_or_else(|e| panic!("read {}: {e}", ca.display()));
        builder = builder.add_root_certificate(
            reqwest::Certificate::from_pem(&pem).expect("CA certificate PEM"),
        );
    }
    builder = match (version, https) {
        (HttpVersion::Http1, _) => builder.http1_only(),
        (HttpVersion::Http2, false) => builder.http2_prior_knowledge(),
        (HttpVersion::Http2, true) => builder,
    };
    builder
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// When a started process counts as up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Every readiness URL answers 200 (a proxy: it has its policy).
    Healthy,
    /// Every readiness URL answers with any HTTP status: the process
    /// listens, whether or not it is healthy (a proxy cut off from its
    /// control plane answers 503).
    Listening,
}

async fn is_up(http: &reqwest::Client, url: &str, readiness: Readiness) -> bool {
    match http.get(url).timeout(Duration::from_secs(2)).send().await {
        Ok(r) => readiness == Readiness::Listening || r.status() == reqwest::StatusCode::OK,
        Err(_) => false,
    }
}

/// Starts a process on the ports `ports()` picks and waits until every URL
/// `ready_urls` names is up as `readiness` says. Retries with new ports when
/// the process exits because a port was taken.
async fn launch(
    name: &str,
    log: &Path,
    mut ports: impl FnMut() -> Vec<u16>,
    command: impl Fn(&[u16]) -> Command,
    ready_urls: impl Fn(&[u16]) -> Vec<String>,
    readiness: Readiness,
    ca: Option<&Path>,
) -> (ChildProcess, Vec<u16>) {
    let http = http_client_trusting(ca);
    for attempt in 1..=START_ATTEMPTS {
        let p = ports();
        let mut process = ChildProcess::spawn(name, command(&p), log);
        let urls = ready_urls(&p);
        let deadline = within(READY_TIMEOUT);
        loop {
            if let Some(status) = process.exited() {
                let output = process.log_of_this_run();
                let clash = output.contains("in use") || output.contains("AddrInUse");
                if clash && attempt < START_ATTEMPTS {
                    eprintln!("{name} could not bind {p:?}; retrying on other ports");
                    break;
                }
                panic!("{name} exited ({status}) before it was ready; its output:\n{output}");
            }
            let mut ready = true;
            for u in &urls {
                // Up, and answered by this child: another test's server
                // that took the port first answers too, while the child
                // that lost the bind is still on its way out.
                if !is_up(&http, u, readiness).await || !process.listens_on_port_of(u) {
                    ready = false;
                    break;
                }
            }
            if ready {
                return (process, p);
            }
            if Instant::now() > deadline {
                panic!(
                    "{name} was not ready within {READY_TIMEOUT:?} ({urls:?}); log:\n{}",
                    process.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL * 2).await;
        }
    }
    panic!("{name} could not start after {START_ATTEMPTS} attempts");
}

fn log_dir() -> Arc<TempDir> {
    Arc::new(
        tempfile::Builder::new()
            .prefix("keycap-e2e-logs-")
            .tempdir()
            .expect("log tempdir"),
    )
}

// --- control plane ------------------------------------------------------------

/// Where the control plane keeps its data.
#[derive(Clone, Debug)]
pub enum Database {
    /// A SQLite file (`keycap.db`) in a directory kept alive by this value.
    Sqlite(Arc<TempDir>),
    /// A PostgreSQL URL.
    Postgres(String),
}

impl Database {
    /// SQLite in a fresh temporary directory.
    pub fn sqlite() -> Database {
        Database::Sqlite(Arc::new(
            tempfile::Builder::new()
                .prefix("keycap-e2e-db-")
                .tempdir()
                .expect("database tempdir"),
        ))
    }

    pub fn url(&self) -> String {
        match self {
            Database::Sqlite(dir) => format!("sqlite:{}", dir.path().join("keycap.db").display()),
            Database::Postgres(url) => url.clone(),
        }
    }
}

/// How to start a control plane.
#[derive(Clone, Debug)]
pub struct ControlOpts {
    pub database: Database,
    pub admin_token: String,
    pub fleet_token: String,
    pub master_key: String,
    /// Key-encryption keys still accepted for opening (a rotation under way).
    pub previous_master_keys: Vec<String>,
    /// `KEYCAP_LOG` for this process (else `KEYCAP_TEST_LOG`, else `info`).
    pub log_level: Option<String>,
    /// Flags added to the command line, e.g. `--change-poll-ms 600000`.
    pub args: Vec<String>,
    /// Serve over TLS (see `ControlTls`); `None` serves plain HTTP.
    pub tls: Option<ControlTls>,
    /// `--allow-private-upstreams`: on for every test control plane (the
    /// mock vendors are plain http on 127.0.0.1) unless a test turns it off.
    pub allow_private_upstreams: bool,
    /// Environment added to the process (`OTEL_*` for a traced one).
    pub env: Vec<(String, String)>,
}

/// TLS for a control plane: its server certificate, the CA clients trust
/// it by, and (for mutual TLS with proxies) the CA of client certificates.
#[derive(Clone, Debug)]
pub struct ControlTls {
    pub server: CertFiles,
    pub ca: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ControlOpts {
    /// Fresh tokens and master key over `database`.
    pub fn new(database: Database) -> ControlOpts {
        ControlOpts {
            database,
            admin_token: admin_token(),
            fleet_token: fleet_token(),
            master_key: master_key(),
            previous_master_keys: Vec::new(),
            log_level: None,
            args: Vec::new(),
            tls: None,
            allow_private_upstreams: true,
            env: Vec::new(),
        }
    }

    pub fn tls(mut self, tls: ControlTls) -> ControlOpts {
        self.tls = Some(tls);
        self
    }

    /// Fresh tokens over a SQLite file in a temporary directory.
    pub fn sqlite() -> ControlOpts {
        ControlOpts::new(Database::sqlite())
    }

    pub fn postgres(url: &str) -> ControlOpts {
        ControlOpts::new(Database::Postgres(url.to_string()))
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// A running `keycap-control`.
pub struct Control {
    // Dropped (killed) before the logs and the database directory go.
    process: ChildProcess,
    pub opts: ControlOpts,
    port: u16,
    logs: Arc<TempDir>,
}

impl Control {
    /// Runs the `keycap` CLI against this control plane with its admin
    /// token (`keycap_cli`).
    pub async fn cli<S: AsRef<str>>(&self, args: &[S]) -> CliOutput {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        keycap_cli(&self.url(), &self.opts.admin_token, &args).await
    }

    pub async fn start(opts: ControlOpts) -> Control {
        let logs = log_dir();
        let (process, port) = Self::spawn(&opts, &logs, None).await;
        Control {
            process,
            opts,
            port,
            logs,
        }
    }

    async fn spawn(opts: &ControlOpts, logs: &TempDir, port: Option<u16>) -> (ChildProcess, u16) {
        let log = logs.path().join("keycap-control.log");
        let (process, ports) = launch(
            "keycap-control",
            &log,
            || vec![port.unwrap_or_else(free_port)],
            |p| {
                let mut cmd = keycap_command("keycap-control");
                cmd.arg("--listen")
                    .arg(format!("127.0.0.1:{}", p[0]))
                    .arg("--database-url")
                    .arg(opts.database.url())
                    .env("KEYCAP_MASTER_KEY", &opts.master_key)
                    .env("KEYCAP_ADMIN_TOKEN", &opts.admin_token)
                    .env("KEYCAP_FLEET_TOKEN", &opts.fleet_token);
                if let Some(level) = &opts.log_level {
                    cmd.env("KEYCAP_LOG", level);
                }
                cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
                cmd.args(&opts.args);
                if opts.allow_private_upstreams {
                    cmd.arg("--allow-private-upstreams");
                }
                if !opts.previous_master_keys.is_empty() {
                    cmd.env(
                        "KEYCAP_PREVIOUS_MASTER_KEYS",
                        opts.previous_master_keys.join(","),
                    );
                }
                if let Some(tls) = &opts.tls {
                    cmd.arg("--tls-cert")
                        .arg(&tls.server.cert)
                        .arg("--tls-key")
                        .arg(&tls.server.key);
                    if let Some(client_ca) = &tls.client_ca {
                        cmd.arg("--client-ca").arg(client_ca);
                    }
                }
                cmd
            },
            |p| vec![format!("{}://127.0.0.1:{}/healthz", opts.scheme(), p[0])],
            Readiness::Healthy,
            opts.tls.as_ref().map(|t| t.ca.as_path()),
        )
        .await;
        (process, ports[0])
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS): gRPC and REST.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.opts.scheme(), self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The REST API with the admin token (trusting the control plane's CA
    /// under TLS).
    pub fn admin(&self) -> Api {
        let api = Api::new(&self.url(), Some(&self.opts.admin_token));
        match &self.opts.tls {
            Some(tls) => api.trusting(&tls.ca),
            None => api,
        }
    }

    pub fn process(&self) -> &ChildProcess {
        &self.process
    }

    pub fn process_mut(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// The directory holding the SQLite database and its `-wal`/`-shm`
    /// files; `None` on PostgreSQL.
    pub fn database_dir(&self) -> Option<&Path> {
        match &self.opts.database {
            Database::Sqlite(dir) => Some(dir.path()),
            Database::Postgres(_) => None,
        }
    }

    /// SIGKILLs the control plane (no graceful shutdown).
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts the control plane again on the same port and database (after
    /// `kill`, or killing it first).
    pub async fn restart(&mut self) {
        self.process.kill().await;
        let (process, _) = Self::spawn(&self.opts, &self.logs, Some(self.port)).await;
        self.process = process;
    }
}

// --- proxy --------------------------------------------------------------------

/// How to start a proxy.
#[derive(Clone, Debug)]
pub struct ProxyOpts {
    pub node_id: String,
    /// Flags added to the command line, e.g. `--upstream-timeout-secs 1`
    /// (see data-plane/src/config.rs).
    pub args: Vec<String>,
    /// `Healthy` (the default) waits until the proxy has its policy;
    /// `Listening` only until it answers, for a proxy that cannot get one.
    pub readiness: Readiness,
    /// `KEYCAP_LOG` for this process (else `KEYCAP_TEST_LOG`, else `info`).
    pub log_level: Option<String>,
    /// Set by `serve_tls`: the CA agents trust the proxy's HTTPS listener
    /// by.
    pub listener_ca: Option<PathBuf>,
    /// Environment added to the process (`OTEL_*` for a traced one).
    pub env: Vec<(String, String)>,
}

impl ProxyOpts {
    pub fn new(node_id: &str) -> ProxyOpts {
        ProxyOpts {
            node_id: node_id.to_string(),
            args: Vec::new(),
            readiness: Readiness::Healthy,
            log_level: None,
            listener_ca: None,
            env: Vec::new(),
        }
    }

    /// Serves agents over HTTPS with `server` (issued by the CA in `ca`).
    pub fn serve_tls(self, server: &CertFiles, ca: &Path) -> ProxyOpts {
        let mut opts = self
            .flag("tls-cert", server.cert.display())
            .flag("tls-key", server.key.display());
        opts.listener_ca = Some(ca.to_path_buf());
        opts
    }

    fn scheme(&self) -> &'static str {
        if self.listener_ca.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn log_level(mut self, level: &str) -> ProxyOpts {
        self.log_level = Some(level.to_string());
        self
    }

    /// Adds `--<flag> <value>`.
    pub fn flag(mut self, flag: &str, value: impl ToString) -> ProxyOpts {
        self.args.push(format!("--{flag}"));
        self.args.push(value.to_string());
        self
    }

    pub fn readiness(mut self, readiness: Readiness) -> ProxyOpts {
        self.readiness = readiness;
        self
    }

    /// Adds `vars` to the process's environment.
    pub fn envs(mut self, vars: Vec<(String, String)>) -> ProxyOpts {
        self.env.extend(vars);
        self
    }
}

/// A running `keycap-proxy`: ready (it has its policy) unless started with
/// `Readiness::Listening`.
pub struct Proxy {
    process: ChildProcess,
    port: u16,
    listener_ca: Option<PathBuf>,
    pub node_id: String,
    control_urls: Vec<String>,
    fleet_token: String,
    opts: ProxyOpts,
    logs: Arc<TempDir>,
}

impl Proxy {
    pub async fn start(control_url: &str, fleet_token: &str, node_id: &str) -> Proxy {
        Proxy::start_with(control_url, fleet_token, &ProxyOpts::new(node_id)).await
    }

    pub async fn start_with(control_url: &str, fleet_token: &str, opts: &ProxyOpts) -> Proxy {
        Proxy::start_with_replicas(&[control_url.to_string()], fleet_token, opts).await
    }

    /// A proxy given every control-plane replica in `control_urls`, one
    /// `--control-url` flag each, in that order: it talks to the first
    /// until that one stops answering.
    pub async fn start_with_replicas(
        control_urls: &[String],
        fleet_token: &str,
        opts: &ProxyOpts,
    ) -> Proxy {
        let logs = log_dir();
        let (process, port) = Self::spawn(control_urls, fleet_token, opts, &logs, None).await;
        Proxy {
            process,
            port,
            listener_ca: opts.listener_ca.clone(),
            node_id: opts.node_id.clone(),
            control_urls: control_urls.to_vec(),
            fleet_token: fleet_token.to_string(),
            opts: opts.clone(),
            logs,
        }
    }

    async fn spawn(
        control_urls: &[String],
        fleet_token: &str,
        opts: &ProxyOpts,
        logs: &TempDir,
        port: Option<u16>,
    ) -> (ChildProcess, u16) {
        let log = logs.path().join("keycap-proxy.log");
        let (process, ports) = launch(
            "keycap-proxy",
            &log,
            || vec![port.unwrap_or_else(free_port)],
            |p| {
                let mut cmd = keycap_command("keycap-proxy");
                cmd.arg("--listen").arg(format!("127.0.0.1:{}", p[0]));
                for url in control_urls {
                    cmd.arg("--control-url").arg(url);
                }
                cmd.arg("--node-id")
                    .arg(&opts.node_id)
                    .args(&opts.args)
                    .env("KEYCAP_FLEET_TOKEN", fleet_token);
                if let Some(level) = &opts.log_level {
                    cmd.env("KEYCAP_LOG", level);
                }
                cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
                cmd
            },
            |p| vec![format!("{}://127.0.0.1:{}/healthz", opts.scheme(), p[0])],
            opts.readiness,
            opts.listener_ca.as_deref(),
        )
        .await;
        (process, ports[0])
    }

    /// Starts the proxy again on the same port, node id and flags (after
    /// `process_mut().kill()`, or killing it first), and waits until it is
    /// ready as its options say.
    pub async fn restart(&mut self) {
        self.process.kill().await;
        let (process, _) = Self::spawn(
            &self.control_urls,
            &self.fleet_token,
            &self.opts,
            &self.logs,
            Some(self.port),
        )
        .await;
        self.process = process;
    }

    /// `http://127.0.0.1:<port>` (`https://` when serving TLS).
    pub fn url(&self) -> String {
        let scheme = if self.listener_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// An agent's client for this proxy with `token` (trusting the
    /// listener's CA when it serves TLS).
    pub fn api(&self, token: Option<&str>) -> Api {
        let api = Api::new(&self.url(), token);
        match &self.listener_ca {
            Some(ca) => api.trusting(ca),
            None => api,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn process(&self) -> &ChildProcess {
        &self.process
    }

    pub fn process_mut(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

// --- keycap dev -----------------------------------------------------------------

/// A running `keycap dev`: control plane, proxy and sandbox vendor in one
/// process over a temporary data dir.
pub struct Dev {
    process: ChildProcess,
    pub proxy_url: String,
    pub control_url: String,
    pub sandbox_url: String,
    pub admin_token: String,
    data_dir: TempDir,
    _logs: Arc<TempDir>,
}

impl Dev {
    /// Starts `keycap dev` with `KEYCAP_ADMIN_TOKEN` set to `admin_token`.
    pub async fn start(admin_token: &str) -> Dev {
        Dev::boot(Some(admin_token), false, &[]).await
    }

    /// `start`, with `env` added to the process's environment (`OTEL_*`
    /// for a traced one).
    pub async fn start_with_env(admin_token: &str, env: &[(String, String)]) -> Dev {
        Dev::boot(Some(admin_token), false, env).await
    }

    /// Starts `keycap --admin-token <admin_token> dev`, with no
    /// `KEYCAP_ADMIN_TOKEN` in its environment.
    pub async fn start_with_admin_token_flag(admin_token: &str) -> Dev {
        Dev::boot(Some(admin_token), true, &[]).await
    }

    /// Starts `keycap dev` without `KEYCAP_ADMIN_TOKEN`, so that it makes
    /// up its own admin token; `admin_token` is then what it wrote to
    /// `<data dir>/admin-token`.
    pub async fn start_generating_admin_token() -> Dev {
        Dev::boot(None, false, &[]).await
    }

    async fn boot(admin_token: Option<&str>, as_flag: bool, env: &[(String, String)]) -> Dev {
        let logs = log_dir();
        let data_dir = tempfile::Builder::new()
            .prefix("keycap-e2e-dev-")
            .tempdir()
            .expect("dev data dir");
        let log = logs.path().join("keycap-dev.log");
        let (process, p) = launch(
            "keycap dev",
            &log,
            || free_ports(3),
            |p| {
                let mut cmd = keycap_command("keycap");
                cmd.env_remove("KEYCAP_ADMIN_TOKEN");
                cmd.envs(env.iter().map(|(k, v)| (k, v)));
                if let (Some(token), true) = (admin_token, as_flag) {
                    cmd.arg("--admin-token").arg(token);
                }
                cmd.arg("dev")
                    .arg("--data-dir")
                    .arg(data_dir.path())
                    .arg("--proxy-listen")
                    .arg(format!("127.0.0.1:{}", p[0]))
                    .arg("--control-listen")
                    .arg(format!("127.0.0.1:{}", p[1]))
                    .arg("--sandbox-listen")
                    .arg(format!("127.0.0.1:{}", p[2]));
                if let (Some(token), false) = (admin_token, as_flag) {
                    cmd.env("KEYCAP_ADMIN_TOKEN", token);
                }
                cmd
            },
            |p| {
                vec![
                    format!("http://127.0.0.1:{}/healthz", p[1]),
                    format!("http://127.0.0.1:{}/healthz", p[0]),
                ]
            },
            Readiness::Healthy,
            None,
        )
        .await;
        let admin_token = match admin_token {
            Some(t) => t.to_string(),
            // Written before either plane listens, so it is there by now.
            None => {
                let path = data_dir.path().join("admin-token");
                std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("keycap dev wrote no {}: {e}", path.display()))
                    .trim()
                    .to_string()
            }
        };
        Dev {
            process,
            proxy_url: format!("http://127.0.0.1:{}", p[0]),
            control_url: format!("http://127.0.0.1:{}", p[1]),
            sandbox_url: format!("http://127.0.0.1:{}", p[2]),
            admin_token,
            data_dir,
            _logs: logs,
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn process(&self) -> &ChildProcess {
        &self.process
    }
}

// --- the keycap CLI ---------------------------------------------------------------

/// What one `keycap` CLI run printed.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Stdout as JSON; panics unless the run succeeded and printed JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        assert!(
            self.status.success(),
            "keycap failed ({}):\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "keycap printed no JSON ({e}):\n{}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `keycap --control-url <url> --admin-token <token> <args...>`.
pub async fn keycap_cli(control_url: &str, admin_token: &str, args: &[&str]) -> CliOutput {
    keycap_cli_with_stdin(control_url, admin_token, args, None).await
}

/// `keycap_cli` with `stdin` written to the command's standard input.
pub async fn keycap_cli_with_stdin(
    control_url: &str,
    admin_token: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> CliOutput {
    let mut cmd = keycap_command("keycap");
    cmd.arg("--control-url")
        .arg(control_url)
        .arg("--admin-token")
        .arg(admin_token)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let run = async {
        let mut child = cmd.spawn()?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await?;
        }
        child.wait_with_output().await
    };
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("keycap {args:?} did not finish within 60 s"))
        .unwrap_or_else(|e| panic!("cannot run keycap {args:?}: {e}"));
    CliOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// --- HTTP -----------------------------------------------------------------------

/// An HTTP response, read in full.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    /// The HTTP version the response came in.
    pub version: reqwest::Version,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Resp {
    /// The body as JSON; panics (showing the body) if it is not.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("response {} is not JSON ({e}): {}", self.status, self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status; returns the body as JSON.
    #[track_caller]
    pub fn expect(&self, status: u16) -> Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        self.json()
    }

    /// Asserts a keycap error: status, code and a message, in whichever
    /// envelope carried them. Returns keycap's part of it in the flat form
    /// (`{"error": code, "message", ...fields}`, see `keycap_refusal`).
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        let body = keycap_refusal(&self.json());
        assert_eq!(
            body["error"], code,
            "unexpected error code; body: {}",
            self.text
        );
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {}",
            self.text
        );
        body
    }

    /// The error code of a keycap error body, if it is one.
    pub fn error_code(&self) -> Option<String> {
        let body = serde_json::from_str::<Value>(&self.text).ok()?;
        keycap_refusal(&body)
            .get("error")?
            .as_str()
            .map(str::to_string)
    }
}

/// keycap's part of a refusal body in the flat form, whatever envelope
/// carried it: the body itself when it is flat (the generic profile, the
/// `/vault/*` API), or, when `error` is an object (a vendor's envelope, or
/// the one answered before the key is known), that object with its `code`
/// as `error`, beside keycap's fields.
pub fn keycap_refusal(body: &Value) -> Value {
    match body.get("error") {
        Some(Value::Object(e)) => {
            let mut flat = e.clone();
            let code = flat.remove("code").unwrap_or(Value::Null);
            flat.insert("error".into(), code);
            Value::Object(flat)
        }
        _ => body.clone(),
    }
}

/// An HTTP client for one base URL with one `Authorization` value: the
/// admin REST API (token) or an agent calling the proxy (vault key).
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    authorization: Option<String>,
    /// The CA trusted for `https://` (`trusting`), kept to build another
    /// client for the same base.
    ca: Option<PathBuf>,
}

impl Api {
    /// `Authorization: Bearer <token>` on every request when `token` is set.
    pub fn new(base: &str, token: Option<&str>) -> Api {
        Api {
            http: http_client(),
            base: base.trim_end_matches('/').to_string(),
            authorization: token.map(|t| format!("Bearer {t}")),
            ca: None,
        }
    }

    /// The same API through a client that trusts only the CA in `ca` for
    /// `https://`.
    pub fn trusting(self, ca: &Path) -> Api {
        Api {
            http: http_client_trusting(Some(ca)),
            ca: Some(ca.to_path_buf()),
            ..self
        }
    }

    /// The same API through a client of its own speaking `version` (see
    /// `HttpVersion`); each `Resp` says which version answered.
    pub fn speaking(&self, version: HttpVersion) -> Api {
        Api {
            http: http_client_with(
                self.ca.as_deref(),
                version,
                self.base.starts_with("https://"),
            ),
            ..self.clone()
        }
    }

    /// The same client with another raw `Authorization` value (or none).
    pub fn with_authorization(&self, value: Option<&str>) -> Api {
        Api {
            authorization: value.map(str::to_string),
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request; `body` is (content type, bytes). Panics only when
    /// nothing answered.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        extra_headers: &[(&str, &str)],
    ) -> Resp {
        let url = format!("{}{}", self.base, path);
        self.try_send(method.clone(), path, body, extra_headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    }

    /// Like `send`, but a request nothing answered (connection refused or
    /// cut) is an error instead of a panic: for calls to a process a test
    /// may kill.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        extra_headers: &[(&str, &str)],
    ) -> Result<Resp, String> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(a) = &self.authorization {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        for (n, v) in extra_headers {
            req = req.header(*n, *v);
        }
        if let Some((ct, bytes)) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, ct).body(bytes);
        }
        let resp = req.send().await.map_err(|e| format!("no response: {e}"))?;
        let status = resp.status().as_u16();
        let version = resp.version();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("body unreadable: {e}"))?;
        Ok(Resp {
            status,
            version,
            headers,
            text,
        })
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, path, None, &[]).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send(Method::DELETE, path, None, &[]).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.send(
            Method::POST,
            path,
            Some(("application/json", body.to_string().into_bytes())),
            &[],
        )
        .await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Resp {
        self.send(
            Method::PUT,
            path,
            Some(("application/json", body.to_string().into_bytes())),
            &[],
        )
        .await
    }

    /// POSTs JSON and returns as soon as the response head has arrived,
    /// for a test that reads the body as it comes (`chunk()`). Panics only
    /// when nothing answered.
    pub async fn post_json_streaming(&self, path: &str, body: &Value) -> reqwest::Response {
        let url = format!("{}{}", self.base, path);
        let mut req = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(a) = &self.authorization {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: no response: {e}"))
    }

    /// POST with a raw body and content type (for malformed input).
    pub async fn post_raw(&self, path: &str, content_type: &str, body: &str) -> Resp {
        self.send(
            Method::POST,
            path,
            Some((content_type, body.as_bytes().to_vec())),
            &[],
        )
        .await
    }

    /// POST `application/x-www-form-urlencoded`, as Stripe clients send.
    pub async fn post_form(&self, path: &str, form: &str) -> Resp {
        self.post_raw(path, "application/x-www-form-urlencoded", form)
            .await
    }
}

/// Percent-encodes a query parameter value.
pub fn q(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// A response read off a raw TCP connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Writes `request` as-is to `addr` (no URL normalisation by any client
/// library) and reads the response until the server closes. The request
/// should carry `Connection: close`.
pub async fn raw_http(addr: SocketAddr, request: &str) -> RawResponse {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("raw HTTP exchange timed out")
        .expect("raw HTTP exchange failed");
    parse_raw_response(&buf)
}

fn parse_raw_response(buf: &[u8]) -> RawResponse {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &buf[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        match headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
        {
            Some(n) => rest[..n.min(rest.len())].to_vec(),
            None => rest.to_vec(),
        }
    };
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return out;
        };
        rest = &rest[eol + 2..];
        if size == 0 || rest.len() < size {
            return out;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[(size + 2).min(rest.len())..];
    }
}

// --- a control plane and a proxy together ------------------------------------------

/// A minted vault key.
#[derive(Debug, Clone)]
pub struct MintedKey {
    pub id: String,
    /// The secret (`kc_...`), shown once.
    pub secret: String,
    /// The create response.
    pub body: Value,
}

/// The error code a ready key gets for the probe request: the probe's
/// endpoint is in no test key's allowlist, so a key the proxy knows and
/// accepts is refused at the allowlist, after the key checks.
pub const PROBE_LIVE: &str = "endpoint_not_allowed";

/// The error code the proxy at `proxy_url` gives `secret` for a request no
/// test key allows (`DELETE /{vendor}/keycap-e2e-probe`): `PROBE_LIVE` for a
/// key it accepts, else why it refuses the key. Nothing is forwarded.
pub async fn probe_key(proxy_url: &str, vendor: &str, secret: &str) -> Option<String> {
    probe(&Api::new(proxy_url, Some(secret)), vendor).await
}

/// `probe_key` through `agent`, a client for a proxy holding the key.
pub async fn probe(agent: &Api, vendor: &str) -> Option<String> {
    agent
        .delete(&format!("/{vendor}/keycap-e2e-probe"))
        .await
        .error_code()
}

/// The next policy update on a fleet policy stream, skipping the heartbeats
/// replicas send between updates.
pub async fn next_policy_update(
    stream: &mut tonic::Streaming<keycap_proto::pb::PolicyUpdate>,
) -> Result<Option<keycap_proto::pb::PolicyUpdate>, tonic::Status> {
    use keycap_proto::pb::policy_update::Update;
    loop {
        match stream.message().await? {
            Some(keycap_proto::pb::PolicyUpdate {
                update: Some(Update::Heartbeat(_)),
                ..
            }) => continue,
            other => return Ok(other),
        }
    }
}

/// Asserts that a creation's or revocation's answer says every connected
/// proxy confirmed it.
pub fn assert_all_confirmed(answer: &Value) {
    assert_eq!(
        answer["confirmation"]["all_confirmed"],
        json!(true),
        "not every proxy confirmed: {answer}"
    );
}

/// A control plane and a proxy connected to it, with an admin client.
pub struct Stack {
    // Field order is drop order: the proxy goes first.
    pub proxy: Proxy,
    pub control: Control,
    pub admin: Api,
}

impl Stack {
    /// Control plane on SQLite in a temporary directory, and one proxy.
    pub async fn start() -> Stack {
        Stack::start_with(ControlOpts::sqlite()).await
    }

    pub async fn start_with(opts: ControlOpts) -> Stack {
        Stack::start_with_proxy(opts, ProxyOpts::new("e2e-proxy")).await
    }

    /// A control plane, and a proxy started with `proxy` (extra flags).
    pub async fn start_with_proxy(opts: ControlOpts, proxy: ProxyOpts) -> Stack {
        let control = Control::start(opts).await;
        let proxy = Proxy::start_with(&control.url(), &control.opts.fleet_token, &proxy).await;
        let admin = control.admin();
        Stack {
            proxy,
            control,
            admin,
        }
    }

    /// The admin REST API relayed through the proxy's `/vault`.
    pub fn admin_via_proxy(&self) -> Api {
        self.proxy.api(Some(&self.control.opts.admin_token))
    }

    /// An agent calling the proxy with `key`.
    pub fn agent(&self, key: &str) -> Api {
        self.proxy.api(Some(key))
    }

    /// Registers (or updates) vendor `name` pointing at `mock`, with the
    /// mock's credential; returns the response body.
    pub async fn register(&self, name: &str, profile: &str, mock: &MockVendor) -> Value {
        self.put_vendor(
            name,
            &json!({"profile": profile, "base_url": mock.url(), "credential": mock.credential()}),
        )
        .await
    }

    /// PUT /vault/vendors/{name}, asserting 200 or 201.
    pub async fn put_vendor(&self, name: &str, body: &Value) -> Value {
        let r = self
            .admin
            .put_json(&format!("/vault/vendors/{name}"), body)
            .await;
        assert!(
            r.status == 200 || r.status == 201,
            "PUT vendor {name}: {} {}",
            r.status,
            r.text
        );
        r.json()
    }

    /// POST /vault/keys, asserting 201; does not wait for the proxy.
    pub async fn create_key(&self, body: &Value) -> MintedKey {
        let r = self.admin.post_json("/vault/keys", body).await;
        let body = r.expect(201);
        MintedKey {
            id: body["id"].as_str().expect("key id").to_string(),
            secret: body["key"].as_str().expect("key secret").to_string(),
            body,
        }
    }

    /// Creates a key, asserting every connected proxy confirmed it serves
    /// the key, and returns at once: the caller's first call is the agent's
    /// first call, made without waiting, as an agent makes it.
    pub async fn mint(&self, body: &Value) -> MintedKey {
        let key = self.create_key(body).await;
        assert_all_confirmed(&key.body);
        key
    }

    /// Mints a key through the proxy's `/vault` relay speaking `version`
    /// (asserting the answer came in it), and waits until the proxy
    /// accepts the key.
    pub async fn mint_via_proxy(&self, version: HttpVersion, body: &Value) -> MintedKey {
        let r = self
            .admin_via_proxy()
            .speaking(version)
            .post_json("/vault/keys", body)
            .await;
        let expected = match version {
            HttpVersion::Http1 => reqwest::Version::HTTP_11,
            HttpVersion::Http2 => reqwest::Version::HTTP_2,
        };
        assert_eq!(r.version, expected, "minted over {:?}", r.version);
        let created = r.expect(201);
        let key = MintedKey {
            id: created["id"].as_str().expect("key id").to_string(),
            secret: created["key"].as_str().expect("key secret").to_string(),
            body: created,
        };
        assert_all_confirmed(&key.body);
        key
    }

    /// See `probe_key`.
    pub async fn probe(&self, vendor: &str, secret: &str) -> Option<String> {
        probe(&self.agent(secret), vendor).await
    }

    /// GET /vault/keys/{id}, asserting 200.
    pub async fn key(&self, id: &str) -> Value {
        self.admin.key(id).await
    }

    /// See `Api::wait_key_spend`.
    pub async fn wait_key_spend(&self, id: &str, micros: i64, calls: i64) -> Value {
        self.admin.wait_key_spend(id, micros, calls).await
    }

    /// GET /vault/audit?<query>, asserting 200; the entries.
    pub async fn audit(&self, query: &str) -> Vec<Value> {
        self.admin.audit(query).await
    }

    /// See `Api::wait_audit`.
    pub async fn wait_audit(&self, query: &str, n: usize) -> Vec<Value> {
        self.admin.wait_audit(query, n).await
    }
}

/// Reads of the admin REST API, for an `Api` holding an admin token.
impl Api {
    /// GET /vault/keys/{id}, asserting 200.
    pub async fn key(&self, id: &str) -> Value {
        self.get(&format!("/vault/keys/{id}")).await.expect(200)
    }

    /// Waits until the control plane reports `micros` spent and `calls`
    /// calls today on key `id`; returns the key.
    pub async fn wait_key_spend(&self, id: &str, micros: i64, calls: i64) -> Value {
        let got = wait_for(within(SPEND_TIMEOUT), || async {
            let k = self.key(id).await;
            (k["spent_today_micros"] == micros && k["calls_today"] == calls).then_some(k)
        })
        .await;
        match got {
            Some(k) => k,
            None => panic!(
                "key {id} never showed {micros} micros over {calls} calls; last: {}",
                self.key(id).await
            ),
        }
    }

    /// GET /vault/audit?<query>, asserting 200; the entries.
    pub async fn audit(&self, query: &str) -> Vec<Value> {
        let body = self.get(&format!("/vault/audit?{query}")).await.expect(200);
        body["entries"].as_array().expect("entries").clone()
    }

    /// Waits until GET /vault/audit?<query> has exactly `n` entries.
    pub async fn wait_audit(&self, query: &str, n: usize) -> Vec<Value> {
        let got = wait_for(within(SPEND_TIMEOUT), || async {
            let e = self.audit(query).await;
            (e.len() == n).then_some(e)
        })
        .await;
        match got {
            Some(e) => e,
            None => panic!(
                "audit {query:?} never had {n} entries; last: {:?}",
                self.audit(query).await
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_never_hands_out_a_port_twice() {
        // Left to the kernel, a thousand picks of a free port repeat some
        // (about 70 here): ports closed again are free to hand out again.
        let mut seen = BTreeSet::new();
        for _ in 0..500 {
            for port in free_ports(2) {
                assert!(seen.insert(port), "port {port} handed out twice");
            }
        }
    }

    /// A child is ready on a port only if the port's listening socket is
    /// its own: one another process holds (here, this test's) is not.
    #[tokio::test]
    async fn a_port_is_the_childs_only_if_it_holds_the_listening_socket() {
        let theirs = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let theirs = format!("http://{}/healthz", theirs.local_addr().unwrap());
        let port = free_port();
        let mine = format!("http://127.0.0.1:{port}/healthz");
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(format!(
            "import socket, time\n\
             s = socket.socket()\n\
             s.bind(('127.0.0.1', {port}))\n\
             s.listen()\n\
             time.sleep(60)\n"
        ));
        let logs = tempfile::tempdir().unwrap();
        let child = ChildProcess::spawn("listener", cmd, &logs.path().join("listener.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !child.listens_on_port_of(&mine) {
            assert!(
                Instant::now() < deadline,
                "the child never listened on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !child.listens_on_port_of(&theirs),
            "{theirs} is this test's"
        );
    }
}
