"""Alert webhooks as a receiver sees them, checked with an implementation
independent of keycap's: Python's `hmac` verifies every delivery's
`Keycap-Signature` (`t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, the
scheme Stripe uses), within the documented five-minute replay window, the
way docs/webhooks.md tells a receiver to. A run spending through the real
proxy is announced at 50% and 80% of its cap before it is refused, each
once, with a stable event id.
"""

import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

REPLAY_WINDOW_SECS = 300
SECRET = "whsec_python_independent_verifier_0123456789"


def verify(secret, header, body, now=None, tolerance=REPLAY_WINDOW_SECS):
    """A receiver's check, written from the documentation alone: the
    timestamp is recent and one of the v1 signatures matches."""
    parts = {}
    for item in header.split(","):
        key, _, value = item.partition("=")
        parts.setdefault(key.strip(), []).append(value.strip())
    timestamp = int(parts["t"][0])
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body,
                        hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, sig) for sig in parts.get("v1", []))


class Receiver:
    """An HTTP server on 127.0.0.1 that keeps every delivery."""

    def __init__(self):
        self.deliveries = []
        received = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.headers, body))  # case-insensitive lookups
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait(self, n, seconds=20):
        deadline = time.monotonic() + seconds
        while len(self.deliveries) < n:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} of {n} deliveries"
            time.sleep(0.05)
        return list(self.deliveries)

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def charge(keycap, secret, cents):
    req = urllib.request.Request(
        f"{keycap.proxy}/stripe/v1/payment_intents",
        data=f"amount={cents}&currency=usd&confirm=true".encode(), method="POST",
        headers={"Authorization": f"Bearer {secret}",
                 "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_verifier_refuses_what_it_must():
    body = b'{"id":"evt_1"}'
    t = int(time.time())
    good = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    assert verify(SECRET, f"t={t},v1={good}", body)
    assert not verify(SECRET, f"t={t},v1={good}", body + b" ")
    assert not verify("whsec_other_secret_000000000000", f"t={t},v1={good}", body)
    assert not verify(SECRET, f"t={t},v1={good}", body, now=t + REPLAY_WINDOW_SECS + 1)


def test_a_run_nearing_its_cap_is_announced_with_signed_deliveries(keycap, receiver):
    label = "webhooks/python-run"
    status, created = keycap.admin("POST", "/vault/webhooks", {
        "url": receiver.url, "secret": SECRET, "events": ["cap.threshold"],
        "thresholds": [50, 80], "run_label": label})
    assert status == 201, created
    assert created["secret"] == SECRET
    webhook_id = created["webhook"]["id"]

    key_id, secret = keycap.mint("stripe", 10, ["POST /v1/payment_intents"], label)
    # $5 (50% of the cap), then $3.50 (85%): each threshold once, for the
    # key and for its run, before any call is refused.
    assert charge(keycap, secret, 500) == 200
    assert charge(keycap, secret, 350) == 200
    keycap.wait_spend(key_id, 8_500_000, 2)

    got = receiver.wait(4)
    seen = []
    for headers, body in got:
        assert verify(SECRET, headers["Keycap-Signature"], body), headers
        event = json.loads(body)
        assert event["id"] == headers["Keycap-Event-Id"]
        assert event["type"] == "cap.threshold"
        assert event["data"]["run_label"] == label
        seen.append((event["data"]["subject"], event["data"]["threshold_percent"]))
    assert sorted(seen) == [("key", 50), ("key", 80), ("run", 50), ("run", 80)]
    assert len({json.loads(b)["id"] for _, b in got}) == 4

    # The API shows the same events, each delivered at the first attempt.
    status, listed = keycap.admin("GET", f"/vault/webhooks/{webhook_id}/deliveries")
    assert status == 200, listed
    assert sorted(d["event_id"] for d in listed["deliveries"]) == \
        sorted(json.loads(b)["id"] for _, b in got)
    deadline = time.monotonic() + 20
    while not all(d["state"] == "delivered" for d in listed["deliveries"]):
        assert time.monotonic() < deadline, listed
        time.sleep(0.05)
        listed = keycap.admin("GET", f"/vault/webhooks/{webhook_id}/deliveries")[1]
    assert all(d["attempts"][0]["status"] == 200 for d in listed["deliveries"])
    keycap.admin("DELETE", f"/vault/webhooks/{webhook_id}")


def test_a_test_delivery_is_signed_with_the_drawn_secret(keycap, receiver):
    status, created = keycap.admin("POST", "/vault/webhooks", {"url": receiver.url,
                                                              "events": ["key.revoked"]})
    assert status == 201, created
    drawn = created["secret"]
    status, queued = keycap.admin("POST", f"/vault/webhooks/{created['webhook']['id']}/test")
    assert status == 202, queued
    (headers, body), = receiver.wait(1)
    assert verify(drawn, headers["Keycap-Signature"], body)
    assert not verify(SECRET, headers["Keycap-Signature"], body)
    assert json.loads(body)["id"] == queued["event_id"]
    keycap.admin("DELETE", f"/vault/webhooks/{created['webhook']['id']}")
