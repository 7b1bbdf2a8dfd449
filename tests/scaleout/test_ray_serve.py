"""The Ray Serve application on a local cluster: adapter affinity, LRU eviction, cluster-wide unload, a replica
killed mid-stream, and the same greedy output as one server. Skipped (with the reason) when Ray is not installed."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.scaleout.conftest import ADAPTERS, PER_REPLICA
from tests.server.conftest import RunningServer

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'loraplex[ray]')")

PROMPT = "The quick brown fox"
SETTLE_S = 0.5  # a replica's multiplexed ids reach Serve's router within ~0.2 s


def complete(client: httpx.Client, model: str, max_tokens: int = 6) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                "temperature": 0})


def replicas(client: httpx.Client) -> dict[str, dict]:
    return {r["id"]: r for r in client.get("/v1/replicas").json()["data"]}


def wait_for(cond, timeout: float = 8.0):
    deadline = time.time() + timeout
    while True:
        value = cond()
        if value or time.time() > deadline:
            return value
        time.sleep(0.2)


@pytest.fixture(scope="module")
def client(cluster):
    with httpx.Client(base_url=cluster[0], timeout=60) as c:
        yield c


def test_affinity_fewest_loaded_and_single_node_output(client, tiny_llama_dir, scaleout_adapters):
    first = complete(client, "a")
    assert first.status_code == 200, first.text
    home = first.headers["x-loraplex-replica"]
    time.sleep(SETTLE_S)
    for _ in range(3):  # requests for a stick to the replica that holds it
        r = complete(client, "a")
        assert r.status_code == 200 and r.headers["x-loraplex-replica"] == home
        assert r.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    other = complete(client, "b")  # a new adapter goes to the replica holding fewer (none)
    assert other.status_code == 200 and other.headers["x-loraplex-replica"] != home
    assert wait_for(lambda: {r: tuple(v["adapters"]) for r, v in replicas(client).items()} ==
                    {home: ("a",), other.headers["x-loraplex-replica"]: ("b",)})
    base = complete(client, "tiny")
    assert base.status_code == 200 and base.json()["model"] == "tiny"

    single = RunningServer([str(tiny_llama_dir), "--served-model-name", "tiny",
                            "--lora-modules", *[f"{n}={scaleout_adapters / n}" for n in ("a", "b")]])
    try:
        with httpx.Client(base_url=single.url, timeout=60) as one:
            want = {m: complete(one, m).json()["choices"][0]["text"] for m in ("a", "b", "tiny")}
    finally:
        single.stop()
    got = {"a": first, "b": other, "tiny": base}
    assert len(set(want.values())) == 3  # the adapters change the output: the comparison can fail
    assert {m: r.json()["choices"][0]["text"] for m, r in got.items()} == want


def test_streaming_through_the_ingress(client):
    with client.stream("POST", "/v1/completions",
                       json={"model": "a", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    # NOTE: a fast engine may finish all 6 tokens before the first read, and queued outputs are coalesced into one
    # event: the count of events is timing, the text and the closing [DONE] are not
    assert events[-1] == "[DONE]" and len(events) >= 2
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == complete(client, "a").json()["choices"][0]["text"]


def test_unknown_adapter_and_bad_load_are_openai_errors(client, tmp_path):
    r = complete(client, "nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert r.json()["error"]["code"] == "model_not_found"
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope", "max_new_tokens": 2}})
    assert r.status_code == 404 and r.json()["error"]["param"] == "adapter_id"
    (tmp_path / "adapter_config.json").write_text("{}")
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(tmp_path)})
    assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path"  # not a vetted path
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "tiny", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "reserved" in r.json()["error"]["message"]


def test_lru_eviction_unloads(client):
    for name in ADAPTERS:
        assert complete(client, name).status_code == 200
        time.sleep(SETTLE_S)

    def settled():
        reps = replicas(client)
        held = [a for r in reps.values() for a in r["adapters"]]
        return reps if all(len(r["adapters"]) <= PER_REPLICA for r in reps.values()) and len(held) == 4 else None

    reps = wait_for(settled)
    assert reps, replicas(client)  # five adapters, two replicas of two: one was evicted and unloaded
    held = {a for r in reps.values() for a in r["adapters"]}
    (evicted,) = set(ADAPTERS) - held
    loads = sum(r["adapter_loads"] for r in reps.values())
    assert complete(client, evicted).status_code == 200  # loaded again where it is asked
    assert wait_for(lambda: sum(r["adapter_loads"] for r in replicas(client).values()) == loads + 1)
    metrics = client.get("/metrics").text
    assert all(f'replica="{r}"' in metrics for r in reps)


def test_cluster_wide_unload_is_404_on_every_replica(client, cluster, scaleout_adapters):
    from ray import serve

    path = str(scaleout_adapters / "a")  # a vetted path (a --lora-modules one) under a new name
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": path},
                    headers={"accept": "application/json"})
    assert r.status_code == 200, r.text
    model_id = f"late@{r.json()['adapter']['generation']}"
    assert complete(client, "late").status_code == 200
    assert any("late" in v["adapters"] for v in replicas(client).values()) or wait_for(
        lambda: any("late" in v["adapters"] for v in replicas(client).values()))
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert all("late" not in v["adapters"] for v in replicas(client).values())  # dropped before the answer
    assert complete(client, "late").status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 404

    from loraplex.scaleout.replica import ForwardedRequest

    handle = serve.get_deployment_handle("EngineReplica", cluster[1]).options(stream=True)
    body = json.dumps({"model": "late", "prompt": PROMPT, "max_tokens": 2}).encode()
    req = ForwardedRequest("POST", "/v1/completions", b"", [(b"content-type", b"application/json")], body,
                           (model_id,))
    seen: dict[str, int] = {}
    for _ in range(30):  # straight to the replicas, bypassing the ingress: each one refuses the old id
        start, *_ = list(handle.remote(req))
        seen[dict(start.headers)[b"x-loraplex-replica"].decode()] = start.status
        if len(seen) == 2:
            break
    assert seen == {r: 404 for r in replicas(client)}


def test_auto_is_routed_once_at_the_ingress_and_other_routes_forward(client):
    r = client.post("/v1/completions", json={"model": "auto", "prompt": "arr matey, where be the treasure map?",
                                             "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == "a" and float(r.headers["x-loraplex-route-score"]) > 0
    r = client.post("/v1/completions", json={"model": "auto", "prompt": "Compute the integral of x squared.",
                                             "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == "tiny"  # no card fits: the base
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/info").status_code == 200
    assert {m["id"] for m in client.get("/v1/models").json()["data"]} >= {"tiny", *ADAPTERS}

def generated(client: httpx.Client, adapter: str) -> float:
    """Tokens generated for ``adapter``, summed over the replicas (from the ingress' merged /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    return sum(s.value for s in fams["loraplex_generation_tokens"].samples
               if s.name.endswith("_total") and s.labels.get("adapter") == adapter)


def test_base_requests_spread_and_a_client_leaving_aborts(client):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        homes = {r.headers["x-loraplex-replica"] for r in pool.map(lambda _: complete(client, "tiny", 24), range(8))}
    assert len(homes) == 2  # base requests go by load, to both replicas

    time.sleep(2.5)  # the replicas' metrics reach the catalog within ~2 s
    before = generated(client, "c")
    with client.stream("POST", "/v1/completions", json={"model": "c", "prompt": PROMPT, "max_tokens": 480,
                                                        "ignore_eos": True, "stream": True}) as r:
        assert next(r.iter_lines()).startswith("data: ")
    time.sleep(3.0)
    assert 1 <= generated(client, "c") - before < 240  # aborted on the replica, not run to 480 tokens

def test_replica_killed_mid_stream_fails_only_its_requests(client):
    import ray

    victim = complete(client, "a").headers["x-loraplex-replica"]
    time.sleep(SETTLE_S)
    other = next(n for n in ADAPTERS[1:] if complete(client, n).headers["x-loraplex-replica"] != victim)
    names = ("a", other)
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(victim))
    actor = ray.get_actor(actor["name"], namespace=actor["namespace"])  # found first: killed right after a token
    body = {"prompt": PROMPT, "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    # n = 8 rows of 480 tokens keep the doomed replica busy for seconds after its first token
    with client.stream("POST", "/v1/completions", json={**body, "model": names[0], "n": 8}) as doomed, \
            client.stream("POST", "/v1/completions", json={**body, "model": names[1]}) as survivor:
        assert doomed.headers["x-loraplex-replica"] == victim != survivor.headers["x-loraplex-replica"]
        doomed_lines, survivor_lines = doomed.iter_lines(), survivor.iter_lines()
        assert next(doomed_lines).startswith("data: ") and next(survivor_lines).startswith("data: ")
        ray.kill(actor, no_restart=True)
        doomed_events = [line[6:] for line in doomed_lines if line.startswith("data: ")]
        survivor_events = [line[6:] for line in survivor_lines if line.startswith("data: ")]
    assert "error" in json.loads(doomed_events[-1])  # the killed replica's stream ends with an error event
    assert survivor_events[-1] == "[DONE]"
    assert json.loads(survivor_events[-2])["choices"][0]["finish_reason"] == "length"
    r = complete(client, names[0])  # the next request is served (by the survivor, or the replacement)
    assert r.status_code == 200 and r.headers["x-loraplex-replica"] != victim

