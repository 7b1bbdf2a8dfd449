"""Who is calling: the admin key (``--api-key``), a tenant's key, or nobody (no key configured).

Tenant keys are 256-bit random tokens shown once at creation; only their SHA-256 digest is stored (a random token
this long needs no slow hash: there is nothing to brute-force). Lookup is by digest, and the digest is compared
with ``hmac.compare_digest``, so the time taken says nothing about the key.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

SCOPES = ("inference", "adapters", "usage")  # what a tenant key may be allowed to do
KEY_PREFIX = "lpx-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def same_digest(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class Principal:
    """The caller of one request. ``tenant`` None: the operator (admin key, or no key configured at all)."""

    tenant: str | None = None
    key_id: str | None = None
    scopes: frozenset[str] = frozenset(SCOPES)

    @property
    def is_admin(self) -> bool:
        return self.tenant is None

    def may(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes

    def owns(self, owner: str | None) -> bool:
        """May this caller see a thing owned by ``owner`` (None: public, the operator's)?"""
        return self.is_admin or owner is None or owner == self.tenant


ADMIN = Principal()
