"""TGI-compatible routes: ``POST /generate``, ``POST /generate_stream``, ``POST /`` (either, by ``stream``) and
``GET /info``; the adapter comes from ``parameters.adapter_id`` (LoRAX / TGI multi-LoRA)."""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loraplex import __version__
from loraplex.outputs import CompletionOutput, RequestOutput
from loraplex.sampling_params import SamplingParams
from loraplex.server.errors import bad_request
from loraplex.server.protocol import MAX_STOP_SEQUENCES, TGIGenerateRequest
from loraplex.server.state import ServerState, Submitted, state_of

router = APIRouter()
DEFAULT_MAX_NEW_TOKENS = 100
_FINISH = {"stop": "stop_sequence", "length": "length"}


def _finish_reason(o: CompletionOutput, eos_ids) -> str:
    if o.finish_reason == "stop" and (o.stop_reason is None or o.stop_reason in eos_ids):
        return "eos_token"
    return _FINISH.get(o.finish_reason, o.finish_reason or "length")


def _params(body: TGIGenerateRequest, st: ServerState, prompt_len: int) -> SamplingParams:
    p = body.parameters
    p.refuse_unsupported()
    if p.best_of not in (None, 1):
        raise bad_request("parameters.best_of: only 1 is supported", "parameters.best_of")
    if p.grammar is not None:
        raise bad_request("parameters.grammar: not supported by this server", "parameters.grammar")
    sample = p.do_sample or (p.temperature not in (None, 0)) or p.top_p is not None or p.top_k is not None
    room = st.max_model_len - prompt_len
    max_new = p.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, room)
    if room < 1 or max_new > room:
        raise bad_request(f"parameters.max_new_tokens: {max_new} + {prompt_len} input tokens exceed "
                          f"max_total_tokens {st.max_model_len}", "parameters.max_new_tokens")
    try:
        return SamplingParams(temperature=(p.temperature or 1.0) if sample else 0.0, top_p=p.top_p or 1.0,
                              top_k=p.top_k or 0, repetition_penalty=p.repetition_penalty or 1.0,
                              frequency_penalty=p.frequency_penalty or 0.0, seed=p.seed, max_tokens=max_new,
                              stop=p.stop, logprobs=p.top_n_tokens or 0, skip_special_tokens=False)
    except ValueError as e:
        raise bad_request(f"parameters.{e}", "parameters." + str(e).split(":")[0]) from None


def _token(st: ServerState, out: CompletionOutput, i: int) -> dict:
    tid = out.token_ids[i]
    lp = out.logprobs[i][tid] if out.logprobs else None
    tok = {"id": tid, "text": st.tokenizer.decode([tid]), "logprob": lp.logprob if lp else None,
           "special": tid in st.tokenizer.all_special_ids}
    return tok


async def _submit(body: TGIGenerateRequest, request: Request) -> tuple[ServerState, Submitted, list[int]]:
    st = state_of(request)
    body.refuse_unsupported()
    ids = st.tokenizer.encode(body.inputs)
    params = _params(body, st, len(ids))
    *target, decision = await st.route(st.resolver.base_id, None, body.parameters.adapter_id,
                                       lambda: (body.inputs, None))
    sub = await st.submit(*target, ids, params, body.inputs, decision, body.parameters.adapters)
    return st, sub, ids


def _details(st: ServerState, out: RequestOutput, body: TGIGenerateRequest) -> dict:
    o = out.outputs[0]
    return {"finish_reason": _finish_reason(o, st.engine.eos_token_ids),
            "generated_tokens": len(o.token_ids), "seed": body.parameters.seed, "prefill": [],
            "tokens": [_token(st, o, i) for i in range(len(o.token_ids))]}


@router.post("/generate")
async def generate(body: TGIGenerateRequest, request: Request):
    st, sub, _ = await _submit(body, request)
    out = await st.wait(request, sub)
    text = (body.inputs if body.parameters.return_full_text else "") + out.outputs[0].text
    result = {"generated_text": text}
    if body.parameters.details:
        result["details"] = _details(st, out, body)
    return JSONResponse(result, headers=sub.headers)


@router.post("/generate_stream")
async def generate_stream(body: TGIGenerateRequest, request: Request):
    st, sub, _ = await _submit(body, request)

    async def events():
        sent = 0
        async for out in sub.stream:
            o = out.outputs[0]
            for i in range(sent, len(o.token_ids)):
                last = out.finished and i == len(o.token_ids) - 1
                event = {"index": i + 1, "token": _token(st, o, i), "generated_text": None, "details": None}
                if last:
                    event["generated_text"] = (body.inputs if body.parameters.return_full_text else "") + o.text
                    event["details"] = {"finish_reason": _finish_reason(o, st.engine.eos_token_ids),
                                        "generated_tokens": len(o.token_ids), "seed": body.parameters.seed}
                yield f"data:{json.dumps(event, ensure_ascii=False)}\n\n"
            sent = len(o.token_ids)

    return st.streaming(sub, events())


@router.post("/")
async def compat_generate(body: TGIGenerateRequest, request: Request):
    """TGI's root route (what ``InferenceClient(url).text_generation`` posts to): stream or not by ``stream``."""
    if body.stream:
        return await generate_stream(body, request)
    resp = await generate(body, request)
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
            "max_input_tokens": st.max_model_len - 1, "max_total_tokens": st.max_model_len,
            "max_batch_total_tokens": e["max_num_batched_tokens"], "validation_workers": 1,
            "max_client_batch_size": 1, "router": "loraplex", "version": __version__, "sha": None,
            "docker_label": None, "lora_adapters": st.engine.adapter_names()}
