"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (plain and SSE)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loraplex.outputs import RequestOutput, most_likely
from loraplex.routing import chat_query
from loraplex.server.adapters import not_found
from loraplex.server.errors import bad_request
from loraplex.server.openapi import GENERATION, SSE, errors, with_content
from loraplex.server.protocol import ChatCompletionRequest, CompletionRequest
from loraplex.server.state import Caller, ServerState, Submitted, caller_of, state_of
from loraplex.server.tools import ToolPlan, ToolStream, plan_tools, render_messages, tool_calls_json

router = APIRouter()


async def _model_cards(st: ServerState, who: Caller) -> list[dict]:
    created = int(st.started)
    data = [{"id": st.resolver.base_id, "object": "model", "created": created, "owned_by": "loraplex",
             "root": st.model_path, "parent": None, "max_model_len": st.engine.max_model_len}]
    for row in await st.adapters(who):
        data.append({"id": row["name"], "object": "model", "created": created, "owned_by": "loraplex",
                     "root": row["path"], "parent": st.resolver.base_id, "max_model_len": None,
                     **({"card": row["card"]} if row.get("card") else {})})
    return data


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": await _model_cards(state_of(request), caller_of(request))}


@router.get("/v1/models/{model_id:path}", responses=errors(404))
async def retrieve_model(model_id: str, request: Request):
    """One model: the base (under any of its served names) or an adapter, as in the list."""
    st = state_of(request)
    cards = await _model_cards(st, caller_of(request))
    if model_id in st.resolver.base_names:
        return cards[0]
    card = next((c for c in cards[1:] if c["id"] == model_id), None)
    if card is None:
        raise not_found(model_id)
    return card


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(out: RequestOutput) -> dict:
    completion = sum(len(o.token_ids) for o in out.outputs)
    return {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": completion,
            "total_tokens": len(out.prompt_token_ids) + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens or 0}}


def _top(entry: dict, k: int, chat: bool) -> list:
    """The ``k`` most likely tokens at one position, as OpenAI lists them."""
    return [{"token": lp.decoded_token, "logprob": lp.logprob,
             **({"bytes": list((lp.decoded_token or "").encode())} if chat else {})} for _, lp in most_likely(entry, k)]


def chat_logprobs(entries: list[dict], k: int) -> dict:
    content = []
    for entry in entries:
        lp = next(iter(entry.values()))  # the sampled token comes first
        content.append({"token": lp.decoded_token, "logprob": lp.logprob,
                        "bytes": list((lp.decoded_token or "").encode()), "top_logprobs": _top(entry, k, True)})
    return {"content": content}


def completion_logprobs(entries: list, k: int, offset: int, first_token: str | None = None) -> dict:
    """Legacy completions logprobs. ``entries`` are the generated positions (or, with ``echo``, the prompt's
    first: ``None``, nothing predicts it — shown as ``first_token`` — then the prompt's and the generated ones).
    ``top_logprobs`` holds the chosen token and the ``k`` most likely (so ``logprobs: 0`` still shows the chosen)."""
    tokens, lps, tops, offsets = [], [], [], []
    for entry in entries:
        if entry is None:
            tokens.append(first_token)
            lps.append(None)
            tops.append(None)
        else:
            lp = next(iter(entry.values()))
            tokens.append(lp.decoded_token)
            lps.append(lp.logprob)
            tops.append({lp.decoded_token: lp.logprob, **{t["token"]: t["logprob"] for t in _top(entry, k, False)}})
        offsets.append(offset)
        offset += len(tokens[-1] or "")
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_json(plp) -> list | None:
    """vLLM's ``prompt_logprobs``: per prompt position ``None`` (the first) or ``{token id: {logprob, rank,
    decoded_token}}`` with the prompt token first."""
    if plp is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in plp]


async def _chat_constraint(st: ServerState, body: ChatCompletionRequest, plan: ToolPlan):
    """The request's one constraint (``response_format`` / vLLM's fields, or the grammar of a forced tool call),
    compiled now: a tool schema, JSON schema, regex or grammar that does not compile is a 400 naming its field."""
    own, forced = body.constraint(), plan.constraint()
    if own is not None and forced is not None:
        raise bad_request(f"tool_choice: a forced tool call cannot be combined with {own[1]}", "tool_choice")
    for spec, param in plan.schemas():
        await st.compile_grammar(spec, param)
    constraint = forced or own
    if constraint is not None:
        await st.compile_grammar(*constraint)
    return None if constraint is None else constraint[0]


def _finish(o, calls: list) -> str | None:
    return "tool_calls" if calls and o.finish_reason == "stop" else o.finish_reason


@router.post("/v1/chat/completions", responses={**with_content(SSE), **GENERATION})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = state_of(request)
    body.refuse_unsupported()
    template = getattr(st.engine.tokenizer, "chat_template", None)
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, template, st.tool_call_parser)
    structured = await _chat_constraint(st, body, plan)
    conversation, tools = render_messages(body.conversation(), plan, template)
    prompt_ids = st.encode_chat(conversation, body.add_generation_prompt, body.chat_template_kwargs, tools)
    want_lp = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs: requires logprobs=true", "top_logprobs")
    keep_special = plan.mode == "auto" and not plan.parser.skip_special_tokens  # its call marker is a special token
    params = body.sampling_params(body.max_completion_tokens or body.max_tokens, len(prompt_ids),
                                  st.engine.max_model_len, want_lp, structured=structured,
                                  skip_special_tokens=False if keep_special else None)
    who = caller_of(request)
    *target, decision = await st.route(body.model, body.lora_path, body.adapter_id,
                                       lambda: chat_query(body.conversation()), who)
    sub = await st.submit(*target, prompt_ids, params, None, decision, body.adapters, who=who)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": sub.served_name}
    if body.stream:
        return st.streaming(sub, _chat_chunks(head, sub, body, want_lp is not None, plan))
    out = await st.wait(request, sub)
    choices = []
    for o in out.outputs:
        content, calls = plan.parse(o.text)
        message = {"role": "assistant", "content": content, **({"tool_calls": tool_calls_json(calls)} if calls else {})}
        choices.append({"index": o.index, "message": message, "finish_reason": _finish(o, calls),
                        "logprobs": chat_logprobs(o.logprobs, want_lp)
                        if want_lp is not None and o.logprobs is not None else None})
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage(out),
                         "prompt_logprobs": prompt_logprobs_json(out.prompt_logprobs)}, headers=sub.headers)


async def _chat_chunks(head: dict, sub: Submitted, body: ChatCompletionRequest, with_lp: bool,
                       plan: ToolPlan) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    for i in range(body.n):
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    last: list = [None]
    texts, tool_streams = [""] * body.n, [ToolStream(plan) for _ in range(body.n)]
    async for i, delta, entries, _, finish in _deltas(sub, body.n, last):
        lp = chat_logprobs(entries, body.top_logprobs or 0) if with_lp and entries is not None else None
        if plan.mode == "none":
            deltas = [{"content": delta}] if delta else []
        else:
            texts[i] += delta
            deltas = tool_streams[i].feed(texts[i], finish is not None)
        if finish is not None and tool_streams[i].called and finish == "stop":
            finish = "tool_calls"
        deltas = deltas or [{}]
        for k, d in enumerate(deltas):
            if not d and finish is None and lp is None:
                continue  # held back (it may be the start of a tool call): nothing to send yet
            yield sse({**head, "choices": [{"index": i, "delta": d, "logprobs": lp if k == 0 else None,
                                            "finish_reason": finish if k == len(deltas) - 1 else None}],
                       **({"usage": usage(last[0])} if body.continuous_usage else {})})
    if body.include_usage and last[0] is not None:
        yield sse({**head, "choices": [], "usage": usage(last[0])})
    yield sse("[DONE]")


def _completion_prompts(st: ServerState, prompt) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        return [(prompt, st.engine.tokenizer.encode(prompt))]
    if not prompt:
        raise bad_request("prompt: must not be empty", "prompt")
    if all(isinstance(t, int) for t in prompt):
        st.check_token_ids(prompt, "prompt")
        return [(None, list(prompt))]
    if all(isinstance(p, str) for p in prompt):
        return [(p, st.engine.tokenizer.encode(p)) for p in prompt]
    for p in prompt:
        st.check_token_ids(p, "prompt")
    return [(None, list(p)) for p in prompt]


@router.post("/v1/completions", responses={**with_content(SSE), **GENERATION})
async def completions(body: CompletionRequest, request: Request):
    st = state_of(request)
    body.refuse_unsupported()
    prompts = _completion_prompts(st, body.prompt)
    if body.stream and len(prompts) > 1:
        raise bad_request("prompt: streaming takes one prompt", "prompt")
    constraint = body.constraint()
    if constraint is not None:
        await st.compile_grammar(*constraint)
    # one decision per request (several prompts are read together): the response names one model
    who = caller_of(request)
    *target, decision = await st.route(body.model, body.lora_path, body.adapter_id, lambda: (
        "\n".join(text if text is not None else st.engine.tokenizer.decode(ids) for text, ids in prompts), None), who)
    subs = []
    try:
        # echo with logprobs shows the prompt tokens' logprobs too: the engine scores the prompt
        echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
        for text, ids in prompts:
            params = body.sampling_params(body.max_tokens, len(ids), st.engine.max_model_len, body.logprobs,
                                          max(echo_lp, body.prompt_logprobs or 0) if echo_lp is not None else None,
                                          structured=constraint and constraint[0])
            subs.append(await st.submit(*target, ids, params, text, decision if not subs else None, body.adapters,
                                        who=who))
    except BaseException:
        for s in subs:
            s.stream.abort()
        raise
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": subs[0].served_name}
    if body.stream:
        return st.streaming(subs[0], _completion_chunks(head, subs[0], body, prompts[0][0]))
    outs = await asyncio.gather(*(st.wait(request, s) for s in subs))
    choices = []
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
             "prompt_tokens_details": {"cached_tokens": 0}}
    for k, ((text, _), out) in enumerate(zip(prompts, outs)):
        tok = st.engine.tokenizer
        echo = (text if text is not None else tok.decode(out.prompt_token_ids)) if body.echo else ""
        for o in out.outputs:
            lp = None
            if body.logprobs is not None and body.echo:
                lp = completion_logprobs((out.prompt_logprobs or []) + (o.logprobs or []), body.logprobs, 0,
                                         tok.decode(out.prompt_token_ids[:1]))
            elif body.logprobs is not None and o.logprobs is not None:
                lp = completion_logprobs(o.logprobs, body.logprobs, len(echo))
            choices.append({"index": k * body.n + o.index, "text": echo + o.text, "logprobs": lp,
                            "finish_reason": o.finish_reason,
                            "prompt_logprobs": prompt_logprobs_json(out.prompt_logprobs)
                            if body.prompt_logprobs is not None else None})
        u = usage(out)
        total = {**{key: total[key] + u[key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")},
                 "prompt_tokens_details": {"cached_tokens": total["prompt_tokens_details"]["cached_tokens"]
                                           + u["prompt_tokens_details"]["cached_tokens"]}}
    return JSONResponse({**head, "choices": choices, "usage": total}, headers=subs[0].headers)


async def _completion_chunks(head: dict, sub: Submitted, body: CompletionRequest, prompt: str | None):
    last: list = [None]
    if body.echo:
        for i in range(body.n):
            yield sse({**head, "choices": [{"index": i, "text": prompt or "", "logprobs": None,
                                            "finish_reason": None}]})
    async for i, delta, entries, offset, finish in _deltas(sub, body.n, last):
        lp = (completion_logprobs(entries, body.logprobs, offset)
              if body.logprobs is not None and entries is not None else None)
        yield sse({**head, "choices": [{"index": i, "text": delta, "logprobs": lp, "finish_reason": finish}],
                   **({"usage": usage(last[0])} if body.continuous_usage else {})})
    if body.include_usage and last[0] is not None:
        yield sse({**head, "choices": [], "usage": usage(last[0])})
    yield sse("[DONE]")


async def _deltas(sub: Submitted, n: int, last: list):
    """What is new in each of the ``n`` completions since the previous chunk: ``(index, text delta, new logprob
    entries or None, offset of the delta in the text, finish_reason)``. ``last[0]`` keeps the latest output."""
    sent_text, sent_tok = [0] * n, [0] * n
    async for out in sub.stream:
        last[0] = out
        for o in out.outputs:
            i, ntok = o.index, len(o.token_ids)
            delta, offset = o.text[sent_text[i]:], sent_text[i]
            if not delta and o.finish_reason is None:
                continue
            sent_text[i], entries = len(o.text), (o.logprobs[sent_tok[i]:ntok] if o.logprobs is not None else None)
            sent_tok[i] = ntok
            yield i, delta, entries, offset, o.finish_reason
