"""Untrusted adapter files in, a content-addressed directory out.

An upload is the PEFT files themselves or one ``.tar.gz`` / ``.tgz`` / ``.tar`` / ``.zip`` holding them. Only
``ALLOWED`` file names are taken (in an archive: at the top or under one plain folder), regular files only — no
other paths, links, devices, duplicates or ``..`` —, every byte counted against the size cap while it is read (a
header's stated size is not trusted). Files land in a temporary directory beside the store; once validated they are
renamed to ``<root>/<digest>``, the digest of their names and contents, so the same upload twice is one copy.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import BinaryIO

CONFIG, WEIGHTS, CARD = "adapter_config.json", "adapter_model.safetensors", "adapter_card.json"
ALLOWED = (CONFIG, WEIGHTS, CARD)
ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")
CHUNK = 1 << 20
MAX_MEMBERS = 8  # an archive of one adapter folder holds at most a folder entry and three files


class UploadError(ValueError):
    """A refused upload; the message starts with the offending part (``file: …``)."""


def _copy(src: BinaryIO, dst: Path, budget: list[int], label: str) -> None:
    with open(dst, "wb") as f:
        while chunk := src.read(CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise UploadError(f"file: {label} makes the upload larger than the cap of {budget[1]} bytes")
            f.write(chunk)


def _member_name(name: str, label: str) -> str:
    """The file name an archive member may have: ``ALLOWED`` at the top or under one plain folder."""
    parts = name.replace("\\", "/").strip("/").split("/")
    if name.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts) or len(parts) > 2:
        raise UploadError(f"file: {label} member {name!r} has a path; only {', '.join(ALLOWED)} (at the top or in "
                          "one folder) are taken")
    if parts[-1].endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
        raise UploadError(f"file: {label} member {name!r} is a pickle file and is refused; save the adapter with "
                          "safetensors (adapter_model.safetensors)")
    if parts[-1] not in ALLOWED:
        raise UploadError(f"file: {label} member {name!r} is not one of {', '.join(ALLOWED)}")
    return parts[-1]


def _extract_tar(src: BinaryIO, dest: Path, budget: list[int], label: str) -> None:
    try:
        with tarfile.open(fileobj=src, mode="r:*") as tar:
            for k, m in enumerate(tar):
                if k >= MAX_MEMBERS:
                    raise UploadError(f"file: {label} has more than {MAX_MEMBERS} members")
                if m.isdir() and len(m.name.strip("/").split("/")) == 1 and m.name.strip("/") not in ("", ".", ".."):
                    continue  # the one folder an archive of a directory holds
                name = _member_name(m.name, label)
                if not m.isreg():
                    raise UploadError(f"file: {label} member {m.name!r} is not a regular file (links and devices "
                                      "are refused)")
                if (dest / name).exists():
                    raise UploadError(f"file: {label} holds {name} twice")
                _copy(tar.extractfile(m), dest / name, budget, f"{label}:{m.name}")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UploadError(f"file: {label} is not a readable tar archive ({e})") from None


def _extract_zip(src: BinaryIO, dest: Path, budget: list[int], label: str) -> None:
    try:
        with zipfile.ZipFile(src) as z:
            if len(z.infolist()) > MAX_MEMBERS:
                raise UploadError(f"file: {label} has more than {MAX_MEMBERS} members")
            for info in z.infolist():
                if info.is_dir() and len(info.filename.strip("/").split("/")) == 1 and ".." not in info.filename:
                    continue
                name = _member_name(info.filename, label)
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no file type
                if kind and kind != stat.S_IFREG:
                    raise UploadError(f"file: {label} member {info.filename!r} is not a regular file (links are "
                                      "refused)")
                if info.flag_bits & 0x1:
                    raise UploadError(f"file: {label} member {info.filename!r} is encrypted")
                if (dest / name).exists():
                    raise UploadError(f"file: {label} holds {name} twice")
                with z.open(info) as f:
                    _copy(f, dest / name, budget, f"{label}:{info.filename}")
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as e:
        raise UploadError(f"file: {label} is not a readable zip archive ({e})") from None


def unpack(parts: list[tuple[str, BinaryIO]], dest: Path, max_bytes: int) -> None:
    """Write the uploaded ``(file name, stream)`` parts into the empty directory ``dest``."""
    budget = [max_bytes, max_bytes]  # bytes left, the cap
    if not parts:
        raise UploadError(f"file: no files uploaded; send {CONFIG} and {WEIGHTS} (and optionally {CARD}), or one "
                          f"archive ({', '.join(ARCHIVES)}) holding them")
    first = os.path.basename((parts[0][0] or "").replace("\\", "/"))
    if len(parts) == 1 and first.lower().endswith(ARCHIVES):
        (_extract_zip if first.lower().endswith(".zip") else _extract_tar)(parts[0][1], dest, budget, first)
    else:
        for given, src in parts:  # a browser sends a folder's files as "folder/name"
            name = _member_name(given or "", "upload")
            if (dest / name).exists():
                raise UploadError(f"file: {name} was sent twice")
            _copy(src, dest / name, budget, name)
    missing = [n for n in (CONFIG, WEIGHTS) if not (dest / n).is_file()]
    if missing:
        hint = " (adapter_model.bin is a pickle and is refused; save with safetensors)" if WEIGHTS in missing else ""
        raise UploadError(f"file: the upload has no {' and no '.join(missing)}{hint}")


def content_digest(folder: Path) -> str:
    """SHA-256 over the files' names and contents, in name order."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir()):
        fh = hashlib.sha256()
        with open(folder / name, "rb") as f:
            while chunk := f.read(CHUNK):
                fh.update(chunk)
        h.update(f"{name}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()


def scratch_dir(root: Path) -> Path:
    """A fresh temporary directory on the store's file system (so the final rename is atomic)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".tmp-{uuid.uuid4().hex}"
    path.mkdir()
    return path


def commit(tmp: Path, root: Path) -> tuple[str, Path]:
    """Move validated files to ``root/<digest>``: one copy per content (a second identical upload is dropped)."""
    d = content_digest(tmp)
    final = root / d
    if final.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        return d, final
    try:
        os.rename(tmp, final)
    except OSError:  # another upload of the same files won the rename
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    return d, final
