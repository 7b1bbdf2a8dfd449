"""The platform's state: tenants, keys, uploaded adapters and deployments, in the database and mirrored in memory
(authentication and visibility checks are dictionary lookups; only changes touch the database).

An uploaded adapter is served under ``<tenant>/<name>``; its files live in ``<root>/adapters/<digest>``. A
deployment names one adapter, a weighted mixture, or ``"auto"`` (routing among what its tenant may use).
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, insert, select, update

from loraplex.platform import db
from loraplex.platform.keys import SCOPES, Principal, digest, new_key, same_digest
from loraplex.platform.ledger import Ledger

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEPLOYMENT_PREFIX = "dep-"


class PlatformError(Exception):
    """A refused platform operation: HTTP status, message naming ``param``, and a string code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def check_name(value: str, param: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise PlatformError(400, f"{param}: {value!r} is not a valid name (letters, digits, '.', '_', '-'; "
                                 "at most 64, starting with a letter or digit)", param)
    return value


@dataclass
class Key:
    id: str
    tenant_id: str
    digest: str
    scopes: frozenset[str]
    name: str | None
    created: float
    revoked: float | None = None

    def public(self) -> dict:
        return {"id": self.id, "object": "api_key", "tenant": self.tenant_id, "scopes": sorted(self.scopes),
                "name": self.name, "created": self.created, "revoked": self.revoked}


@dataclass
class Deployment:
    id: str
    tenant_id: str | None
    name: str
    spec: dict  # {"adapter": name} | {"adapters": [{"name", "weight"}]}
    paused: bool
    created: float

    def public(self) -> dict:
        return {"id": self.id, "object": "deployment", "tenant": self.tenant_id, "name": self.name, **self.spec,
                "status": "paused" if self.paused else "active", "created": self.created,
                "endpoint": f"/deployments/{self.id}/v1/chat/completions"}


@dataclass
class UploadedAdapter:
    tenant_id: str
    name: str
    digest: str
    size: int
    rank: int
    created: float

    @property
    def full_name(self) -> str:
        return f"{self.tenant_id}/{self.name}"


@dataclass
class Platform:
    """Tenants, keys, uploaded adapters, deployments and the ledger, over one database and one directory."""

    engine: object  # sqlalchemy Engine
    root: Path
    max_upload_bytes: int
    ledger: Ledger = field(init=False)
    tenants: dict[str, float] = field(default_factory=dict)
    keys: dict[str, Key] = field(default_factory=dict)  # by digest; revoked keys are dropped
    adapters: dict[str, UploadedAdapter] = field(default_factory=dict)  # by full name
    deployments: dict[str, Deployment] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, database: str, root: str | Path, max_upload_bytes: int) -> "Platform":
        p = cls(db.connect(database), Path(root).resolve(), max_upload_bytes)
        p.ledger = Ledger(p.engine)
        p.adapter_root.mkdir(parents=True, exist_ok=True)
        for stale in p.adapter_root.glob(".tmp-*"):  # uploads cut short by a crash
            shutil.rmtree(stale, ignore_errors=True)
        with p.engine.connect() as conn:
            p.tenants = {r.id: r.created for r in conn.execute(select(db.tenants))}
            for r in conn.execute(select(db.api_keys).where(db.api_keys.c.revoked.is_(None))):
                p.keys[r.digest] = Key(r.id, r.tenant_id, r.digest, frozenset(r.scopes.split(",")), r.name,
                                       r.created)
            for r in conn.execute(select(db.adapters)):
                a = UploadedAdapter(r.tenant_id, r.name, r.digest, r.size, r.rank, r.created)
                p.adapters[a.full_name] = a
            for r in conn.execute(select(db.deployments)):
                p.deployments[r.id] = Deployment(r.id, r.tenant_id, r.name, json.loads(r.spec), r.paused, r.created)
        return p

    @property
    def adapter_root(self) -> Path:
        return self.root / "adapters"

    def close(self) -> None:
        self.ledger.close()
        self.engine.dispose()

    # ---- who is calling -------------------------------------------------------------------------------------
    def authenticate(self, token: str) -> Principal | None:
        d = digest(token)
        key = self.keys.get(d)
        if key is None or not same_digest(key.digest, d):
            return None
        return Principal(key.tenant_id, key.id, key.scopes)

    def owner(self, model: str) -> str | None:
        """The tenant an adapter belongs to (None: the operator's, public)."""
        a = self.adapters.get(model)
        return None if a is None else a.tenant_id

    # ---- tenants and keys -----------------------------------------------------------------------------------
    def create_tenant(self, tenant: str) -> dict:
        check_name(tenant, "id")
        with self._lock:
            if tenant in self.tenants:
                raise PlatformError(409, f"id: tenant {tenant!r} exists", "id", "tenant_exists")
            now = time.time()
            with self.engine.begin() as conn:
                conn.execute(insert(db.tenants).values(id=tenant, created=now))
            self.tenants[tenant] = now
        return self.tenant(tenant)

    def tenant(self, tenant: str) -> dict:
        if tenant not in self.tenants:
            raise PlatformError(404, f"tenant {tenant!r} does not exist", "tenant", "tenant_not_found")
        return {"id": tenant, "object": "tenant", "created": self.tenants[tenant],
                "adapters": sum(a.tenant_id == tenant for a in self.adapters.values()),
                "keys": sum(k.tenant_id == tenant for k in self.keys.values())}

    def create_key(self, tenant: str, scopes: list[str] | None, name: str | None) -> tuple[Key, str]:
        self.tenant(tenant)
        scopes = list(SCOPES) if scopes is None else scopes
        if not scopes or any(s not in SCOPES for s in scopes):
            raise PlatformError(400, f"scopes: a non-empty list, each one of {', '.join(SCOPES)}", "scopes")
        secret = new_key()
        key = Key(f"key-{secrets.token_hex(8)}", tenant, digest(secret), frozenset(scopes), name, time.time())
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(db.api_keys).values(id=key.id, tenant_id=tenant, digest=key.digest,
                                                    scopes=",".join(sorted(key.scopes)), name=name,
                                                    created=key.created))
            self.keys[key.digest] = key
        return key, secret

    def list_keys(self, tenant: str) -> list[dict]:
        self.tenant(tenant)
        with self.engine.connect() as conn:
            rows = conn.execute(select(db.api_keys).where(db.api_keys.c.tenant_id == tenant)
                                .order_by(db.api_keys.c.created))
            return [Key(r.id, r.tenant_id, "", frozenset(r.scopes.split(",")), r.name, r.created,
                        r.revoked).public() for r in rows]

    def revoke_key(self, tenant: str, key_id: str) -> dict:
        self.tenant(tenant)
        with self._lock:
            with self.engine.begin() as conn:
                done = conn.execute(update(db.api_keys).where(
                    (db.api_keys.c.id == key_id) & (db.api_keys.c.tenant_id == tenant)
                    & db.api_keys.c.revoked.is_(None)).values(revoked=time.time())).rowcount
            if not done:
                raise PlatformError(404, f"key_id: tenant {tenant!r} has no active key {key_id!r}", "key_id",
                                    "key_not_found")
            self.keys = {d: k for d, k in self.keys.items() if k.id != key_id}
        return {"id": key_id, "object": "api_key", "revoked": True}

    # ---- uploaded adapters ----------------------------------------------------------------------------------
    def record_adapter(self, a: UploadedAdapter) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(db.adapters).values(tenant_id=a.tenant_id, name=a.name, digest=a.digest,
                                                    size=a.size, rank=a.rank, created=a.created))
            self.adapters[a.full_name] = a

    def forget_adapter(self, full_name: str) -> None:
        """Drop the row; the files go too unless another row holds the same content."""
        with self._lock:
            a = self.adapters[full_name]
            with self.engine.begin() as conn:
                conn.execute(delete(db.adapters).where((db.adapters.c.tenant_id == a.tenant_id)
                                                       & (db.adapters.c.name == a.name)))
            del self.adapters[full_name]
            if not any(b.digest == a.digest for b in self.adapters.values()):
                shutil.rmtree(self.adapter_root / a.digest, ignore_errors=True)

    # ---- deployments ----------------------------------------------------------------------------------------
    def create_deployment(self, tenant: str | None, name: str, spec: dict) -> Deployment:
        dep = Deployment(f"{DEPLOYMENT_PREFIX}{secrets.token_hex(8)}", tenant, name, spec, False, time.time())
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(db.deployments).values(id=dep.id, tenant_id=tenant, name=name,
                                                       spec=json.dumps(spec), paused=False, created=dep.created))
            self.deployments[dep.id] = dep
        return dep

    def set_paused(self, dep: Deployment, paused: bool) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(update(db.deployments).where(db.deployments.c.id == dep.id).values(paused=paused))
            dep.paused = paused

    def delete_deployment(self, dep: Deployment) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(db.deployments).where(db.deployments.c.id == dep.id))
            self.deployments.pop(dep.id, None)

    def users_of(self, full_name: str) -> list[str]:
        """The deployments that serve adapter ``full_name``."""
        return [d.id for d in self.deployments.values()
                if d.spec.get("adapter") == full_name
                or any(m["name"] == full_name for m in d.spec.get("adapters", ()))]
