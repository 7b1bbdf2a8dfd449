"""The scale-out pieces that need no cluster: the catalog's versions and acks, what the ingress reads in a body,
the merged metrics, and the adapter handle's idempotent release."""
from __future__ import annotations

import importlib.util
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.scaleout import catalog as cat
from loraplex.scaleout.catalog import AdapterCatalog, split_model_id
from loraplex.scaleout.metrics import merge_metrics
from loraplex.scaleout.requests import Wanted, route_query, routed_body, wanted

BASES = ["tiny", "/models/tiny"]


def test_catalog_generations_versions_and_acks(monkeypatch):
    c = AdapterCatalog()
    a1 = c.add("a", "/p/a")
    assert split_model_id(a1.model_id) == ("a", a1.gen)
    c.report("r1", c.version, ["a"], 1, "")
    c.report("r2", 0, [], 0, "")
    assert c.lagging(c.version) == ["r2"]
    v = c.remove("a")
    assert v == c.version and c.remove("a") is None and c.entry("a") is None
    a2 = c.add("a", "/p/a2")  # loaded again: a new model id, never a stale cache hit
    assert a2.model_id != a1.model_id
    monkeypatch.setattr(cat, "LIVE_S", 0.0)  # replicas not heard from are not waited for
    time.sleep(0.01)
    assert c.lagging(c.version) == []
    with pytest.raises(ValueError, match="NAME@GENERATION"):
        split_model_id("a")


@pytest.mark.parametrize("body, want", [
    ({"model": "a"}, Wanted((("a", "model"),))),
    ({"model": "tiny"}, Wanted()),
    ({"model": "tiny:a"}, Wanted((("a", "model"),))),
    ({"model": "tiny:"}, Wanted()),
    ({"model": "tiny", "lora_path": "b"}, Wanted((("b", "lora_path"),))),
    ({"inputs": "x", "parameters": {"adapter_id": "c"}}, Wanted((("c", "adapter_id"),))),
    ({"model": "tiny", "adapters": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5}]},
     Wanted((("a", "adapters"), ("b", "adapters")))),
    ({"model": "auto"}, Wanted(auto=True)),
    ({"inputs": "x", "parameters": {"adapter_id": "auto"}}, Wanted(auto=True)),
    ({"model": "tiny:auto"}, Wanted(auto=True)),
])
def test_wanted_reads_the_resolvers_fields(body, want):
    assert wanted(body, BASES, "auto") == want


def test_routed_body_and_query():
    chat = {"model": "auto", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    assert route_query(chat) == ("hi", "be brief")
    assert routed_body(chat, "law", "tiny", "auto")["model"] == "law"
    tgi = {"inputs": "q", "parameters": {"adapter_id": "auto", "max_new_tokens": 3}}
    assert route_query(tgi) == ("q", None)
    assert routed_body(tgi, "law", "tiny", "auto")["parameters"] == {"adapter_id": "law", "max_new_tokens": 3}
    assert routed_body(tgi, "tiny", "tiny", "auto")["parameters"] == {"max_new_tokens": 3}


def test_merged_metrics_label_each_replica_once_per_family():
    one = ('# HELP x_total requests\n# TYPE x_total counter\nx_total{adapter="a"} 3.0\n'
           '# HELP g a gauge\n# TYPE g gauge\ng 1.0\n')
    two = '# HELP x_total requests\n# TYPE x_total counter\nx_total{adapter="a"} 5.0\n'
    text = merge_metrics({"r1": one, "r2": two}).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.count("# TYPE x_total counter") == 1
    assert {(s.labels["replica"], s.value) for s in fams["x"].samples} == {("r1", 3.0), ("r2", 5.0)}
    assert [s.labels for s in fams["g"].samples] == [{"replica": "r1"}]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray[serve] is not installed")
def test_adapter_handle_release_is_idempotent():
    """Serve calls an evicted handle's ``__del__`` and Python calls it again when collecting it: one eviction."""
    import asyncio

    from loraplex.scaleout.catalog import CatalogEntry
    from loraplex.scaleout.replica import AdapterHandle

    class Replica:
        def __init__(self, loop):
            self.loop, self.evicted = loop, []

        def evict(self, entry):
            self.evicted.append(entry.model_id)

    async def main():
        replica = Replica(asyncio.get_running_loop())
        handle = AdapterHandle(replica, CatalogEntry("a", "/p", 1))
        await asyncio.get_running_loop().run_in_executor(None, handle.__del__)  # as Serve's LRU does
        handle.__del__()
        del handle  # and the collector
        await asyncio.sleep(0.01)
        return replica.evicted

    assert asyncio.run(main()) == ["a@1"]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray[serve] is not installed")
def test_serve_run_arguments_are_the_serve_flags():
    """``serve run loraplex.scaleout.ray_serve:build_app key=value ...`` reads the same flags as ``loraplex serve``."""
    from loraplex.scaleout.ray_serve import argv_of, parser

    args = parser().parse_args(argv_of({"model": "/m", "num_replicas": "2", "lora_modules": "a=/p/a b=/p/b",
                                        "enable_runtime_lora": "true", "no_adapter_affinity": "false"}))
    assert (args.model, args.num_replicas, args.lora_modules) == ("/m", 2, ["a=/p/a", "b=/p/b"])
    assert args.enable_runtime_lora and not args.no_adapter_affinity
    with pytest.raises(ValueError, match="num_replica: not a loraplex serve flag"):
        argv_of({"num_replica": "2"})


def test_plain_serve_does_not_import_ray():
    import subprocess
    import sys

    code = ("import sys; from loraplex.cli import main; from loraplex.server import serve; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
