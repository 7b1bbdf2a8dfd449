"""The CPU peer side by side: llama.cpp's ``llama-server`` vs ``loraplex serve``, same GGUF, same demo adapters.

    python benchmarks/bench_llamacpp.py --llama-dir DIR [--new-tokens 64] [--clients 32] [--requests 64]

llama.cpp is bench-only, never a runtime dependency. ``--llama-dir`` is a llama.cpp source tree whose ``build/bin``
holds ``llama-server`` and ``llama-quantize`` (also found through ``$LLAMA_CPP_DIR``), e.g. the tree vendored in
llama-cpp-python's sdist:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        && cmake --build build --target llama-server llama-quantize

Without it the benchmark says so and exits 0 (skipped).

What runs, one server at a time on the machine, each with every core: the embedded SmolLM2 GGUF as shipped (Q4_1)
and a bf16 copy made by ``llama-quantize --allow-requantize … BF16`` (the values loraplex computes with after it
dequantizes the same file); the three demo adapters converted by llama.cpp's ``convert_lora_to_gguf.py`` and chosen
per request (``"lora": [{"id", "scale"}]``; loraplex: ``model``). loraplex runs twice: bf16, and with
``--quantization gguf`` (the Q4_1 blocks kept as int4: llama.cpp's as-shipped precision). Cases:

1. one client: ``--single`` prompts × N tokens in turn on adapter congcong, streaming; decode tok/s (first token
   left out, median) and TTFT, against the batch-1 floor ``weight bytes / read bandwidth`` measured in the run;
2. ``--clients`` concurrent clients: ``--requests`` requests spread round-robin over base + 3 adapters; generated
   tok/s over the wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from bench_engine import QUESTIONS  # noqa: E402

ADAPTERS = ("congcong", "benben", "pirate")  # the demo adapters, loaded by `loraplex serve` by default
ADAPTER_DIR = Path(__file__).resolve().parents[1] / "src" / "loraplex" / "adapters"
# one connection per request, both servers alike: llama-server closes idle keep-alive connections, and a request
# sent on one it has just closed fails ("Server disconnected without sending a response")
NO_KEEPALIVE = httpx.Limits(max_connections=None, max_keepalive_connections=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def hf_base_dir(work: Path) -> Path:
    """The base's HF directory (config with ``architectures``, which llama.cpp's converter needs)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from loraplex.models.loader import local_hf_dir

    src = Path(local_hf_dir(None))
    out = work / "base-hf"
    out.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config.setdefault("architectures", [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[AutoConfig.from_pretrained(src).model_type]])
    (out / "config.json").write_text(json.dumps(config))
    return out


def prepare_llamacpp(llama_dir: Path, gguf: Path, work: Path) -> tuple[dict[str, Path], list[Path]]:
    """GGUF variants of the base (``{"Q4_1 (as shipped)": …, "bf16": …}``) and the demo adapters as GGUF LoRAs."""
    base = hf_base_dir(work)
    loras = []
    for name in ADAPTERS:
        out = work / f"{name}.gguf"
        subprocess.run([sys.executable, str(llama_dir / "convert_lora_to_gguf.py"), "--base", str(base), "--outtype",
                        "bf16", "--outfile", str(out), str(ADAPTER_DIR / name)], check=True, capture_output=True)
        loras.append(out)
    bf16 = work / "base-bf16.gguf"
    subprocess.run([str(llama_dir / "build" / "bin" / "llama-quantize"), "--allow-requantize", str(gguf), str(bf16),
                    "BF16"], check=True, capture_output=True)
    return {f"{gguf.stem.rsplit('.', 1)[-1]} (as shipped)": gguf, "bf16": bf16}, loras


class Server:
    """One server under test: how to start it and how a request names its adapter."""

    def __init__(self, label: str, argv: list[str], port: int, body_for) -> None:
        self.label, self.argv, self.port, self.body_for = label, argv, port, body_for
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> "Server":
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_healthy(self.proc, self.url)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if exc_type is not None:  # show why the server stopped answering
            self.log.seek(0)
            print(f"--- {self.label} log (last lines) ---\n" + "".join(self.log.readlines()[-30:]), file=sys.stderr)
        self.log.close()


def loraplex_server(port: int, base_id: str, quantization: str | None = None) -> Server:
    """``quantization="gguf"``: the GGUF's Q4_1 blocks kept as int4 (the precision llama.cpp runs as shipped)."""
    argv = [sys.executable, "-m", "loraplex", "serve", "--port", str(port), "--log-level", "warning"]
    argv += ["--quantization", quantization] if quantization else []
    label = "loraplex (GGUF kept quantized)" if quantization else "loraplex (bf16)"
    return Server(label, argv, port, lambda adapter: {"model": adapter or base_id})


def weight_bytes(server: Server, path: Path) -> int:
    """What a decode step reads: loraplex's weights as held (``/info``), llama.cpp's GGUF file."""
    if server.label.startswith("loraplex"):
        return int(httpx.get(f"{server.url}/info").json()["memory_bytes"]["weights"])
    return path.stat().st_size


def llama_server(label: str, binary: Path, gguf: Path, loras: list[Path], port: int, slots: int, ctx: int) -> Server:
    threads = str(os.cpu_count() or 1)
    argv = [str(binary), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-t", threads, "-tb", threads,
            "-np", str(slots), "-c", str(slots * ctx), "--lora-init-without-apply"]
    for lora in loras:
        argv += ["--lora", str(lora)]

    def body_for(adapter: str | None) -> dict:  # every adapter's scale, the chosen one at 1
        return {"lora": [{"id": i, "scale": float(name == adapter)} for i, name in enumerate(ADAPTERS)]}

    return Server(label, argv, port, body_for)


async def one(client: httpx.AsyncClient, server: Server, adapter: str | None, prompt: str, n: int) -> dict:
    """One streaming completion: arrival time of each chunk that carries text, and the tokens it generated."""
    body = {**server.body_for(adapter), "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0, times, usage = time.perf_counter(), [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    tokens = usage if usage is not None else len(times)
    return {"t0": t0, "times": times, "tokens": tokens}


async def single(server: Server, prompts: list[str], n: int) -> tuple[float, float]:
    """Median decode tok/s (after the first token) and median TTFT of one client on adapter congcong."""
    rates, ttfts = [], []
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=NO_KEEPALIVE) as client:
        await one(client, server, ADAPTERS[0], prompts[0], n)  # warm-up
        for p in prompts:
            r = await one(client, server, ADAPTERS[0], p, n)
            rates.append((r["tokens"] - 1) / (r["times"][-1] - r["times"][0]))
            ttfts.append(r["times"][0] - r["t0"])
    return statistics.median(rates), statistics.median(ttfts)


async def concurrent(server: Server, clients: int, requests: int, n: int) -> tuple[float, int]:
    """Generated tok/s of ``requests`` completions, ``clients`` at a time, round-robin over base + adapters."""
    models = [None, *ADAPTERS]
    sem = asyncio.Semaphore(clients)

    async def worker(i: int, client: httpx.AsyncClient) -> int:
        async with sem:
            return (await one(client, server, models[i % len(models)], f"{QUESTIONS[i % len(QUESTIONS)]} ({i})",
                              n))["tokens"]

    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=NO_KEEPALIVE) as client:
        await asyncio.gather(*(one(client, server, m, "Hello", 4) for m in models))  # warm-up, adapters resident
        t = time.perf_counter()
        tokens = sum(await asyncio.gather(*(worker(i, client) for i in range(requests))))
        return tokens / (time.perf_counter() - t), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-dir", type=Path, default=os.environ.get("LLAMA_CPP_DIR"),
                    help="llama.cpp source tree with build/bin/llama-server and llama-quantize")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--single", type=int, default=4, help="prompts for the one-client case")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    args = ap.parse_args()
    binary = args.llama_dir and Path(args.llama_dir) / "build" / "bin" / "llama-server"
    if not binary or not binary.is_file():
        print("skipped: no llama-server (give --llama-dir or $LLAMA_CPP_DIR; see this file's docstring)")
        return

    from loraplex.models.registry import resolve_model

    source = resolve_model(None)
    gguf = source.path / source.gguf_file
    prompts = QUESTIONS[:args.single]
    with tempfile.TemporaryDirectory(prefix="loraplex-llamacpp-") as tmp:
        variants, loras = prepare_llamacpp(Path(args.llama_dir), gguf, Path(tmp))
        servers = [(loraplex_server(free_port(), source.model_id), variants["bf16"]),
                   (loraplex_server(free_port(), source.model_id, "gguf"), gguf)]
        servers += [(llama_server(f"llama.cpp {label}", binary, path, loras, free_port(), args.clients,
                                  args.new_tokens + 64), path) for label, path in variants.items()]
        rows = []
        for server, weights in servers:
            with server:
                nbytes = weight_bytes(server, weights)
                rate, ttft = asyncio.run(single(server, prompts, args.new_tokens))
                tps, tokens = asyncio.run(concurrent(server, args.clients, args.requests, args.new_tokens))
            rows.append((server.label, nbytes, rate, ttft, tps, tokens))
        bw = roofline.read_bandwidth()
    cpu, flags = roofline.cpu_model()
    print(f"CPU {cpu} [{' '.join(flags)}], {os.cpu_count()} cores; read bandwidth {bw / 1e9:.1f} GB/s (measured after "
          f"the runs); {source.model_id}; {args.new_tokens} tokens per request; adapters {', '.join(ADAPTERS)}")
    print(f"| server | weights MB | 1 client decode tok/s | of floor | TTFT ms | {args.clients} clients tok/s "
          f"(base + 3 adapters) |\n|---|---|---|---|---|---|")
    for label, nbytes, rate, ttft, tps, tokens in rows:
        floor = bw / nbytes
        print(f"| {label} | {nbytes / 1e6:.0f} | {rate:.1f} | {rate / floor:.0%} | {ttft * 1e3:.0f} | {tps:.1f} |")
    for ours, peer in ((rows[0], rows[3]), (rows[1], rows[2]), (rows[0], rows[2])):  # same precision first
        print(f"{ours[0]} / {peer[0]}: one client {ours[2] / peer[2]:.2f}x, {args.clients} clients "
              f"{ours[4] / peer[4]:.2f}x")


if __name__ == "__main__":
    main()
