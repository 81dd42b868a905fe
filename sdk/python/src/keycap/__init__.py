"""keycap's Python SDK: a typed client for keycap's admin API.

    import keycap
    from openai import OpenAI

    kc = keycap.Client()  # KEYCAP_ADDR, KEYCAP_ADMIN_TOKEN
    created = kc.keys.create(vendor="openai", daily_usd_cap="5",
                             allowed_endpoints=["POST /v1/chat/completions"],
                             expires_in="1h", agent_run_label="run-42")
    ai = OpenAI(base_url=created.base_url("http://127.0.0.1:8080"), api_key=created.key)
"""

from ._client import (
    AdminTokens,
    Approvals,
    AsyncApprovals,
    AsyncAdminTokens,
    AsyncAudit,
    AsyncClient,
    AsyncKeys,
    AsyncVendors,
    Audit,
    Client,
    Keys,
    Vendors,
)
from ._errors import (
    Conflict,
    InvalidRequest,
    KeycapError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from ._types import (
    AdminToken,
    Approval,
    AuditEntry,
    BrokenEntry,
    Checkpoint,
    Confirmation,
    CreatedAdminToken,
    CreatedIssuerToken,
    CreatedKey,
    Duration,
    IssuerToken,
    KekRotation,
    Key,
    KeyEnforcement,
    KeyRevocation,
    Money,
    PriceImport,
    PolicySuggestion,
    RolledKey,
    RunRevocation,
    SimulatedQuote,
    SimulatedRefusal,
    Simulation,
    SkippedPrice,
    Spend,
    UnusedPrice,
    Verification,
    SpendGroup,
    SpendReport,
    Vendor,
    VendorProxyError,
    VendorSpend,
    VendorWrite,
    base_url,
)

__all__ = [
    "AdminToken", "AdminTokens", "Approval", "Approvals", "AsyncApprovals", "AsyncAdminTokens", "BrokenEntry", "Checkpoint",
    "CreatedAdminToken", "KekRotation", "PriceImport", "SkippedPrice", "UnusedPrice",
    "Verification", "SimulatedQuote", "SimulatedRefusal", "Simulation", "PolicySuggestion",
    "AsyncAudit", "AsyncClient", "AsyncKeys", "AsyncVendors", "Audit", "AuditEntry", "Client",
    "Confirmation", "Conflict", "CreatedIssuerToken", "CreatedKey", "RolledKey", "Duration", "InvalidRequest",
    "IssuerToken", "Key", "KeyEnforcement", "KeyRevocation", "KeycapError", "Keys", "Money", "NotFound",
    "PermissionDenied", "RunRevocation", "Spend", "SpendGroup", "SpendReport", "Unauthenticated",
    "Unavailable", "Vendor", "VendorProxyError", "VendorSpend", "VendorWrite", "Vendors",
    "base_url",
]
