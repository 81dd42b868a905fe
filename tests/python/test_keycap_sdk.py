"""keycap's own Python SDK (sdk/python) against the real `keycap dev` and
the mock vendor, the way a Python team walks it: register a vendor, mint a
key, call the vendor through the proxy with the official `openai` client
pointed at keycap by the key's `base_url`, meet the cap refusal, revoke the
run, then read the audit and the spend. Then its errors: the server's code,
message and field; one clear error for a wrong token or an unreachable
server; no token in any error or repr. The same flow on `AsyncClient`.
Also: the checked-in generated code matches a fresh `scripts/gen-sdks`,
and the package type-checks under mypy --strict.
"""

import asyncio
import filecmp
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import openai
import pytest

import keycap as kc
from conftest import CREDENTIAL, ROOT, SPEND_SETTLES, free_ports

CHAT = ["POST /v1/chat/completions"]


def chat(ai):
    r = ai.chat.completions.create(model="gpt-4o", max_tokens=10,
                                   messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from the mock.", r


def settled(probe):
    """`probe()` once it is truthy: spend reaches the control plane in
    batches just after the answer."""
    deadline = time.monotonic() + SPEND_SETTLES
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, "spend never reached the control plane"
        time.sleep(0.05)


@pytest.fixture
def client(keycap):
    with kc.Client(addr=keycap.control, token=keycap.admin_token) as c:
        yield c


def test_a_python_team_walks_the_whole_flow(keycap, client):
    written = client.vendors.put("py-openai", profile="openai", base_url=keycap.mock_url,
                                 credential=CREDENTIAL)
    assert written.created and written.confirmation.all_confirmed, written
    assert written.vendor.profile == "openai" and written.vendor.created_at.tzinfo is not None
    assert client.vendors.get("py-openai").base_url == keycap.mock_url
    assert "py-openai" in [v.name for v in client.vendors.list()]

    run = "py-sdk/run-1"
    created = client.keys.create(vendor="py-openai", daily_usd_cap=Decimal("1.5"),
                                 allowed_endpoints=CHAT, expires_in=timedelta(hours=1),
                                 agent_run_label=run, per_call_usd_cap="0.5")
    assert created.key.startswith("kc_") and created.id
    assert created.expires_at - datetime.now(timezone.utc) > timedelta(minutes=59)
    assert created.info.daily_usd_cap == Decimal("1.5")
    assert created.info.per_call_usd_cap == Decimal("0.5")
    assert created.info.status == "active"
    assert created.key not in repr(created)

    ai = openai.OpenAI(base_url=created.base_url(keycap.proxy), api_key=created.key, max_retries=0)
    chat(ai)
    key = settled(lambda: (k := client.keys.get(created.id)).calls_today == 1 and k)
    assert Decimal(0) < key.spent_today_usd < Decimal("0.5")
    assert key.remaining_today_usd == Decimal("1.5") - key.spent_today_usd

    # A second key of the same run whose cap no call fits: the official
    # client raises its rate-limit error with keycap's code.
    tiny = client.keys.create(vendor="py-openai", daily_usd_cap="0.0001", allowed_endpoints=CHAT,
                              expires_in="1h", agent_run_label=run)
    with pytest.raises(openai.RateLimitError) as refused:
        chat(openai.OpenAI(base_url=tiny.base_url(keycap.proxy), api_key=tiny.key, max_retries=0))
    assert refused.value.code == "daily_cap_exceeded"

    revoked = client.keys.revoke_run(run)
    assert sorted(revoked.revoked_ids) == sorted([created.id, tiny.id])
    assert revoked.confirmation.all_confirmed
    with pytest.raises(openai.AuthenticationError) as gone:
        chat(ai)
    assert gone.value.code == "key_revoked"
    assert client.keys.get(created.id).status == "revoked"
    assert {k.id for k in client.keys.list(agent_run_label=run)} == set()
    assert {k.id for k in client.keys.list(agent_run_label=run, include_inactive=True)} == {
        created.id, tiny.id}

    spend = client.spend(agent_run_label=run)
    assert spend.total_usd == key.spent_today_usd and spend.calls == 1
    assert [(v.vendor, v.total_usd) for v in spend.vendors] == [("py-openai", spend.total_usd)]
    entries = list(client.audit.query(agent_run_label=run))
    outcomes = sorted(e.outcome for e in entries)
    assert len(entries) >= 1 and all(e.vendor == "py-openai" for e in entries), entries
    forwarded = [e for e in entries if e.key_id == created.id and e.cost_usd > 0]
    assert len(forwarded) == 1, outcomes
    assert forwarded[0].cost_usd == spend.total_usd
    assert forwarded[0].path == "/v1/chat/completions" and forwarded[0].at.tzinfo is not None

    assert client.vendors.delete("py-openai").all_confirmed
    with pytest.raises(kc.NotFound) as missing:
        client.vendors.get("py-openai")
    assert missing.value.code == "not_found"


def test_the_audit_iterates_over_every_page(keycap, client):
    # More entries than one page holds would take minutes to make; instead
    # a key's entries come back whole and newest first, and the iterator
    # stops on the last page.
    created = client.keys.create(vendor="openai", daily_usd_cap="5", allowed_endpoints=CHAT,
                                 expires_in="1h", agent_run_label="py-sdk/audit")
    ai = openai.OpenAI(base_url=created.base_url(keycap.proxy), api_key=created.key, max_retries=0)
    for _ in range(3):
        chat(ai)
    entries = settled(lambda: (e := list(client.audit.query(key_id=created.id))) and len(e) == 3 and e)
    seqs = [e.seq for e in entries]
    assert seqs == sorted(seqs, reverse=True)
    since = entries[-1].at
    assert len(list(client.audit.query(key_id=created.id, since=since))) == 3
    assert list(client.audit.query(key_id=created.id, until=since - timedelta(hours=1))) == []


def test_admin_tokens_are_minted_listed_and_revoked(keycap, client):
    created = client.admin_tokens.create(name="py-sdk reader", scopes=["keys:read"],
                                         vendors=["openai"], expires_in="1h")
    assert created.token.startswith("kcadm_") and created.token not in repr(created)
    assert created.info.scopes == ("keys:read",) and created.info.vendors == ("openai",)
    assert created.info.status == "active" and created.info.expires_at.tzinfo is not None
    assert created.id in [t.id for t in client.admin_tokens.list()]

    # The new token reads keys and nothing else.
    with kc.Client(addr=keycap.control, token=created.token) as reader:
        assert isinstance(reader.keys.list(), list)
        with pytest.raises(kc.PermissionDenied) as denied:
            reader.vendors.list()
        assert denied.value.code == "missing_scope"
        assert created.token not in str(denied.value) + repr(denied.value)

    revoked = client.admin_tokens.revoke(created.id)
    assert revoked.status == "revoked" and revoked.revoked_at is not None
    assert created.id not in [t.id for t in client.admin_tokens.list()]
    assert created.id in [t.id for t in client.admin_tokens.list(include_inactive=True)]
    with kc.Client(addr=keycap.control, token=created.token) as gone:
        with pytest.raises(kc.Unauthenticated):
            gone.keys.list()
    with pytest.raises(kc.InvalidRequest) as bad:
        client.admin_tokens.create(name="typo", scopes=["keys:reed"])
    assert bad.value.field == "scopes"


def test_the_audit_ledger_verifies_and_lists_its_checkpoints(keycap, client):
    created = client.keys.create(vendor="openai", daily_usd_cap="5", allowed_endpoints=CHAT,
                                 expires_in="1h", agent_run_label="py-sdk/verify")
    chat(openai.OpenAI(base_url=created.base_url(keycap.proxy), api_key=created.key,
                       max_retries=0))
    settled(lambda: list(client.audit.query(key_id=created.id)))
    verified = client.audit.verify()
    assert verified.ok and verified.broken is None, verified
    newest = max(e.seq for e in client.audit.query())
    assert verified.head_seq == newest and verified.checked >= 1
    assert verified.head_hash is not None and len(verified.head_hash) == 64
    assert client.audit.verify(from_seq=newest).checked == 1
    kept = f"{newest}:{verified.head_hash}"
    assert client.audit.verify(checkpoint=kept).ok
    other = client.audit.verify(checkpoint=f"{newest}:{'ab' * 32}")
    assert not other.ok and other.broken.seq == newest, other
    for cp in client.audit.checkpoints(limit=5):
        assert cp.seq <= newest and len(cp.hash) == 64 and len(cp.signature) == 128
        assert cp.at is not None and cp.at.tzinfo is not None


def test_a_spend_report_and_a_streamed_export_that_verifies(keycap, client, tmp_path):
    run = "py-sdk/report"
    created = client.keys.create(vendor="openai", daily_usd_cap="5", allowed_endpoints=CHAT,
                                 expires_in="1h", agent_run_label=run)
    ai = openai.OpenAI(base_url=created.base_url(keycap.proxy), api_key=created.key, max_retries=0)
    for _ in range(2):
        chat(ai)
    since = datetime.now(timezone.utc) - timedelta(days=1)
    report = settled(lambda: (r := client.spend_report(group_by=["key", "day"], since=since,
                                                       agent_run_label=run, top=5)).calls == 2 and r)
    assert report.group_by == ("key", "day") and not report.more
    [group] = report.groups
    assert group.key_id == created.id and group.vendor is None and group.agent_run_label is None
    assert group.day == datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert group.calls == 2 and Decimal(0) < group.total_usd == report.total_usd
    assert client.spend_report(group_by=["key"], until=since, agent_run_label=run).groups == ()
    with pytest.raises(kc.InvalidRequest) as bad:
        client.spend_report(group_by=["colour"])
    assert bad.value.field == "group_by"

    path = tmp_path / "audit.jsonl"
    with open(path, "wb") as f:
        for piece in client.audit.export(format="jsonl"):
            f.write(piece)
    verified = subprocess.run([sys.executable, str(ROOT / "docs" / "verify_ledger.py"), str(path)],
                              capture_output=True, text=True)
    assert verified.returncode == 0 and verified.stdout.startswith("OK "), verified.stdout
    csv = b"".join(client.audit.export(format="csv", since=since))
    assert csv.startswith(b"seq,event_id,key_id,") and csv.count(b"\r\n") >= 3
    assert list(client.audit.query(key_id=created.id, outcome="refused")) == []


def test_the_servers_refusal_names_its_code_and_field(client):
    with pytest.raises(kc.InvalidRequest) as bad:
        client.keys.create(vendor="openai", daily_usd_cap=0, allowed_endpoints=CHAT,
                           expires_in="1h")
    assert bad.value.code == "invalid_request"
    assert bad.value.field == "daily_cap_micros"  # the gRPC field the server judged
    assert "must be greater than 0" in bad.value.message
    with pytest.raises(kc.InvalidRequest) as bad:
        client.keys.create(vendor="openai", daily_usd_cap=1, allowed_endpoints=["FETCH /x"],
                           expires_in="1h")
    assert bad.value.field == "allowed_endpoints", repr(bad.value)
    with pytest.raises(kc.NotFound):
        client.keys.get("no-such-key")
    # A float never holds money: refused before anything is sent.
    with pytest.raises(kc.InvalidRequest) as bad:
        client.keys.create(vendor="openai", daily_usd_cap=0.1, allowed_endpoints=CHAT,
                           expires_in="1h")
    assert bad.value.field == "daily_usd_cap"


def test_a_wrong_token_is_one_clear_error_without_the_token(keycap):
    token = "kcadm_live_definitely-not-a-real-token"
    with kc.Client(addr=keycap.control, token=token) as c:
        with pytest.raises(kc.Unauthenticated) as e:
            c.vendors.list()
    assert e.value.code == "unauthenticated"
    assert str(e.value) == "unauthenticated: missing or invalid token"
    for text in (str(e.value), repr(e.value), repr(c), repr(c.keys)):
        assert token not in text
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_an_unreachable_server_is_one_clear_error(keycap):
    (port,) = free_ports(1)
    addr = f"http://127.0.0.1:{port}"
    with kc.Client(addr=addr, token=keycap.admin_token, timeout=2) as c:
        with pytest.raises(kc.Unavailable) as e:
            c.keys.list()
    assert str(e.value) == f"unavailable: the control plane at {addr} is unreachable"
    assert keycap.admin_token not in repr(e.value)


def test_no_token_at_all_is_refused_before_connecting(monkeypatch):
    monkeypatch.delenv("KEYCAP_ADMIN_TOKEN", raising=False)
    with pytest.raises(kc.Unauthenticated):
        kc.Client(addr="http://127.0.0.1:1")


def test_the_environment_configures_the_client(keycap, monkeypatch):
    monkeypatch.setenv("KEYCAP_ADDR", keycap.control)
    monkeypatch.setenv("KEYCAP_ADMIN_TOKEN", keycap.admin_token)
    with kc.Client() as c:
        assert "openai" in [v.name for v in c.vendors.list()]


def test_a_rolled_key_shares_its_budget_and_works_through_its_grace(keycap, client):
    run = "py-sdk/roll"
    first = client.keys.create(vendor="openai", daily_usd_cap="2", allowed_endpoints=CHAT,
                               expires_in="1h", agent_run_label=run)
    chat(openai.OpenAI(base_url=first.base_url(keycap.proxy), api_key=first.key, max_retries=0))
    spent = settled(lambda: (k := client.keys.get(first.id)).calls_today == 1 and k).spent_today_usd

    rolled = client.keys.roll(first.id, grace="1h")
    assert rolled.key.startswith("kc_") and rolled.key not in repr(rolled)
    assert rolled.confirmation.all_confirmed
    assert rolled.info.rolled_from == first.id and rolled.info.budget_id == first.id
    assert rolled.rolled.successor == rolled.id and rolled.rolled.grace_ends_at is not None
    assert rolled.info.spent_today_usd == spent, "a roll resets no spend"
    # The successor serves its first call; the old key still works.
    chat(openai.OpenAI(base_url=first.base_url(keycap.proxy), api_key=rolled.key, max_retries=0))
    chat(openai.OpenAI(base_url=first.base_url(keycap.proxy), api_key=first.key, max_retries=0))
    settled(lambda: client.keys.get(rolled.id).calls_today == 3)
    with pytest.raises(kc.Conflict) as twice:
        client.keys.roll(first.id)
    assert twice.value.code == "key_already_rolled"
    with pytest.raises(kc.InvalidRequest) as long:
        client.keys.roll(rolled.id, grace="2d")
    assert long.value.field == "grace"
    client.keys.revoke_run(run)


def test_the_async_client_has_the_same_surface(keycap):
    async def flow():
        async with kc.AsyncClient(addr=keycap.control, token=keycap.admin_token) as c:
            created = await c.keys.create(vendor="openai", daily_usd_cap="2", allowed_endpoints=CHAT,
                                          expires_in=3600, agent_run_label="py-sdk/async")
            ai = openai.AsyncOpenAI(base_url=created.base_url(keycap.proxy), api_key=created.key,
                                    max_retries=0)
            r = await ai.chat.completions.create(model="gpt-4o", max_tokens=10,
                                                 messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].message.content == "Hello from the mock."
            assert [k.id for k in await c.keys.list(agent_run_label="py-sdk/async")] == [created.id]
            deadline = time.monotonic() + SPEND_SETTLES
            while (await c.spend(agent_run_label="py-sdk/async")).calls != 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            entries = [e async for e in c.audit.query(key_id=created.id)]
            assert len(entries) == 1 and entries[0].cost_usd > 0
            report = await c.spend_report(group_by=["run_label"], agent_run_label="py-sdk/async")
            assert [(g.agent_run_label, g.calls) for g in report.groups] == [("py-sdk/async", 1)]
            export = b"".join([p async for p in c.audit.export(format="jsonl")])
            assert created.id.encode() in export
            revoked = await c.keys.revoke(created.id)
            assert revoked.key.status == "revoked" and revoked.confirmation.all_confirmed
            assert (await c.audit.verify()).ok
            assert isinstance(await c.audit.checkpoints(), list)
            tokens = await c.admin_tokens.list()
            assert any(t.status == "active" for t in tokens), tokens
            with pytest.raises(kc.InvalidRequest) as bad:
                await c.keys.create(vendor="openai", daily_usd_cap="1", allowed_endpoints=CHAT,
                                    expires_in="0s")
            assert bad.value.field is not None
    asyncio.run(flow())


def test_a_dry_run_and_a_suggested_policy(keycap, client):
    client.vendors.put("py-dry", profile="openai", base_url=keycap.mock_url, credential=CREDENTIAL)
    created = client.keys.create(vendor="py-dry", daily_usd_cap="1", allowed_endpoints=CHAT,
                                 expires_in="1h", agent_run_label="py/dry-run")
    body = '{"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}'
    dry = client.keys.simulate(created.info.id, method="POST", path="/v1/chat/completions",
                               headers={"Content-Type": "application/json"}, body=body)
    assert dry.allowed and dry.refusal is None, dry
    assert dry.quote is not None and dry.quote.kind == "openai_chat" and dry.quote.reserve_usd > 0
    assert dry.daily_remaining_usd == Decimal("1"), dry
    assert CREDENTIAL not in repr(dry)
    refused = client.keys.simulate(created.info.id, method="POST", path="/v1/embeddings",
                                   headers={"Content-Type": "application/json"}, body="{}")
    assert not refused.allowed and refused.refusal is not None
    assert refused.refusal.code == "endpoint_not_allowed" and refused.refusal.rule == "allowed_endpoints"

    ai = openai.OpenAI(base_url=created.base_url(keycap.proxy), api_key=created.key)
    chat(ai)
    suggestion = settled(lambda: _suggest(client, created.info.id))
    assert suggestion.allowed_endpoints == ("POST /v1/chat/completions",), suggestion
    assert suggestion.margin_percent == 25 and suggestion.per_call_usd_cap > 0
    assert suggestion.create_key_args()["vendor"] == "py-dry"


def test_an_observed_key_is_learned_from_and_switched_to_enforce(keycap, client):
    run = "py-sdk/observe"
    created = client.keys.create(vendor="openai", daily_usd_cap="0.0001", allowed_endpoints=CHAT,
                                 expires_in="1h", agent_run_label=run, observe_ceiling_usd="1")
    assert created.info.mode == "observe" and created.info.observe_ceiling_usd == Decimal("1")
    ai = openai.OpenAI(base_url=created.base_url(keycap.proxy), api_key=created.key, max_retries=0)
    # Over its daily cap and off its allowlist: forwarded, and marked.
    chat(ai)
    ai.embeddings.create(model="text-embedding-3-small", input="hi")
    entries = settled(lambda: len(e := list(client.audit.query(key_id=created.id))) == 2 and e)
    assert sorted((e.would_refuse, e.would_refuse_rule) for e in entries) == [
        ("daily_cap_exceeded", "daily_cap"), ("endpoint_not_allowed", "allowed_endpoints")]
    report = client.spend_report(group_by=["key"], agent_run_label=run)
    assert report.would_refuse_calls == 2 and report.groups[0].would_refuse_calls == 2
    dry = client.keys.simulate(created.id, method="POST", path="/v1/embeddings",
                               headers={"Content-Type": "application/json"},
                               body='{"model": "text-embedding-3-small", "input": "hi"}')
    assert dry.allowed and dry.would_refuse is not None, dry
    assert dry.would_refuse.code == "endpoint_not_allowed"

    switched = client.keys.enforce(created.id, daily_usd_cap="5")
    assert switched.key.mode == "enforce" and switched.key.id == created.id
    assert switched.confirmation.all_confirmed
    with pytest.raises(openai.PermissionDeniedError):
        ai.embeddings.create(model="text-embedding-3-small", input="hi")
    chat(ai)
    with pytest.raises(kc.Conflict):
        client.keys.enforce(created.id)
    client.keys.revoke_run(run)


def test_a_held_call_is_approved_and_its_retry_goes_through_the_official_sdk(keycap, client):
    run = "py-sdk/approval"
    created = client.keys.create(vendor="openai", daily_usd_cap="5", allowed_endpoints=CHAT,
                                 expires_in="1h", agent_run_label=run,
                                 approval_above_usd="0.000001")
    ai = openai.OpenAI(base_url=created.base_url(keycap.proxy), api_key=created.key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as held:
        chat(ai)
    approval_id = held.value.body["approval_id"]
    assert held.value.body["code"] == "approval_required", held.value.body
    pending = client.approvals.list(state="pending", key_id=created.id)
    assert [a.id for a in pending] == [approval_id]
    assert pending[0].quote_usd > 0 and pending[0].path == "/v1/chat/completions"
    approved = client.approvals.approve(approval_id, reason="the monthly report")
    assert approved.state == "approved" and approved.reason == "the monthly report"
    retry = ai.with_options(default_headers={"Keycap-Approval": approval_id})
    chat(retry)
    with pytest.raises(openai.PermissionDeniedError) as again:
        chat(retry)
    assert again.value.body["code"] == "approval_used", again.value.body
    assert client.approvals.get(approval_id).state == "used"
    with pytest.raises(openai.PermissionDeniedError) as other:
        chat(ai)
    with pytest.raises(kc.KeycapError):
        client.approvals.deny(approval_id, reason="too late")
    denied = client.approvals.deny(other.value.body["approval_id"], reason="not today")
    assert denied.state == "denied"
    client.keys.revoke_run(run)


def _suggest(client, key_id):
    try:
        return client.keys.suggest(key_id)
    except kc.Conflict:
        return None  # no forwarded call in the ledger yet


def test_the_checked_in_generated_code_is_fresh(tmp_path):
    subprocess.run([str(ROOT / "scripts" / "gen-sdks"), "--into", str(tmp_path)], check=True)
    fresh = tmp_path / "sdk" / "python" / "src" / "keycap" / "v1"
    checked_in = ROOT / "sdk" / "python" / "src" / "keycap" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in checked_in.iterdir() if p.name != "__pycache__")
    _, differ, errors = filecmp.cmpfiles(fresh, checked_in, names, shallow=False)
    assert differ == [] and errors == [], f"run scripts/gen-sdks: {differ or errors} changed"
    packaged = ROOT / "sdk" / "python" / "LICENSE"
    assert packaged.read_bytes() == (ROOT / "LICENSE").read_bytes(), "run scripts/gen-sdks"


def test_the_wheel_ships_the_license_its_metadata_declares(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(tmp_path), str(ROOT / "sdk" / "python")],
                   check=True)
    (wheel,) = tmp_path.glob("keycap-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert z.read(license_file) == (ROOT / "LICENSE").read_bytes()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert "License-Expression: Apache-2.0" in z.read(metadata).decode()
    assert "keycap/py.typed" in names and "keycap/v1/admin_pb2.py" in names


def test_the_sdk_type_checks_strictly():
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT / "sdk" / "python",
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
