"""Prometheus metrics: per adapter (the unit a platform bills by) and for the engine.

Counters and histograms are updated as requests run; the engine's gauges (queue lengths, KV usage, adapter tiers)
are read at scrape time by a collector, so nothing is computed when nobody scrapes. A scrape renders the engine's
gauges fresh every time; the per-adapter series (hundreds of lines per adapter with the histograms: ~25 ms for 100
adapters) are rendered at most once per ``--metrics-max-age`` seconds (METRICS_MAX_AGE_S) and reused in between,
so a gateway scraping every 50 ms reads live queues and adapters without stalling the engine.

The same gauges are also exported under vLLM's names, which LoRA-aware gateways scrape (the Kubernetes Gateway API
Inference Extension's endpoint picker, llm-d, AIBrix): ``vllm:num_requests_running`` / ``_waiting``,
``vllm:kv_cache_usage_perc`` (and its older name ``vllm:gpu_cache_usage_perc``; a fraction, 1 = full),
``vllm:cache_config_info`` and ``vllm:lora_requests_info`` — labels ``running_lora_adapters`` (adapters in a device
slot with requests), ``waiting_lora_adapters`` (queued for an adapter not in a slot), ``max_lora`` (``--max-loras``),
comma-separated, the value the scrape's Unix time (a picker takes the series with the highest value).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loraplex.engine import LLMEngine
from loraplex.server.args import METRICS_MAX_AGE_S

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
TIERS = ("device", "host", "disk")


class _EngineCollector:
    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def _vllm(self, stats):
        """vLLM's names for what a gateway's endpoint picker reads."""
        e, model = self.engine, [self.model_name]
        for name, doc, value in (("num_requests_running", "Requests in the running batch", stats.num_running),
                                 ("num_requests_waiting", "Requests waiting for admission", stats.num_waiting),
                                 ("kv_cache_usage_perc", "KV cache usage (1 = 100 percent)", stats.kv_usage),
                                 ("gpu_cache_usage_perc", "KV cache usage (1 = 100 percent; the older name)",
                                  stats.kv_usage)):
            g = GaugeMetricFamily(f"vllm:{name}", doc, labels=["model_name"])
            g.add_metric(model, value)
            yield g
        g = GaugeMetricFamily("vllm:cache_config_info", "KV cache configuration", labels=["block_size",
                                                                                          "num_gpu_blocks"])
        g.add_metric([str(e.scheduler.kv.block_size), str(stats.kv_blocks)], 1.0)
        yield g
        running, waiting = e.lora_activity()
        g = GaugeMetricFamily("vllm:lora_requests_info", "Adapters with requests (value: the Unix time)",
                              labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        max_lora = e.lora_store.max_loras if e.lora_store is not None else 0
        g.add_metric([str(max_lora), ",".join(running), ",".join(waiting)], time.time())
        yield g

    def collect(self):
        e = self.engine
        stats = e.stats()
        yield from self._vllm(stats)
        yield GaugeMetricFamily("loraplex_num_requests_running", "Requests in the running batch",
                                value=stats.num_running)
        yield GaugeMetricFamily("loraplex_num_requests_waiting", "Requests waiting for admission",
                                value=stats.num_waiting)
        yield GaugeMetricFamily("loraplex_kv_cache_usage_ratio", "Fraction of KV cache blocks in use",
                                value=stats.kv_usage)
        yield GaugeMetricFamily("loraplex_kv_cache_blocks_total", "KV cache blocks", value=stats.kv_blocks)
        yield CounterMetricFamily("loraplex_preemptions", "Requests preempted (recomputed) for KV blocks",
                                  value=stats.num_preemptions)
        yield GaugeMetricFamily("loraplex_prefix_cache_blocks", "KV blocks holding cached prefix content",
                                value=stats.cached_blocks)


class _AdapterCollector:
    """Per registered adapter: its tier, loads and evictions."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine

    def collect(self):
        e = self.engine
        if not e.serves_adapters:
            return
        tier = GaugeMetricFamily("loraplex_adapter_resident", "1 for the tier an adapter is in",
                                 labels=["adapter", "tier"])
        loads = CounterMetricFamily("loraplex_adapter_loads", "Adapter loads into a device slot", labels=["adapter"])
        evictions = CounterMetricFamily("loraplex_adapter_evictions", "Adapter evictions from a device slot",
                                        labels=["adapter"])
        for row in e.adapter_stats():
            for t in TIERS:
                tier.add_metric([row.name, t], float(t == row.tier))
            loads.add_metric([row.name], row.loads)
            evictions.add_metric([row.name], row.evictions)
        yield tier
        yield loads
        yield evictions


class ServerMetrics:
    """One registry per server (tests start several). ``adapter`` labels are adapter names or the base model id."""

    def __init__(self, engine: LLMEngine, base_name: str, max_age: float = METRICS_MAX_AGE_S) -> None:
        self.base_name = base_name
        self.max_age = max_age
        self.live = CollectorRegistry()  # the engine's gauges, rendered at every scrape
        self.live.register(_EngineCollector(engine, base_name))
        self._rendered: tuple[float, bytes] = (float("-inf"), b"")
        self.registry = CollectorRegistry()  # per-adapter series
        r = self.registry
        self.requests = Counter("loraplex_requests", "Requests received", ["adapter"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens", ["adapter"], registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Generated tokens", ["adapter"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Arrival to first generated token",
                              ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Time between generated tokens",
                             ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.routes = Counter("loraplex_routes", "Requests sent to each adapter by model='auto'", ["adapter"],
                              registry=r)
        self.prefix_queries = Counter("loraplex_prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix "
                                      "cache", ["adapter"], registry=r)
        self.prefix_hits = Counter("loraplex_prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache",
                                   ["adapter"], registry=r)
        r.register(_AdapterCollector(engine))

    def render(self) -> bytes:
        """The Prometheus text of a scrape: the live gauges, and the per-adapter series at most ``max_age`` old."""
        now = time.monotonic()
        if now - self._rendered[0] >= self.max_age:
            self._rendered = (now, generate_latest(self.registry))
        return generate_latest(self.live) + self._rendered[1]

    def _label(self, adapter: str | None) -> str:
        return adapter or self.base_name

    def on_request(self, adapter: str | None, num_prompt_tokens: int) -> None:
        label = self._label(adapter)
        self.requests.labels(label).inc()
        self.prompt_tokens.labels(label).inc(num_prompt_tokens)

    def on_prefix_cache(self, adapter: str | None, num_prompt_tokens: int, num_cached: int) -> None:
        """Once per request, when it is admitted: how much of its prompt the prefix cache held."""
        label = self._label(adapter)
        self.prefix_queries.labels(label).inc(num_prompt_tokens)
        self.prefix_hits.labels(label).inc(num_cached)

    def on_tokens(self, adapter: str | None, new_tokens: int, elapsed: float, first: bool) -> None:
        """Called by the engine thread when a request's outputs grew by ``new_tokens`` after ``elapsed`` s."""
        label = self._label(adapter)
        self.generation_tokens.labels(label).inc(new_tokens)
        (self.ttft if first else self.itl).labels(label).observe(elapsed if first else elapsed / new_tokens)
