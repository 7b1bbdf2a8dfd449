"""``loraplex serve [MODEL]``: vLLM-compatible flags, the engine loaded before the port opens, uvicorn."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from loraplex.config import LoRAConfig
from loraplex.engine import LLMEngine
from loraplex.lora.demo import demo_adapters, resolve_adapter_path
from loraplex.lora.request import LoRARequest
from loraplex.models.registry import resolve_model
from loraplex.server.adapters import AdapterResolver
from loraplex.server.app import build_app
from loraplex.server.args import add_serve_args  # noqa: F401 - re-exported
from loraplex.server.async_engine import AsyncEngine
from loraplex.server.metrics import ServerMetrics
from loraplex.server.state import ServerState

log = logging.getLogger("loraplex.server")


def parse_lora_module(spec: str) -> dict:
    """``name=path`` | JSON ``{"name", "path", ...}`` | bare path."""
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            mod = json.loads(spec)
        except ValueError as e:
            raise SystemExit(f"--lora-modules: bad JSON {spec!r}: {e}") from None
        if not isinstance(mod, dict) or not mod.get("name") or not mod.get("path"):
            raise SystemExit(f"--lora-modules: JSON form needs 'name' and 'path', got {spec!r}")
        return mod
    if "=" in spec:
        name, path = spec.split("=", 1)
        return {"name": name, "path": path}
    return {"name": Path(spec.rstrip("/")).name, "path": spec}


def build_state(args) -> ServerState:
    model = args.model or args.model_flag
    lora = LoRAConfig(args.max_loras, args.max_lora_rank, args.max_cpu_loras)
    engine = LLMEngine.from_args(model, args.dtype, args.device, args.max_model_len, args.max_num_seqs,
                                 args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory, seed=args.seed,
                                 lora=lora)
    modules = [parse_lora_module(s) for s in args.lora_modules]
    if not args.no_demo_adapters and resolve_model(model).model_id == resolve_model(None).model_id:
        modules = [{"name": n, "path": n} for n in demo_adapters() if n not in {m["name"] for m in modules}] + modules
    names = list(args.served_model_name or [engine.model_id])
    names += [n for n in (engine.model_id, model) if n and n not in names]
    async_engine = AsyncEngine(engine, max_waiting=args.max_waiting)
    async_engine.metrics = ServerMetrics(engine, names[0])
    state = ServerState(async_engine, AdapterResolver(async_engine, names, args.adapter_dir), async_engine.metrics,
                        model_path=str(model or engine.model_id), api_key=args.api_key,
                        enable_runtime_lora=args.enable_runtime_lora)
    for mod in modules:
        try:
            engine.add_lora(LoRARequest(mod["name"], lora_path=mod["path"]))
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--lora-modules: {e}") from None
        state.startup_paths.add(str(Path(resolve_adapter_path(mod["path"])).resolve()))
        state.set_card(mod["name"], mod.get("description"), mod.get("examples"))
    return state


def serve(args) -> None:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = build_state(args)
    app = build_app(state, args.max_body_bytes)
    log.info("serving %s with adapters %s on http://%s:%d", state.resolver.base_id,
             ", ".join(state.engine.engine.lora_store.registry) or "(none)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None)
