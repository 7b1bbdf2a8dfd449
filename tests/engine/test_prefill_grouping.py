"""A step's prefill chunks are grouped by adapter: prompts that alternate two adapters prefill as two SGMV segments,
not one per prompt, and each still gets the tokens it gets alone."""
from loraplex import LLM, LoRARequest, SamplingParams
from tests.conftest import save_tiny_adapter


def test_prefill_chunks_are_grouped_by_adapter(tiny_llama_dir, tmp_path):
    for i in range(2):
        save_tiny_adapter(tiny_llama_dir, tmp_path / f"a{i}", i, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    reqs = [LoRARequest(f"a{i % 2}", i % 2 + 1, str(tmp_path / f"a{i % 2}")) for i in range(6)]
    reqs[4] = None  # and one prompt on the base
    prompts = [[1 + i, 2 + i, 3, 4 + i] for i in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm = LLM(str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=2, max_model_len=64)
    runner = llm.llm_engine.runner
    lora_batch, prefills = runner.lora_batch, []

    def spy(rows, adapters):
        batch, to_score = lora_batch(rows, adapters)
        if batch is not None and all(r.num_tokens > 1 for r in rows):
            prefills.append((batch, [r.num_tokens for r in rows]))
        return batch, to_score

    runner.lora_batch = spy
    together = llm.generate(prompt_token_ids=prompts, sampling_params=sp, lora_request=reqs, use_tqdm=False)
    assert prefills
    batch, sizes = prefills[0]
    assert len(sizes) == 6 and len(batch.segments) == 2  # 5 adapter prompts in two runs (the base one has none)
    runner.lora_batch = lora_batch
    for p, r, out in zip(prompts, reqs, together):
        alone = llm.generate(prompt_token_ids=[p], sampling_params=sp, lora_request=r, use_tqdm=False)
        assert alone[0].outputs[0].token_ids == out.outputs[0].token_ids
