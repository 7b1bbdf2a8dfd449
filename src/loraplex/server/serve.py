"""``loraplex serve [MODEL]``: vLLM-compatible flags, the engine loaded before the port opens, uvicorn."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from loraplex.config import LoRAConfig
from loraplex.engine import LLMEngine
from loraplex.lora.demo import demo_adapters, resolve_adapter_path
from loraplex.lora.request import LoRARequest
from loraplex.platform import Platform
from loraplex.routing import AdapterCard, Router, make_scorer
from loraplex.server.adapters import AdapterResolver
from loraplex.server.app import build_app
from loraplex.server.args import vllm_only_flags
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
        try:
            AdapterCard.from_dict(mod)  # description / examples, checked now
        except ValueError as e:
            raise SystemExit(f"--lora-modules: {mod['name']}: {e}") from None
        return mod
    if "=" in spec:
        name, path = spec.split("=", 1)
        return {"name": name, "path": path}
    return {"name": Path(spec.rstrip("/")).name, "path": spec}


def runtime_lora_env() -> bool:
    """vLLM's switch for the runtime load/unload API."""
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true", "yes")


def build_state(args) -> ServerState:
    model = args.model or args.model_flag
    router = build_router(args)  # a bad rules file fails before the model loads
    try:
        lora = LoRAConfig(args.max_loras, args.max_lora_rank, args.max_cpu_loras)
    except ValueError as e:
        raise SystemExit(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}") from None
    if ignored := vllm_only_flags(args):
        log.info("accepted for vLLM compatibility, no effect here: %s", " ".join(ignored))
    engine = LLMEngine.from_args(model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                 block_size=args.block_size, kv_cache_memory=args.kv_cache_memory, seed=args.seed,
                                 lora=lora, enable_prefix_caching=args.enable_prefix_caching,
                                 quantization=args.quantization, deterministic=args.deterministic)
    modules = [parse_lora_module(s) for s in args.lora_modules]
    if not args.no_demo_adapters and model is None and not modules and not args.adapter_dir:
        modules = [{"name": n, "path": n} for n in demo_adapters()]  # the zero-argument demo run
    names = list(args.served_model_name or [engine.model_id])
    names += [n for n in (engine.model_id, model) if n and n not in names]
    async_engine = AsyncEngine(engine, max_waiting=args.max_waiting)
    async_engine.metrics = ServerMetrics(engine, names[0], args.metrics_max_age)
    state = ServerState(async_engine, AdapterResolver(async_engine, names, args.adapter_dir), async_engine.metrics,
                        model_path=str(model or engine.model_id), api_key=args.api_key,
                        enable_runtime_lora=args.enable_runtime_lora or runtime_lora_env(),
                        auto_name=args.router_name,
                        router=router, tool_call_parser=args.tool_call_parser)
    state.platform = open_platform(args, engine)
    if args.router_name in names:
        raise SystemExit(f"--router-name: {args.router_name!r} is the base model's name")
    for mod in modules:
        if mod["name"] == args.router_name:
            raise SystemExit(f"--lora-modules: {mod['name']!r} is a reserved model name")
        try:
            engine.add_lora(LoRARequest(mod["name"], lora_path=mod["path"]))
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--lora-modules: {e}") from None
        state.startup_paths.add(str(Path(resolve_adapter_path(mod["path"])).resolve()))
        state.set_card(mod["name"], mod.get("description"), mod.get("examples"))
    # the router knows every adapter served by name: registered ones and --adapter-dir folders (cards embedded now)
    known = {n: async_engine.adapter_path(n) for n in async_engine.adapter_names()}
    known.update({n: str(state.resolver.adapter_dir / n) for n in state.resolver.discoverable()})
    for name, path in known.items():
        state.router.set_card(name, state.adapter_card(name, path))
    for rule in state.router.rules:
        if rule.adapter is not None and rule.adapter not in state.router.names:
            log.warning("--router-rules: adapter %r is not served; its rule applies once it is loaded", rule.adapter)
    state.router.calibration()  # every card's threshold, before the first request
    state.router_explain = args.router_explain
    return state


def open_platform(args, engine: LLMEngine) -> Platform | None:
    """``--platform`` / ``--db``: open the database and serve every adapter uploaded before (under its name)."""
    if not (args.platform or args.db):
        return None
    if not args.api_key:
        raise SystemExit("--platform: needs --api-key (the admin key that creates tenants and their keys)")
    if not engine.serves_adapters:
        raise SystemExit("--platform: the model was loaded without LoRA support")
    db = args.db or str(Path(args.platform_dir) / "platform.db")
    try:
        platform = Platform.open(db, args.platform_dir, args.max_upload_bytes)
    except Exception as e:  # noqa: BLE001 - a bad URL, an unreachable server, a missing driver
        raise SystemExit(f"--db: cannot open {db!r}: {e}") from None
    for name, a in platform.adapters.items():
        folder = platform.adapter_root / a.digest
        try:
            engine.add_lora(LoRARequest(name, lora_path=str(folder)))
        except (ValueError, FileNotFoundError) as e:
            log.error("platform: uploaded adapter %s cannot be served (%s)", name, e)
    log.info("platform: %d tenants, %d uploaded adapters, %d deployments (database %s)", len(platform.tenants),
             len(platform.adapters), len(platform.deployments), db.split("@")[-1])
    return platform


def build_router(args) -> Router:
    """The router of ``model: "auto"``; logs which scorer it uses and why (``make_scorer`` warns when ``auto`` fell
    back)."""
    try:
        router = Router(make_scorer(args.router_scorer), args.router_threshold, args.router_margin,
                        args.router_rules)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"--router-*: {e}") from None
    scorer = router.scorer
    log.info("router scorer: %s (%s)", scorer.name, scorer.reason)
    return router


def serve(args) -> None:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)  # the CLI configured WARNING before dispatching
    state = build_state(args)
    app = build_app(state, args.max_body_bytes)
    mem = state.engine.info()["memory_bytes"]
    log.info("memory: weights %.0f MB%s, KV cache %.0f MB, LoRA slots %.0f MB", mem["weights"] / 1e6,
             f" ({args.quantization})" if args.quantization else "", mem["kv_cache"] / 1e6, mem["lora_slots"] / 1e6)
    log.info("serving %s with adapters %s on http://%s:%d", state.resolver.base_id,
             ", ".join(state.engine.adapter_names()) or "(none)", args.host, args.port)
    router = state.router
    thresholds = ", ".join(f"{n} {router.threshold_of(n):.2f}" for n in router.cards) or "(no adapter has a card)"
    log.info("model %r routes among %s (%s scorer, spread %.4f, thresholds in spreads: %s; margin %s; %d rules); "
             "GET /v1/router shows its decisions", state.auto_name, ", ".join(router.cards) or "(none)",
             router.scorer.name, router.spread, thresholds, router.margin, len(router.rules))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None)
