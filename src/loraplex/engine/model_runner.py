"""Flattens a :class:`SchedulerOutput` into tensors, runs the decoder over the paged KV cache, samples.

Layout of a step: decode rows (one token each) first, then prefill chunks, all on one token axis ``T``.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import NamedTuple

import torch

from loraplex.config import CacheConfig
from loraplex.engine.kernel_choice import KernelChoice, kernel_choice, onednn
from loraplex.engine.lora_batch import build_lora_batch
from loraplex.engine.thread_tuner import ThreadTuner
from loraplex import ops
from loraplex.layers.attention import AttentionMetadata, PagedRows, PrefillChunk
from loraplex.layers.xlora_gate import XLoRAGate
from loraplex.lora.xlora import XLoRAPlan
from loraplex.models.loader import LoadedModel
from loraplex.ops import hugepages
from loraplex.ops.lora_batch import LoRABatch, XLoRAGroup
from loraplex.sampling import Sampler, score_tokens
from loraplex.scheduler.output import (
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    XLoRAPhase,
)


class StepAdapters(NamedTuple):
    """The step's adapters, made resident by the engine before the runner runs: device ``slots`` by name, the
    all-zero ``zero_slot`` and the plans of the step's X-LoRAs."""

    slots: Mapping[str, int]
    zero_slot: int
    xloras: Mapping[str, XLoRAPlan]


class ModelRunner:
    """Owns the model, the KV cache tensors and the sampler's per-request RNGs."""

    def __init__(self, loaded: LoadedModel, cache: CacheConfig, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, row_tile: int = 0) -> None:
        self.model = loaded.model
        self.spec = loaded.spec
        self.device = device
        self.block_size = cache.block_size
        self._block_offsets = torch.arange(self.block_size)  # a block's slot offsets (context slots per step)
        shape = (cache.num_slots, self.spec.num_kv_heads, self.spec.head_dim)  # [num_slots, Hkv, D] per layer
        # NOTE: zeros, not empty: padded decode positions read slot 0, and a NaN there would poison 0 * V.
        if device.type == "cpu" and hugepages.available():  # weights and KV streamed from 2 MB pages
            hugepages.move_module(self.model)
            kv = hugepages.zeros([shape] * (2 * self.spec.num_layers), dtype)
            self.kv_caches = list(zip(kv[0::2], kv[1::2]))
        else:
            self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device)) for _ in range(self.spec.num_layers)]
        self.sampler = Sampler(device, seed)
        # row_tile > 0 (deterministic): fixed GEMM shapes and per-token attention, so no per-step kernel switch
        self.row_tile = row_tile
        # which kernel serves which step where two compete (oneDNN or not for tiny steps, dense LoRA or BGMV):
        # measured on this CPU at this model's shapes (cached), not in deterministic mode (fixed kernels there)
        self.kernels = KernelChoice() if row_tile else kernel_choice(self.spec, dtype, device)
        if device.type == "cpu":
            ops.build_cpu_kernels(dtype)  # now, before serving (~1 s once per machine), not in the first request
        # CPU steps run on as many threads as measured fastest for their size (not in deterministic mode, whose
        # kernels must not change with the thread count)
        self.threads = ThreadTuner(torch.get_num_threads()) if device.type == "cpu" and not row_tile else None
        self.dtype = dtype
        self._gates: dict[str, tuple[XLoRAPlan, XLoRAGate]] = {}  # X-LoRA name -> (its plan, classifier on device)
        self._xlora_scores: dict[str, torch.Tensor] = {}  # request -> expert weights of its scored tokens

    def lora_batch(self, rows: list[ScheduledRequest],
                   adapters: StepAdapters | None) -> tuple[LoRABatch | None, list]:
        """The step's LoRA batch (``engine.lora_batch``) with its X-LoRA groups, and the X-LoRA scaling-pass rows
        to score after the forward (see :meth:`xlora_groups`). ``rows`` are in step order (decodes first)."""
        if adapters is None:
            return None, []
        decodes = sum(1 for r in rows if r.num_tokens == 1)
        fused = decodes if 0 < decodes <= self.kernels.c_gemv_tokens and self.model.fused_takes_lora(decodes) else 0
        batch = build_lora_batch(rows, adapters.slots, adapters.zero_slot, self.device, self.row_tile,
                                 self.kernels.dense_lora_ratio, fused)
        if batch is None or not adapters.xloras:
            return batch, []
        groups, to_score = self.xlora_groups(rows, adapters)
        return dataclasses.replace(batch, xlora=tuple(groups)), to_score

    # ---- X-LoRA --------------------------------------------------------------------------------------------------
    def _gate(self, plan: XLoRAPlan) -> XLoRAGate:
        cached = self._gates.get(plan.name)
        if cached is None or cached[0] is not plan:  # (re)loaded under this name
            gate = XLoRAGate(plan.config, plan.classifier, list(plan.modules), self.spec.num_layers, self.dtype,
                             self.device)
            cached = self._gates[plan.name] = (plan, gate)
        return cached[1]

    def xlora_groups(self, rows: list[ScheduledRequest],
                     adapters: StepAdapters) -> tuple[list[XLoRAGroup], list[tuple[str, XLoRAPlan, torch.Tensor]]]:
        """X-LoRA rows of the step (see ``Scheduler._xlora_phase``). Real-pass rows use the expert weights their
        scaling pass scored in an earlier step; scaling-pass rows run on their own KV track with every expert at
        ``scaling_pass_value`` (0: plain base rows). Returns the step's groups and, for scaling rows, what to score
        from the step's final hidden states: ``(request id, X-LoRA, token rows)``."""
        real: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
        scaling: dict[str, list[int]] = {}
        to_score: list[tuple[str, XLoRAPlan, torch.Tensor]] = []
        pos = 0
        for r in rows:
            idx = list(range(pos, pos + r.num_tokens))
            pos += r.num_tokens
            if r.xlora_phase is XLoRAPhase.REAL:
                scores = self._xlora_scores.pop(r.request_id)  # [n scored, modules, E]
                if scores.shape[0] > r.num_tokens:  # a chunk of them (token budget): keep the rest
                    self._xlora_scores[r.request_id] = scores[r.num_tokens:]
                real.setdefault(r.xlora, ([], []))[0].extend(idx)
                real[r.xlora][1].append(scores[:r.num_tokens])
            elif r.xlora_phase is XLoRAPhase.SCALING:
                scaling.setdefault(r.xlora, []).extend(idx)
                to_score.append((r.request_id, adapters.xloras[r.xlora], torch.tensor(idx, device=self.device)))

        def experts(name: str) -> torch.Tensor:
            return torch.tensor([adapters.slots[e] for e in adapters.xloras[name].expert_names()],
                                device=self.device)

        def gate(name: str) -> XLoRAGate:
            return self._gate(adapters.xloras[name])

        groups = [XLoRAGroup(torch.tensor(idx, device=self.device), experts(n), gate(n).spread(torch.cat(w)))
                  for n, (idx, w) in real.items()]
        for n, idx in scaling.items():
            w = gate(n).scaling_pass_weights(len(idx))
            if w is not None:
                groups.append(XLoRAGroup(torch.tensor(idx, device=self.device), experts(n), gate(n).spread(w)))
        return groups, to_score

    def score_xlora(self, hidden: torch.Tensor, to_score: list[tuple[str, XLoRAPlan, torch.Tensor]]) -> None:
        """The classifier on scaling-pass rows' final hidden states: their tokens' expert weights, kept for the
        request's next (real-pass) step."""
        for req_id, plan, idx in to_score:
            classify = self._gate(plan).classify
            scores = ops.row_tiled(classify, hidden[idx], self.row_tile) if self.row_tile else classify(hidden[idx])
            prev = self._xlora_scores.get(req_id)
            self._xlora_scores[req_id] = scores if prev is None else torch.cat([prev, scores])

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _context_slots(self, block_tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """Slots of positions ``0..L_i-1`` per row, padded with slot 0: ``[R, Lmax]``."""
        bs = self.block_size
        max_len = max(lengths)
        n_blocks = -(-max_len // bs)
        bt = torch.tensor([t[:n_blocks] + [0] * (n_blocks - len(t[:n_blocks])) for t in block_tables])
        return (bt.unsqueeze(-1) * bs + self._block_offsets).view(len(block_tables), -1)[:, :max_len].contiguous()

    def _paged_rows(self, rows: list[ScheduledRequest]) -> PagedRows:
        bs = self.block_size
        tables = [r.block_table[:-(-(r.start_pos + r.num_tokens) // bs)] for r in rows]
        width = max(len(t) for t in tables)
        starts = [0]
        for r in rows[:-1]:
            starts.append(starts[-1] + r.num_tokens)

        def ints(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=self.device)

        return PagedRows(ints([t + [0] * (width - len(t)) for t in tables]), ints(starts),
                         ints([r.num_tokens for r in rows]), ints([r.start_pos for r in rows]),
                         max(r.num_tokens for r in rows), bs)

    def prepare(self, rows: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """``rows`` must list decodes first. Returns input_ids, positions, metadata and the index of each
        sampling row's last token."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sample_idx: list[int] = []
        prefills: list[PrefillChunk] = []
        decode_rows = [r for r in rows if r.num_tokens == 1]
        kernel = ops.use_triton(self.device)  # paged attention reads the block tables itself: no gathered slots
        for r in rows:
            q_start = len(input_ids)
            end = r.start_pos + r.num_tokens
            input_ids += r.token_ids
            positions += range(r.start_pos, end)
            slot_mapping += self._slots(r.block_table, r.start_pos, end)
            if self.row_tile:
                slots = self._context_slots([r.block_table], [end])
                prefills.append(PrefillChunk(q_start, len(input_ids), r.start_pos, slots[0].to(self.device)))
            elif r.num_tokens > 1 and not kernel:
                chunk = PrefillChunk(q_start, len(input_ids), r.start_pos)
                if r.start_pos > 0:
                    slots = self._context_slots([r.block_table], [end])
                    q_pos = torch.arange(r.start_pos, end).unsqueeze(1)
                    chunk.kv_slots = slots[0].to(self.device)
                    chunk.mask = (torch.arange(end).unsqueeze(0) <= q_pos).to(self.device)  # [n, L]
                prefills.append(chunk)
            if r.sample:
                sample_idx.append(len(input_ids) - 1)
        meta = AttentionMetadata(torch.tensor(slot_mapping, device=self.device), len(decode_rows), prefills=prefills)
        if self.row_tile:
            meta.prefills, meta.token_rows = [], prefills
        elif kernel:
            meta.rows = self._paged_rows(rows)
        elif decode_rows:
            lens = [r.start_pos + 1 for r in decode_rows]
            meta.decode_kv_slots = self._context_slots([r.block_table for r in decode_rows], lens).to(self.device)
            meta.decode_lens = torch.tensor(lens, device=self.device)
        ids = torch.tensor(input_ids, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        return ids, pos, meta, sample_idx

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, adapters: StepAdapters | None = None) -> ModelRunnerOutput:
        """Run the step's rows (their adapters already resident: ``adapters``) and sample their next tokens."""
        self.sampler.drop(sched.finished_req_ids)  # preempted requests keep their RNG
        for rid in sched.finished_req_ids + sched.preempted_req_ids:  # preempted X-LoRAs recompute their scores
            self._xlora_scores.pop(rid, None)
        # stable: decodes first, in order; prefill chunks grouped by adapter (one SGMV segment per adapter, not per
        # prompt when prompts alternate adapters)
        rows = sorted(sched.scheduled, key=lambda r: (r.num_tokens > 1, r.loras if r.num_tokens > 1 else ()))
        if not rows:
            return ModelRunnerOutput()
        if self.threads is None:
            return self._execute(rows, adapters)
        n = sum(r.num_tokens for r in rows)
        threads = self.threads.choose(n)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        start = time.perf_counter()
        out = self._execute(rows, adapters)
        self.threads.record(n, threads, time.perf_counter() - start)
        return out

    def _execute(self, rows: list[ScheduledRequest], adapters: StepAdapters | None) -> ModelRunnerOutput:
        ids, pos, meta, sample_idx = self.prepare(rows)
        lora, to_score = self.lora_batch(rows, adapters)
        sampling_rows = [r for r in rows if r.sample]
        out = ModelRunnerOutput()
        with onednn(ids.numel() > self.kernels.gemv_tokens), ops.cpu_gemv(self.kernels.c_gemv_tokens):
            hidden = self.model(ids, pos, self.kv_caches, meta, lora)
            self.score_xlora(hidden, to_score)
            out.prompt_logprobs = self.prompt_logprobs(hidden, rows)
            if not sampling_rows:
                return out
            # every row samples (a step of decodes): its hidden states as they are, no gather
            logits = self.model.compute_logits(hidden if len(sample_idx) == hidden.shape[0] else hidden[sample_idx])
        tokens = self.sampler(logits, sampling_rows)
        out.sampled = {r.request_id: t for r, t in zip(sampling_rows, tokens)}
        return out

    def prompt_logprobs(self, hidden: torch.Tensor, rows: list[ScheduledRequest]) -> dict:
        """For rows that asked for prompt log-probabilities: score each prompt token this chunk predicts (position
        ``p`` predicts token ``p + 1``) → ``{request id: (first scored position, [SampledToken, ...])}``."""
        out = {}
        start = 0
        for r in rows:
            k = r.sampling_params.prompt_logprobs
            n_prompt = len(r.prompt_token_ids)
            end = min(r.start_pos + r.num_tokens, n_prompt - 1)  # the last prompt token predicts no prompt token
            if k is not None and r.xlora_phase is not XLoRAPhase.SCALING and r.start_pos < end:
                idx = torch.arange(start, start + end - r.start_pos, device=hidden.device)
                lp = torch.log_softmax(self.model.compute_logits(hidden[idx]), dim=-1)
                out[r.request_id] = (r.start_pos + 1, score_tokens(lp, r.prompt_token_ids[r.start_pos + 1:end + 1], k))
            start += r.num_tokens
        return out
