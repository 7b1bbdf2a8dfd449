"""Small C kernels for the CPU, built at first use and loaded with ctypes.

Each source beside this file is compiled with the system C compiler (``gcc -O3 -march=native -fopenmp``,
about a second) into ``$LORAPLEX_CACHE/ext/`` keyed by the source, the CPU and the compiler, and
shares torch's OpenMP runtime. Where that fails (no compiler, another platform) ``library`` returns None, the
reason is logged once, and the caller keeps its torch form. ``LORAPLEX_NO_C_KERNELS=1`` turns every C kernel off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("loraplex.ops")

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
EXACT = ("-ffp-contract=off",)  # no fused multiply-adds: for kernels that round where their torch reference does


def _cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex")) / "ext"


def _cpu_id() -> bytes:
    """The first CPU's model name and flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    return "\n".join(next((x for x in lines if x.startswith(k)), "") for k in ("model name", "flags")).encode()


def _sources() -> bytes:
    """Every C source and header beside this file (what a source may include)."""
    here = Path(__file__).parent
    return b"".join(h.read_bytes() for h in sorted([*here.glob("*.h"), *here.glob("*.c")]))


@functools.cache
def sources_key() -> str:
    """A hash of the C kernels' sources: measurements of their speed (``engine.quant_plan``, ``kernel_choice``) are
    cached under it, so a changed kernel is measured again."""
    return hashlib.sha256(_sources()).hexdigest()[:12]


def _build_key(cc: str, source: Path, flags: tuple[str, ...]) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    key = source.read_bytes() + _sources() + _cpu_id() + version.encode() + " ".join(flags).encode()
    return hashlib.sha256(key).hexdigest()[:16]


@functools.cache
def library(name: str, what: str, exact: bool = False) -> ctypes.CDLL | None:
    """The built ``ops/<name>.c`` (``what``: the kernels it holds, for the log; ``exact``: compiled with ``EXACT``),
    or None where C kernels are off or cannot be built."""
    if os.environ.get("LORAPLEX_NO_C_KERNELS") == "1":
        log.info("C kernels off (LORAPLEX_NO_C_KERNELS=1): %s in torch", what)
        return None
    source = Path(__file__).with_name(f"{name}.c")
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None or not source.is_file():
        log.warning("no C compiler found: %s in torch", what)
        return None
    try:
        flags = FLAGS + EXACT if exact else FLAGS
        lib_path = _cache_dir() / f"{name}-{_build_key(cc, source, flags)}.so"
        if not lib_path.is_file():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                out = Path(tmp) / lib_path.name
                subprocess.run([cc, *flags, "-o", str(out), str(source), "-lm"], check=True, capture_output=True,
                               text=True, timeout=120)
                out.replace(lib_path)  # atomic: a concurrent process sees the whole file or none
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("C kernels %s unavailable (%s): %s in torch", name, str(detail).strip()[:300], what)
        return None
    log.info("C kernels built (%s): %s", what, lib_path)
    return lib
