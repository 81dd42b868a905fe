"""keycap's errors: one class per stable code, each carrying the code and
the server's message (and, for invalid input, the field it is about).

The code is the one keycap's REST bodies carry (`invalid_request`,
`not_found`, ...), read from the `keycap-error` gRPC metadata. No token or
credential ever appears in an error's text or repr.
"""

from __future__ import annotations

import grpc


class KeycapError(Exception):
    """Any error keycap answered, or the failure to reach it."""

    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, field={self.field!r})"


class InvalidRequest(KeycapError):
    """The server refused an input; `field` names it."""

    code = "invalid_request"


class NotFound(KeycapError):
    code = "not_found"


class Conflict(KeycapError):
    code = "conflict"


class Unauthenticated(KeycapError):
    """A missing or wrong admin token (never says which)."""

    code = "unauthenticated"


class PermissionDenied(KeycapError):
    """The token is valid but may not do this (`missing_scope`,
    `vendor_not_allowed`, `issuer_scope`)."""

    code = "permission_denied"


class Unavailable(KeycapError):
    """The control plane could not be reached or did not answer in time."""

    code = "unavailable"


_BY_CODE: dict[str, type[KeycapError]] = {
    "invalid_request": InvalidRequest,
    "not_found": NotFound,
    "conflict": Conflict,
    "key_already_rolled": Conflict,
    "unauthenticated": Unauthenticated,
    "missing_scope": PermissionDenied,
    "vendor_not_allowed": PermissionDenied,
    "issuer_scope": PermissionDenied,
}

_BY_GRPC: dict[grpc.StatusCode, type[KeycapError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: Conflict,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def from_rpc_error(e: grpc.RpcError, addr: str) -> KeycapError:
    """keycap's error for a failed call: the class of its code, the server's
    message; transport failures become one `Unavailable` naming the address."""
    if isinstance(e, grpc.aio.AioRpcError):
        code, details, trailing = e.code(), e.details(), tuple(e.trailing_metadata() or ())
    elif isinstance(e, grpc.Call):
        code, details, trailing = e.code(), e.details(), tuple(e.trailing_metadata() or ())
    else:
        return KeycapError("the call to the control plane failed")
    metadata = {str(k): v for k, v in trailing}
    keycap_code = metadata.get("keycap-error")
    field = metadata.get("keycap-field")
    if isinstance(keycap_code, str):
        cls = _BY_CODE.get(keycap_code, KeycapError)
        return cls(details or keycap_code, code=keycap_code,
                   field=field if isinstance(field, str) else None)
    cls = _BY_GRPC.get(code, KeycapError)
    if cls is Unavailable:
        what = "did not answer in time" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "is unreachable"
        return Unavailable(f"the control plane at {addr} {what}")
    return cls(details or "the control plane failed the call")
