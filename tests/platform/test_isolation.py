"""Every route, called with another tenant's key, answers as if the other tenant's things did not exist (404);
admin routes need the admin key (403 for tenant keys); a key outside its scopes is refused (403)."""
from __future__ import annotations

import pytest

from tests.platform.conftest import ADMIN_KEY, Client, files_of, make_tenant

CARD = {"description": "Astronomy: eclipses, planets, orbits and telescopes.",
        "examples": ["What causes a lunar eclipse?", "How far is Mars from the Sun?", "Why do planets orbit stars?"]}
ASK = "What causes a lunar eclipse?"


@pytest.fixture(scope="module")
def world(platform, admin, adapter_dir):
    owner = Client(platform.url, make_tenant(admin, "owner"))
    other = Client(platform.url, make_tenant(admin, "other"))
    r = owner.post("/v1/adapters", data={"name": "secret"}, files=files_of(adapter_dir / "a4", CARD))
    assert r.status_code == 201, r.text
    dep = owner.post("/v1/deployments", json={"name": "d", "adapter": "owner/secret"}).json()
    assert owner.post(f"/deployments/{dep['id']}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code \
        == 200
    return owner, other, dep["id"]


def cross_calls(dep: str) -> list[tuple[str, str, dict]]:
    gen = {"max_tokens": 2}
    return [
        ("GET", "/v1/models/owner/secret", {}),
        ("POST", "/v1/chat/completions", {"json": {"model": "owner/secret", **gen,
                                                   "messages": [{"role": "user", "content": "hi"}]}}),
        ("POST", "/v1/completions", {"json": {"model": "owner/secret", "prompt": "hi", **gen}}),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "hi", "adapters": [
            {"name": "owner/secret", "weight": 1.0}], **gen}}),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "hi", "lora_path": "owner/secret", **gen}}),
        ("POST", "/v1/completions", {"json": {"model": "tiny:owner/secret", "prompt": "hi", **gen}}),
        ("POST", "/generate", {"json": {"inputs": "hi", "parameters": {"adapter_id": "owner/secret",
                                                                        "max_new_tokens": 2}}}),
        ("POST", "/", {"json": {"inputs": "hi", "parameters": {"adapter_id": "owner/secret", "max_new_tokens": 2}}}),
        ("GET", "/v1/adapters/owner/secret", {}),
        ("DELETE", "/v1/adapters/owner/secret", {}),
        ("POST", "/v1/deployments", {"json": {"name": "steal", "adapter": "owner/secret"}}),
        ("POST", "/v1/deployments", {"json": {"name": "steal", "adapters": [{"name": "owner/secret", "weight": 1}]}}),
        ("GET", f"/v1/deployments/{dep}", {}),
        ("POST", f"/v1/deployments/{dep}/pause", {}),
        ("POST", f"/v1/deployments/{dep}/resume", {}),
        ("DELETE", f"/v1/deployments/{dep}", {}),
        ("POST", f"/deployments/{dep}/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}]}}),
        ("POST", f"/deployments/{dep}/v1/completions", {"json": {"prompt": "x"}}),
        ("POST", f"/maas/deployment/{dep}/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}]}}),
        ("GET", "/v1/usage?tenant=owner", {}),
        ("GET", "/v1/usage/requests?tenant=owner", {}),
        ("POST", "/v1/adapters", {"data": {"name": "planted", "tenant": "owner"}, "files": "a4"}),
    ]


def test_other_tenant_gets_404_everywhere(world, adapter_dir):
    owner, other, dep = world
    for method, path, kw in cross_calls(dep):
        if kw.get("files") == "a4":
            kw = {**kw, "files": files_of(adapter_dir / "a4")}
        r = other.request(method, path, **kw)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert "owner/secret" not in r.text or "does not exist" in r.text
    # and nothing of the owner's is listed or counted
    assert "owner/secret" not in other.get("/v1/models").text
    assert other.get("/v1/adapters").json()["data"] == []
    assert all(d["tenant"] == "other" for d in other.get("/v1/deployments").json()["data"])
    assert "owner" not in other.get("/v1/usage", params={"group_by": "tenant"}).text
    # the owner still has everything (the 404s above were not deletions)
    assert owner.get("/v1/adapters/secret").status_code == 200
    assert owner.get(f"/v1/deployments/{dep}").json()["status"] == "active"


def test_auto_routes_only_among_own_and_public_adapters(world):
    owner, other, _ = world
    body = {"model": "auto", "messages": [{"role": "user", "content": ASK}], "max_tokens": 2}
    mine = owner.post("/v1/chat/completions", json=body)
    assert mine.status_code == 200 and mine.headers["x-loraplex-adapter"] == "owner/secret"
    theirs = other.post("/v1/chat/completions", json=body)
    assert theirs.status_code == 200 and theirs.headers["x-loraplex-adapter"] == "tiny"


@pytest.mark.parametrize("method,path", [("POST", "/v1/tenants"), ("GET", "/v1/tenants"),
                                         ("POST", "/v1/tenants/other/keys"), ("POST", "/v1/load_lora_adapter"),
                                         ("POST", "/v1/unload_lora_adapter"), ("POST", "/v1/pin_lora_adapter"),
                                         ("GET", "/v1/lora_adapters"), ("POST", "/load_lora_adapter")])
def test_admin_routes_need_the_admin_key(world, method, path):
    _, other, _ = world
    r = other.request(method, path, json={})
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]


def test_tenant_keys_cannot_load_server_paths(world, adapter_dir):
    _, other, _ = world
    r = other.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": str(adapter_dir / "a8"),
                                                                      "adapter_source": "local"}})
    assert r.status_code == 403


def test_scopes_and_bad_keys(platform, admin, adapter_dir):
    infer = Client(platform.url, make_tenant(admin, "scoped", ["inference"]))
    usage = Client(platform.url, make_tenant(admin, "scoped", ["usage"]))
    assert infer.post("/v1/adapters", data={"name": "x"}, files=files_of(adapter_dir / "a4")).status_code == 403
    assert infer.get("/v1/usage").status_code == 403
    assert infer.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1}).status_code == 200
    assert usage.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}).status_code == 403
    assert usage.get("/v1/usage").status_code == 200
    assert Client(platform.url, "lpx-not-a-key").get("/v1/models").status_code == 401
    assert admin.http.get("/v1/models", headers={"Authorization": ""}).status_code == 401
    r = admin.post("/v1/tenants/scoped/keys", json={"scopes": ["everything"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "scopes"
    keys = admin.get("/v1/tenants/scoped/keys").json()["data"]
    assert len(keys) == 2 and all("key" not in k and "digest" not in k for k in keys)  # never shown again
    assert Client(platform.url, ADMIN_KEY).get("/v1/tenants/nobody/keys").status_code == 404


def test_metrics_need_the_admin_key_with_the_platform(world, platform):
    _, other, _ = world
    assert other.get("/metrics").status_code == 403  # its labels name every tenant's adapters
    assert Client(platform.url, "").http.get("/metrics", headers={"Authorization": ""}).status_code == 401
    assert "owner/secret" in Client(platform.url, ADMIN_KEY).get("/metrics").text
