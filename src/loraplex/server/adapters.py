"""Which adapter serves a request: ``model`` = adapter name, ``model`` = base id + ``lora_path`` / ``adapter_id``,
or ``model = "base:adapter"``. Unknown names are 404, never a quiet fallback to the base.

With ``--adapter-dir DIR`` every PEFT folder ``DIR/<name>`` is served as ``<name>``: registered when first asked
for (names with path separators or ``..`` are refused as unknown).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from loraplex.lora.request import LoRARequest
from loraplex.server.async_engine import AsyncEngine
from loraplex.server.errors import APIError, bad_request, from_value_error

_SAFE_NAME = re.compile(r"^[\w][\w.\-]*$")


def not_found(name: str, param: str = "model") -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param, "model_not_found")


class AdapterResolver:
    """Maps request fields to ``(served name, LoRARequest | None)``; the served name goes in the response."""

    def __init__(self, engine: AsyncEngine, base_names: list[str], adapter_dir: str | None = None) -> None:
        self.engine = engine
        self.base_names = base_names  # the first is the id /v1/models shows
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        self.draining: set[str] = set()  # adapters being unloaded: no new requests

    @property
    def base_id(self) -> str:
        return self.base_names[0]


    async def resolve(self, model: str, lora_path: str | None = None, adapter_id: str | None = None,
                      visible: Callable[[str], bool] | None = None) -> tuple[str, LoRARequest | None]:
        """``visible(name)``: may the caller use that adapter (else it is unknown to them: 404)."""
        extra = lora_path or adapter_id
        param = "lora_path" if lora_path else "adapter_id"
        if lora_path and adapter_id and lora_path != adapter_id:
            raise bad_request("lora_path: give lora_path or adapter_id, not two different adapters", "lora_path")
        if model in self.base_names or not model:
            if not extra:
                return self.base_id, None
            name = extra
        elif not self.engine.has_adapter(model) and ":" in model and model.split(":", 1)[0] in self.base_names:
            name, param = model.split(":", 1)[1], "model"
            if not name:  # SGLang: "base:" is the base itself
                return self.base_id, None
        else:
            if extra and extra != model:
                raise bad_request(f"{param}: model {model!r} already names an adapter", param)
            name, param = model, "model"
        return name, await self.lora_request(name, param, visible)

    async def lora_request(self, name: str, param: str = "model",
                           visible: Callable[[str], bool] | None = None) -> LoRARequest:
        if visible is not None and not visible(name):
            raise not_found(name, param)
        if name in self.draining:
            raise APIError(404, f"The model `{name}` is being unloaded.", param, "model_not_found")
        req = self.engine.lora_request(name)
        return req if req is not None else await self._discover(name, param)

    def folder(self, name: str) -> str | None:
        """``--adapter-dir/<name>`` when it is a PEFT folder (names with separators or ``..`` never are)."""
        if self.adapter_dir is None or not _SAFE_NAME.match(name) or ".." in name:
            return None
        path = self.adapter_dir / name
        return str(path) if (path / "adapter_config.json").is_file() else None

    async def _discover(self, name: str, param: str) -> LoRARequest:
        path = self.folder(name)
        if path is None:
            raise not_found(name, param)
        req = LoRARequest(name, lora_path=path)
        try:
            await self.engine.load_adapter(req)
        except (ValueError, FileNotFoundError) as e:
            raise from_value_error(e) from None
        return self.engine.lora_request(name)

    def discoverable(self) -> list[str]:
        """Adapter folders under ``--adapter-dir`` not registered yet (listed by /v1/models)."""
        if self.adapter_dir is None or not self.adapter_dir.is_dir():
            return []
        return sorted(p.name for p in self.adapter_dir.iterdir()
                      if (p / "adapter_config.json").is_file() and not self.engine.has_adapter(p.name)
                      and _SAFE_NAME.match(p.name))
