"""What the client returns: frozen dataclasses named and shaped like
keycap's REST bodies (`daily_usd_cap`, `status` as "active" / "expired" /
"revoked"), with money as `Decimal` US dollars, times as aware UTC
`datetime`s and durations as `timedelta`s. Conversion from and to the
generated protobuf messages lives here and nowhere else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Union

from google.protobuf.timestamp_pb2 import Timestamp

from keycap.v1 import admin_pb2 as pb

from ._errors import InvalidRequest

MICROS_PER_USD = 1_000_000

Money = Union[Decimal, int, str]
"""A USD amount: a `Decimal`, an `int` or a decimal string; never a float."""

Duration = Union[timedelta, int, str]
"""A duration: a `timedelta`, whole seconds, or keycap's text ("90s",
"15m", "2h", "7d", or a sum such as "1h30m")."""


def usd(micros: int) -> Decimal:
    """Integer micro-dollars as exact US dollars."""
    return Decimal(micros) / MICROS_PER_USD


def micros(field_name: str, amount: Money) -> int:
    """US dollars as integer micro-dollars; the server judges the value."""
    if isinstance(amount, bool) or isinstance(amount, float):
        raise InvalidRequest(f"{field_name}: give a Decimal or a decimal string, not a float",
                             field=field_name)
    try:
        exact = Decimal(amount) * MICROS_PER_USD
    except (InvalidOperation, ValueError, TypeError):
        raise InvalidRequest(f"{field_name}: not a US dollar amount: {amount!r}",
                             field=field_name) from None
    if not exact.is_finite() or exact != exact.to_integral_value():
        raise InvalidRequest(f"{field_name}: must be whole micro-dollars (at most 6 decimals)",
                             field=field_name)
    return int(exact)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)\s*([smhdw])")


def seconds(field_name: str, d: Duration) -> int:
    """A duration as whole seconds."""
    if isinstance(d, timedelta):
        return int(d.total_seconds())
    if isinstance(d, int) and not isinstance(d, bool):
        return d
    if isinstance(d, str):
        text = d.replace(" ", "")
        parts = _PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(int(n) * _UNITS[u] for n, u in parts)
    raise InvalidRequest(f"{field_name}: not a duration: {d!r} (e.g. \"30m\", \"2h\", \"7d\")",
                         field=field_name)


def _time(t: Timestamp, present: bool = True) -> datetime | None:
    if not present:
        return None
    return datetime.fromtimestamp(t.seconds, tz=timezone.utc) + timedelta(microseconds=t.nanos // 1000)


def timestamp(t: datetime) -> Timestamp:
    if t.tzinfo is None:
        raise InvalidRequest("times must be timezone-aware datetimes", field="time")
    out = Timestamp()
    out.FromDatetime(t.astimezone(timezone.utc))
    return out


_STATUS = {
    pb.KEY_STATUS_ACTIVE: "active",
    pb.KEY_STATUS_EXPIRED: "expired",
    pb.KEY_STATUS_REVOKED: "revoked",
}


@dataclass(frozen=True)
class Confirmation:
    """Which proxies serve a change: `all_confirmed` once every connected
    proxy applied it (a revocation is enforced fleet-wide)."""

    version: int
    confirmed_nodes: tuple[str, ...]
    unconfirmed_nodes: tuple[str, ...]
    unconfirmed_lease_usd: Decimal

    @property
    def all_confirmed(self) -> bool:
        return not self.unconfirmed_nodes

    @classmethod
    def _from(cls, m: pb.FleetConfirmation) -> Confirmation:
        return cls(m.version, tuple(m.confirmed_nodes), tuple(m.unconfirmed_nodes),
                   usd(m.unconfirmed_lease_micros))


@dataclass(frozen=True)
class VendorProxyError:
    node_id: str
    error: str
    at: datetime | None


@dataclass(frozen=True)
class Vendor:
    """A vendor keycap forwards to. Its credential is write-only: never here."""

    name: str
    profile: str
    base_url: str
    currency_rates: dict[str, Decimal]
    prices: Any
    created_at: datetime | None
    updated_at: datetime | None
    proxy_errors: tuple[VendorProxyError, ...]

    @classmethod
    def _from(cls, m: pb.Vendor) -> Vendor:
        return cls(
            name=m.name,
            profile=m.profile,
            base_url=m.base_url,
            currency_rates={k: Decimal(v) for k, v in m.currency_rates.items()},
            prices=json.loads(m.prices_json) if m.prices_json else None,
            created_at=_time(m.created_at, m.HasField("created_at")),
            updated_at=_time(m.updated_at, m.HasField("updated_at")),
            proxy_errors=tuple(VendorProxyError(e.node_id, e.error, _time(e.at, e.HasField("at")))
                               for e in m.proxy_errors),
        )


@dataclass(frozen=True)
class VendorWrite:
    """The answer to `vendors.put`: the vendor, whether it was new, and
    which proxies serve it as written."""

    vendor: Vendor
    created: bool
    confirmation: Confirmation


@dataclass(frozen=True)
class Key:
    """A vault key as keycap stores it: never its secret."""

    id: str
    key_prefix: str
    vendor: str
    status: str
    allowed_endpoints: tuple[str, ...]
    daily_usd_cap: Decimal
    per_call_usd_cap: Decimal | None
    lifetime_usd_cap: Decimal | None
    spent_today_usd: Decimal
    remaining_today_usd: Decimal
    spent_lifetime_usd: Decimal
    calls_today: int
    expires_at: datetime | None
    created_at: datetime | None
    revoked_at: datetime | None
    agent_run_label: str
    metadata: dict[str, str]
    rate_limit_per_minute: int | None
    allowed_cidrs: tuple[str, ...]
    zone: str
    parent_id: str
    rolled_from: str
    """The key this one succeeded in a roll; empty if none."""
    successor: str
    """The key that succeeded this one; empty until it is rolled."""
    grace_ends_at: datetime | None
    """When this rolled key is revoked; None if it was not rolled."""
    budget_id: str
    """The budget the key spends: its roll chain's first key."""
    approval_above_usd: Decimal | None = None
    """Calls reserving more than this need a person's approval."""
    mode: str = "enforce"
    """"enforce", or "observe" (docs/observe.md): the caps, endpoints and
    rate limit then only mark the calls they would refuse."""
    observe_ceiling_usd: Decimal | None = None
    """Observe mode's hard daily ceiling; None when enforcing."""

    @classmethod
    def _from(cls, m: pb.VaultKey) -> Key:
        return cls(
            id=m.id,
            key_prefix=m.key_prefix,
            vendor=m.vendor,
            status=_STATUS.get(m.status, "unknown"),
            allowed_endpoints=tuple(m.allowed_endpoints),
            daily_usd_cap=usd(m.daily_cap_micros),
            per_call_usd_cap=usd(m.per_call_cap_micros) if m.per_call_cap_micros else None,
            lifetime_usd_cap=usd(m.lifetime_cap_micros) if m.lifetime_cap_micros else None,
            spent_today_usd=usd(m.spent_today_micros),
            remaining_today_usd=usd(m.remaining_today_micros),
            spent_lifetime_usd=usd(m.spent_lifetime_micros),
            calls_today=m.calls_today,
            expires_at=_time(m.expires_at, m.HasField("expires_at")),
            created_at=_time(m.created_at, m.HasField("created_at")),
            revoked_at=_time(m.revoked_at, m.HasField("revoked_at")),
            agent_run_label=m.agent_run_label,
            metadata=dict(m.metadata),
            rate_limit_per_minute=m.rate_limit_per_minute or None,
            allowed_cidrs=tuple(m.allowed_cidrs),
            zone=m.zone,
            parent_id=m.parent_id,
            approval_above_usd=(usd(m.approval_above_micros)
                                if m.approval_above_micros else None),
            rolled_from=m.rolled_from,
            successor=m.successor,
            grace_ends_at=_time(m.grace_ends_at, m.HasField("grace_ends_at")),
            budget_id=m.budget_id or m.id,
            mode=m.mode or "enforce",
            observe_ceiling_usd=(usd(m.observe_ceiling_micros)
                                 if m.observe_ceiling_micros else None),
        )


def base_url(proxy: str, vendor: str, sdk: str = "openai") -> str:
    """The base URL an official vendor SDK takes to call `vendor` through
    the keycap proxy at `proxy`: `/{vendor}` on the proxy, plus the `/v1`
    the OpenAI SDKs expect in theirs (the Anthropic, Stripe and other SDKs
    add their own version to each path)."""
    root = f"{proxy.rstrip('/')}/{vendor}"
    return f"{root}/v1" if sdk == "openai" else root


@dataclass(frozen=True)
class CreatedKey:
    """A newly minted key. `key` is its secret, shown this once; it is left
    out of the repr so a log line never carries it."""

    key: str = field(repr=False)
    info: Key
    confirmation: Confirmation

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def expires_at(self) -> datetime | None:
        return self.info.expires_at

    def base_url(self, proxy: str, sdk: str = "openai") -> str:
        """`OpenAI(base_url=created.base_url(proxy), api_key=created.key)`."""
        return base_url(proxy, self.info.vendor, sdk)


@dataclass(frozen=True)
class RolledKey:
    """A roll: the successor (`key` is its secret, shown this once and left
    out of the repr), which proxies serve it, and the rolled key with its
    grace deadline."""

    key: str = field(repr=False)
    info: Key
    confirmation: Confirmation
    rolled: Key

    @property
    def id(self) -> str:
        return self.info.id


@dataclass(frozen=True)
class KeyRevocation:
    key: Key
    confirmation: Confirmation


@dataclass(frozen=True)
class KeyEnforcement:
    """A key switched from observe mode to enforcing, and which proxies
    confirmed they enforce it."""

    key: Key
    confirmation: Confirmation


@dataclass(frozen=True)
class RunRevocation:
    revoked_ids: tuple[str, ...]
    confirmation: Confirmation


@dataclass(frozen=True)
class IssuerToken:
    id: str
    key_id: str
    name: str
    token_prefix: str
    status: str
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def _from(cls, m: pb.IssuerToken) -> IssuerToken:
        return cls(m.id, m.key_id, m.name, m.token_prefix, _STATUS.get(m.status, "unknown"),
                   _time(m.created_at, m.HasField("created_at")),
                   _time(m.expires_at, m.HasField("expires_at")),
                   _time(m.revoked_at, m.HasField("revoked_at")))


@dataclass(frozen=True)
class CreatedIssuerToken:
    """A new issuer token; `token` is its secret, shown once, not in the repr."""

    token: str = field(repr=False)
    info: IssuerToken


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    event_id: str
    key_id: str
    agent_run_label: str
    vendor: str
    method: str
    path: str
    upstream_status: int
    reserved_usd: Decimal
    cost_usd: Decimal
    outcome: str
    at: datetime | None
    node_id: str
    detail: Any
    refusal_reason: str = ""
    """For outcome "refused": the error code the calls got."""
    refused_calls: int = 0
    """For outcome "refused": the calls of the key in that minute it stands for."""
    approval_id: str = ""
    """For a call forwarded under an approval: its id, who decided it and why."""
    approval_decided_by: str = ""
    approval_reason: str = ""
    would_refuse: str = ""
    """For a call of a key in observe mode: the refusal code enforcement
    would have answered (docs/observe.md); empty otherwise."""
    would_refuse_rule: str = ""

    @classmethod
    def _from(cls, m: pb.AuditEntry) -> AuditEntry:
        return cls(m.seq, m.event_id, m.key_id, m.agent_run_label, m.vendor, m.method, m.path,
                   m.upstream_status, usd(m.reserved_micros), usd(m.cost_micros), m.outcome,
                   _time(m.at, m.HasField("at")), m.node_id,
                   json.loads(m.detail_json) if m.detail_json else None,
                   m.refusal_reason, m.refused_calls,
                   m.approval_id, m.approval_decided_by, m.approval_reason,
                   m.would_refuse, m.would_refuse_rule)


@dataclass(frozen=True)
class Approval:
    """A call held for a person's approval (docs/approvals.md)."""

    id: str
    key_id: str
    agent_run_label: str
    vendor: str
    method: str
    path: str
    fingerprint: str
    quote_usd: Decimal
    state: str
    """"pending", "approved", "denied", "expired" or "used"."""
    requested_at: datetime | None
    expires_at: datetime | None
    decided_by: str
    reason: str
    decided_at: datetime | None
    consumed_at: datetime | None
    node_id: str
    approval_url: str

    @classmethod
    def _from(cls, m: pb.Approval) -> Approval:
        return cls(
            id=m.id, key_id=m.key_id, agent_run_label=m.agent_run_label, vendor=m.vendor,
            method=m.method, path=m.path, fingerprint=m.fingerprint,
            quote_usd=usd(m.quote_micros), state=m.state,
            requested_at=_time(m.requested_at, m.HasField("requested_at")),
            expires_at=_time(m.expires_at, m.HasField("expires_at")),
            decided_by=m.decided_by, reason=m.reason,
            decided_at=_time(m.decided_at, m.HasField("decided_at")),
            consumed_at=_time(m.consumed_at, m.HasField("consumed_at")),
            node_id=m.node_id, approval_url=m.approval_url,
        )


@dataclass(frozen=True)
class VendorSpend:
    vendor: str
    total_usd: Decimal
    calls: int


@dataclass(frozen=True)
class Spend:
    agent_run_label: str
    total_usd: Decimal
    calls: int
    vendors: tuple[VendorSpend, ...]

    @classmethod
    def _from(cls, m: pb.SpendSummaryResponse) -> Spend:
        return cls(m.agent_run_label, usd(m.total_micros), m.calls,
                   tuple(VendorSpend(v.vendor, usd(v.total_micros), v.calls) for v in m.vendors))


@dataclass(frozen=True)
class AdminToken:
    """An admin token as keycap stores it: never its secret. `vendors` is
    empty for a token that may act on every vendor."""

    id: str
    name: str
    scopes: tuple[str, ...]
    vendors: tuple[str, ...]
    token_prefix: str
    status: str
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def _from(cls, m: pb.AdminToken) -> AdminToken:
        return cls(m.id, m.name, tuple(m.scopes), tuple(m.vendors), m.token_prefix,
                   _STATUS.get(m.status, "unknown"),
                   _time(m.created_at, m.HasField("created_at")),
                   _time(m.expires_at, m.HasField("expires_at")),
                   _time(m.revoked_at, m.HasField("revoked_at")))


@dataclass(frozen=True)
class CreatedAdminToken:
    """A new admin token; `token` is its secret, shown once, not in the repr."""

    token: str = field(repr=False)
    info: AdminToken

    @property
    def id(self) -> str:
        return self.info.id


@dataclass(frozen=True)
class BrokenEntry:
    """The first audit entry whose hash chain does not hold, and why."""

    seq: int
    reason: str
    message: str


@dataclass(frozen=True)
class Verification:
    """Whether the audit ledger's hash chain holds (`ok`); `broken` names
    the first entry that breaks it."""

    ok: bool
    checked: int
    legacy: int
    head_seq: int | None
    head_hash: str | None
    broken: BrokenEntry | None
    checkpoint_seq: int | None

    @classmethod
    def _from(cls, m: pb.VerifyAuditResponse) -> Verification:
        head = bool(m.head_hash)
        return cls(
            ok=m.ok, checked=m.checked, legacy=m.legacy,
            head_seq=m.head_seq if head else None,
            head_hash=m.head_hash.hex() if head else None,
            broken=None if m.ok else BrokenEntry(m.broken_seq, m.broken_reason, m.broken_message),
            checkpoint_seq=m.checkpoint_seq or None,
        )


@dataclass(frozen=True)
class Checkpoint:
    """A signed checkpoint of the ledger's head: hex SHA-256 `hash` of the
    entry at `seq`, and the Ed25519 `public_key` and `signature` over it."""

    seq: int
    hash: str
    at: datetime | None
    public_key: str
    signature: str

    @classmethod
    def _from(cls, m: pb.Checkpoint) -> Checkpoint:
        return cls(m.seq, m.hash.hex(), _time(m.at, m.HasField("at")), m.public_key.hex(),
                   m.signature.hex())


@dataclass(frozen=True)
class KekRotation:
    """The answer to `vendors.rotate_kek`: not done while `failed_vendors`
    is not empty."""

    kek_id: str
    rewrapped: int
    already_current: int
    failed_vendors: tuple[str, ...]


@dataclass(frozen=True)
class SkippedPrice:
    name: str
    reason: str


@dataclass(frozen=True)
class UnusedPrice:
    kind: str
    reason: str
    entries: int


@dataclass(frozen=True)
class PriceImport:
    """The answer to `vendors.import_prices`: the vendor with its new
    prices, and what the file priced, skipped and left out."""

    vendor: Vendor
    as_of: str
    entries: int
    models: tuple[str, ...]
    embeddings: tuple[str, ...]
    images: tuple[str, ...]
    skipped: tuple[SkippedPrice, ...]
    unused_prices: tuple[UnusedPrice, ...]

    @classmethod
    def _from(cls, m: pb.ImportVendorPricesResponse) -> PriceImport:
        r = m.report
        return cls(Vendor._from(m.vendor), r.as_of, r.entries, tuple(r.models),
                   tuple(r.embeddings), tuple(r.images),
                   tuple(SkippedPrice(s.name, s.reason) for s in r.skipped),
                   tuple(UnusedPrice(u.kind, u.reason, u.entries) for u in r.unused_prices))


@dataclass(frozen=True)
class SpendGroup:
    """One group of a spend report: the dimensions grouped by (None for
    the others), the settled spend, the forwarded and the refused calls."""

    agent_run_label: str | None
    key_id: str | None
    vendor: str | None
    day: str | None
    total_usd: Decimal
    calls: int
    refused_calls: int
    would_refuse_calls: int = 0
    """Calls of keys in observe mode enforcement would have refused."""
    would_refuse_usd: Decimal = Decimal(0)


@dataclass(frozen=True)
class SpendReport:
    """Spend grouped as asked, largest first; the totals cover every entry
    in range, not only the groups returned (`more`: some were left out)."""

    group_by: tuple[str, ...]
    groups: tuple[SpendGroup, ...]
    total_usd: Decimal
    calls: int
    refused_calls: int
    more: bool
    would_refuse_calls: int = 0
    would_refuse_usd: Decimal = Decimal(0)

    @classmethod
    def _from(cls, m: pb.SpendReportResponse) -> SpendReport:
        by = tuple(m.group_by)

        def dim(name: str, value: str) -> str | None:
            return value if name in by else None

        groups = tuple(SpendGroup(dim("run_label", g.agent_run_label), dim("key", g.key_id),
                                  dim("vendor", g.vendor), dim("day", g.day),
                                  usd(g.total_micros), g.calls, g.refused_calls,
                                  g.would_refuse_calls, usd(g.would_refuse_micros))
                       for g in m.groups)
        return cls(by, groups, usd(m.total_micros), m.calls, m.refused_calls, m.more,
                   m.would_refuse_calls, usd(m.would_refuse_micros))


@dataclass(frozen=True)
class SimulatedRefusal:
    """Why the proxy would refuse a simulated call: the code it answers
    (or `quote_needs_lookup`) and the rule that decided it."""

    code: str
    rule: str
    message: str


@dataclass(frozen=True)
class SimulatedQuote:
    """The quote the proxy's pricing makes: what it would reserve, the
    quote's kind and reservation rule, the priced quantities."""

    reserve_usd: Decimal
    kind: str
    rule: str
    detail: Any
    streaming: bool


@dataclass(frozen=True)
class Simulation:
    """The answer to `keys.simulate`: what the proxy would do with the call.
    Nothing was forwarded or reserved."""

    allowed: bool
    refusal: SimulatedRefusal | None
    quote: SimulatedQuote | None
    daily_remaining_usd: Decimal
    lifetime_remaining_usd: Decimal | None
    unleased_usd: Decimal
    resets_at: datetime | None
    not_checked: tuple[str, ...]
    lookups: tuple[str, ...]
    would_refuse: SimulatedRefusal | None = None
    """For a key in observe mode: what enforcement would have refused the
    call with (the call is still allowed)."""

    @classmethod
    def _from(cls, m: pb.SimulateResponse) -> Simulation:
        refusal = (SimulatedRefusal(m.refusal_code, m.rule, m.message)
                   if m.refusal_code else None)
        quote = (SimulatedQuote(usd(m.quote.reserve_micros), m.quote.kind, m.quote.rule,
                                json.loads(m.quote.detail_json or "null"), m.quote.streaming)
                 if m.HasField("quote") else None)
        b = m.budget
        return cls(m.allowed, refusal, quote, usd(b.daily_remaining_micros),
                   usd(b.lifetime_remaining_micros) if b.has_lifetime_cap else None,
                   usd(b.unleased_micros), _time(b.resets_at, b.HasField("resets_at")),
                   tuple(m.not_checked), tuple(m.lookups),
                   SimulatedRefusal(m.would_refuse_code, m.would_refuse_rule,
                                    m.would_refuse_message) if m.would_refuse_code else None)


@dataclass(frozen=True)
class PolicySuggestion:
    """The answer to `keys.suggest`: an enforcing policy drawn from the
    key's forwarded calls. `create_key_args()` gives `keys.create` keyword
    arguments (add `expires_in` and `agent_run_label`)."""

    vendor: str
    allowed_endpoints: tuple[str, ...]
    daily_usd_cap: Decimal
    per_call_usd_cap: Decimal
    margin_percent: int
    observed_calls: int
    observed_days: int
    max_daily_usd: Decimal
    max_call_usd: Decimal

    def create_key_args(self) -> dict[str, Any]:
        return {"vendor": self.vendor, "allowed_endpoints": list(self.allowed_endpoints),
                "daily_usd_cap": self.daily_usd_cap, "per_call_usd_cap": self.per_call_usd_cap}

    @classmethod
    def _from(cls, m: pb.SuggestPolicyResponse) -> PolicySuggestion:
        o = m.observed
        return cls(m.vendor, tuple(m.allowed_endpoints), usd(m.daily_cap_micros),
                   usd(m.per_call_cap_micros), m.margin_percent, o.calls, o.days,
                   usd(o.max_daily_micros), usd(o.max_call_micros))
