"""A decode step the fused C decode step can take keeps its LoRA in the BGMV form — one adapter on every row
included, which the dense-ratio rule alone would make a segment — so it runs in one call, with the op-by-op
path's greedy tokens."""
import pytest
import torch

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.engine import model_runner
from loraplex.engine.kernel_choice import KernelChoice
from loraplex.models.transformer import DecoderLM
from loraplex.ops import decode_step_cpu, dense_cpu
from loraplex.ops.lora_batch import Bgmv
from tests.conftest import save_tiny_adapter


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_adapter_on_every_row_stays_in_the_fused_step(tiny_llama_dir, tmp_path, monkeypatch, dtype):
    if not decode_step_cpu.available(torch.zeros(1)):
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(model_runner, "kernel_choice",  # the C GEMV for every step size; dense from 4 per adapter
                        lambda *args: KernelChoice(dense_lora_ratio=4, c_gemv_tokens=dense_cpu.GEMV_MAX_ROWS))
    save_tiny_adapter(tiny_llama_dir, tmp_path / "a", 0, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    req = LoRARequest("a", 1, str(tmp_path / "a"))
    prompts = [[1 + i, 2 + i, 3] for i in range(20)]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    fused_steps, forms = [], []
    step = DecoderLM._fused_step
    monkeypatch.setattr(DecoderLM, "_fused_step", lambda self, *a: fused_steps.append(1) or step(self, *a))

    def run() -> list:
        llm = LLM(str(tiny_llama_dir), dtype=dtype, enable_lora=True, max_loras=2, max_model_len=64)
        runner = llm.llm_engine.runner
        lora_batch = runner.lora_batch

        def spy(rows, adapters):
            batch, to_score = lora_batch(rows, adapters)
            if len(rows) == len(prompts) and all(r.num_tokens == 1 for r in rows):
                forms.append(batch)
            return batch, to_score

        runner.lora_batch = spy
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, lora_request=req, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    fused = run()
    assert forms and all(isinstance(b.decodes, Bgmv) and not b.segments for b in forms)
    assert len(fused_steps) >= len(forms)  # those steps ran in one call
    forms.clear()
    monkeypatch.setattr(DecoderLM, "_fused_serves", lambda self, h, meta, lora: False)
    monkeypatch.setattr(DecoderLM, "fused_takes_lora", lambda self, n: False)
    assert run() == fused  # op by op (the rows on one adapter a segment again): the same tokens
    assert forms and all(b.decodes is None and b.segments for b in forms)
