"""The vendors' official Python SDKs, pointed at keycap with their own
base-URL option, against `keycap dev` and the mock vendor: a call succeeds
and its spend settles; each refusal raises the SDK's own exception (rate
limit for a spent cap, without the SDK retrying; authentication for a bad
or revoked key; permission for an endpoint outside the key's allowlist)
with keycap's code and fields where the SDK keeps them; and a Stripe retry
after a lost answer rides on the first attempt's charge.
"""

import json
import math
from decimal import Decimal

import anthropic
import openai
import pytest
import resend
import stripe
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client as TwilioClient

from conftest import ACCOUNT_SID, ROOT

# The mock's chat usage: 42 prompt tokens, and max_tokens completion tokens.
PROMPT_TOKENS = 42
MAX_TOKENS = 10
# A cap far below any call's reservation, so the first call is refused.
TINY_CAP = "0.0001"


def token_cost(table, model, output_tokens):
    """Micro-dollars the shipped price table charges for the mock's usage."""
    prices = json.loads((ROOT / "vendors" / "prices" / table).read_text())["models"][model]
    per_token = lambda usd: Decimal(usd)  # micro-dollars per token == USD per million
    return (math.ceil(PROMPT_TOKENS * per_token(prices["input"]))
            + math.ceil(output_tokens * per_token(prices["output"])))


def unit_price(table, *path):
    v = json.loads((ROOT / "vendors" / "prices" / table).read_text())
    for p in path:
        v = v[p]
    return int(Decimal(v) * 1_000_000)


class Stripe:
    name = "stripe"
    endpoints = ["POST /v1/payment_intents"]
    rate_limit, auth, permission = stripe.RateLimitError, stripe.AuthenticationError, stripe.PermissionError

    def client(self, proxy, key):
        return stripe.StripeClient(key, base_addresses={"api": f"{proxy}/stripe"},
                                   max_network_retries=2)

    def call(self, c):
        pi = c.v1.payment_intents.create(params={"amount": 2500, "currency": "usd", "confirm": True})
        assert pi.object == "payment_intent" and pi.status == "succeeded", pi
        return 25_000_000

    def outside(self, c):
        c.v1.customers.retrieve("cus_1")

    def code(self, e):
        return e.error.code

    def fields(self, e):
        return e.error.to_dict()


class OpenAI:
    name = "openai"
    endpoints = ["POST /v1/chat/completions"]
    rate_limit, auth, permission = openai.RateLimitError, openai.AuthenticationError, openai.PermissionDeniedError

    def client(self, proxy, key):
        return openai.OpenAI(api_key=key, base_url=f"{proxy}/openai/v1")

    def call(self, c):
        r = c.chat.completions.create(model="gpt-4o", max_tokens=MAX_TOKENS,
                                      messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "Hello from the mock.", r
        return token_cost("openai.json", "gpt-4o", MAX_TOKENS)

    def outside(self, c):
        c.embeddings.create(model="text-embedding-3-small", input="hi")

    def code(self, e):
        return e.code

    def fields(self, e):
        return e.body


class Anthropic:
    name = "anthropic"
    endpoints = ["POST /v1/messages"]
    rate_limit, auth, permission = anthropic.RateLimitError, anthropic.AuthenticationError, anthropic.PermissionDeniedError

    def client(self, proxy, key):
        return anthropic.Anthropic(api_key=key, base_url=f"{proxy}/anthropic")

    def call(self, c):
        r = c.messages.create(model="claude-sonnet-4-5", max_tokens=MAX_TOKENS,
                              messages=[{"role": "user", "content": "hi"}])
        assert r.content[0].text == "Hello from the mock.", r
        return token_cost("anthropic.json", "claude-sonnet-4-5", MAX_TOKENS)

    def outside(self, c):
        c.models.list()

    def code(self, e):
        return e.error_code

    def fields(self, e):
        return e.body["error"]


class Resend:
    """Resend's SDK is configured module-wide; it has no code or fields
    of keycap's to show (its `code` is the HTTP status)."""
    name = "resend"
    endpoints = ["POST /emails"]
    rate_limit, auth = resend.exceptions.RateLimitError, resend.exceptions.MissingApiKeyError

    def permission(self, e):
        return type(e) is resend.exceptions.ResendError and e.error_type == "restricted_api_key"

    def client(self, proxy, key):
        resend.api_key = key
        resend.api_url = f"{proxy}/resend"
        return resend

    def call(self, c):
        r = c.Emails.send({"from": "agent@example.com", "to": ["someone@example.com"],
                           "subject": "hi", "html": "<p>hi</p>"})
        assert r["id"].startswith("email_mock_"), r
        return unit_price("resend.json", "per_recipient")

    def outside(self, c):
        c.Emails.get("email_mock_1")

    def code(self, e):
        return None

    def fields(self, e):
        return None


class Twilio:
    name = "twilio"
    endpoints = ["POST /2010-04-01/Accounts/*/Messages.json"]
    rate_limit = auth = permission = TwilioRestException

    def client(self, proxy, key):
        c = TwilioClient(ACCOUNT_SID, key)
        c.api.base_url = f"{proxy}/twilio"
        return c

    def call(self, c):
        m = c.messages.create(to="+15551234567", from_="+15557654321", body="hi")
        assert m.sid.startswith("SM") and m.status == "queued", m
        return unit_price("twilio.json", "sms", "prefixes", "+1")

    def outside(self, c):
        c.calls.create(to="+15551234567", from_="+15557654321", url="https://example.com/twiml")

    def code(self, e):
        return e.code

    def fields(self, e):
        return e.details


VENDORS = [Stripe(), OpenAI(), Anthropic(), Resend(), Twilio()]
STATUS = {"rate_limit": 429, "auth": 401, "permission": 403}


def raised(vendor, kind, excinfo):
    """Asserts the exception is the SDK's own for `kind`."""
    e = excinfo.value
    expected = getattr(vendor, kind)
    if isinstance(expected, type):
        assert isinstance(e, expected), repr(e)
    else:
        assert expected(e), repr(e)
    if vendor.name == "twilio":
        assert e.status == STATUS[kind], repr(e)
    return e


by_vendor = pytest.mark.parametrize("vendor", VENDORS, ids=lambda v: v.name)


@by_vendor
def test_a_call_succeeds_and_settles_its_cost(keycap, counted, vendor):
    key_id, key = keycap.mint(vendor.name, 50, vendor.endpoints, f"sdk/{vendor.name}/ok")
    with counted() as proxy:
        cost = vendor.call(vendor.client(keycap.proxy, key))
    assert proxy.seen == {"forwarded": 1}
    keycap.wait_spend(key_id, cost, 1)


@by_vendor
def test_a_spent_cap_is_the_sdks_rate_limit_error_and_is_not_retried(keycap, counted, vendor):
    key_id, key = keycap.mint(vendor.name, TINY_CAP, vendor.endpoints, f"sdk/{vendor.name}/cap")
    with counted() as proxy, pytest.raises(Exception) as excinfo:
        vendor.call(vendor.client(keycap.proxy, key))
    e = raised(vendor, "rate_limit", excinfo)
    # One call reached the proxy: the SDK did not retry.
    assert proxy.seen == {"daily_cap_exceeded": 1}
    if vendor.name != "resend":
        assert vendor.code(e) == "daily_cap_exceeded", repr(e)
        fields = vendor.fields(e)
        assert fields["cap_usd"] == float(TINY_CAP), fields
        assert fields["remaining_usd"] == float(TINY_CAP), fields
        assert fields["resets_at"].endswith("T00:00:00Z"), fields
    else:
        assert e.code == 429 and e.error_type == "daily_quota_exceeded", repr(e)
    assert keycap.key(key_id)["calls_today"] == 0


@by_vendor
def test_a_revoked_key_is_the_sdks_authentication_error(keycap, counted, vendor):
    key_id, key = keycap.mint(vendor.name, 5, vendor.endpoints, f"sdk/{vendor.name}/revoked")
    keycap.revoke(key_id)
    with counted() as proxy, pytest.raises(Exception) as excinfo:
        vendor.call(vendor.client(keycap.proxy, key))
    e = raised(vendor, "auth", excinfo)
    assert proxy.seen == {"key_revoked": 1}
    if vendor.name != "resend":
        assert vendor.code(e) == "key_revoked", repr(e)


@by_vendor
def test_a_bad_key_is_the_sdks_authentication_error(keycap, counted, vendor):
    # Answered before any key is known, in the one envelope every SDK reads.
    with counted() as proxy, pytest.raises(Exception) as excinfo:
        vendor.call(vendor.client(keycap.proxy, "kc_live_not-a-vault-key"))
    e = raised(vendor, "auth", excinfo)
    assert proxy.seen == {"invalid_key": 1}
    if vendor.name != "resend":
        assert vendor.code(e) == "invalid_key", repr(e)


@by_vendor
def test_an_endpoint_outside_the_allowlist_is_the_sdks_permission_error(keycap, counted, vendor):
    key_id, key = keycap.mint(vendor.name, 5, vendor.endpoints, f"sdk/{vendor.name}/outside")
    with counted() as proxy, pytest.raises(Exception) as excinfo:
        vendor.outside(vendor.client(keycap.proxy, key))
    e = raised(vendor, "permission", excinfo)
    assert proxy.seen == {"endpoint_not_allowed": 1}
    if vendor.name != "resend":
        assert vendor.code(e) == "endpoint_not_allowed", repr(e)
    assert keycap.key(key_id)["calls_today"] == 0


def test_a_stripe_retry_after_a_lost_answer_rides_on_the_first_charge(keycap, counted):
    # 30 USD: the 25 USD intent fits once, never twice.
    key_id, key = keycap.mint("stripe", 30, ["POST /v1/payment_intents"], "sdk/stripe/idempotent")
    client = Stripe().client(keycap.proxy, key)
    params = {"amount": 2500, "currency": "usd", "confirm": True,
              # The mock makes the intent but holds this first answer back
              # past the proxy's upstream timeout.
              "description": "mock:lose-first-answer"}
    with counted() as proxy:
        pi = client.v1.payment_intents.create(params=params,
                                              options={"idempotency_key": "order-py-1"})
    # The first attempt timed out (counted at its reservation: Stripe may
    # have charged it); the SDK's own retry, same key, was forwarded with
    # nothing reserved and answered with Stripe's replay.
    assert proxy.seen == {"upstream_timeout": 1, "forwarded": 1}
    assert pi.status == "succeeded" and pi.id.startswith("pi_mock_"), pi
    keycap.wait_spend(key_id, 25_000_000, 2)
    retry, first = keycap.audit(key_id)
    assert first["outcome"] == "settled_at_reservation", first
    assert (retry["reserved_micros"], retry["cost_micros"]) == (0, 0), retry

    # The same key with another request is another call: priced, it does
    # not fit.
    with counted() as proxy, pytest.raises(stripe.RateLimitError) as excinfo:
        client.v1.payment_intents.create(params={**params, "amount": 2600},
                                         options={"idempotency_key": "order-py-1"})
    assert proxy.seen == {"daily_cap_exceeded": 1}
    assert excinfo.value.error.code == "daily_cap_exceeded"
    assert excinfo.value.error.remaining_usd <= 5
