"""A real server with --platform over the tiny llama model, and helpers to build uploads."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ADAPTERS, RunningServer, adapter_dir, reference  # noqa: F401 - fixtures

ADMIN_KEY = "admin-secret"
FILES = ("adapter_config.json", "adapter_model.safetensors")


def platform_server(base: Path, data: Path, *extra: str) -> RunningServer:
    return RunningServer([str(base), "--served-model-name", "tiny", "--api-key", ADMIN_KEY, "--platform",
                          "--platform-dir", str(data), "--max-loras", "2", *extra])


def files_of(folder: Path, card: dict | None = None) -> list[tuple[str, tuple[str, bytes]]]:
    """Multipart parts for the adapter in ``folder`` (httpx ``files=``)."""
    parts = [(n, (n, (folder / n).read_bytes())) for n in FILES]
    if card is not None:
        parts.append(("adapter_card.json", ("adapter_card.json", json.dumps(card).encode())))
    return parts


def tar_of(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


class Client:
    """httpx with one key."""

    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def __getattr__(self, name):
        return getattr(self.http, name)


def make_tenant(admin: Client, tenant: str, scopes: list[str] | None = None) -> str:
    """Create the tenant (if new) and one key; the key's secret."""
    r = admin.post("/v1/tenants", json={"id": tenant})
    assert r.status_code in (201, 409), r.text
    r = admin.post(f"/v1/tenants/{tenant}/keys", json={"scopes": scopes} if scopes else {})
    assert r.status_code == 201, r.text
    return r.json()["key"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("platform")


@pytest.fixture(scope="module")
def platform(tiny_llama_dir, data_dir):
    srv = platform_server(tiny_llama_dir, data_dir, "--max-upload-bytes", str(4 << 20))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(platform):
    return Client(platform.url, ADMIN_KEY)
