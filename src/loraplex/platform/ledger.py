"""The token ledger: one row per finished, aborted or failed request, appended off the event loop.

``append`` only queues the row; a writer thread inserts what has queued every ``FLUSH_S`` (one transaction per
batch), so no request waits on the database and a SIGKILL loses at most the last ``FLUSH_S`` of rows. ``flush``
waits until everything queued so far is written (``/v1/usage`` calls it, so a client's count and the ledger's agree
the moment its response has ended).
"""
from __future__ import annotations

import csv
import io
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine

from loraplex.platform.db import usage

FLUSH_S = 0.2
GROUPS = ("tenant", "adapter", "deployment", "day", "status")
_COLUMNS = {"tenant": usage.c.tenant_id, "adapter": usage.c.adapter, "deployment": usage.c.deployment,
            "day": usage.c.day, "status": usage.c.status}
log = logging.getLogger("loraplex.platform")


@dataclass(frozen=True)
class UsageRow:
    """What one request used; the token counts are the response's ``usage`` fields."""

    request_id: str
    tenant_id: str | None
    key_id: str | None
    deployment: str | None
    adapter: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    started: float
    ended: float
    status: str  # finished | aborted | failed

    def record(self) -> dict:
        day = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d")
        return {**asdict(self), "day": day}


class Ledger:
    """Batched, ordered appends to the ``usage`` table, and its aggregates."""

    def __init__(self, engine: Engine, flush_s: float = FLUSH_S) -> None:
        self.engine, self.flush_s = engine, flush_s
        self._queue: queue.SimpleQueue[UsageRow | Future | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="loraplex-ledger", daemon=True)
        self._thread.start()
        self.written = 0

    def append(self, row: UsageRow) -> None:
        self._queue.put(row)

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every row appended before this call is in the database."""
        done: Future = Future()
        self._queue.put(done)
        done.result(timeout)

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stop = False
        while not stop:
            rows, waiters = [], []
            deadline = time.monotonic() + self.flush_s
            while True:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if isinstance(item, Future):
                    waiters.append(item)
                    break  # write now: someone waits
                rows.append(item.record())
            error = None
            if rows:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(insert(usage), rows)
                    self.written += len(rows)
                except Exception as e:  # noqa: BLE001 - keep the rows for the next try; requests are unaffected
                    log.exception("ledger: writing %d rows failed; retrying with the next batch", len(rows))
                    for r in rows:
                        self._queue.put(UsageRow(**{k: v for k, v in r.items() if k != "day"}))
                    error = e
                    time.sleep(self.flush_s)
            for w in waiters:
                w.set_exception(error) if error else w.set_result(None)

    # ---- reading -----------------------------------------------------------------------------------------------
    def totals(self, group_by: list[str], start: float | None = None, end: float | None = None,
               tenant: str | None = None) -> list[dict]:
        """Requests and tokens per group (``GROUPS``), for requests started in ``[start, end)``."""
        cols = [_COLUMNS[g].label(g) for g in group_by]
        query = select(*cols, func.count().label("requests"),
                       func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
                       func.sum(usage.c.cached_tokens).label("cached_tokens"),
                       func.sum(usage.c.completion_tokens).label("completion_tokens"))
        if start is not None:
            query = query.where(usage.c.started >= start)
        if end is not None:
            query = query.where(usage.c.started < end)
        if tenant is not None:
            query = query.where(usage.c.tenant_id == tenant)
        if cols:
            query = query.group_by(*cols).order_by(*cols)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        for r in rows:
            for k in ("prompt_tokens", "cached_tokens", "completion_tokens"):
                r[k] = int(r[k] or 0)
            r["total_tokens"] = r["prompt_tokens"] + r["completion_tokens"]
        return [r for r in rows if r["requests"]]

    def rows(self, start: float | None = None, end: float | None = None, tenant: str | None = None) -> list[dict]:
        query = select(usage).order_by(usage.c.id)
        if start is not None:
            query = query.where(usage.c.started >= start)
        if end is not None:
            query = query.where(usage.c.started < end)
        if tenant is not None:
            query = query.where(usage.c.tenant_id == tenant)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()
