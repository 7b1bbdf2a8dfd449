"""dtype="auto" on CPU: bf16 only where it multiplies about as fast as fp32, measured once and cached."""
from __future__ import annotations

import json

import torch

from loraplex.engine import cpu_dtype


def test_choose_by_relative_rate():
    assert cpu_dtype.choose({"float32": 100.0, "bfloat16": 290.0}) is torch.bfloat16  # Zen 4: bf16 ~3x fp32
    assert cpu_dtype.choose({"float32": 90.0, "bfloat16": 88.0}) is torch.bfloat16  # as fast: half the bytes
    assert cpu_dtype.choose({"float32": 300.0, "bfloat16": 95.0}) is torch.float32  # emulated bf16 (Zen 3)


def test_measured_once_per_machine_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(cpu_dtype, "matmul_rate", lambda dt, *a, **k: calls.append(dt) or
                        {torch.float32: 300.0, torch.bfloat16: 100.0}[dt])
    assert cpu_dtype.auto_cpu_dtype() is torch.float32 and len(calls) == 2
    assert cpu_dtype.auto_cpu_dtype() is torch.float32 and len(calls) == 2  # from the cache
    cached = json.loads((tmp_path / "cpu_dtype.json").read_text())
    assert cached[cpu_dtype.machine_key()] == {"float32": 300.0, "bfloat16": 100.0}


def test_matmul_rate_is_a_positive_rate():
    assert cpu_dtype.matmul_rate(torch.float32, (8, 64, 64), seconds=0.01) > 0


def test_auto_dtype_reaches_the_model(tiny_llama_dir, tmp_path, monkeypatch):
    from loraplex import LLM

    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    for rates, want in (({"float32": 300.0, "bfloat16": 100.0}, torch.float32),
                        ({"float32": 100.0, "bfloat16": 300.0}, torch.bfloat16)):
        (tmp_path / "cpu_dtype.json").write_text(json.dumps({cpu_dtype.machine_key(): rates}))
        llm = LLM(model=str(tiny_llama_dir), dtype="auto", device="cpu")
        assert llm.llm_engine.config.model.dtype is want
        assert llm.llm_engine.runner.model.embed_tokens.weight.dtype is want
    assert LLM(model=str(tiny_llama_dir), dtype="bfloat16", device="cpu").llm_engine.config.model.dtype is \
        torch.bfloat16  # an explicit dtype is never replaced


