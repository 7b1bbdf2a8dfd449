"""The same platform over a real PostgreSQL server (``--db postgresql://…``), started here from the Debian
``postgresql`` binaries (CI installs them)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.platform.conftest import ADMIN_KEY, Client, files_of, make_tenant, platform_server
from tests.server.conftest import free_port


def _bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]
    return found if isinstance(found, str) else (found[0] if found else None)


@pytest.fixture(scope="module")
def postgres_url():
    initdb, postgres = _bin("initdb"), _bin("postgres")
    if not (initdb and postgres):
        pytest.skip("PostgreSQL binaries are not installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))  # not under pytest's root-only tmp (postgres must read it)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    run_as = {}
    if os.geteuid() == 0:  # postgres refuses to run as root: use the package's own user
        user = pwd.getpwnam("postgres")
        for p in (root, sock):
            os.chown(p, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid}
    subprocess.run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True, **run_as)
    port = free_port()
    proc = subprocess.Popen([postgres, "-D", str(data), "-p", str(port), "-k", str(sock), "-c",
                             "listen_addresses=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            **run_as)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    import psycopg

    deadline = time.time() + 60
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            assert proc.poll() is None and time.time() < deadline, "postgres did not start"
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    shutil.rmtree(root, ignore_errors=True)


def test_seed_flow_on_postgres(tiny_llama_dir, adapter_dir, postgres_url, tmp_path):
    srv = platform_server(tiny_llama_dir, tmp_path, "--db", postgres_url)
    try:
        admin = Client(srv.url, ADMIN_KEY)
        t = Client(srv.url, make_tenant(admin, "pg"))
        assert t.post("/v1/adapters", data={"name": "e"}, files=files_of(adapter_dir / "a8")).status_code == 201
        dep = t.post("/v1/deployments", json={"name": "d", "adapter": "pg/e"}).json()
        tokens = 0
        for _ in range(3):
            r = t.post(f"/deployments/{dep['id']}/v1/completions", json={"prompt": "hi", "max_tokens": 5})
            assert r.status_code == 200, r.text
            tokens += r.json()["usage"]["total_tokens"]
        by_day = t.get("/v1/usage", params={"group_by": "day,adapter"}).json()["data"]
        assert [(d["adapter"], d["requests"], d["total_tokens"]) for d in by_day] == [("pg/e", 3, tokens)]
    finally:
        srv.stop()
    srv = platform_server(tiny_llama_dir, tmp_path, "--db", postgres_url)  # the rows are in PostgreSQL
    try:
        admin = Client(srv.url, ADMIN_KEY)
        assert admin.get("/v1/usage", params={"group_by": "tenant"}).json()["data"][0]["total_tokens"] == tokens
        assert [a["id"] for a in admin.get("/v1/adapters").json()["data"]] == ["pg/e"]
    finally:
        srv.stop()
