"""A real server on a loopback port (uvicorn in a thread) over the tiny llama model with three adapters."""
from __future__ import annotations

import argparse
import socket
import threading
import time

import pytest
import uvicorn

from loraplex import LLM, LoRARequest
from loraplex.server.app import build_app
from loraplex.server.args import add_serve_args
from loraplex.server.serve import build_state
from tests.conftest import save_tiny_adapter

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
ADAPTERS = {"a4": dict(r=4, target_modules=["q_proj", "v_proj"]),
            "a8": dict(r=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
            "a16": dict(r=16, target_modules="all-linear", use_rslora=True)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, argv: list[str], max_body_bytes: int | None = None, tiny: bool = True) -> None:
        """``tiny``: the tiny test model's way (fp32 unless ``argv`` names a dtype, no demo adapters, a minimal chat
        template); else ``argv`` alone
        (no model given: the embedded SmolLM2 with the demo adapters and its own template)."""
        p = argparse.ArgumentParser()
        add_serve_args(p)
        self.port = free_port()
        fresh = [] if "--metrics-max-age" in argv else ["--metrics-max-age", "0"]  # tests read counters at once
        args = p.parse_args([*argv, "--port", str(self.port), *fresh,
                             *(([] if "--dtype" in argv else ["--dtype", "float32"]) + ["--no-demo-adapters"]
                               if tiny else [])])
        self.state = build_state(args)
        if tiny:
            self.state.engine.engine.tokenizer.chat_template = CHAT_TEMPLATE
        app = build_app(self.state, max_body_bytes or args.max_body_bytes)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine = self.state.engine.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def idle(self, timeout: float = 10.0) -> bool:
        """No request left in the engine and every KV block free."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            sched = self.engine.scheduler
            if not sched.requests and sched.kv.num_free_blocks == sched.kv.pool.num_blocks:
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="session")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, kw) in enumerate(ADAPTERS.items()):
        save_tiny_adapter(tiny_llama_dir, root / name, seed=10 + seed, **kw)
    return root


@pytest.fixture(scope="session")
def server(tiny_llama_dir, adapter_dir):
    mods = [f"{n}={adapter_dir / n}" for n in ADAPTERS]
    srv = RunningServer([str(tiny_llama_dir), "--served-model-name", "tiny", "--max-loras", "2",
                         "--lora-modules", *mods])
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def reference(tiny_llama_dir, adapter_dir):
    """The offline engine on the same weights: what each request must return."""
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=3)
    llm.get_tokenizer().chat_template = CHAT_TEMPLATE
    llm.lora = {n: LoRARequest(n, i + 1, str(adapter_dir / n)) for i, n in enumerate(ADAPTERS)}
    return llm
