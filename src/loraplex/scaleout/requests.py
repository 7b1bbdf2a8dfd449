"""What the ingress reads in a request body: which adapters it names, and the text ``model: "auto"`` routes on.

The same fields the single-node resolver reads (``server/adapters.py``): ``model`` (an adapter, the base, or
``base:adapter``), ``lora_path`` / ``adapter_id`` (LoRAX), TGI's ``parameters.adapter_id``, and mixtures
(``adapters: [{name, weight}]``). The ingress only needs the names; the replica's own app validates the body.
"""
from __future__ import annotations

from dataclasses import dataclass

from loraplex.routing import chat_query


@dataclass(frozen=True)
class Wanted:
    """The adapters a request names, each with the body field that named it (for a 404's ``param``); ``auto``:
    the request asks the router to choose."""

    adapters: tuple[tuple[str, str], ...] = ()
    auto: bool = False


def _str(v) -> str | None:
    return v if isinstance(v, str) and v else None


def wanted(body: dict, base_names: list[str], auto_name: str) -> Wanted:
    """The adapters ``body`` names (no lookup: an unknown name is the caller's 404)."""
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    model = _str(body.get("model")) or ""
    extras = [(v, p) for p, v in (("lora_path", _str(body.get("lora_path"))),
                                  ("adapter_id", _str(body.get("adapter_id") or params.get("adapter_id")))) if v]
    if model == auto_name or any(v == auto_name for v, _ in extras) or any(
            model == f"{b}:{auto_name}" for b in base_names):
        return Wanted(auto=True)
    names: list[tuple[str, str]] = []
    if model and model not in base_names:
        base, sep, rest = model.partition(":")
        if sep and base in base_names:
            if rest:
                names.append((rest, "model"))
        else:
            names.append((model, "model"))
    names += extras
    mixture = body.get("adapters") or params.get("adapters")
    if isinstance(mixture, list):
        names += [(a["name"], "adapters") for a in mixture if isinstance(a, dict) and _str(a.get("name"))]
    seen: dict[str, str] = {}
    for name, param in names:
        seen.setdefault(name, param)
    return Wanted(tuple(seen.items()))


def route_query(body: dict) -> tuple[str, str | None]:
    """(prompt, system) the router scores: the last user message for chat, the prompt(s) for completions, TGI's
    ``inputs``. Token-id prompts are not decoded here (the ingress has no tokenizer): they read as empty."""
    if isinstance(body.get("messages"), list):
        return chat_query([m for m in body["messages"] if isinstance(m, dict)])
    prompt = body.get("prompt", body.get("inputs", body.get("text", "")))
    if isinstance(prompt, list):
        prompt = "\n".join(p for p in prompt if isinstance(p, str))
    return (prompt if isinstance(prompt, str) else ""), None


def routed_body(body: dict, choice: str, base_id: str, auto_name: str) -> dict:
    """``body`` with the router's choice (an adapter or the base id) in place of ``auto``."""
    out = dict(body)
    for key in ("lora_path", "adapter_id"):
        if out.get(key) == auto_name:
            out.pop(key)
    if isinstance(out.get("parameters"), dict) and out["parameters"].get("adapter_id") == auto_name:
        params = dict(out["parameters"])
        params.pop("adapter_id")
        if choice != base_id:
            params["adapter_id"] = choice
        out["parameters"] = params
        return out
    out["model"] = choice
    return out
