"""One local Ray cluster for the session (2 CPUs, loopback, no dashboard) with the loraplex Serve application:
two engine replicas of the tiny llama model, at most two adapters registered per replica, five adapters."""
from __future__ import annotations

import importlib.util
import json
import os
import socket

import pytest

from tests.conftest import save_tiny_adapter

ADAPTERS = ["a", "b", "c", "d", "e"]
PER_REPLICA = 2
CARD = {"description": "pirate speech: sailing ships, treasure maps and parrots",
        "examples": ["arr matey, where be the buried treasure?", "hoist the sails, the parrot wants gold"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def scaleout_adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("scaleout_adapters")
    for i, name in enumerate(ADAPTERS + ["late"]):
        save_tiny_adapter(tiny_llama_dir, root / name, seed=40 + i, r=4, target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture(scope="session")
def cluster(tiny_llama_dir, scaleout_adapters):
    """``(base URL, app name)`` of the application on a session-wide local Ray cluster; shut down at the end."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray[serve] is not installed (pip install 'loraplex[ray]'); make install installs it")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from a test cluster
    import ray
    from ray import serve

    from loraplex.scaleout.ray_serve import APP_NAME, NAMESPACE, application, parser

    ray.init(num_cpus=2, object_store_memory=80 << 20, include_dashboard=False, log_to_driver=False,
             namespace=NAMESPACE, _node_ip_address="127.0.0.1", configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = parser().parse_args([
            str(tiny_llama_dir), "--served-model-name", "tiny", "--dtype", "float32", "--no-demo-adapters",
            "--num-replicas", "2", "--max-adapters-per-replica", str(PER_REPLICA), "--router-scorer", "lexical",
            "--lora-modules", json.dumps({"name": "a", "path": str(scaleout_adapters / "a"), **CARD}),
            *[f"{n}={scaleout_adapters / n}" for n in ADAPTERS[1:]]])
        serve.run(application(args), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}", APP_NAME
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
