"""TGI / LoRAX routes: ``POST /generate``, ``POST /generate_stream``, ``POST /`` (either, by ``stream``) and
``GET /info``. The adapter comes from ``parameters.adapter_id`` (a served name; with LoRAX's
``adapter_source: "local"`` a directory, loaded on first use where the server may read it), or LoRAX's
``merged_adapters`` (``linear``: a per-request mixture). ``/generate`` also takes SGLang's native body
(``text`` / ``input_ids`` + ``sampling_params``, see ``sglang_api``), told apart by its fields."""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loraplex import __version__
from loraplex.outputs import CompletionOutput, RequestOutput, most_likely
from loraplex.sampling_params import SamplingParams
from loraplex.server import sglang_api
from loraplex.server.errors import bad_request, parse_body, read_json
from loraplex.server.openapi import GENERATION, SSE, errors, with_content
from loraplex.server.protocol import MAX_STOP_SEQUENCES, AdapterWeight, TGIGenerateRequest
from loraplex.server.state import Caller, ServerState, Submitted, caller_of, state_of

router = APIRouter()
# /generate takes TGI's body or SGLang's (told apart by their fields)
GENERATE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    {"$ref": "#/components/schemas/TGIGenerateRequest"}, {"$ref": "#/components/schemas/SGLangGenerateRequest"}]}}}}}
DEFAULT_MAX_NEW_TOKENS = 100
_FINISH = {"stop": "stop_sequence", "length": "length"}


def _finish_reason(o: CompletionOutput, eos_ids) -> str:
    if o.finish_reason == "stop" and (o.stop_reason is None or o.stop_reason in eos_ids):
        return "eos_token"
    return _FINISH.get(o.finish_reason, o.finish_reason or "length")


def _params(body: TGIGenerateRequest, st: ServerState, prompt_len: int, structured=None) -> SamplingParams:
    p = body.parameters
    sample = p.do_sample or (p.temperature not in (None, 0)) or p.top_p is not None or p.top_k is not None
    room = st.engine.max_model_len - prompt_len
    max_new = p.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, room)
    if room < 1 or max_new > room:
        raise bad_request(f"parameters.max_new_tokens: {max_new} + {prompt_len} input tokens exceed "
                          f"max_total_tokens {st.engine.max_model_len}", "parameters.max_new_tokens")
    try:
        return SamplingParams(temperature=(p.temperature or 1.0) if sample else 0.0, top_p=p.top_p or 1.0,
                              top_k=p.top_k or 0, repetition_penalty=p.repetition_penalty or 1.0,
                              frequency_penalty=p.frequency_penalty or 0.0, seed=p.seed, max_tokens=max_new,
                              stop=p.stop, logprobs=max(p.top_n_tokens or 0, p.return_k_alternatives or 0),
                              prompt_logprobs=0 if p.decoder_input_details else None,
                              ignore_eos=p.ignore_eos_token, skip_special_tokens=False,
                              structured_outputs=structured)
    except ValueError as e:
        raise bad_request(f"parameters.{e}", "parameters." + str(e).split(":")[0]) from None


def _as_token(st: ServerState, tid: int, logprob: float | None) -> dict:
    return {"id": tid, "text": st.engine.tokenizer.decode([tid]), "logprob": logprob,
            "special": tid in st.engine.tokenizer.all_special_ids}


def _token(st: ServerState, out: CompletionOutput, i: int, p) -> dict:
    """Generated token ``i``; with LoRAX's ``return_k_alternatives``, its alternatives."""
    tid = out.token_ids[i]
    entry = out.logprobs[i] if out.logprobs else {}
    tok = _as_token(st, tid, entry[tid].logprob if tid in entry else None)
    if p.return_k_alternatives:
        tok["alternative_tokens"] = [{"id": t, "text": lp.decoded_token, "logprob": lp.logprob}
                                     for t, lp in most_likely(entry, p.return_k_alternatives)]
    return tok


def _top_tokens(st: ServerState, out: CompletionOutput, i: int, n: int) -> list[dict]:
    """TGI's ``top_n_tokens`` at generated position ``i``."""
    return [_as_token(st, t, lp.logprob) for t, lp in most_likely(out.logprobs[i] if out.logprobs else {}, n)]


def _prefill(st: ServerState, out: RequestOutput) -> list[dict]:
    """TGI's ``decoder_input_details``: every prompt token with its log-probability (None for the first)."""
    plp = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    return [{"id": t, "text": st.engine.tokenizer.decode([t]), "logprob": None if e is None else e[t].logprob}
            for t, e in zip(out.prompt_token_ids, plp)]


async def _adapter(st: ServerState, p, who: Caller) -> tuple[str | None, list | None]:
    """``(adapter_id, mixture)`` from TGI / LoRAX parameters."""
    if p.merged_adapters is not None:
        m = p.merged_adapters
        if p.adapter_id or p.adapters:
            raise bad_request("parameters.merged_adapters: give adapter_id or merged_adapters, not both",
                              "parameters.merged_adapters")
        if m.merge_strategy not in (None, "linear"):
            raise bad_request(f"parameters.merged_adapters.merge_strategy: only 'linear' is served (a per-request "
                              f"mixture), got {m.merge_strategy!r}", "parameters.merged_adapters.merge_strategy")
        if len(m.ids) != len(m.weights):
            raise bad_request("parameters.merged_adapters.weights: one weight per id", "parameters.merged_adapters")
        return None, [AdapterWeight(name=i, weight=w) for i, w in zip(m.ids, m.weights)]
    if p.adapter_source not in (None, "hub", "local"):
        raise bad_request(f"parameters.adapter_source: {p.adapter_source!r} is not served here (only 'local' "
                          "directories and served adapter names)", "parameters.adapter_source")
    if p.adapter_source == "local" and p.adapter_id and not st.engine.has_adapter(p.adapter_id):
        await st.load_local(p.adapter_id, "parameters.adapter_id", who)
    return p.adapter_id, p.adapters


async def _submit(body: TGIGenerateRequest, request: Request) -> tuple[ServerState, Submitted, list[int]]:
    st = state_of(request)
    body.refuse_unsupported()
    body.parameters.refuse_unsupported()
    ids = st.engine.tokenizer.encode(body.inputs)
    constraint = body.parameters.constraint()
    if constraint is not None:
        await st.compile_grammar(*constraint)
    params = _params(body, st, len(ids), constraint and constraint[0])
    who = caller_of(request)
    adapter_id, mixture = await _adapter(st, body.parameters, who)
    *target, decision = await st.route(st.resolver.base_id, None, adapter_id, lambda: (body.inputs, None), who)
    sub = await st.submit(*target, ids, params, body.inputs, decision, mixture, who=who)
    return st, sub, ids


def _details(st: ServerState, out: RequestOutput, body: TGIGenerateRequest) -> dict:
    o, p = out.outputs[0], body.parameters
    details = {"finish_reason": _finish_reason(o, st.engine.eos_token_ids),
               "prompt_tokens": len(out.prompt_token_ids), "generated_tokens": len(o.token_ids), "seed": p.seed,
               "prefill": _prefill(st, out) if p.decoder_input_details else [],
               "tokens": [_token(st, o, i, p) for i in range(len(o.token_ids))]}
    if p.top_n_tokens:
        details["top_tokens"] = [_top_tokens(st, o, i, p.top_n_tokens) for i in range(len(o.token_ids))]
    return details


@router.post("/generate", responses={**with_content(SSE), **GENERATION, **errors(403)},
             openapi_extra=GENERATE_BODY)
async def generate(request: Request):
    raw = await read_json(request)
    if isinstance(raw, dict) and "inputs" in raw and ("text" in raw or "input_ids" in raw):
        raise bad_request("inputs: give TGI's inputs or SGLang's text / input_ids, not both", "inputs")
    if sglang_api.is_sglang_body(raw):
        return await sglang_api.generate(parse_body(sglang_api.SGLangGenerateRequest, raw), request)
    return await _generate(parse_body(TGIGenerateRequest, raw), request)


async def _generate(body: TGIGenerateRequest, request: Request):
    st, sub, _ = await _submit(body, request)
    out = await st.wait(request, sub)
    text = (body.inputs if body.parameters.return_full_text else "") + out.outputs[0].text
    result = {"generated_text": text}
    if body.parameters.details:
        result["details"] = _details(st, out, body)
    return JSONResponse(result, headers=sub.headers)


@router.post("/generate_stream", responses={**with_content(SSE), **GENERATION, **errors(403)})
async def generate_stream(body: TGIGenerateRequest, request: Request):
    st, sub, _ = await _submit(body, request)

    async def events():
        sent = 0
        async for out in sub.stream:
            o = out.outputs[0]
            for i in range(sent, len(o.token_ids)):
                last = out.finished and i == len(o.token_ids) - 1
                p = body.parameters
                event = {"index": i + 1, "token": _token(st, o, i, p), "generated_text": None, "details": None}
                if p.top_n_tokens:
                    event["top_tokens"] = _top_tokens(st, o, i, p.top_n_tokens)
                if last:
                    event["generated_text"] = (body.inputs if p.return_full_text else "") + o.text
                    event["details"] = {"finish_reason": _finish_reason(o, st.engine.eos_token_ids),
                                        "prompt_tokens": len(out.prompt_token_ids),
                                        "generated_tokens": len(o.token_ids), "seed": p.seed}
                yield f"data:{json.dumps(event, ensure_ascii=False)}\n\n"
            sent = len(o.token_ids)

    return st.streaming(sub, events())


@router.post("/", responses={**with_content(SSE), **GENERATION, **errors(403)})
async def compat_generate(body: TGIGenerateRequest, request: Request):
    """TGI's root route (what ``InferenceClient(url).text_generation`` posts to): stream or not by ``stream``."""
    if body.stream:
        return await generate_stream(body, request)
    resp = await _generate(body, request)
    return JSONResponse([json.loads(resp.body)],
                        headers={k: v for k, v in resp.headers.items() if k.startswith("x-loraplex-")})


@router.get("/info")
async def info(request: Request):
    st = state_of(request)
    e = st.engine.info()
    return {"model_id": st.resolver.base_id, "model_sha": None, "model_dtype": e["dtype"],
            "model_device_type": e["device"], "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": st.engine.max_waiting, "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_tokens": st.engine.max_model_len - 1, "max_total_tokens": st.engine.max_model_len,
            "max_batch_total_tokens": e["max_num_batched_tokens"], "validation_workers": 1,
            "max_client_batch_size": 1, "router": "loraplex", "version": __version__, "sha": None,
            "docker_label": None, "lora_adapters": st.engine.adapter_names(),
            "quantization": e["quantization"], "memory_bytes": e["memory_bytes"],  # loraplex's own fields
            "deterministic": e["deterministic"], "cpu_threads": e["cpu_threads"], "kernels": e["kernels"]}
