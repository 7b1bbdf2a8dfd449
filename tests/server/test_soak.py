"""Soak: 500 concurrent streaming requests over the base and adapters, ~30 % of the clients hanging up mid-stream,
while an extra adapter is loaded, used, pinned, unpinned and unloaded in a loop. No 5xx; every completed greedy stream
equals its sequential reference (fp32; and bf16 with --deterministic); afterwards no KV block is held, no adapter is
left pinned, the server still answers. Prints requests/s and the peak RSS."""
from __future__ import annotations

import asyncio
import json
import random
import resource
import time

import httpx
import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from tests.server.conftest import ADAPTERS, CHAT_TEMPLATE, RunningServer

N_REQUESTS = 500
HANG_UP = 0.3
# fp32 as it is; bf16 only with --deterministic (otherwise a stream's rounding depends on what shares its batches)
MODES = {"fp32": ["--dtype", "float32"], "bf16-deterministic": ["--dtype", "bfloat16", "--deterministic"]}


@pytest.fixture(scope="module", params=list(MODES))
def soak_server(request, tiny_llama_dir, adapter_dir):
    mods = [f"{n}={adapter_dir / n}" for n in ADAPTERS]
    srv = RunningServer([str(tiny_llama_dir), "--served-model-name", "tiny", "--max-loras", "3",
                         "--lora-modules", *mods, "--max-num-seqs", "64", "--max-waiting", "1000",
                         "--enable-runtime-lora", *MODES[request.param]])
    srv.mode = request.param
    yield srv
    srv.stop()


def _reference(soak_server, tiny_llama_dir, adapter_dir, fp32_reference):
    """The offline engine on the same weights and mode: what each request must return."""
    if soak_server.mode == "fp32":
        return fp32_reference
    llm = LLM(model=str(tiny_llama_dir), dtype="bfloat16", enable_lora=True, max_loras=3, deterministic=True)
    llm.get_tokenizer().chat_template = CHAT_TEMPLATE
    llm.lora = {n: LoRARequest(n, i + 1, str(adapter_dir / n)) for i, n in enumerate(ADAPTERS)}
    return llm


async def _stream(client, url, body, hang_after: int | None):
    """The streamed text, or None when this client hung up after ``hang_after`` chunks."""
    text, n = "", 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, (r.status_code, await r.aread())
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            n += 1
            if hang_after is not None and n >= hang_after:
                return None
    return text


async def _churn(client, url, adapter_dir, stop: asyncio.Event) -> int:
    """Load, use, pin, unpin and unload an extra adapter until ``stop``; returns the number of cycles."""
    cycles = 0
    while not stop.is_set():
        r = await client.post(url + "/v1/load_lora_adapter", json={"lora_name": "churn",
                                                                   "lora_path": str(adapter_dir / "a8")})
        assert r.status_code == 200, r.text
        r = await client.post(url + "/v1/completions", json={"model": "churn", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
        for pinned in (True, False):
            r = await client.post(url + "/v1/pin_lora_adapter", json={"lora_name": "churn", "pinned": pinned})
            assert r.status_code == 200, r.text
        r = await client.post(url + "/v1/unload_lora_adapter", json={"lora_name": "churn", "wait": True})
        assert r.status_code == 200, r.text
        cycles += 1
    return cycles


@pytest.mark.slow
def test_soak_concurrent_streams_with_hangups_and_adapter_churn(soak_server, reference, adapter_dir, tiny_llama_dir):
    reference = _reference(soak_server, tiny_llama_dir, adapter_dir, reference)
    rng = random.Random(0)
    models = [None, *ADAPTERS]
    jobs = []
    for i in range(N_REQUESTS):
        model = models[i % len(models)]
        prompt = f"story {i % 37}: once upon a time"
        hang = rng.randrange(1, 4) if rng.random() < HANG_UP else None
        jobs.append((model, prompt, rng.randrange(4, 12), hang))

    async def main():
        limits = httpx.Limits(max_connections=N_REQUESTS, max_keepalive_connections=N_REQUESTS)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            stop = asyncio.Event()
            churn = asyncio.create_task(_churn(client, soak_server.url, adapter_dir, stop))
            t = time.perf_counter()
            texts = await asyncio.gather(*(_stream(client, soak_server.url, {
                "model": m or "tiny", "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": True}, h) for m, p, n, h in jobs))
            elapsed = time.perf_counter() - t
            stop.set()
            return texts, elapsed, await churn

    texts, elapsed, cycles = asyncio.run(main())
    completed = [(job, text) for job, text in zip(jobs, texts) if text is not None]
    assert len(completed) > N_REQUESTS * 0.5 and cycles > 0
    want = {}
    for (model, prompt, n, _), text in completed:
        key = (model, prompt, n)
        if key not in want:
            lora = reference.lora[model] if model else None
            want[key] = reference.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                           use_tqdm=False, lora_request=lora)[0].outputs[0].text
        assert text == want[key], key
    assert soak_server.idle(timeout=30)  # every stream, finished or abandoned, gave its KV blocks back
    store = soak_server.engine.lora_store
    assert not store.pinned and not store.refcount and "churn" not in store.registry
    assert httpx.get(soak_server.url + "/health").status_code == 200
    info = httpx.get(soak_server.url + "/info").json()
    assert info["deterministic"] is (soak_server.mode != "fp32")
    assert (info["cpu_threads"] is None) is info["deterministic"]  # no thread switching in deterministic mode
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nsoak ({soak_server.mode}): {N_REQUESTS} streams ({N_REQUESTS - len(completed)} hung up) in {elapsed:.1f} s = "
          f"{N_REQUESTS / elapsed:.1f} requests/s, {cycles} adapter load/use/pin/unload cycles, peak RSS {rss_mb:.0f} MB")
