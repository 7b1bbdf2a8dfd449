"""The engine and its step loop: schedule → run model → sample → process outputs."""
from __future__ import annotations

import itertools
import threading
import warnings
from typing import NamedTuple

import torch

from loraplex.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    parse_dtype,
)
from loraplex import ops
from loraplex.engine.cpu_dtype import auto_cpu_dtype
from loraplex.engine.quant_plan import quant_plan
from loraplex.engine.model_runner import ModelRunner, StepAdapters
from loraplex.engine.output_processor import OutputProcessor, ParentRequest
from loraplex.kv_cache import BlockManager
from loraplex.lora.peft_format import inspect_peft_lora, read_lora
from loraplex.lora.request import LoRARequest
from loraplex.lora.store import AdapterEntry, AdapterStore
from loraplex.models.loader import LoadedModel, load_model
from loraplex.models.registry import resolve_model
from loraplex.outputs import RequestOutput
from loraplex.request import Request
from loraplex.sampling.grammar import GrammarCompiler
from loraplex.sampling_params import SamplingParams, StructuredOutputsParams
from loraplex.scheduler import Scheduler, SchedulerOutput

class EngineStats(NamedTuple):
    """What the engine's gauges show: queue lengths, KV usage and preemptions so far."""

    num_running: int
    num_waiting: int
    kv_usage: float
    kv_blocks: int
    num_preemptions: int
    cached_blocks: int  # prefix-cache blocks (referenced or free)


class AdapterStats(NamedTuple):
    name: str
    tier: str  # device / host / disk
    loads: int
    evictions: int


CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on CPU
# --quantization: weight-only int8 (per channel) / int4 (per group, CPU) / gguf (a GGUF file's own, nearest format)
QUANTIZATIONS = (None, "int8", "int4", "gguf")
GPU_KV_CACHE_FRACTION = 0.8  # of the free device memory after loading weights


def _kv_blocks(loaded: LoadedModel, dtype: torch.dtype, device: torch.device, block_size: int,
               max_model_len: int, max_num_seqs: int, kv_cache_bytes: int | None) -> int:
    s = loaded.spec
    block_bytes = 2 * s.num_layers * block_size * s.num_kv_heads * s.head_dim * torch.finfo(dtype).bits // 8
    if kv_cache_bytes is None:
        if device.type == "cuda":
            kv_cache_bytes = int(torch.cuda.mem_get_info(device)[0] * GPU_KV_CACHE_FRACTION)
        else:
            kv_cache_bytes = CPU_KV_CACHE_BYTES
    wanted = -(-max_model_len // block_size) * max_num_seqs
    blocks = min(wanted, kv_cache_bytes // block_bytes)
    if blocks * block_size < max_model_len:
        raise ValueError(f"max_model_len: {max_model_len} tokens do not fit the KV cache ({blocks} blocks of "
                         f"{block_size}); lower max_model_len or raise kv_cache_memory")
    return blocks


class LLMEngine:
    """Continuous-batching engine over one base model. Feed it with :meth:`add_request`, drive it with :meth:`step`."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.source.model_id
        self.lora_store: AdapterStore | None = None
        if config.lora is not None:
            lc = config.lora
            loaded.model.enable_lora(lc.max_loras, lc.max_lora_rank)
            self.lora_store = AdapterStore(loaded.spec.module_shapes, lc.max_loras, lc.max_lora_rank,
                                           lc.host_capacity, config.model.dtype,
                                           lambda slot, w: loaded.model.set_lora_slot(slot, w.weights))
        self.scheduler = Scheduler(config.scheduler, BlockManager(config.cache.num_blocks, config.cache.block_size,
                                                                  config.cache.enable_prefix_caching),
                                   self.lora_store)
        self.runner = ModelRunner(loaded, config.cache, torch.device(config.model.device), config.model.dtype,
                                  config.model.seed, config.model.row_tile)
        self.outputs = OutputProcessor(loaded.tokenizer)
        self._ids = itertools.count()
        self._retired: set[str] = set()  # adapters swapped in place, kept until their last request is done
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()

    @classmethod
    def from_args(cls, *, model: str | None = None, dtype: str | torch.dtype | None = "auto",
                  device: str | None = None, max_model_len: int | None = SchedulerConfig.max_model_len,
                  max_num_seqs: int = SchedulerConfig.max_num_seqs,
                  max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
                  block_size: int = CacheConfig.block_size, kv_cache_memory: int | None = None,
                  seed: int = ModelConfig.seed, lora: LoRAConfig | None = None,
                  enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
                  quantization: str | None = None,
                  deterministic: bool = ModelConfig.deterministic) -> "LLMEngine":
        """Resolve and load ``model`` and size the KV cache (``kv_cache_memory`` in bytes; default 1 GiB on CPU);
        ``quantization="int8" | "int4"``: weight-only quantized decoder projections (vLLM's argument name), quantized
        tensor by tensor at load; ``"gguf"``: a GGUF file's tensors kept in the nearest kernel format to their type;
        ``deterministic``: batch-invariant kernels, so a request's tokens do not depend on what shares its steps."""
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: {quantization!r} is not supported (one of {QUANTIZATIONS[1:]})")
        torch_dtype = parse_dtype(dtype)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu" and (dtype is None or dtype == "auto"):
            torch_dtype = auto_cpu_dtype()  # bf16 only where this CPU multiplies it fast (measured, cached)
        if torch_dtype == torch.float16 and device == "cpu":
            warnings.warn("dtype float16 on CPU: computing in bfloat16 instead (CPU float16 kernels are slow)",
                          stacklevel=2)
            torch_dtype = torch.bfloat16
        SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len)  # bad limits fail before loading
        if deterministic and ops.use_triton(torch.device(device)):
            raise ValueError("deterministic: not available with the Triton kernels (CUDA, or LORAPLEX_TRITON=1) yet; "
                             "run without --deterministic there")
        source = resolve_model(model)
        loaded = load_model(source, torch_dtype, device, max_model_len, quantization,
                            lambda kind, n_in, n_out: quant_plan(kind, n_in, n_out, torch_dtype, device))
        model_config = ModelConfig(source.model_id, torch_dtype, device, seed, quantization, deterministic)
        if deterministic:
            loaded.model.make_batch_invariant(model_config.row_tile)
        max_model_len = loaded.max_model_len
        blocks = _kv_blocks(loaded, torch_dtype, torch.device(device), block_size, max_model_len, max_num_seqs,
                            kv_cache_memory)
        config = EngineConfig(
            model=model_config,
            cache=CacheConfig(block_size, blocks, enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len),
            lora=lora,
        )
        return cls(config, loaded)

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    # ---- requests ---------------------------------------------------------------------------------------------
    def compile_grammar(self, spec: StructuredOutputsParams):
        """Compile (or fetch from the cache) a constraint; thread-safe, so a server calls it off the engine thread
        before :meth:`add_request`. ``ValueError`` naming the field for a constraint that does not compile."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.loaded.spec.vocab_size,
                                                 sorted(self.loaded.eos_token_ids))
        return self._grammars.compile(spec)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, lora_request: LoRARequest | None = None) -> str:
        """Validate and queue a request (``n`` children for ``params.n``); returns its id."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        params.validate()
        if not prompt_token_ids:
            raise ValueError("prompt: the prompt is empty")
        vocab = self.loaded.spec.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt_token_ids: every id must be an int in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(prompt_token_ids)} tokens leave no room to generate within "
                             f"max_model_len {self.max_model_len}")
        lora_name, lora_mix, xlora = self._resolve_loras(lora_request)
        experts = self.lora_store.registry[xlora].xlora.expert_names() if xlora else ()
        request_id = request_id or str(next(self._ids))
        if request_id in self.outputs.parents:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        compiled = None if params.structured_outputs is None else self.compile_grammar(params.structured_outputs)
        eos = self.loaded.eos_token_ids
        parent = ParentRequest(request_id, prompt, list(prompt_token_ids))
        key = self._cache_key(lora_name, lora_mix, xlora, params)
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            parent.children.append(Request(child_id, parent.prompt_token_ids, params, eos, prompt,
                                           lora_name=lora_name, lora_mix=lora_mix, xlora=xlora,
                                           xlora_experts=experts, parent_id=request_id, index=i, cache_key=key,
                                           grammar=None if compiled is None else self._grammars.matcher(compiled)))
        self.outputs.add(parent)
        for child in parent.children:
            self.scheduler.add_request(child)
        return request_id

    def _cache_key(self, lora_name: str | None, lora_mix, xlora: str | None, params: SamplingParams):
        """What computes a request's K/V, as prefix caching keys it: the base, an adapter's content digest, a
        mixture's sorted (digest, weight) pairs. None (never cached): X-LoRA rows (their gate depends on the scaling
        pass's own track, kept out of the cache) and requests that score their prompt (``prompt_logprobs``)."""
        if xlora is not None or params.prompt_logprobs is not None:
            return None
        if lora_name is not None:
            return ("lora", self.lora_store.digest(lora_name))
        if lora_mix:
            return ("mix", tuple(sorted((self.lora_store.digest(n), w) for n, w in lora_mix)))
        return "base"

    def _resolve_loras(self, lora_request) -> tuple[str | None, tuple[tuple[str, float], ...], str | None]:
        """``None`` (base) | ``LoRARequest`` (an adapter or an X-LoRA) | a mixture ``[(LoRARequest, weight), ...]``
        → (adapter name, mixture, X-LoRA name)."""
        if lora_request is None:
            return None, (), None
        pairs = [(lora_request, 1.0)] if isinstance(lora_request, LoRARequest) else lora_request
        if not isinstance(pairs, (list, tuple)) or not pairs or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], LoRARequest)
                and isinstance(p[1], (int, float)) for p in pairs):
            raise TypeError("lora_request: expected a LoRARequest or a list of (LoRARequest, weight) pairs, got "
                            f"{type(lora_request).__name__}")
        store = self._store()
        if len({r.lora_name for r, _ in pairs}) != len(pairs):
            raise ValueError("lora_request: a mixture names the same adapter twice")
        if len(pairs) > store.max_loras:
            raise ValueError(f"lora_request: a mixture of {len(pairs)} adapters exceeds max_loras {store.max_loras}")
        entries = [store.register(r) for r, _ in pairs]
        if any(e.xlora for e in entries):
            if len(pairs) > 1 or pairs[0][1] != 1.0:
                raise ValueError("lora_request: an X-LoRA cannot be part of a weighted mixture (its classifier "
                                 "already mixes its experts per token)")
            return None, (), entries[0].name
        names = [e.name for e in entries]
        if len(pairs) == 1 and pairs[0][1] == 1.0:
            return names[0], (), None
        return None, tuple((n, float(w)) for n, (_, w) in zip(names, pairs)), None

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a request (all its ``n`` children) and free its KV blocks; returns its final output."""
        parent = self.outputs.parents.get(request_id)
        if parent is None:
            return None
        self.scheduler.abort([c.request_id for c in parent.children])
        return self.outputs.abort(request_id)

    # ---- adapters at run time ---------------------------------------------------------------------------------
    def _store(self) -> AdapterStore:
        if self.lora_store is None:
            raise ValueError("lora_request: this engine was started without enable_lora=True")
        return self.lora_store

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Register and validate an adapter now and start reading it in the background; True when it is usable."""
        store = self._store()
        store.prefetch([store.register(lora_request).name])
        return True

    def check_lora(self, name: str, path: str) -> int:
        """Every check loading makes (config, targets, ranks, shapes against the base) plus reading every tensor
        (a truncated or corrupt file, or non-finite weights, fail here); registers nothing. Returns the rank;
        raises ``ValueError``. Touches no engine state, so it may run on any thread."""
        store = self._store()
        weights = read_lora(inspect_peft_lora(name, path, store.shapes, store.max_lora_rank))
        for (layer, module), (a, b) in weights.weights.items():
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"adapter {name!r}: layer {layer} {module} has non-finite weights")
        return weights.rank

    def replace_lora(self, lora_request: LoRARequest) -> bool:
        """Load new weights under a known name (vLLM's ``load_inplace``): requests already queued or running finish
        on the old weights (kept under a retired alias until they are done), new requests get the new ones."""
        store = self._store()
        name = lora_request.lora_name
        if name not in store.registry:
            return self.add_lora(lora_request)
        users = [r for r in self.scheduler.requests.values() if name in r.lora_names]
        alias = f"{name}~{next(self._ids)}"
        store.retire(name, alias)
        try:
            store.register(lora_request)
        except Exception:
            store.retire(alias, name)  # the new weights are bad: keep serving the old ones under their name
            raise
        for req in users:
            req.rename_adapter(name, alias)
        self._retired.add(alias)
        store.prefetch([name])
        return True

    def pin_lora(self, name: str) -> bool:
        """Keep an adapter in a device slot (never evicted) until :meth:`unpin_lora` or :meth:`remove_lora`."""
        self._store().pin(name)
        return True

    def unpin_lora(self, name: str) -> bool:
        self._store().unpin(name)
        return True

    def _lora_users(self, name: str) -> int:
        return sum(name in r.lora_names or name == r.xlora for r in self.scheduler.requests.values())

    def remove_lora(self, name: str) -> bool:
        """Forget an adapter; raises ``RuntimeError`` while requests (running or queued) use it, ``KeyError`` if
        unknown."""
        store = self._store()
        if name in store.registry and (users := self._lora_users(name)):
            raise RuntimeError(f"adapter {name!r} has {users} requests in flight")
        store.unload(name)
        return True

    def list_loras(self) -> list[dict]:
        """One row per known adapter: name, path, id, rank, tier, pinned, in-flight requests (running + queued)."""
        return [{**row, "in_flight": self._lora_users(row["name"])} for row in self._store().describe()
                if row["name"] not in self._retired]

    @property
    def serves_adapters(self) -> bool:
        return self.lora_store is not None

    def adapter(self, name: str) -> AdapterEntry | None:
        """The registered adapter ``name`` (metadata: name, path, id), or None."""
        return None if self.lora_store is None else self.lora_store.registry.get(name)

    def adapter_names(self) -> list[str]:
        """The adapters served by name (not the retired copies kept for requests of an in-place swap)."""
        return [] if self.lora_store is None else [n for n in self.lora_store.registry if n not in self._retired]

    def lora_request(self, name: str) -> LoRARequest | None:
        """A :class:`LoRARequest` for the registered adapter ``name`` (None when unknown)."""
        entry = self.adapter(name)
        return None if entry is None else LoRARequest(entry.name, entry.lora_int_id, entry.path)

    def adapter_stats(self) -> list[AdapterStats]:
        """Per registered adapter: its tier and how often it was loaded into / evicted from a device slot."""
        store = self.lora_store
        if store is None:
            return []
        return [AdapterStats(n, store.tier(n), store.loads[n], store.evictions[n]) for n in self.adapter_names()]

    def memory(self) -> dict[str, int]:
        """Bytes held: the base weights (as stored: quantized ones at their packed size), the KV cache, the LoRA
        device slots."""
        model = self.runner.model
        stacks = [m for m in model.modules() if hasattr(m, "lora_a") and hasattr(m, "lora_b")]
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return {"weights": nbytes([*model.parameters(), *model.buffers()]),
                "kv_cache": nbytes([t for kv in self.runner.kv_caches for t in kv]),
                "lora_slots": nbytes([t for s in stacks for t in (s.lora_a, *s.lora_b)])}

    def thread_choices(self) -> dict[str, dict[int, float]] | None:
        """What the CPU thread tuner measured so far: per step-size bucket, ms per token under each thread count
        (None off the CPU and in deterministic mode)."""
        tuner = self.runner.threads
        return None if tuner is None else tuner.summary()

    def kernel_choices(self) -> dict[str, float | None]:
        """Where two kernels compete, what was measured to serve which step (``engine.kernel_choice``); a ratio
        that never favours the dense LoRA form is None (JSON has no infinity)."""
        k = self.runner.kernels
        return {"gemv_tokens": k.gemv_tokens,
                "dense_lora_ratio": None if k.dense_lora_ratio == float("inf") else k.dense_lora_ratio}

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(s.num_running, s.num_waiting, s.kv.usage, s.kv.pool.num_blocks, s.num_preemptions,
                           s.kv.pool.num_cached)

    def lora_activity(self) -> tuple[list[str], list[str]]:
        """What a LoRA-aware gateway routes by (vLLM's ``lora_requests_info``): the adapters in a device slot that
        have requests (running or queued), and the adapters of queued requests that are not in a slot yet. Names
        as requests give them (an X-LoRA by its own name). Safe to call from another thread (snapshots)."""
        store = self.lora_store
        if store is None:
            return [], []
        running, waiting = tuple(self.scheduler.running), tuple(self.scheduler.waiting)

        def names(reqs) -> dict[str, None]:
            return dict.fromkeys(n for r in reqs for n in (*(a for a, _ in r.loras), *((r.xlora,) if r.xlora else ())))

        resident = {n for n in names(running + waiting) if store.tier(n) == "device"}
        return [n for n in names(running + waiting) if n in resident], [n for n in names(waiting) if n not in resident]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (vLLM's name); refused (False) while requests hold blocks."""
        return self.scheduler.kv.pool.reset_cache()

    # ---- the step loop ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule → make the step's adapters resident → run the model (and sample) → update
        requests → detokenize and emit outputs (with those of requests that failed at admission)."""
        sched = self.scheduler.schedule()
        adapters = self._make_resident(sched)
        result = self.runner.execute(sched, adapters)
        if self.lora_store is not None:  # adapters the next steps will want: pinned, then those of the queue
            store = self.lora_store
            store.prefetch([*store.pinned, *self.scheduler.waiting_loras(store.max_cpu_loras)])
        touched = self.scheduler.update_from_output(sched, result)
        outputs = self.outputs.process(touched, self.scheduler.finish)
        for alias in [a for a in self._retired if not self._lora_users(a)]:
            self.lora_store.unload(alias)
            self._retired.discard(alias)
        for failed in sched.failed:  # its adapter could not be read: the request (and its n siblings) fail alone
            parent = self.outputs.parents.get(failed.parent_id)
            if parent is None:
                continue
            self.scheduler.abort([c.request_id for c in parent.children])
            out = self.outputs.abort(failed.parent_id)
            out.error = failed.error
            outputs.append(out)
        return outputs

    def _make_resident(self, sched: SchedulerOutput) -> StepAdapters | None:
        """Put the step's adapters (held by their running requests, so already in host memory) in device slots."""
        names = {n for s in sched.scheduled for n in s.lora_names}
        if not names:
            return None
        store = self.lora_store
        xloras = {s.xlora: store.registry[s.xlora].xlora for s in sched.scheduled if s.xlora}
        return StepAdapters(store.activate(names), store.max_loras, xloras)
