"""Starts what the SDK tests drive: the real `keycap dev` (control plane,
proxy, embedded SQLite) and the real `keycap-mock-vendor`, on 127.0.0.1.

Both binaries come from cargo's target directory (`CARGO_TARGET_DIR`, else
`target/` at the repository root), built by `cargo build --workspace
--bins`. One `keycap dev` serves the whole session; each test mints its own
keys and calls at once. Nothing here talks to anything but 127.0.0.1.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The one credential every vendor is registered with: the mock checks it in
# whichever header each profile puts it (Twilio's as Basic SID:TOKEN).
ACCOUNT_SID = "AC5ef8732a3c49700934481addd5ce1659"
CREDENTIAL = f"{ACCOUNT_SID}:KeycapSdkTestVendorCredentialDoNotLeak"

VENDORS = ["stripe", "openai", "anthropic", "resend", "twilio"]

# How long the proxy waits for a vendor's answer: short, so a lost answer
# (the mock holding one back) times out quickly.
UPSTREAM_TIMEOUT_SECS = 2

# Most a process gets to start, or the control plane to show a call's spend.
STARTUP = 60
SPEND_SETTLES = 20


def binary(name):
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    if not target.is_absolute():
        target = ROOT / target
    path = target / "debug" / name
    if not path.exists():
        pytest.exit(f"{path} is missing: run `cargo build --workspace --bins` first", 2)
    return str(path)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http(method, url, token=None, body=None):
    """One JSON call; returns (status, parsed body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_until(what, probe, seconds, process=None, log=None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.05)
    tail = Path(log).read_text()[-4000:] if log else ""
    raise AssertionError(f"{what} not ready within {seconds} s\n{tail}")


class Process:
    def __init__(self, args, log):
        self.log = log
        out = open(log, "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYCAP_")}
        env["KEYCAP_LOG"] = "warn"
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Keycap:
    """A running `keycap dev` with every vendor registered on the mock."""

    def __init__(self, workdir, extra_args=()):
        mock_port, proxy_port, control_port, sandbox_port, metrics_port = free_ports(5)
        self.mock_url = f"http://127.0.0.1:{mock_port}"
        self.proxy = f"http://127.0.0.1:{proxy_port}"
        self.control = f"http://127.0.0.1:{control_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.mock = Process(
            [binary("keycap-mock-vendor"), "--listen", f"127.0.0.1:{mock_port}",
             "--credential", CREDENTIAL],
            workdir / "mock-vendor.log",
        )
        data_dir = workdir / "dev"
        self.dev = Process(
            [binary("keycap"), "dev", "--data-dir", str(data_dir),
             "--proxy-listen", f"127.0.0.1:{proxy_port}",
             "--control-listen", f"127.0.0.1:{control_port}",
             "--sandbox-listen", f"127.0.0.1:{sandbox_port}",
             "--metrics-listen", f"127.0.0.1:{metrics_port}",
             "--upstream-timeout-secs", str(UPSTREAM_TIMEOUT_SECS), *extra_args],
            workdir / "keycap-dev.log",
        )
        wait_until("keycap-mock-vendor",
                   lambda: socket.create_connection(("127.0.0.1", mock_port), 1).close() or True,
                   STARTUP, self.mock.proc, self.mock.log)
        wait_until("keycap dev", lambda: http("GET", f"{self.proxy}/healthz")[0] == 200,
                   STARTUP, self.dev.proc, self.dev.log)
        self.admin_token = (data_dir / "admin-token").read_text().strip()
        for vendor in VENDORS:
            status, body = self.admin("PUT", f"/vault/vendors/{vendor}", {
                "profile": vendor, "base_url": self.mock_url, "credential": CREDENTIAL})
            assert status in (200, 201), body
            assert body["confirmation"]["all_confirmed"], body

    def stop(self):
        self.dev.stop()
        self.mock.stop()

    def admin(self, method, path, body=None):
        return http(method, f"{self.control}{path}", self.admin_token, body)

    def mint(self, vendor, cap, endpoints, label):
        """A new key: (id, secret). Usable at once: creation waits for the proxy."""
        status, body = self.admin("POST", "/vault/keys", {
            "vendor": vendor, "daily_usd_cap": cap, "allowed_endpoints": endpoints,
            "expires_in": "1h", "agent_run_label": label})
        assert status == 201, body
        assert body["confirmation"]["all_confirmed"], body
        return body["id"], body["key"]

    def revoke(self, key_id):
        status, body = self.admin("DELETE", f"/vault/keys/{key_id}")
        assert status == 200 and body["confirmation"]["all_confirmed"], body

    def key(self, key_id):
        status, body = self.admin("GET", f"/vault/keys/{key_id}")
        assert status == 200, body
        return body

    def wait_spend(self, key_id, micros, calls):
        """The key once the control plane shows `micros` spent over `calls`
        calls today (spend reaches it in batches, just after the answer)."""
        deadline = time.monotonic() + SPEND_SETTLES
        while True:
            k = self.key(key_id)
            if (k["spent_today_micros"], k["calls_today"]) == (micros, calls):
                return k
            assert time.monotonic() < deadline, (
                f"key never showed {micros} micros over {calls} calls: {k}")
            time.sleep(0.05)

    def audit(self, key_id):
        status, body = self.admin("GET", f"/vault/audit?key_id={key_id}")
        assert status == 200, body
        return body["entries"]

    def requests_seen(self):
        """The proxy's agent calls so far, by outcome (its metrics)."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        seen = {}
        for m in re.finditer(r'^keycap_proxy_requests_total\{outcome="([^"]+)"\} (\d+)', text, re.M):
            seen[m.group(1)] = int(m.group(2))
        return seen


@pytest.fixture(scope="session")
def keycap():
    workdir = Path(tempfile.mkdtemp(prefix="keycap-sdk-tests-"))
    k = Keycap(workdir)
    try:
        yield k
    finally:
        k.stop()
    shutil.rmtree(workdir, ignore_errors=True)


class Counted:
    """What the proxy saw during a `with` block."""

    def __init__(self, keycap):
        self.keycap = keycap

    def __enter__(self):
        self.before = self.keycap.requests_seen()
        return self

    def __exit__(self, *exc):
        after = self.keycap.requests_seen()
        self.seen = {k: v - self.before.get(k, 0) for k, v in after.items()
                     if v != self.before.get(k, 0)}
        return False


@pytest.fixture
def counted(keycap):
    return lambda: Counted(keycap)
