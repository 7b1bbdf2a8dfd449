"""``engine.kernel_choice``: competing kernels chosen by a measurement on this machine, cached per machine and shape."""
from __future__ import annotations

import json
import math

import pytest
import torch

from loraplex.engine import kernel_choice as kc
from loraplex.models.model_config import ModelSpec


@pytest.fixture
def spec():
    from transformers import LlamaConfig

    return ModelSpec.from_hf_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                num_key_value_heads=2, num_hidden_layers=1, vocab_size=100))


def test_measurements_give_values_the_runner_can_use(spec):
    assert kc.measure_gemv_tokens(spec, torch.float32) in (0, *kc.GEMV_ROWS)
    assert kc.measure_c_gemv_tokens(spec, torch.float32) in (0, *kc.C_GEMV_ROWS)
    ratio = kc.measure_dense_lora_ratio(spec, torch.float32)
    assert ratio == math.inf or ratio in {kc.DECODES / d for d in kc.ADAPTERS}


def test_choice_is_measured_once_then_read_from_the_cache(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(kc, "measure_gemv_tokens", lambda s, d: calls.append("gemv") or 2)
    monkeypatch.setattr(kc, "measure_dense_lora_ratio", lambda s, d: calls.append("lora") or math.inf)
    monkeypatch.setattr(kc, "measure_c_gemv_tokens", lambda s, d: calls.append("c") or 4)
    first = kc.kernel_choice(spec, torch.float32, torch.device("cpu"))
    again = kc.kernel_choice(spec, torch.float32, torch.device("cpu"))
    assert first == again == kc.KernelChoice(2, math.inf, 4) and calls == ["gemv", "lora", "c"]
    assert len(json.loads((tmp_path / "kernel_choice.json").read_text())) == 1
    other = kc.kernel_choice(spec, torch.bfloat16, torch.device("cpu"))  # another dtype: measured again
    assert other == first and calls == ["gemv", "lora", "c"] * 2


def test_where_triton_serves_the_defaults_stay(spec, monkeypatch):
    from loraplex import ops

    monkeypatch.setattr(kc, "measure_gemv_tokens", lambda s, d: pytest.fail("measured for the Triton kernels"))
    assert kc.kernel_choice(spec, torch.float32, torch.device("meta")) == kc.KernelChoice()
    monkeypatch.setattr(ops, "TRITON_ON_CPU", True)  # CPU tensors through the Triton kernels (the interpreter)
    if ops.use_triton(torch.device("cpu")):
        assert kc.kernel_choice(spec, torch.float32, torch.device("cpu")) == kc.KernelChoice()
