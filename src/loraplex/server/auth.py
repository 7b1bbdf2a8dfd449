"""API keys: who a request comes from, and what that key may do.

Without ``--api-key`` every caller is the operator. With it, the admin key (compared in constant time) may do
everything; with ``--platform`` a tenant's key (``lpx-…``) may call the routes of its scopes — ``inference``
(generation, models, deployments' endpoints), ``adapters`` (uploads, deployments), ``usage`` (the ledger) — and
nothing else: every other route (loading server paths, pinning, tenants) is the admin's, and so is ``/metrics``
(open without the platform), whose labels would name other tenants' adapters.
"""
from __future__ import annotations

import hmac

from loraplex.platform import Platform, Principal
from loraplex.platform.keys import ADMIN

OPEN_PATHS = ("/health", "/metrics")  # no key needed
OPEN_PREFIX = "/ui"  # the console's static files (it asks for the key itself)
ANY_KEY_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
# (path prefix, scope): a prefix ending in "/" matches below it, others match exactly or with a "/" after them
SCOPED = (("/v1/chat/completions", "inference"), ("/v1/completions", "inference"), ("/v1/models", "inference"),
          ("/deployments/", "inference"), ("/maas/deployment/", "inference"), ("/generate", "inference"),
          ("/generate_stream", "inference"), ("/info", "inference"),
          ("/v1/adapters", "adapters"), ("/v1/deployments", "adapters"), ("/v1/usage", "usage"))


class Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def scope_of(method: str, path: str) -> str | None:
    """The scope a tenant key needs for this route; None: admin only."""
    if path == "/" and method == "POST":  # TGI's generate
        return "inference"
    for prefix, scope in SCOPED:
        if path == prefix.rstrip("/") and not prefix.endswith("/"):
            return scope
        if path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return scope
    return None


def bearer(headers: dict[bytes, bytes]) -> str:
    given = headers.get(b"authorization", b"").decode("latin-1")
    return given[7:].strip() if given.lower().startswith("bearer ") else headers.get(b"x-api-key", b"").decode()


def principal_for(api_key: str | None, platform: Platform | None, headers: dict[bytes, bytes], method: str,
                  path: str) -> Principal:
    """The caller of a request, or ``Denied`` (401: no valid key, 403: a tenant key outside its scopes)."""
    if platform is not None and path == "/metrics":  # its labels name every tenant's adapters: the admin's
        open_path = False
    else:
        open_path = path in OPEN_PATHS
    console = path == OPEN_PREFIX or path.startswith(OPEN_PREFIX + "/") or (path == "/" and method == "GET")
    if api_key is None or open_path or console:
        return ADMIN
    token = bearer(headers)
    if hmac.compare_digest(token.encode(), api_key.encode()):
        return ADMIN
    who = platform.authenticate(token) if platform is not None and token else None
    if who is None:
        raise Denied(401, "invalid or missing API key (Authorization: Bearer <key>)")
    if path in ANY_KEY_PATHS:
        return who
    need = scope_of(method, path)
    if need is None:
        raise Denied(403, f"{path} needs the admin key")
    if not who.may(need):
        raise Denied(403, f"this key lacks the {need!r} scope that {path} needs")
    return who
