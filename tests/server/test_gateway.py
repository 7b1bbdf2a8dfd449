"""Behind a LoRA-aware gateway (the Kubernetes Gateway API Inference Extension's endpoint picker, llm-d, AIBrix):
our /metrics parsed as the picker parses it, a port of its scoring rules choosing between two live servers, the
dynamic-LoRA sidecar's and AIBrix's admin calls replayed, and the manifests in deploy/kubernetes validated."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loraplex import SamplingParams
from tests.server.conftest import ADAPTERS, RunningServer

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
PROMPT = "Tell me about gateways"


@dataclass
class PodMetrics:
    """What the picker keeps per pod after a scrape."""

    waiting: float
    running: float
    kv_usage: float
    active: set[str]
    queued: set[str]
    max_lora: int


def scrape(url: str) -> PodMetrics:
    """The picker's extraction: the gauges by name; of ``vllm:lora_requests_info`` the series with the highest
    value (a timestamp), its label lists split on commas."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:lora_requests_info", "vllm:cache_config_info"):
        assert families[name].type == "gauge", name
    value = lambda name: families[name].samples[0].value  # noqa: E731
    info = max(families["vllm:lora_requests_info"].samples, key=lambda s: s.value).labels
    names = lambda text: {n for n in text.split(",") if n}  # noqa: E731
    return PodMetrics(value("vllm:num_requests_waiting"), value("vllm:num_requests_running"),
                      value("vllm:kv_cache_usage_perc"), names(info["running_lora_adapters"]),
                      names(info["waiting_lora_adapters"]), int(info["max_lora"]))


def lora_affinity(pod: PodMetrics, model: str) -> float:
    """The lora-affinity-scorer: 1 where the adapter is active, 0.8 where the pod has room for one more, 0.6 where
    it is queued, else 0."""
    if model in pod.active:
        return 1.0
    if len(pod.active | pod.queued) < pod.max_lora:
        return 0.8
    return 0.6 if model in pod.queued else 0.0


def pick(pods: dict[str, PodMetrics], model: str, weights: dict[str, float]) -> tuple[str, dict[str, float]]:
    """max-score-picker over the weighted queue, KV-cache-utilization and LoRA-affinity scorers."""
    lo, hi = min(p.waiting for p in pods.values()), max(p.waiting for p in pods.values())
    scores = {name: weights["queue-scorer"] * (1.0 if hi == lo else (hi - p.waiting) / (hi - lo))
              + weights["kv-cache-utilization-scorer"] * (1.0 - p.kv_usage)
              + weights["lora-affinity-scorer"] * lora_affinity(p, model) for name, p in pods.items()}
    return max(scores, key=scores.get), scores


def manifests() -> dict[str, list[dict]]:
    return {f.name: list(yaml.safe_load_all(f.read_text())) for f in sorted(DEPLOY.glob("*.yaml"))}


def picker_weights() -> dict[str, float]:
    """The scorer weights of the EndpointPickerConfig shipped in deploy/kubernetes/epp.yaml."""
    config_map = next(d for d in manifests()["epp.yaml"] if d["kind"] == "ConfigMap")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    profile = config["schedulingProfiles"][0]["plugins"]
    return {p["pluginRef"]: p["weight"] for p in profile if "weight" in p}


@pytest.fixture(scope="module")
def pods(tiny_llama_dir, adapter_dir):
    mods = [f"{n}={adapter_dir / n}" for n in ADAPTERS]
    common = ["--served-model-name", "tiny", "--lora-modules", *mods, "--adapter-dir", str(adapter_dir),
              "--max-num-seqs", "1",  # one stream runs, the next queues: equal queues, so LoRA affinity decides
              "--metrics-max-age", "1"]  # the default: live gauges, per-adapter series up to 1 s old
    one = RunningServer([str(tiny_llama_dir), "--max-loras", "1", *common])
    two = RunningServer([str(tiny_llama_dir), "--max-loras", "2", *common])
    yield {"one": one, "two": two}
    one.stop()
    two.stop()


def _hold(srv: RunningServer, model: str, done: threading.Event) -> threading.Event:
    """Start a long stream for ``model`` kept open until ``done``; the returned event is set at its first chunk."""
    started = threading.Event()

    def run():
        body = {"model": model, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            started.set()
            done.wait(30)
    threading.Thread(target=run, daemon=True).start()
    return started


def test_picker_routes_by_the_adapters_each_server_runs(pods, reference):
    weights = picker_weights()
    assert set(weights) >= {"queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer"}
    idle = scrape(pods["one"].url)
    assert (idle.active, idle.queued, idle.max_lora, idle.waiting, idle.running) == (set(), set(), 1, 0, 0)
    assert abs(max(s.value for f in text_string_to_metric_families(httpx.get(pods["one"].url + "/metrics").text)
                   if f.name == "vllm:lora_requests_info" for s in f.samples) - time.time()) < 5

    done = threading.Event()
    try:
        # one runs a4 (its only slot) with a16 queued behind it; two runs a8 with a base request queued
        for name, running, queued in (("one", "a4", "a16"), ("two", "a8", "tiny")):
            srv = pods[name]
            assert _hold(srv, running, done).wait(30)
            _hold(srv, queued, done)
            deadline = time.time() + 10
            while time.time() < deadline and scrape(srv.url).waiting < 1:
                time.sleep(0.01)
            srv.state.engine.call(time.sleep, 3.0)  # pause its step loop: a steady picture to scrape
        time.sleep(0.1)
        metrics = {name: scrape(srv.url) for name, srv in pods.items()}
        assert metrics["one"].active == {"a4"} and metrics["one"].queued == {"a16"}, metrics
        assert metrics["two"].active == {"a8"} and metrics["two"].queued == set(), metrics
        assert all((m.running, m.waiting) == (1, 1) for m in metrics.values()), metrics

        assert pick(metrics, "a4", weights)[0] == "one"  # active there
        assert pick(metrics, "a8", weights)[0] == "two"
        chosen, scores = pick(metrics, "a16", weights)  # queued on one (0.6, full), room on two (0.8)
        assert chosen == "two" and lora_affinity(metrics["one"], "a16") == 0.6, scores
    finally:
        done.set()

    # the picked server answers as the single-node engine does
    r = httpx.post(pods[chosen].url + "/v1/completions", json={"model": "a16", "prompt": PROMPT, "max_tokens": 8,
                                                              "temperature": 0}, timeout=60)
    want = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False,
                              lora_request=reference.lora["a16"])[0].outputs[0].text
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    for srv in pods.values():
        assert srv.idle()
    after = scrape(pods["one"].url)
    assert after.active == set() and after.queued == set()
    counted = 'loraplex_requests_total{adapter="a16"} 1.0'
    time.sleep(1.05)  # past --metrics-max-age: the per-adapter series are rendered again
    assert counted in httpx.get(pods[chosen].url + "/metrics").text


def test_sidecar_and_aibrix_admin_calls(pods, adapter_dir):
    """The dynamic-LoRA sidecar (lora-syncer): GET /health, GET /v1/models, load with base_model_name (its
    ConfigMap's defaultBaseModel, or "" when none), unload by name. AIBrix's adapter controller: load with
    lora_name + lora_path, unload with lora_name."""
    url = pods["two"].url
    ids = lambda: {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}  # noqa: E731
    assert httpx.get(url + "/health").status_code == 200
    for name, base in (("sidecar-sql", "tiny"), ("sidecar-chat", ""), ("aibrix-x", None)):
        body = {"lora_name": name, "lora_path": str(adapter_dir / "a8"),
                **({"base_model_name": base} if base is not None else {})}
        r = httpx.post(url + "/v1/load_lora_adapter", json=body)
        assert r.status_code == 200 and r.text.startswith("Success"), r.text
        assert name in ids()
        model = next(m for m in httpx.get(url + "/v1/models").json()["data"] if m["id"] == name)
        assert model["parent"] == "tiny"
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "other-base", "lora_path": str(adapter_dir / "a8"),
                                                        "base_model_name": "meta-llama/Llama-3.1-8B"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "base_model_name"
    for name in ("sidecar-sql", "sidecar-chat", "aibrix-x"):
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": name})
        assert r.status_code == 200 and r.text.startswith("Success"), r.text
        assert name not in ids()
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "sidecar-sql"}).status_code == 404


def test_manifests_are_valid_and_wired():
    docs = manifests()
    everything = [d for ds in docs.values() for d in ds]
    kinds = {d["kind"]: d for d in everything}
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    for doc in everything:
        if doc["apiVersion"].split("/")[0] in ("apps", "v1", "rbac.authorization.k8s.io"):
            validate.validate(doc, "1.33", strict=True)  # the core kinds against Kubernetes' own schemas
    # the custom resources (no schema on PyPI): the fields their API reference requires, and the wiring
    pool, route, server = kinds["InferencePool"], kinds["HTTPRoute"], docs["loraplex.yaml"][0]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = next(c for c in server["spec"]["template"]["spec"]["containers"] if c["name"] == "loraplex")
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [c["containerPort"] for c in container["ports"]]
    epp_service = next(d for d in docs["epp.yaml"] if d["kind"] == "Service")
    assert pool["spec"]["endpointPickerRef"]["name"] == epp_service["metadata"]["name"]
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] == epp_service["spec"]["ports"][0]["port"]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["group"], backend["kind"], backend["name"]) == ("inference.networking.k8s.io", "InferencePool",
                                                                   pool["metadata"]["name"])
    config_map = next(d for d in docs["epp.yaml"] if d["kind"] == "ConfigMap")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert (config["apiVersion"], config["kind"]) == ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    declared = {p["type"] for p in config["plugins"]}
    assert "lora-affinity-scorer" in declared
    assert {p["pluginRef"] for p in config["schedulingProfiles"][0]["plugins"]} <= declared
    epp = next(d for d in docs["epp.yaml"] if d["kind"] == "Deployment")
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    for flag, metric in (("--total-queued-requests-metric", "vllm:num_requests_waiting"),
                         ("--kv-cache-usage-percentage-metric", "vllm:kv_cache_usage_perc"),
                         ("--lora-info-metric", "vllm:lora_requests_info")):
        assert args[args.index(flag) + 1] == metric  # series loraplex exports (test above)
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    adapters = next(d for d in docs["loraplex.yaml"] if d["kind"] == "ConfigMap")
    sidecar = yaml.safe_load(adapters["data"]["configmap.yaml"])["vLLMLoRAConfig"]
    served = container["args"][container["args"].index("--served-model-name") + 1]
    assert sidecar["defaultBaseModel"] == served and sidecar["port"] == container["ports"][0]["containerPort"]
