"""Nothing lost: a SIGTERM drain writes every ledger row; after a SIGKILL under load at most the last second of
rows is missing, the SQLite file is consistent and the restarted server serves the uploaded adapter."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx

from tests.platform.conftest import ADMIN_KEY, files_of
from tests.server.conftest import free_port

BODY = {"model": "tiny", "prompt": "Tell me a story", "max_tokens": 6, "ignore_eos": True, "temperature": 0}


def start(base, data) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "serve", str(base), "--port", str(port),
                             "--served-model-name", "tiny", "--dtype", "float32", "--no-demo-adapters",
                             "--log-level", "warning", "--api-key", ADMIN_KEY, "--platform", "--platform-dir",
                             str(data)], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not start")


def hammer(url: str, key: str, done: list, stop: threading.Event) -> None:
    """Requests back to back until the server goes away: (x-request-id, end time, usage) of each answered one."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        while not stop.is_set():
            try:
                r = c.post("/v1/completions", json=BODY)
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                done.append((r.headers["x-request-id"], time.time(), r.json()["usage"]))


def test_sigkill_under_load_loses_at_most_the_last_second(tiny_llama_dir, adapter_dir, tmp_path):
    proc, url = start(tiny_llama_dir, tmp_path)
    try:
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        assert admin.post("/v1/tenants", json={"id": "t"}).status_code == 201
        key = admin.post("/v1/tenants/t/keys", json={}).json()["key"]
        up = httpx.post(url + "/v1/adapters", headers={"Authorization": f"Bearer {key}"}, data={"name": "e"},
                        files=files_of(adapter_dir / "a4"), timeout=60)
        assert up.status_code == 201, up.text
        done: list = []
        stop = threading.Event()
        threads = [threading.Thread(target=hammer, args=(url, key, done, stop)) for _ in range(6)]
        for t in threads:
            t.start()
        while len(done) < 30:
            time.sleep(0.05)
        killed = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        proc.kill()

    con = sqlite3.connect(tmp_path / "platform.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    proc, url = start(tiny_llama_dir, tmp_path)
    try:
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        rows = {r["request_id"]: r for r in admin.get("/v1/usage/requests", params={"format": "json"}).json()["data"]}
        answered = {rid: (end, u) for rid, end, u in done}
        for rid, (end, u) in answered.items():
            if end < killed - 1.0:
                assert rid in rows, f"a request answered {killed - end:.2f}s before the kill is not in the ledger"
            if rid in rows:
                r = rows[rid]
                assert r["status"] == "finished" and r["tenant_id"] == "t"
                assert (r["prompt_tokens"], r["completion_tokens"]) == (u["prompt_tokens"], u["completion_tokens"])
        assert all(r["status"] in ("finished", "aborted", "failed") for r in rows.values())
        assert len([r for r in rows.values() if r["status"] == "finished"]) <= len(answered) + 6  # + those in flight
        # the uploaded adapter survived the kill and serves
        r = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                       json={**BODY, "model": "t/e"}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    # the SIGTERM drain wrote the last request's row
    con = sqlite3.connect(tmp_path / "platform.db")
    assert con.execute("SELECT count(*) FROM usage WHERE adapter = 't/e'").fetchone()[0] == 1
    con.close()
