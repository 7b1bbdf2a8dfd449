"""One source of configuration: every entry point has the defaults of ``loraplex.config``; bad tiers are refused."""
from __future__ import annotations

import argparse
import inspect

import pytest

from loraplex.config import DEFAULT_MAX_LORAS, CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.engine import LLMEngine
from loraplex.llm import LLM
from loraplex.server.args import add_limit_args, add_serve_args

KNOBS = {"max_loras": LoRAConfig, "max_lora_rank": LoRAConfig, "max_cpu_loras": LoRAConfig,
         "max_model_len": SchedulerConfig, "max_num_seqs": SchedulerConfig,
         "max_num_batched_tokens": SchedulerConfig, "block_size": CacheConfig, "seed": ModelConfig}


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _cli_defaults(add) -> dict:
    p = argparse.ArgumentParser()
    add(p)
    return vars(p.parse_args([]))


@pytest.mark.parametrize("where", ["LLM", "LLMEngine.from_args", "serve", "generate/chat"])
def test_every_entry_point_has_the_config_defaults(where):
    got = {"LLM": lambda: _defaults(LLM.__init__), "LLMEngine.from_args": lambda: _defaults(LLMEngine.from_args),
           "serve": lambda: _cli_defaults(add_serve_args), "generate/chat": lambda: _cli_defaults(add_limit_args)}[where]()
    checked = [k for k in KNOBS if k in got]
    assert {"max_model_len", "max_num_seqs"} <= set(checked)
    for k in checked:
        assert got[k] == getattr(KNOBS[k], k), f"{where}: default of {k} is {got[k]!r}, config.py says " \
                                               f"{getattr(KNOBS[k], k)!r}"


def test_from_args_is_keyword_only():
    with pytest.raises(TypeError):
        LLMEngine.from_args("some-model")


def test_host_tier_smaller_than_device_slots_is_refused():
    with pytest.raises(ValueError, match=r"max_cpu_loras \(2\) must be >= max_loras \(8\)"):
        LoRAConfig(max_loras=8, max_cpu_loras=2)
    assert LoRAConfig(max_loras=2).host_capacity == 4 and LoRAConfig(max_loras=2, max_cpu_loras=2).host_capacity == 2


def test_max_loras_defaults_to_at_most_max_cpu_loras():  # vLLM: `--max-cpu-loras 2` alone starts
    assert LoRAConfig().max_loras == DEFAULT_MAX_LORAS and LoRAConfig().host_capacity == 2 * DEFAULT_MAX_LORAS
    assert LoRAConfig(max_cpu_loras=2).max_loras == 2 and LoRAConfig(max_cpu_loras=100).max_loras == DEFAULT_MAX_LORAS


def test_serve_refuses_small_host_tier_before_loading():  # both given, host smaller: refused naming both
    from loraplex.server.serve import build_state

    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--max-loras", "4", "--max-cpu-loras", "2", "--router-scorer", "lexical"])
    with pytest.raises(SystemExit, match=r"--max-cpu-loras.*max_cpu_loras \(2\) must be >= max_loras \(4\)"):
        build_state(args)
