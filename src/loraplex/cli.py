"""``loraplex`` command line: ``serve`` (HTTP server), ``generate`` (one prompt, streamed), ``chat`` (interactive,
streamed) and ``merge`` (fold LoRA adapters into the base weights)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator

from loraplex.llm import LLM
from loraplex.models.registry import DEFAULT_MODEL
from loraplex.sampling_params import SamplingParams
from loraplex.scaleout.args import add_cluster_args
from loraplex.server.args import add_limit_args, add_serve_args


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"HF model directory, .gguf file or alias (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", help="auto (= bfloat16), bfloat16, float16 or float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt for the chat template")
    add_limit_args(p)


def _params(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          max_tokens=args.max_tokens)


def stream(llm: LLM, prompt_token_ids: list[int], params: SamplingParams) -> Iterator[str]:
    """Run one request on the engine and yield its text as it grows."""
    engine = llm.llm_engine
    rid = engine.add_request(prompt_token_ids, params)
    sent = 0
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != rid:
                    continue
                text = out.outputs[0].text
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if out.finished:
                    return
    finally:
        engine.abort_request(rid)


def _encode_chat(llm: LLM, messages: list[dict]) -> list[int]:
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def _make_llm(args) -> LLM:
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    return LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, device=args.device,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               deterministic=args.deterministic)


def cmd_generate(args) -> int:
    llm = _make_llm(args)
    if args.raw or not llm.get_tokenizer().chat_template:
        ids = llm.get_tokenizer().encode(args.prompt)
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = _encode_chat(llm, system + [{"role": "user", "content": args.prompt}])
    start = time.perf_counter()
    for delta in stream(llm, ids, _params(args)):
        print(delta, end="", flush=True)
    print()
    print(f"[{time.perf_counter() - start:.2f}s]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    llm = _make_llm(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = ""
        for delta in stream(llm, _encode_chat(llm, history), _params(args)):
            reply += delta
            print(delta, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_serve(args) -> int:
    if args.num_replicas is not None:  # Ray is imported only here
        from loraplex.scaleout.args import check_cluster_args

        check_cluster_args(args)
        try:
            from loraplex.scaleout.ray_serve import serve_cluster
        except ImportError as e:
            raise SystemExit(f"--num-replicas: needs Ray Serve ({e}); pip install 'loraplex[ray]'") from None
        return serve_cluster(args)
    from loraplex.server.serve import serve

    serve(args)
    return 0


def cmd_merge(args) -> int:
    from loraplex.merge import merge_adapters

    out = merge_adapters(args.base, args.adapter, args.weights, args.out, dtype=args.dtype, force=args.force)
    print(f"merged {len(args.adapter)} adapter(s) into {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-LoRA LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="OpenAI + TGI compatible HTTP server over the multi-LoRA engine")
    add_serve_args(s)
    add_cluster_args(s)
    s.set_defaults(fn=cmd_serve)
    g = sub.add_parser("generate", help="generate a completion for one prompt, streamed")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _add_engine_args(g)
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat, streamed")
    _add_engine_args(c)
    c.set_defaults(fn=cmd_chat)
    m = sub.add_parser("merge", help="fold LoRA adapters into the base weights, write an HF model directory")
    m.add_argument("--base", default=DEFAULT_MODEL,
                   help=f"HF model directory, .gguf file or alias (default {DEFAULT_MODEL})")
    m.add_argument("--adapter", action="append", required=True,
                   help="PEFT adapter directory or demo adapter name; repeat for several")
    m.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per adapter (default all 1.0)")
    m.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    m.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: the base's")
    m.add_argument("--force", action="store_true", help="replace a non-empty --out")
    m.set_defaults(fn=cmd_merge)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return args.fn(args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
