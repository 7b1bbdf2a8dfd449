"""SGLang's native ``POST /generate``: ``{"text" | "input_ids", "sampling_params": {...}, "lora_path", "stream"}``.

It shares the path with TGI's ``/generate`` (``{"inputs", "parameters"}``); ``is_sglang_body`` tells them apart by
their fields. ``lora_path`` names a served adapter (SGLang's meaning), ``"auto"`` routes. Answers SGLang's shape:
``{"text", "meta_info": {"id", "finish_reason": {"type", ...}, "prompt_tokens", "completion_tokens"}}``; a stream
sends the cumulative text in each ``data:`` event, then ``data: [DONE]``.
"""
from __future__ import annotations

import json
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from loraplex.outputs import RequestOutput
from loraplex.sampling_params import SamplingParams
from loraplex.server.errors import bad_request
from loraplex.server.protocol import SGLangGenerateRequest, SGLangSamplingParams
from loraplex.server.state import caller_of, state_of

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default


def is_sglang_body(raw) -> bool:
    return isinstance(raw, dict) and "inputs" not in raw and ("text" in raw or "input_ids" in raw)


def _params(sp: SGLangSamplingParams, room: int, structured=None) -> SamplingParams:
    max_new = sp.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, room)
    if max_new > room:
        raise bad_request(f"sampling_params.max_new_tokens: {max_new} exceeds the {room} tokens left in the context",
                          "sampling_params.max_new_tokens")
    try:
        return SamplingParams(max_tokens=max_new, min_tokens=sp.min_new_tokens, temperature=sp.temperature,
                              top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p, stop=sp.stop,
                              stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos,
                              repetition_penalty=sp.repetition_penalty, frequency_penalty=sp.frequency_penalty,
                              presence_penalty=sp.presence_penalty, n=sp.n, skip_special_tokens=sp.skip_special_tokens,
                              seed=sp.seed, structured_outputs=structured)
    except ValueError as e:
        name = str(e).split(":")[0]
        raise bad_request(f"sampling_params.{e}", f"sampling_params.{name}") from None


def _meta(out: RequestOutput, rid: str, i: int) -> dict:
    o = out.outputs[i]
    reason = None
    if o.finish_reason == "length":
        reason = {"type": "length", "length": len(o.token_ids)}
    elif o.finish_reason is not None:
        reason = {"type": o.finish_reason, "matched": o.stop_reason}
    return {"id": rid, "finish_reason": reason, "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(o.token_ids), "cached_tokens": 0}


async def generate(body: SGLangGenerateRequest, request: Request):
    st = state_of(request)
    body.refuse_unsupported()
    if (body.text is None) == (body.input_ids is None):
        raise bad_request("text: give text or input_ids (one prompt)", "text")
    ids = st.engine.tokenizer.encode(body.text) if body.text is not None else list(body.input_ids)
    room = st.engine.max_model_len - len(ids)
    if room < 1:
        raise bad_request(f"text: {len(ids)} tokens leave no room to generate", "text")
    constraint = body.sampling_params.constraint()
    if constraint is not None:
        await st.compile_grammar(*constraint)
    params = _params(body.sampling_params, room, constraint and constraint[0])
    st.check_token_ids(ids, "input_ids")
    who = caller_of(request)
    *target, decision = await st.route(st.resolver.base_id, body.lora_path, None, lambda: (
        body.text if body.text is not None else st.engine.tokenizer.decode(ids), None), who)
    sub = await st.submit(*target, ids, params, body.text, decision, who=who)
    rid = uuid.uuid4().hex
    if body.stream:
        async def events():
            async for out in sub.stream:
                for i, o in enumerate(out.outputs):
                    yield f"data: {json.dumps({'text': o.text, 'index': i, 'meta_info': _meta(out, rid, i)})}\n\n"
            yield "data: [DONE]\n\n"

        return st.streaming(sub, events())
    out = await st.wait(request, sub)
    results = [{"text": o.text, "meta_info": _meta(out, rid, i)} for i, o in enumerate(out.outputs)]
    return JSONResponse(results[0] if len(results) == 1 else results, headers=sub.headers)
