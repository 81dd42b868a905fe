"""`Client` (blocking) and `AsyncClient` (asyncio): keycap's admin gRPC API
with the REST mapping's vocabulary. Both build the same request messages
and convert the same answers (`_Requests`, `_types`); they differ only in
how a call is awaited. The client checks no business rule itself: the
server's refusal comes back as a `KeycapError` with its code, message and
field.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import grpc
import grpc.aio

from keycap.v1 import admin_pb2 as pb
from keycap.v1 import admin_pb2_grpc as rpc

from ._errors import KeycapError, Unauthenticated, from_rpc_error
from ._types import (
    AdminToken,
    Approval,
    AuditEntry,
    Checkpoint,
    Confirmation,
    CreatedAdminToken,
    CreatedIssuerToken,
    CreatedKey,
    Duration,
    IssuerToken,
    Key,
    KekRotation,
    KeyEnforcement,
    KeyRevocation,
    Money,
    PriceImport,
    PolicySuggestion,
    RolledKey,
    RunRevocation,
    Simulation,
    Spend,
    Verification,
    SpendReport,
    Vendor,
    VendorWrite,
    micros,
    seconds,
    timestamp,
)

DEFAULT_ADDR = "http://127.0.0.1:8081"
AUDIT_PAGE_SIZE = 500

T = TypeVar("T")


@dataclass(frozen=True)
class _Target:
    """Where and how to connect. The token is kept out of the repr."""

    addr: str
    host: str
    secure: bool
    root_certificates: bytes | None
    timeout: float

    @classmethod
    def resolve(cls, addr: str | None, ca_file: str | None, timeout: float) -> _Target:
        addr = addr or os.environ.get("KEYCAP_ADDR") or os.environ.get("KEYCAP_CONTROL_URL") \
            or DEFAULT_ADDR
        ca_file = ca_file or os.environ.get("KEYCAP_CACERT") or os.environ.get("KEYCAP_CA")
        if addr.startswith("https://"):
            host, secure = addr[len("https://"):], True
        elif addr.startswith("http://"):
            host, secure = addr[len("http://"):], False
        else:
            host, secure = addr, ca_file is not None
        host = host.rstrip("/")
        roots = None
        if ca_file is not None:
            try:
                with open(ca_file, "rb") as f:
                    roots = f.read()
            except OSError as e:
                raise KeycapError(f"cannot read the CA file {ca_file}: {e.strerror}",
                                  code="invalid_request", field="ca_file") from None
        return cls(addr, host, secure, roots, timeout)


def _token(token: str | None) -> str:
    token = token or os.environ.get("KEYCAP_ADMIN_TOKEN")
    if not token:
        raise Unauthenticated("an admin token is required: token= or KEYCAP_ADMIN_TOKEN")
    return token


class _Requests:
    """The request message of each operation, from the client's arguments."""

    @staticmethod
    def put_vendor(name: str, profile: str, base_url: str, credential: str | None,
                   currency_rates: Mapping[str, Money] | None, prices_json: str | None,
                   ack_timeout: Duration | None) -> pb.PutVendorRequest:
        return pb.PutVendorRequest(
            name=name, profile=profile, base_url=base_url, credential=credential or "",
            currency_rates={k: str(v) for k, v in (currency_rates or {}).items()},
            prices_json=prices_json or "",
            ack_timeout_ms=_ack_ms(ack_timeout))

    @staticmethod
    def create_key(vendor: str, daily_usd_cap: Money, allowed_endpoints: Sequence[str],
                   expires_in: Duration, agent_run_label: str, per_call_usd_cap: Money | None,
                   lifetime_usd_cap: Money | None, metadata: Mapping[str, str] | None,
                   rate_limit_per_minute: int | None, allowed_cidrs: Sequence[str] | None,
                   zone: str | None, parent_id: str | None,
                   ack_timeout: Duration | None,
                   approval_above_usd: Money | None = None,
                   observe_ceiling_usd: Money | None = None) -> pb.CreateKeyRequest:
        return pb.CreateKeyRequest(
            vendor=vendor,
            daily_cap_micros=micros("daily_usd_cap", daily_usd_cap),
            allowed_endpoints=list(allowed_endpoints),
            expires_in_seconds=seconds("expires_in", expires_in),
            agent_run_label=agent_run_label,
            per_call_cap_micros=(0 if per_call_usd_cap is None
                                 else micros("per_call_usd_cap", per_call_usd_cap)),
            lifetime_cap_micros=(0 if lifetime_usd_cap is None
                                 else micros("lifetime_usd_cap", lifetime_usd_cap)),
            metadata=dict(metadata or {}),
            rate_limit_per_minute=rate_limit_per_minute or 0,
            allowed_cidrs=list(allowed_cidrs or ()),
            zone=zone or "",
            parent_id=parent_id or "",
            ack_timeout_ms=_ack_ms(ack_timeout),
            approval_above_micros=(0 if approval_above_usd is None
                                   else micros("approval_above_usd", approval_above_usd)),
            mode="" if observe_ceiling_usd is None else "observe",
            observe_ceiling_micros=(0 if observe_ceiling_usd is None
                                    else micros("observe_ceiling_usd", observe_ceiling_usd)))

    @staticmethod
    def enforce_key(id: str, daily_usd_cap: Money | None, per_call_usd_cap: Money | None,
                    lifetime_usd_cap: Money | None, allowed_endpoints: Sequence[str] | None,
                    ack_timeout: Duration | None) -> pb.EnforceKeyRequest:
        def cap(field: str, v: Money | None) -> int:
            return 0 if v is None else micros(field, v)

        return pb.EnforceKeyRequest(
            id=id,
            daily_cap_micros=cap("daily_usd_cap", daily_usd_cap),
            per_call_cap_micros=cap("per_call_usd_cap", per_call_usd_cap),
            lifetime_cap_micros=cap("lifetime_usd_cap", lifetime_usd_cap),
            allowed_endpoints=list(allowed_endpoints or ()),
            ack_timeout_ms=_ack_ms(ack_timeout))

    @staticmethod
    def query_audit(key_id: str | None, agent_run_label: str | None, vendor: str | None,
                    since: datetime | None, until: datetime | None, trace_id: str | None,
                    context: str | None, page_token: str, outcome: str | None = None,
                    refusal_reason: str | None = None) -> pb.QueryAuditRequest:
        req = pb.QueryAuditRequest(key_id=key_id or "", agent_run_label=agent_run_label or "",
                                   vendor=vendor or "", page_size=AUDIT_PAGE_SIZE,
                                   page_token=page_token, trace_id=trace_id or "",
                                   context=context or "", outcome=outcome or "",
                                   refusal_reason=refusal_reason or "")
        if since is not None:
            req.since.CopyFrom(timestamp(since))
        if until is not None:
            req.until.CopyFrom(timestamp(until))
        return req

    @staticmethod
    def spend_report(group_by: Sequence[str], since: datetime | None, until: datetime | None,
                     top: int | None, agent_run_label: str | None) -> pb.SpendReportRequest:
        req = pb.SpendReportRequest(group_by=list(group_by), top=top or 0,
                                    agent_run_label=agent_run_label or "")
        if since is not None:
            getattr(req, "from").CopyFrom(timestamp(since))
        if until is not None:
            req.to.CopyFrom(timestamp(until))
        return req

    @staticmethod
    def export_audit(format: str, since: datetime | None,
                     until: datetime | None) -> pb.ExportAuditRequest:
        req = pb.ExportAuditRequest(format=format)
        if since is not None:
            getattr(req, "from").CopyFrom(timestamp(since))
        if until is not None:
            req.to.CopyFrom(timestamp(until))
        return req


def _simulate_request(key_id: str, method: str, path: str,
                      headers: Mapping[str, str] | Sequence[tuple[str, str]] | None,
                      body: bytes | str | None) -> pb.SimulateRequest:
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    data = body.encode() if isinstance(body, str) else (body or b"")
    return pb.SimulateRequest(key_id=key_id, request=pb.SimulatedCall(
        method=method, path=path,
        headers=[pb.SimulatedHeader(name=n, value=v) for n, v in pairs], body=data))


def _admin_token_request(name: str, scopes: Sequence[str], vendors: Sequence[str] | None,
                         expires_in: Duration | None) -> pb.CreateAdminTokenRequest:
    return pb.CreateAdminTokenRequest(
        name=name, scopes=list(scopes), vendors=list(vendors or ()),
        expires_in_seconds=0 if expires_in is None else seconds("expires_in", expires_in))


def _ack_ms(d: Duration | None) -> int:
    return 0 if d is None else seconds("ack_timeout", d) * 1000


def _roll_request(id: str, grace: Duration | None, ack_timeout: Duration | None) -> pb.RollKeyRequest:
    return pb.RollKeyRequest(id=id, grace="" if grace is None else f"{seconds('grace', grace)}s",
                             ack_timeout_ms=_ack_ms(ack_timeout))


def _rolled_key(r: pb.RollKeyResponse) -> RolledKey:
    return RolledKey(key=r.secret, info=Key._from(r.key),
                     confirmation=Confirmation._from(r.confirmation), rolled=Key._from(r.rolled))


def _kek_rotation(r: pb.RotateKekResponse) -> KekRotation:
    return KekRotation(r.kek_id, r.rewrapped, r.already_current, tuple(r.failed_vendors))


def _created_key(r: pb.CreateKeyResponse) -> CreatedKey:
    return CreatedKey(key=r.secret, info=Key._from(r.key),
                      confirmation=Confirmation._from(r.confirmation))


# ---------------------------------------------------------------- blocking


class _Sync:
    def __init__(self, channel: grpc.Channel, target: _Target, metadata: tuple[tuple[str, str], ...]):
        self._target = target
        self._metadata = metadata
        self._vendors = rpc.VendorServiceStub(channel)
        self._keys = rpc.KeyServiceStub(channel)
        self._audit = rpc.AuditServiceStub(channel)
        self._admin_tokens = rpc.AdminTokenServiceStub(channel)
        self._simulate = rpc.SimulateServiceStub(channel)
        self._approvals = rpc.ApprovalServiceStub(channel)
        self._suggest = rpc.SuggestServiceStub(channel)

    def _call(self, method: grpc.UnaryUnaryMultiCallable[Any, T], request: Any) -> T:
        try:
            return method(request, timeout=self._target.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self._target.addr) from None


class Vendors(_Sync):
    def put(self, name: str, *, profile: str, base_url: str, credential: str | None = None,
            currency_rates: Mapping[str, Money] | None = None, prices_json: str | None = None,
            ack_timeout: Duration | None = None) -> VendorWrite:
        """Creates or replaces a vendor; `credential` is required on creation."""
        r = self._call(self._vendors.PutVendor, _Requests.put_vendor(
            name, profile, base_url, credential, currency_rates, prices_json, ack_timeout))
        return VendorWrite(Vendor._from(r.vendor), r.created, Confirmation._from(r.confirmation))

    def get(self, name: str) -> Vendor:
        return Vendor._from(self._call(self._vendors.GetVendor, pb.GetVendorRequest(name=name)).vendor)

    def list(self) -> list[Vendor]:
        r = self._call(self._vendors.ListVendors, pb.ListVendorsRequest())
        return [Vendor._from(v) for v in r.vendors]

    def delete(self, name: str, *, ack_timeout: Duration | None = None) -> Confirmation:
        r = self._call(self._vendors.DeleteVendor,
                       pb.DeleteVendorRequest(name=name, ack_timeout_ms=_ack_ms(ack_timeout)))
        return Confirmation._from(r.confirmation)

    def import_prices(self, name: str, litellm_json: str) -> PriceImport:
        """Replaces the vendor's prices with those of LiteLLM's price file
        (its JSON text as published)."""
        return PriceImport._from(self._call(self._vendors.ImportVendorPrices,
                                            pb.ImportVendorPricesRequest(
                                                name=name, litellm_json=litellm_json)))

    def rotate_kek(self) -> KekRotation:
        """Re-wraps every vendor credential under the answering control
        plane's primary master key."""
        return _kek_rotation(self._call(self._vendors.RotateKek, pb.RotateKekRequest()))


class Keys(_Sync):
    def create(self, *, vendor: str, daily_usd_cap: Money, allowed_endpoints: Sequence[str],
               expires_in: Duration, agent_run_label: str = "",
               per_call_usd_cap: Money | None = None, lifetime_usd_cap: Money | None = None,
               metadata: Mapping[str, str] | None = None,
               rate_limit_per_minute: int | None = None,
               allowed_cidrs: Sequence[str] | None = None, zone: str | None = None,
               parent_id: str | None = None,
               ack_timeout: Duration | None = None,
               approval_above_usd: Money | None = None,
               observe_ceiling_usd: Money | None = None) -> CreatedKey:
        """Mints a vault key; the answer carries its secret (`.key`) once.
        With `observe_ceiling_usd` the key is minted in observe mode
        (docs/observe.md)."""
        return _created_key(self._call(self._keys.CreateKey, _Requests.create_key(
            vendor, daily_usd_cap, allowed_endpoints, expires_in, agent_run_label,
            per_call_usd_cap, lifetime_usd_cap, metadata, rate_limit_per_minute, allowed_cidrs,
            zone, parent_id, ack_timeout, approval_above_usd, observe_ceiling_usd)))

    def enforce(self, id: str, *, daily_usd_cap: Money | None = None,
                per_call_usd_cap: Money | None = None, lifetime_usd_cap: Money | None = None,
                allowed_endpoints: Sequence[str] | None = None,
                ack_timeout: Duration | None = None) -> KeyEnforcement:
        """Switches a key in observe mode to enforcing, in place (same id,
        secret and budget); each cap or the endpoints left out keep the
        key's own. Returns once the proxies enforce it."""
        r = self._call(self._keys.EnforceKey, _Requests.enforce_key(
            id, daily_usd_cap, per_call_usd_cap, lifetime_usd_cap, allowed_endpoints,
            ack_timeout))
        return KeyEnforcement(Key._from(r.key), Confirmation._from(r.confirmation))

    def get(self, id: str) -> Key:
        return Key._from(self._call(self._keys.GetKey, pb.GetKeyRequest(id=id)).key)

    def list(self, *, agent_run_label: str | None = None, vendor: str | None = None,
             include_inactive: bool = False) -> list[Key]:
        r = self._call(self._keys.ListKeys, pb.ListKeysRequest(
            agent_run_label=agent_run_label or "", vendor=vendor or "",
            include_inactive=include_inactive))
        return [Key._from(k) for k in r.keys]

    def revoke(self, id: str, *, ack_timeout: Duration | None = None) -> KeyRevocation:
        """Revokes a key; returns once the proxies confirmed (or the wait ended)."""
        r = self._call(self._keys.RevokeKey,
                       pb.RevokeKeyRequest(id=id, ack_timeout_ms=_ack_ms(ack_timeout)))
        return KeyRevocation(Key._from(r.key), Confirmation._from(r.confirmation))

    def roll(self, id: str, *, grace: Duration | None = None,
             ack_timeout: Duration | None = None) -> RolledKey:
        """Rolls a key: a successor with the same policy that spends the same
        budget, answered once the proxies serve it; the key keeps working for
        `grace` (default 10 minutes, at most 24 hours), then is revoked."""
        return _rolled_key(self._call(self._keys.RollKey, _roll_request(id, grace, ack_timeout)))

    def revoke_run(self, agent_run_label: str, *,
                   ack_timeout: Duration | None = None) -> RunRevocation:
        """Revokes every key of an agent run."""
        r = self._call(self._keys.RevokeRun, pb.RevokeRunRequest(
            agent_run_label=agent_run_label, ack_timeout_ms=_ack_ms(ack_timeout)))
        return RunRevocation(tuple(r.revoked_ids), Confirmation._from(r.confirmation))

    def create_issuer_token(self, key_id: str, *, name: str,
                            expires_in: Duration) -> CreatedIssuerToken:
        r = self._call(self._keys.CreateIssuerToken, pb.CreateIssuerTokenRequest(
            key_id=key_id, name=name, expires_in_seconds=seconds("expires_in", expires_in)))
        return CreatedIssuerToken(r.secret, IssuerToken._from(r.token))

    def list_issuer_tokens(self, key_id: str, *, include_inactive: bool = False) -> builtins.list[IssuerToken]:
        r = self._call(self._keys.ListIssuerTokens, pb.ListIssuerTokensRequest(
            key_id=key_id, include_inactive=include_inactive))
        return [IssuerToken._from(t) for t in r.tokens]

    def revoke_issuer_token(self, id: str) -> IssuerToken:
        r = self._call(self._keys.RevokeIssuerToken, pb.RevokeIssuerTokenRequest(id=id))
        return IssuerToken._from(r.token)

    def simulate(self, key_id: str, *, method: str, path: str,
                 headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
                 body: bytes | str | None = None) -> Simulation:
        """A dry run: what the proxy would do with this call of the key
        (`path` as the vendor sees it), without forwarding or reserving
        anything (docs/simulate.md)."""
        return Simulation._from(self._call(self._simulate.Simulate,
                                           _simulate_request(key_id, method, path, headers, body)))

    def suggest(self, key_id: str, *, margin_percent: int | None = None) -> PolicySuggestion:
        """An enforcing policy drawn from the key's forwarded calls
        (docs/observe.md)."""
        req = pb.SuggestPolicyRequest(key_id=key_id, margin_percent=margin_percent)
        return PolicySuggestion._from(self._call(self._suggest.SuggestPolicy, req))


class Audit(_Sync):
    def query(self, *, key_id: str | None = None, agent_run_label: str | None = None,
              vendor: str | None = None, since: datetime | None = None,
              until: datetime | None = None, trace_id: str | None = None,
              context: str | None = None, outcome: str | None = None,
              refusal_reason: str | None = None) -> Iterator[AuditEntry]:
        """Every matching entry, newest first, fetching page after page.
        `trace_id`: one call's entries; `context`: "key=value" of the
        agent context the calls carried; `outcome="refused"`: the recorded
        refusals (`refusal_reason`: of one error code)."""
        page = ""
        while True:
            r = self._call(self._audit.QueryAudit, _Requests.query_audit(
                key_id, agent_run_label, vendor, since, until, trace_id, context, page,
                outcome, refusal_reason))
            yield from (AuditEntry._from(e) for e in r.entries)
            if not r.next_page_token:
                return
            page = r.next_page_token

    def verify(self, *, from_seq: int | None = None,
               checkpoint: str | None = None) -> Verification:
        """Recomputes the ledger's hash chain (from `from_seq`, trusting the
        hash stored before it) and holds its end against the latest
        checkpoint keycap signed and against `checkpoint`, one kept from
        earlier as "SEQ:HASH" (hash in hex)."""
        return Verification._from(self._call(
            self._audit.VerifyAudit,
            pb.VerifyAuditRequest(from_seq=from_seq or 0, checkpoint=checkpoint or "")))

    def checkpoints(self, *, limit: int | None = None) -> list[Checkpoint]:
        """The ledger's signed checkpoints, newest first."""
        r = self._call(self._audit.ListCheckpoints, pb.ListCheckpointsRequest(limit=limit or 0))
        return [Checkpoint._from(c) for c in r.checkpoints]


    def export(self, *, format: str = "jsonl", since: datetime | None = None,
               until: datetime | None = None) -> Iterator[bytes]:
        """The ledger oldest first with its chain fields, as JSON Lines
        ("jsonl") or CSV ("csv"), a page of records per piece, as the
        server streams it: write each piece as it comes (docs/ledger.md;
        docs/verify_ledger.py checks a JSON Lines export on its own). No
        per-call timeout: an export takes as long as the ledger is long."""
        try:
            for piece in self._audit.ExportAudit(_Requests.export_audit(format, since, until),
                                                 metadata=self._metadata):
                yield piece.data
        except grpc.RpcError as e:
            raise from_rpc_error(e, self._target.addr) from None


class AdminTokens(_Sync):
    def create(self, *, name: str, scopes: Sequence[str], vendors: Sequence[str] | None = None,
               expires_in: Duration | None = None) -> CreatedAdminToken:
        """Mints an admin token with `scopes` (restricted to `vendors` when
        given); the answer carries its secret (`.token`) once."""
        r = self._call(self._admin_tokens.CreateAdminToken,
                       _admin_token_request(name, scopes, vendors, expires_in))
        return CreatedAdminToken(r.secret, AdminToken._from(r.token))

    def list(self, *, include_inactive: bool = False) -> builtins.list[AdminToken]:
        r = self._call(self._admin_tokens.ListAdminTokens,
                       pb.ListAdminTokensRequest(include_inactive=include_inactive))
        return [AdminToken._from(t) for t in r.tokens]

    def revoke(self, id: str) -> AdminToken:
        r = self._call(self._admin_tokens.RevokeAdminToken, pb.RevokeAdminTokenRequest(id=id))
        return AdminToken._from(r.token)


class Approvals(_Sync):
    """Calls held for a person's approval (docs/approvals.md)."""

    def list(self, *, state: str | None = None, key_id: str | None = None,
             limit: int = 0) -> builtins.list[Approval]:
        """Newest first; `state` one of "pending", "approved", "denied",
        "expired", "used" (needs keys:read)."""
        r = self._call(self._approvals.ListApprovals, pb.ListApprovalsRequest(
            state=state or "", key_id=key_id or "", limit=limit))
        return [Approval._from(a) for a in r.approvals]

    def get(self, id: str) -> Approval:
        return Approval._from(self._call(self._approvals.GetApproval,
                                         pb.GetApprovalRequest(id=id)).approval)

    def approve(self, id: str, *, reason: str) -> Approval:
        """Approves a held call (needs approvals:decide); the agent's
        identical retry with `Keycap-Approval` is then forwarded once."""
        return Approval._from(self._call(self._approvals.ApproveApproval,
                                         pb.DecideApprovalRequest(id=id, reason=reason)).approval)

    def deny(self, id: str, *, reason: str) -> Approval:
        """Denies a held call (needs approvals:decide)."""
        return Approval._from(self._call(self._approvals.DenyApproval,
                                         pb.DecideApprovalRequest(id=id, reason=reason)).approval)


class Client:
    """keycap's admin API, blocking.

    `addr` is the control plane's URL (`http://host:port` or
    `https://host:port`), else `KEYCAP_ADDR` (or `KEYCAP_CONTROL_URL`), else
    http://127.0.0.1:8081; `token` an admin token, else `KEYCAP_ADMIN_TOKEN`;
    `ca_file` a PEM file of CAs for https, else `KEYCAP_CACERT` (or
    `KEYCAP_CA`), else the system's roots; `timeout` seconds per call.
    """

    def __init__(self, addr: str | None = None, token: str | None = None,
                 ca_file: str | None = None, timeout: float = 10.0) -> None:
        target = _Target.resolve(addr, ca_file, timeout)
        metadata = (("authorization", f"Bearer {_token(token)}"),)
        if target.secure:
            creds = grpc.ssl_channel_credentials(root_certificates=target.root_certificates)
            self._channel = grpc.secure_channel(target.host, creds)
        else:
            self._channel = grpc.insecure_channel(target.host)
        self.addr = target.addr
        self.vendors = Vendors(self._channel, target, metadata)
        self.keys = Keys(self._channel, target, metadata)
        self.audit = Audit(self._channel, target, metadata)
        self.admin_tokens = AdminTokens(self._channel, target, metadata)
        self.approvals = Approvals(self._channel, target, metadata)

    def spend(self, *, agent_run_label: str) -> Spend:
        """What an agent run spent, in total and per vendor."""
        return Spend._from(self.audit._call(self.audit._audit.SpendSummary,
                                            pb.SpendSummaryRequest(agent_run_label=agent_run_label)))

    def spend_report(self, *, group_by: Sequence[str] = (), since: datetime | None = None,
                     until: datetime | None = None, top: int | None = None,
                     agent_run_label: str | None = None) -> SpendReport:
        """Spend, calls and refused calls grouped by any of "run_label",
        "key", "vendor", "day" (UTC), at or after `since` and before
        `until`; the `top` groups by spend, and the totals."""
        return SpendReport._from(self.audit._call(
            self.audit._audit.SpendReport,
            _Requests.spend_report(group_by, since, until, top, agent_run_label)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"keycap.Client(addr={self.addr!r})"


# ----------------------------------------------------------------- asyncio


class _Async:
    def __init__(self, channel: grpc.aio.Channel, target: _Target,
                 metadata: tuple[tuple[str, str], ...]):
        self._target = target
        self._metadata = metadata
        self._vendors = rpc.VendorServiceStub(channel)
        self._keys = rpc.KeyServiceStub(channel)
        self._audit = rpc.AuditServiceStub(channel)
        self._admin_tokens = rpc.AdminTokenServiceStub(channel)
        self._simulate = rpc.SimulateServiceStub(channel)
        self._approvals = rpc.ApprovalServiceStub(channel)
        self._suggest = rpc.SuggestServiceStub(channel)

    async def _call(self, method: grpc.aio.UnaryUnaryMultiCallable[Any, T], request: Any) -> T:
        try:
            return await method(request, timeout=self._target.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self._target.addr) from None


class AsyncVendors(_Async):
    async def put(self, name: str, *, profile: str, base_url: str, credential: str | None = None,
                  currency_rates: Mapping[str, Money] | None = None,
                  prices_json: str | None = None,
                  ack_timeout: Duration | None = None) -> VendorWrite:
        r = await self._call(self._vendors.PutVendor, _Requests.put_vendor(
            name, profile, base_url, credential, currency_rates, prices_json, ack_timeout))
        return VendorWrite(Vendor._from(r.vendor), r.created, Confirmation._from(r.confirmation))

    async def get(self, name: str) -> Vendor:
        r = await self._call(self._vendors.GetVendor, pb.GetVendorRequest(name=name))
        return Vendor._from(r.vendor)

    async def list(self) -> list[Vendor]:
        r = await self._call(self._vendors.ListVendors, pb.ListVendorsRequest())
        return [Vendor._from(v) for v in r.vendors]

    async def delete(self, name: str, *, ack_timeout: Duration | None = None) -> Confirmation:
        r = await self._call(self._vendors.DeleteVendor,
                             pb.DeleteVendorRequest(name=name, ack_timeout_ms=_ack_ms(ack_timeout)))
        return Confirmation._from(r.confirmation)

    async def import_prices(self, name: str, litellm_json: str) -> PriceImport:
        return PriceImport._from(await self._call(self._vendors.ImportVendorPrices,
                                                  pb.ImportVendorPricesRequest(
                                                      name=name, litellm_json=litellm_json)))

    async def rotate_kek(self) -> KekRotation:
        return _kek_rotation(await self._call(self._vendors.RotateKek, pb.RotateKekRequest()))


class AsyncKeys(_Async):
    async def create(self, *, vendor: str, daily_usd_cap: Money,
                     allowed_endpoints: Sequence[str], expires_in: Duration,
                     agent_run_label: str = "", per_call_usd_cap: Money | None = None,
                     lifetime_usd_cap: Money | None = None,
                     metadata: Mapping[str, str] | None = None,
                     rate_limit_per_minute: int | None = None,
                     allowed_cidrs: Sequence[str] | None = None, zone: str | None = None,
                     parent_id: str | None = None,
                     ack_timeout: Duration | None = None,
                     approval_above_usd: Money | None = None,
                     observe_ceiling_usd: Money | None = None) -> CreatedKey:
        return _created_key(await self._call(self._keys.CreateKey, _Requests.create_key(
            vendor, daily_usd_cap, allowed_endpoints, expires_in, agent_run_label,
            per_call_usd_cap, lifetime_usd_cap, metadata, rate_limit_per_minute, allowed_cidrs,
            zone, parent_id, ack_timeout, approval_above_usd, observe_ceiling_usd)))

    async def enforce(self, id: str, *, daily_usd_cap: Money | None = None,
                      per_call_usd_cap: Money | None = None,
                      lifetime_usd_cap: Money | None = None,
                      allowed_endpoints: Sequence[str] | None = None,
                      ack_timeout: Duration | None = None) -> KeyEnforcement:
        """See `Keys.enforce`."""
        r = await self._call(self._keys.EnforceKey, _Requests.enforce_key(
            id, daily_usd_cap, per_call_usd_cap, lifetime_usd_cap, allowed_endpoints,
            ack_timeout))
        return KeyEnforcement(Key._from(r.key), Confirmation._from(r.confirmation))

    async def get(self, id: str) -> Key:
        return Key._from((await self._call(self._keys.GetKey, pb.GetKeyRequest(id=id))).key)

    async def list(self, *, agent_run_label: str | None = None, vendor: str | None = None,
                   include_inactive: bool = False) -> list[Key]:
        r = await self._call(self._keys.ListKeys, pb.ListKeysRequest(
            agent_run_label=agent_run_label or "", vendor=vendor or "",
            include_inactive=include_inactive))
        return [Key._from(k) for k in r.keys]

    async def revoke(self, id: str, *, ack_timeout: Duration | None = None) -> KeyRevocation:
        r = await self._call(self._keys.RevokeKey,
                             pb.RevokeKeyRequest(id=id, ack_timeout_ms=_ack_ms(ack_timeout)))
        return KeyRevocation(Key._from(r.key), Confirmation._from(r.confirmation))

    async def roll(self, id: str, *, grace: Duration | None = None,
                   ack_timeout: Duration | None = None) -> RolledKey:
        """See `Keys.roll`."""
        return _rolled_key(await self._call(self._keys.RollKey,
                                            _roll_request(id, grace, ack_timeout)))

    async def revoke_run(self, agent_run_label: str, *,
                         ack_timeout: Duration | None = None) -> RunRevocation:
        r = await self._call(self._keys.RevokeRun, pb.RevokeRunRequest(
            agent_run_label=agent_run_label, ack_timeout_ms=_ack_ms(ack_timeout)))
        return RunRevocation(tuple(r.revoked_ids), Confirmation._from(r.confirmation))

    async def create_issuer_token(self, key_id: str, *, name: str,
                                  expires_in: Duration) -> CreatedIssuerToken:
        r = await self._call(self._keys.CreateIssuerToken, pb.CreateIssuerTokenRequest(
            key_id=key_id, name=name, expires_in_seconds=seconds("expires_in", expires_in)))
        return CreatedIssuerToken(r.secret, IssuerToken._from(r.token))

    async def list_issuer_tokens(self, key_id: str, *,
                                 include_inactive: bool = False) -> builtins.list[IssuerToken]:
        r = await self._call(self._keys.ListIssuerTokens, pb.ListIssuerTokensRequest(
            key_id=key_id, include_inactive=include_inactive))
        return [IssuerToken._from(t) for t in r.tokens]

    async def revoke_issuer_token(self, id: str) -> IssuerToken:
        r = await self._call(self._keys.RevokeIssuerToken, pb.RevokeIssuerTokenRequest(id=id))
        return IssuerToken._from(r.token)

    async def simulate(self, key_id: str, *, method: str, path: str,
                       headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
                       body: bytes | str | None = None) -> Simulation:
        """`Keys.simulate`, awaited."""
        return Simulation._from(await self._call(
            self._simulate.Simulate, _simulate_request(key_id, method, path, headers, body)))

    async def suggest(self, key_id: str, *, margin_percent: int | None = None) -> PolicySuggestion:
        """`Keys.suggest`, awaited."""
        req = pb.SuggestPolicyRequest(key_id=key_id, margin_percent=margin_percent)
        return PolicySuggestion._from(await self._call(self._suggest.SuggestPolicy, req))


class AsyncAudit(_Async):
    async def query(self, *, key_id: str | None = None, agent_run_label: str | None = None,
                    vendor: str | None = None, since: datetime | None = None,
                    until: datetime | None = None, trace_id: str | None = None,
                    context: str | None = None, outcome: str | None = None,
                    refusal_reason: str | None = None) -> AsyncIterator[AuditEntry]:
        page = ""
        while True:
            r = await self._call(self._audit.QueryAudit, _Requests.query_audit(
                key_id, agent_run_label, vendor, since, until, trace_id, context, page,
                outcome, refusal_reason))
            for e in r.entries:
                yield AuditEntry._from(e)
            if not r.next_page_token:
                return
            page = r.next_page_token

    async def verify(self, *, from_seq: int | None = None,
                     checkpoint: str | None = None) -> Verification:
        return Verification._from(await self._call(
            self._audit.VerifyAudit,
            pb.VerifyAuditRequest(from_seq=from_seq or 0, checkpoint=checkpoint or "")))

    async def checkpoints(self, *, limit: int | None = None) -> list[Checkpoint]:
        r = await self._call(self._audit.ListCheckpoints,
                             pb.ListCheckpointsRequest(limit=limit or 0))
        return [Checkpoint._from(c) for c in r.checkpoints]


    async def export(self, *, format: str = "jsonl", since: datetime | None = None,
                     until: datetime | None = None) -> AsyncIterator[bytes]:
        """`Audit.export` on asyncio."""
        try:
            async for piece in self._audit.ExportAudit(
                    _Requests.export_audit(format, since, until), metadata=self._metadata):
                yield piece.data
        except grpc.RpcError as e:
            raise from_rpc_error(e, self._target.addr) from None


class AsyncAdminTokens(_Async):
    async def create(self, *, name: str, scopes: Sequence[str],
                     vendors: Sequence[str] | None = None,
                     expires_in: Duration | None = None) -> CreatedAdminToken:
        r = await self._call(self._admin_tokens.CreateAdminToken,
                             _admin_token_request(name, scopes, vendors, expires_in))
        return CreatedAdminToken(r.secret, AdminToken._from(r.token))

    async def list(self, *, include_inactive: bool = False) -> builtins.list[AdminToken]:
        r = await self._call(self._admin_tokens.ListAdminTokens,
                             pb.ListAdminTokensRequest(include_inactive=include_inactive))
        return [AdminToken._from(t) for t in r.tokens]

    async def revoke(self, id: str) -> AdminToken:
        r = await self._call(self._admin_tokens.RevokeAdminToken,
                             pb.RevokeAdminTokenRequest(id=id))
        return AdminToken._from(r.token)


class AsyncApprovals(_Async):
    """`Approvals` on asyncio."""

    async def list(self, *, state: str | None = None, key_id: str | None = None,
                   limit: int = 0) -> builtins.list[Approval]:
        r = await self._call(self._approvals.ListApprovals, pb.ListApprovalsRequest(
            state=state or "", key_id=key_id or "", limit=limit))
        return [Approval._from(a) for a in r.approvals]

    async def get(self, id: str) -> Approval:
        r = await self._call(self._approvals.GetApproval, pb.GetApprovalRequest(id=id))
        return Approval._from(r.approval)

    async def approve(self, id: str, *, reason: str) -> Approval:
        r = await self._call(self._approvals.ApproveApproval,
                             pb.DecideApprovalRequest(id=id, reason=reason))
        return Approval._from(r.approval)

    async def deny(self, id: str, *, reason: str) -> Approval:
        r = await self._call(self._approvals.DenyApproval,
                             pb.DecideApprovalRequest(id=id, reason=reason))
        return Approval._from(r.approval)


class AsyncClient:
    """`Client`'s surface on asyncio (grpc.aio); the same arguments."""

    def __init__(self, addr: str | None = None, token: str | None = None,
                 ca_file: str | None = None, timeout: float = 10.0) -> None:
        target = _Target.resolve(addr, ca_file, timeout)
        metadata = (("authorization", f"Bearer {_token(token)}"),)
        if target.secure:
            creds = grpc.ssl_channel_credentials(root_certificates=target.root_certificates)
            self._channel = grpc.aio.secure_channel(target.host, creds)
        else:
            self._channel = grpc.aio.insecure_channel(target.host)
        self.addr = target.addr
        self.vendors = AsyncVendors(self._channel, target, metadata)
        self.keys = AsyncKeys(self._channel, target, metadata)
        self.audit = AsyncAudit(self._channel, target, metadata)
        self.admin_tokens = AsyncAdminTokens(self._channel, target, metadata)
        self.approvals = AsyncApprovals(self._channel, target, metadata)

    async def spend(self, *, agent_run_label: str) -> Spend:
        r = await self.audit._call(self.audit._audit.SpendSummary,
                                   pb.SpendSummaryRequest(agent_run_label=agent_run_label))
        return Spend._from(r)

    async def spend_report(self, *, group_by: Sequence[str] = (), since: datetime | None = None,
                           until: datetime | None = None, top: int | None = None,
                           agent_run_label: str | None = None) -> SpendReport:
        r = await self.audit._call(
            self.audit._audit.SpendReport,
            _Requests.spend_report(group_by, since, until, top, agent_run_label))
        return SpendReport._from(r)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"keycap.AsyncClient(addr={self.addr!r})"
