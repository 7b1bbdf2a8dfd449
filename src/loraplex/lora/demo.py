"""The demo adapters shipped inside the package (trained by scripts/train_demo_adapters.py on SmolLM2)."""
from __future__ import annotations

import os
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent / "adapters"


def demo_adapters() -> dict[str, Path]:
    """``name -> directory`` of every shipped demo adapter (for the default model SmolLM2-135M-Instruct)."""
    if not DEMO_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(DEMO_DIR.iterdir()) if (p / "adapter_config.json").is_file()}


def resolve_adapter_path(path: str) -> str:
    """A directory as given, or the name of a demo adapter (``"congcong"``) → its shipped directory."""
    expanded = os.path.expanduser(path)  # unlike Path.expanduser, leaves "~unknown-user" as it is
    if Path(expanded).is_dir():
        return expanded
    demo = demo_adapters().get(path)
    return str(demo) if demo is not None else path
