"""Offline API with vLLM's names: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from loraplex.config import CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.engine import LLMEngine
from loraplex.lora.request import LoRARequest
from loraplex.outputs import RequestOutput
from loraplex.routing import AdapterCard, CardBook, Router, chat_query
from loraplex.sampling_params import SamplingParams

AUTO = "auto"  # lora_request="auto": the router picks the adapter (or the base) for each prompt

# vLLM engine arguments that have no meaning here: accepted (so vLLM scripts run) with a warning.
IGNORED_VLLM_ARGS = frozenset({
    "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "allowed_local_media_path", "tensor_parallel_size",
    "pipeline_parallel_size", "revision", "tokenizer_revision", "gpu_memory_utilization",
    "swap_space", "cpu_offload_gb", "enforce_eager", "max_seq_len_to_capture", "disable_custom_all_reduce",
    "disable_async_output_proc", "hf_token", "hf_overrides", "mm_processor_kwargs", "task", "override_pooler_config",
    "compilation_config", "load_format", "download_dir", "distributed_executor_backend",
    "enable_chunked_prefill", "max_logprobs", "disable_log_stats", "served_model_name", "worker_cls",
    "kv_cache_dtype", "calculate_kv_scales", "lora_dtype",
    "fully_sharded_loras", "long_lora_scaling_factors", "disable_sliding_window", "use_v2_block_manager",
    "num_scheduler_steps", "multi_step_stream_outputs", "preemption_mode", "scheduling_policy", "runner",
})


def _is_mixture(obj) -> bool:
    """A weighted set of adapters for one prompt: ``[(LoRARequest, weight), ...]``."""
    return (isinstance(obj, (list, tuple)) and bool(obj)
            and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], LoRARequest) for p in obj))


class LLM:
    """A base model (the embedded SmolLM2 by default) behind vLLM's offline interface.

    ``LLM(model=path_or_alias, dtype="auto"|"bfloat16"|"float16"|"float32", max_model_len=..., enable_lora=...)``.
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = SchedulerConfig.max_model_len, enable_lora: bool = False,
                 seed: int = ModelConfig.seed, max_num_seqs: int = SchedulerConfig.max_num_seqs,
                 max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens, device: str | None = None,
                 block_size: int = CacheConfig.block_size, kv_cache_memory: int | None = None,
                 max_loras: int | None = LoRAConfig.max_loras, max_lora_rank: int = LoRAConfig.max_lora_rank,
                 max_cpu_loras: int | None = LoRAConfig.max_cpu_loras,
                 enable_prefix_caching: bool = CacheConfig.enable_prefix_caching, quantization: str | None = None,
                 deterministic: bool = ModelConfig.deterministic, **kwargs) -> None:
        unknown = sorted(set(kwargs) - IGNORED_VLLM_ARGS)
        if unknown:
            raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r}")
        if kwargs:
            warnings.warn(f"LLM(): ignoring vLLM arguments that do not apply here: {', '.join(sorted(kwargs))}",
                          stacklevel=2)
        if tokenizer is not None and tokenizer != model:
            warnings.warn("LLM(tokenizer=...): the model's own tokenizer is used", stacklevel=2)
        self.enable_lora = enable_lora
        lora = LoRAConfig(max_loras, max_lora_rank, max_cpu_loras) if enable_lora else None
        self.llm_engine = LLMEngine.from_args(
            model=model, dtype=dtype, device=device, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, kv_cache_memory=kv_cache_memory,
            seed=seed, lora=lora, enable_prefix_caching=enable_prefix_caching, quantization=quantization,
            deterministic=deterministic)
        self._router: Router | None = None
        self._cards = CardBook()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (e.g. between benchmark runs); False while requests are in flight."""
        return self.llm_engine.reset_prefix_cache()

    # ---- inputs -----------------------------------------------------------------------------------------------
    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.get_tokenizer().encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._encode(prompt["prompt"])
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"prompts: expected str, list of token ids or dict with 'prompt'/'prompt_token_ids', "
                        f"got {type(prompt).__name__}")

    def generate(self, prompts=None, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None, use_tqdm: bool = True,
                 lora_request=None) -> list[RequestOutput]:
        """Generate for every prompt (strings, token-id lists or vLLM prompt dicts); outputs keep input order."""
        if prompts is None and prompt_token_ids is None:
            raise ValueError("prompts: give prompts or prompt_token_ids")
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("prompts: give either prompts or prompt_token_ids, not both")
        if prompt_token_ids is not None:
            inputs = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        else:
            inputs = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        encoded = [self._encode(p) for p in inputs]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(encoded)
        if len(params) != len(encoded):
            raise ValueError(f"sampling_params: {len(params)} given for {len(encoded)} prompts")
        per_prompt = (isinstance(lora_request, Sequence) and not isinstance(lora_request, str)
                      and not _is_mixture(lora_request))
        loras = list(lora_request) if per_prompt else [lora_request] * len(encoded)
        if len(loras) != len(encoded):
            raise ValueError(f"lora_request: {len(loras)} given for {len(encoded)} prompts")
        loras, routes = self._route(loras, lambda i: (encoded[i][0] if encoded[i][0] is not None
                                                      else self.get_tokenizer().decode(encoded[i][1]), None))
        outs = self._run([(text, ids, sp, lr) for (text, ids), sp, lr in zip(encoded, params, loras)], use_tqdm)
        return self._with_routes(outs, loras, routes)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, lora_request=None, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, tools: list[dict] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them (with ``tools`` for templates that
        take them), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = [tok.apply_chat_template(conv, tokenize=False, chat_template=chat_template,
                                           add_generation_prompt=add_generation_prompt and not continue_final_message,
                                           continue_final_message=continue_final_message,
                                           **({"tools": tools} if tools else {}), **(chat_template_kwargs or {}))
                   for conv in conversations]
        # NOTE: the template already holds the special tokens, so no BOS is added when encoding.
        ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        routes = None
        if lora_request == AUTO or (isinstance(lora_request, list) and AUTO in lora_request):
            loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(conversations)
            if len(loras) != len(conversations):
                raise ValueError(f"lora_request: {len(loras)} given for {len(conversations)} conversations")
            lora_request, routes = self._route(loras, lambda i: chat_query(conversations[i]))
        outs = self.generate([{"prompt": p, "prompt_token_ids": i} for p, i in zip(prompts, ids)],
                             sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)
        return outs if routes is None else self._with_routes(outs, lora_request, routes)

    # ---- routing (lora_request="auto") ------------------------------------------------------------------------
    @property
    def router(self) -> Router:
        """Chooses among the registered adapters that have a card (built on first use; assign your own to change
        the scorer, threshold, margin or rules)."""
        if self._router is None:
            self._router = Router()
        return self._router

    @router.setter
    def router(self, router: Router) -> None:
        self._router = router

    def set_adapter_card(self, name: str, description: str | None = None,
                         examples: Sequence[str] | None = None) -> None:
        """Describe adapter ``name`` for ``lora_request="auto"`` (instead of its folder's ``adapter_card.json``).
        Both empty: the adapter has no card and is never chosen by score."""
        self._cards.give(name, AdapterCard.of(description, list(examples or [])))

    def _sync_router(self) -> None:
        engine = self.llm_engine
        if not engine.serves_adapters:
            raise ValueError("lora_request: 'auto' needs LLM(enable_lora=True) and registered adapters")
        names = engine.adapter_names()
        for name in self.router.names - set(names):
            self.router.remove(name)
        for name in names:
            self.router.set_card(name, self._cards.card(name, engine.adapter(name).path))  # embeds new cards only

    def _route(self, loras: list, query: Callable[[int], tuple[str, str | None]]) -> tuple[list, list]:
        """Replace each ``"auto"`` by the router's choice for ``query(i)`` = (prompt, system): ``(loras, decisions,
        None where the caller chose)``."""
        if not any(isinstance(lr, str) and lr == AUTO for lr in loras):
            return loras, [None] * len(loras)
        self._sync_router()
        out, routes = [], []
        for i, lr in enumerate(loras):
            if not (isinstance(lr, str) and lr == AUTO):
                out.append(lr)
                routes.append(None)
                continue
            d = self.router.route(*query(i))
            out.append(self.llm_engine.lora_request(d.adapter) if d.adapter else None)
            routes.append(d)
        return out, routes

    @staticmethod
    def _with_routes(outs: list[RequestOutput], loras: list, routes: list) -> list[RequestOutput]:
        for out, lr, d in zip(outs, loras, routes):
            if d is not None:
                out.lora_request, out.route = lr, d
        return outs

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _run(self, items: list[tuple[str | None, list[int], SamplingParams, LoRARequest | None]],
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for text, token_ids, sp, lora_request in items:
                ids.append(engine.add_request(token_ids, sp, prompt=text, lora_request=lora_request))
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, leave=False) as bar:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update()
        for out in done.values():
            if out.error:
                warnings.warn(f"request {out.request_id}: {out.error}", stacklevel=3)
        return [done[rid] for rid in ids]
