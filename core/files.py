"""Safe file handling: safetensors-only weights, atomic writes, confined output paths, quick hashes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Iterator

from .errors import TuneLabError

SAFE_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def check_safetensors(path: str | os.PathLike, input_name: str) -> Path:
    """Refuse pickle formats and truncated or corrupt safetensors files before anything loads them."""
    p = Path(path)
    if not p.exists():
        raise TuneLabError(f"file not found: {p}", input_name=input_name)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise TuneLabError(
            f"'{p.name}' is a pickle file ({p.suffix}); pickle can run arbitrary code when loaded, so TuneLab loads "
            "weights from .safetensors only. Convert it to .safetensors or download the safetensors variant.",
            input_name=input_name)
    if p.suffix.lower() not in SAFE_SUFFIXES:
        raise TuneLabError(f"'{p.name}' is not a .safetensors file", input_name=input_name)
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, 100 * 1024 * 1024):
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise TuneLabError(f"'{p.name}' is not a valid safetensors file ({e}); it may be corrupt or not a model.",
                           input_name=input_name) from None
    if 8 + header_len + end != size:
        raise TuneLabError(
            f"'{p.name}' is truncated or corrupt: its header describes {8 + header_len + end} bytes but the file has "
            f"{size}. Download it again.", input_name=input_name)
    return p


def safetensors_metadata(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def sha256_file(path: str | os.PathLike, quick_over: int = 512 * 1024 * 1024) -> str:
    """Full sha256, or for files over `quick_over` bytes a quick hash of size + first and last 8 MiB ("quick:" prefix)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= quick_over:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(8 << 20))
        f.seek(-(8 << 20), os.SEEK_END)
        h.update(f.read())
    return "quick:" + h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync and rename it into place, on failure remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: it creates 0600 files, and datasets are shared between users and machines
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def confined_path(root: str | os.PathLike, name: str, input_name: str) -> Path:
    """Resolve a free-text relative name inside `root`. Absolute paths, '..' and symlinks that lead out are refused:
    these strings reach the server through POST /prompt from anyone who can reach it."""
    if not isinstance(name, str) or not name.strip():
        raise TuneLabError("an output name is required", input_name=input_name)
    name = name.strip()
    if os.path.isabs(name) or name.startswith(("~", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise TuneLabError(f"'{name}' is an absolute path; give a name relative to the output folder",
                           input_name=input_name)
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts:
        raise TuneLabError(f"'{name}' contains '..'; give a name inside the output folder", input_name=input_name)
    root_real = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root_real / Path(*parts)))
    if os.path.commonpath([root_real, target]) != str(root_real):
        raise TuneLabError(f"'{name}' leads outside the output folder (through a symlink); choose another name",
                           input_name=input_name)
    return target
