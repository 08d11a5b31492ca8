"""Request limits and API errors: every refusal is a JSON body that names the field and the limit.

Status codes: 400 malformed body, 401 missing/wrong token, 404 unknown generation, 408 request
timeout, 413 text over a size limit, 422 a value out of range, 429 too many concurrent
generations, 503 no model loaded yet.
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
from typing import Any

from lmcore.errors import LmopsError


class ApiError(Exception):
    """An HTTP error with a machine-readable code, the offending field and the limit it broke."""

    def __init__(self, status: int, code: str, field: str | None, message: str, limit: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.field, self.message, self.limit = status, code, field, message, limit
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.field, self.message, self.limit)


def error_body(code: str, field: str | None, message: str, limit: str | None = None, **extra: Any) -> dict:
    err: dict[str, Any] = {"code": code, "field": field, "message": message}
    if limit is not None:
        err["limit"] = limit
    err.update(extra)
    return {"error": err}


def check_text(value: str | None, field: str, max_chars: int, limit: str) -> None:
    """413 when a text field is longer than its limit."""
    if value is not None and len(value) > max_chars:
        raise ApiError(413, "too_large", field, f"{field} has {len(value)} characters; the limit is {max_chars}",
                       limit)


def check_max_new_tokens(value: int, cap: int, field: str = "max_new_tokens") -> None:
    if value > cap:
        raise ApiError(422, "over_limit", field, f"{field}={value} is over the cap of {cap}", "serve.max_new_tokens")


def check_token(authorization: str | None, token: str | None, client_host: str | None, *,
                loopback_only_without_token: bool = False) -> None:
    """Bearer-token guard. Without a configured token the endpoint is open, or loopback-only when asked."""
    if not token:
        if loopback_only_without_token and client_host is not None and not is_loopback(client_host):
            raise ApiError(403, "forbidden", "Authorization",
                           "admin endpoints are loopback-only unless LMOPS_API_TOKEN is set")
        return
    if not authorization:
        raise ApiError(401, "missing_token", "Authorization", "missing 'Authorization: Bearer <token>' header",
                       headers={"WWW-Authenticate": "Bearer"})
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "invalid_token", "Authorization", "wrong bearer token",
                       headers={"WWW-Authenticate": "Bearer"})


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def require_token_beyond_loopback(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token: admin (and feedback) would be open to the network."""
    if not is_loopback(host) and not token:
        raise LmopsError(f"binding {host} (beyond loopback) needs LMOPS_API_TOKEN set: it guards /admin/reload "
                         "and /v1/feedback; set it, or bind 127.0.0.1")


class ConcurrencyGate:
    """A non-blocking counter: over ``limit`` generations in flight, the next one gets a 429."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self.in_flight >= self.limit:
                raise ApiError(429, "too_many_requests", None,
                               f"{self.in_flight} generations are in flight; the limit is {self.limit}",
                               "serve.max_concurrent", headers={"Retry-After": "1"})
            self.in_flight += 1

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1
