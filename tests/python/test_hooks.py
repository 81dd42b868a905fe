"""Inbound hooks (docs/inbound-hooks.md) checked against the vendors' own
code: events are signed with stripe-python's `WebhookSignature`,
twilio-python's `RequestValidator` and the `svix` package (Resend's
signer), sent to the real proxy of `keycap dev`, and must reach the
destination (a receiver in this process) exactly when the vendor's library
would accept them, signed with a `Keycap-Signature` that stripe-python's
own verifier accepts with the relay secret. Forged, stale, replayed,
oversized and unknown-hook events are refused and never forwarded.
"""

import base64
import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone

import pytest
import stripe
from svix.webhooks import Webhook
from twilio.request_validator import RequestValidator

from test_webhooks import Receiver

TWILIO_TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def post(url, body, headers, content_type="application/json"):
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": content_type, **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def register(keycap, body):
    status, created = keycap.admin("POST", "/vault/hooks", body)
    assert status == 201, created
    url = keycap.proxy + created["path"]
    # The proxy learns the hook through its policy stream: poll until an
    # unsigned post is refused for its signature rather than unknown.
    deadline = time.monotonic() + 20
    while post(url, b"{}", {})[0] == 404:
        assert time.monotonic() < deadline, f"{url} never served"
        time.sleep(0.05)
    return created, url


def stripe_header(payload, secrets, t=None):
    t = int(time.time()) if t is None else t
    sigs = ",".join(
        "v1=" + stripe.WebhookSignature._compute_signature(f"{t}.{payload}", s)
        for s in secrets)
    return f"t={t},{sigs}"


def relayed_with_keycap_signature(got, relay_secret):
    """Each relayed event verifies with stripe-python's own verifier: the
    Keycap-Signature is Stripe's scheme."""
    for headers, body in got:
        assert stripe.WebhookSignature.verify_header(
            body.decode(), headers["Keycap-Signature"], relay_secret, tolerance=300)


def test_stripe_events_signed_by_stripe_python(keycap, receiver):
    old, new = "whsec_" + os.urandom(16).hex(), "whsec_" + os.urandom(16).hex()
    created, url = register(keycap, {
        "vendor": "stripe", "signing_secret": old, "destination_url": receiver.url})
    relay = created["relay_secret"]
    payload = json.dumps({"id": "evt_py_" + os.urandom(6).hex(), "object": "event"})

    ok = {"Stripe-Signature": stripe_header(payload, [old])}
    assert post(url, payload.encode(), ok)[0] == 200
    got = receiver.wait(1)
    assert got[0][1] == payload.encode()
    relayed_with_keycap_signature(got, relay)

    # The same event again: a replay. Forged, tampered and stale: refused.
    assert post(url, payload.encode(), ok) == (409, {"error": "hook_replayed",
                                                     "message": "this event was already received"})
    other = json.dumps({"id": "evt_py_forged", "object": "event"})
    assert post(url, other.encode(), {"Stripe-Signature": stripe_header(other, ["whsec_x"])})[0] == 401
    assert post(url, other.encode() + b" ", {"Stripe-Signature": stripe_header(other, [old])})[0] == 401
    stale = stripe_header(other, [old], t=int(time.time()) - 600)
    assert post(url, other.encode(), {"Stripe-Signature": stale})[0] == 401
    # Over 1 MB: answered 413 from the headers, possibly before the body is
    # sent (then the connection is closed under the sender).
    big = b"x" * ((1 << 20) + 1)
    try:
        status = post(url, big, {"Stripe-Signature": stripe_header(big.decode(), [old])})[0]
    except (urllib.error.URLError, ConnectionError):
        status = 413
    assert status == 413
    assert post(keycap.proxy + "/hooks/hk_unknown", payload.encode(), ok)[0] == 404

    # A roll: Stripe signs with both secrets; once the old one is removed,
    # an event signed only with it is refused.
    status, hook = keycap.admin("POST", f"/vault/hooks/{created['hook']['id']}/secrets",
                                {"signing_secret": new})
    assert status == 200, hook
    rolled = json.dumps({"id": "evt_py_roll_" + os.urandom(6).hex(), "object": "event"})
    deadline = time.monotonic() + 20
    while post(url, rolled.encode(), {"Stripe-Signature": stripe_header(rolled, [new])})[0] != 200:
        assert time.monotonic() < deadline, "the new secret never verified"
        time.sleep(0.05)
    both = json.dumps({"id": "evt_py_both_" + os.urandom(6).hex(), "object": "event"})
    assert post(url, both.encode(), {"Stripe-Signature": stripe_header(both, [old, new])})[0] == 200
    relayed_with_keycap_signature(receiver.wait(3), relay)
    assert len(receiver.deliveries) == 3, "a refused event was forwarded"


def test_twilio_requests_signed_by_twilio_python(keycap, receiver):
    created, url = register(keycap, {
        "vendor": "twilio", "signing_secret": TWILIO_TOKEN,
        "destination_url": receiver.url, "public_url": keycap.proxy + "/"})
    assert created["hook"]["public_url"] == url
    validator = RequestValidator(TWILIO_TOKEN)

    params = {"MessageSid": "SM" + os.urandom(8).hex(), "From": "+15005550006",
              "To": "+15005550001", "Body": "hello from twilio"}
    form = urllib.parse.urlencode(params).encode()
    sig = validator.compute_signature(url, params)
    headers = {"X-Twilio-Signature": sig, "I-Twilio-Idempotency-Token": os.urandom(8).hex()}
    form_type = "application/x-www-form-urlencoded"
    assert post(url, form, headers, form_type)[0] == 200
    assert receiver.wait(1)[0][1] == form
    relayed_with_keycap_signature(receiver.deliveries, created["relay_secret"])
    assert post(url, form, headers, form_type)[0] == 409
    # The idempotency token is not signed: a fresh one makes no replay new.
    fresh = {**headers, "I-Twilio-Idempotency-Token": os.urandom(8).hex()}
    assert post(url, form, fresh, form_type)[0] == 409

    tampered = urllib.parse.urlencode({**params, "Body": "changed"}).encode()
    other = {"X-Twilio-Signature": sig, "I-Twilio-Idempotency-Token": os.urandom(8).hex()}
    assert post(url, tampered, other, form_type)[0] == 401

    # A JSON body: Twilio signs the URL with bodySHA256 in its query.
    body = json.dumps({"event": "status", "id": os.urandom(4).hex()}).encode()
    json_url = url + "?bodySHA256=" + hashlib.sha256(body).hexdigest()
    json_sig = validator.compute_signature(json_url, {})
    assert validator.validate(json_url, body.decode(), json_sig)
    assert post(json_url, body, {"X-Twilio-Signature": json_sig})[0] == 200
    assert post(json_url, body + b" ", {"X-Twilio-Signature": json_sig})[0] == 401
    assert len(receiver.wait(2)) == 2


def test_resend_events_signed_by_svix(keycap, receiver):
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    created, url = register(keycap, {
        "vendor": "resend", "signing_secret": secret, "destination_url": receiver.url})
    wh = Webhook(secret)
    payload = json.dumps({"type": "email.delivered", "data": {"email_id": os.urandom(4).hex()}})

    def headers(msg_id, when):
        return {"svix-id": msg_id, "svix-timestamp": str(int(when.timestamp())),
                "svix-signature": wh.sign(msg_id, when, payload)}

    msg_id = "msg_" + os.urandom(8).hex()
    good = headers(msg_id, datetime.now(tz=timezone.utc))
    wh.verify(payload, good)  # what svix itself accepts
    assert post(url, payload.encode(), good)[0] == 200
    assert receiver.wait(1)[0][1] == payload.encode()
    relayed_with_keycap_signature(receiver.deliveries, created["relay_secret"])
    assert post(url, payload.encode(), good)[0] == 409

    stale = headers("msg_" + os.urandom(8).hex(),
                    datetime.fromtimestamp(time.time() - 600, tz=timezone.utc))
    assert post(url, payload.encode(), stale)[0] == 401
    forged = Webhook("whsec_" + base64.b64encode(os.urandom(24)).decode())
    fid = "msg_" + os.urandom(8).hex()
    now = datetime.now(tz=timezone.utc)
    bad = {"svix-id": fid, "svix-timestamp": str(int(now.timestamp())),
           "svix-signature": forged.sign(fid, now, payload)}
    assert post(url, payload.encode(), bad)[0] == 401
    assert len(receiver.deliveries) == 1, "a refused event was forwarded"
