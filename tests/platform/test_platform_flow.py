"""Seed 001's flow over a real server: tenant → key → upload → deployment → chat as the adapter → exact usage;
then persistence across a restart, key revocation and deletion rules."""
from __future__ import annotations

import time

import openai

from loraplex import SamplingParams
from tests.platform.conftest import ADMIN_KEY, Client, files_of, make_tenant, platform_server

PROMPT = "Tell me about adapters"


def offline_chat(reference, adapter: str | None, max_tokens: int = 10) -> str:
    lora = reference.lora[adapter] if adapter else None
    return reference.chat([{"role": "user", "content": PROMPT}], SamplingParams(temperature=0, max_tokens=max_tokens),
                          use_tqdm=False, lora_request=lora)[0].outputs[0].text


def test_seed_flow_upload_deploy_chat_usage(platform, admin, adapter_dir, reference):
    acme = Client(platform.url, make_tenant(admin, "acme"))
    r = acme.post("/v1/adapters", data={"name": "expert"}, files=files_of(adapter_dir / "a4"))
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["id"] == "acme/expert" and up["rank"] == 4 and up["tenant"] == "acme" and len(up["digest"]) == 64
    assert up["seconds"] < 10

    r = acme.post("/v1/deployments", json={"name": "support-bot", "adapter": "acme/expert"})
    assert r.status_code == 201, r.text
    dep = r.json()
    assert dep["id"].startswith("dep-") and dep["status"] == "active"

    # the seed's call shape: no model in the body, the tenant's key
    want = offline_chat(reference, "a4")
    total = {"prompt_tokens": 0, "completion_tokens": 0}
    for path in (f"/deployments/{dep['id']}/v1/chat/completions", f"/maas/deployment/{dep['id']}/chat/completions"):
        r = acme.post(path, json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10,
                                  "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "acme/expert" and body["choices"][0]["message"]["content"] == want
        for k in total:
            total[k] += body["usage"][k]
    # the openai SDK pointed at the deployment, streaming with usage
    sdk = openai.OpenAI(base_url=f"{platform.url}/deployments/{dep['id']}/v1", api_key=acme.headers["Authorization"][7:],
                        max_retries=0)
    chunks = list(sdk.chat.completions.create(model=dep["id"], messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=10, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    for k in total:
        total[k] += getattr(chunks[-1].usage, k)

    r = acme.get("/v1/usage", params={"group_by": "deployment"})
    assert r.status_code == 200, r.text
    row = next(d for d in r.json()["data"] if d["deployment"] == dep["id"])
    assert row["requests"] == 3
    assert (row["prompt_tokens"], row["completion_tokens"]) == (total["prompt_tokens"], total["completion_tokens"])
    csv = acme.get("/v1/usage/requests").text.splitlines()
    assert csv[0].startswith("id,request_id,tenant_id") and len(csv) == 4
    assert all(",acme," in line and ",finished" in line for line in csv[1:])
    assert acme.get("/v1/usage", params={"from": "2026-12-04T10:00Z", "to": "1e99"}).status_code == 400  # not seconds
    for bad in ({"from": "2026-13-01"}, {"to": "yesterday"}, {"group_by": "adapter,model"}, {"format": "xml"}):
        r = acme.get("/v1/usage", params=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), (bad, r.text)
    assert acme.get("/v1/usage", params={"from": "2026-12-04", "to": "2026-12-04T10:00:00+01:00"}).status_code == 200
    r = acme.get("/v1/usage", params={"group_by": "deployment,day,deployment"})
    assert r.status_code == 200 and r.json()["group_by"] == ["deployment", "day"]


def test_same_files_twice_are_one_copy(platform, admin, adapter_dir, data_dir):
    one = Client(platform.url, make_tenant(admin, "dup1"))
    two = Client(platform.url, make_tenant(admin, "dup2"))
    a = one.post("/v1/adapters", data={"name": "x"}, files=files_of(adapter_dir / "a8")).json()
    b = two.post("/v1/adapters", data={"name": "y"}, files=files_of(adapter_dir / "a8")).json()
    assert a["digest"] == b["digest"]
    assert sorted(p.name for p in (data_dir / "adapters").iterdir()).count(a["digest"]) == 1
    assert one.delete("/v1/adapters/x").status_code == 200
    assert (data_dir / "adapters" / a["digest"]).is_dir()  # still used by dup2/y
    assert two.delete("/v1/adapters/dup2/y").status_code == 200
    assert not (data_dir / "adapters" / a["digest"]).exists()


def test_archive_upload_paused_and_deleted_deployment(platform, admin, adapter_dir):
    from tests.platform.conftest import tar_of

    t = Client(platform.url, make_tenant(admin, "arch"))
    tgz = tar_of({f"a16/{n}": (adapter_dir / "a16" / n).read_bytes() for n in ("adapter_config.json",
                                                                                "adapter_model.safetensors")})
    r = t.post("/v1/adapters", data={"name": "big"}, files={"archive": ("a16.tar.gz", tgz)})
    assert r.status_code == 201, r.text
    dep = t.post("/v1/deployments", json={"name": "d", "adapter": "arch/big"}).json()
    assert t.delete("/v1/adapters/big").status_code == 409  # a deployment serves it
    assert t.post(f"/v1/deployments/{dep['id']}/pause").json()["status"] == "paused"
    r = t.post(f"/deployments/{dep['id']}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 409 and r.json()["error"]["code"] == "deployment_paused"
    assert t.post(f"/v1/deployments/{dep['id']}/resume").json()["status"] == "active"
    r = t.post(f"/deployments/{dep['id']}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "model": "other"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert t.post(f"/deployments/{dep['id']}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert t.delete(f"/v1/deployments/{dep['id']}").status_code == 200
    assert t.post(f"/deployments/{dep['id']}/v1/completions", json={"prompt": "hi"}).status_code == 404
    assert t.delete("/v1/adapters/big").status_code == 200
    assert t.post("/v1/completions", json={"model": "arch/big", "prompt": "hi"}).status_code == 404


def test_mixture_and_auto_deployments(platform, admin, adapter_dir, reference):
    t = Client(platform.url, make_tenant(admin, "mix"))
    for name, src in (("p", "a4"), ("q", "a8")):
        assert t.post("/v1/adapters", data={"name": name}, files=files_of(adapter_dir / src)).status_code == 201
    dep = t.post("/v1/deployments", json={"name": "blend", "adapters": [{"name": "mix/p", "weight": 0.5},
                                                                         {"name": "mix/q", "weight": 0.5}]}).json()
    r = t.post(f"/deployments/{dep['id']}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    want = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False, lora_request=[
        (reference.lora["a4"], 0.5), (reference.lora["a8"], 0.5)])[0].outputs[0].text
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    auto = t.post("/v1/deployments", json={"name": "router", "adapter": "auto"})
    assert auto.status_code == 201, auto.text
    r = t.post(f"/deployments/{auto.json()['id']}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200


def test_restart_keeps_adapters_keys_deployments_and_ledger(tiny_llama_dir, adapter_dir, reference, tmp_path):
    srv = platform_server(tiny_llama_dir, tmp_path)
    try:
        admin = Client(srv.url, ADMIN_KEY)
        key = make_tenant(admin, "keep")
        t = Client(srv.url, key)
        assert t.post("/v1/adapters", data={"name": "e"}, files=files_of(adapter_dir / "a4")).status_code == 201
        dep = t.post("/v1/deployments", json={"name": "d", "adapter": "keep/e"}).json()
        first = t.post(f"/deployments/{dep['id']}/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0})
        assert first.status_code == 200
    finally:
        srv.stop()
    srv = platform_server(tiny_llama_dir, tmp_path)
    try:
        t = Client(srv.url, key)
        again = t.post(f"/deployments/{dep['id']}/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0})
        assert again.status_code == 200
        assert again.json()["choices"][0]["message"]["content"] == offline_chat(reference, "a4")
        assert [a["id"] for a in t.get("/v1/adapters").json()["data"]] == ["keep/e"]
        assert t.get("/v1/usage", params={"group_by": "tenant"}).json()["data"][0]["requests"] == 2
        # revoking the key locks it out at once
        admin = Client(srv.url, ADMIN_KEY)
        key_id = admin.get("/v1/tenants/keep/keys").json()["data"][0]["id"]
        assert admin.delete(f"/v1/tenants/keep/keys/{key_id}").status_code == 200
        assert t.get("/v1/models").status_code == 401
    finally:
        srv.stop()


def test_delete_refuses_while_requests_are_in_flight(platform, admin, adapter_dir):
    t = Client(platform.url, make_tenant(admin, "busy"))
    assert t.post("/v1/adapters", data={"name": "e"}, files=files_of(adapter_dir / "a4")).status_code == 201
    body = {"model": "busy/e", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with t.http.stream("POST", "/v1/completions", json=body) as s:
        lines = s.iter_lines()  # kept: dropping the iterator would close the stream
        next(lines)  # generating now
        platform.state.engine.call(time.sleep, 0.5)  # hold the step loop: the request is surely still in flight
        r = t.delete("/v1/adapters/e")
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
    assert platform.idle()
    assert t.delete("/v1/adapters/e").status_code == 200
    rows = t.get("/v1/usage", params={"group_by": "status"}).json()["data"]
    assert [r["status"] for r in rows] == ["aborted"]  # the client hung up mid-stream: billed as aborted


def test_off_unless_asked_and_needs_the_admin_key(tiny_llama_dir, tmp_path):
    import pytest

    from tests.server.conftest import RunningServer

    srv = RunningServer([str(tiny_llama_dir), "--api-key", ADMIN_KEY])
    try:
        assert Client(srv.url, ADMIN_KEY).get("/v1/tenants").status_code == 404
        assert "/v1/adapters" not in Client(srv.url, ADMIN_KEY).get("/openapi.json").json()["paths"]
    finally:
        srv.stop()
    with pytest.raises(SystemExit, match="--api-key"):
        RunningServer([str(tiny_llama_dir), "--platform", "--platform-dir", str(tmp_path)])
