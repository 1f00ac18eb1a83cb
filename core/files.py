"""Safe file handling: safetensors-only weights, atomic writes, confined output paths, quick hashes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
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


_TEMP = re.compile(r"^\.(.+)\.[^.]+\.tmp$")  # atomic_path's temporary names: .<final name>.<random>.tmp


def remove_temps(folders, owns) -> list:
    """Delete the temporaries atomic_path left in `folders` when its writer was killed, those whose final name
    `owns(name)` accepts (a shard removes only its own: another shard may be writing right now). Returns them."""
    removed = []
    for d in map(Path, folders):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            m = _TEMP.match(p.name)
            if m and p.is_file() and owns(m.group(1)):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def confined_path(root: str | os.PathLike, name: str, input_name: str, *, root_label: str = "the output folder",
                  where: str = "") -> Path:
    """Resolve a free-text relative name inside `root`. Absolute paths, '..' and symlinks that lead out are refused:
    these strings reach the server through POST /prompt from anyone who can reach it (and table cells come from
    files anyone may have written). `root_label` names the root in messages ("the input folder", "the table's
    folder" ...); `where` says where the name came from (e.g. "row 3").

    The name (not the path it resolves to) is what the user gave, so every message quotes it."""
    at = f"{where}: " if where else ""
    if not isinstance(name, str) or not name.strip():
        raise TuneLabError(f"{at}a name is required (a path relative to {root_label})", input_name=input_name)
    if "\x00" in name:
        raise TuneLabError(f"{at}{name!r} contains a NUL byte (\\x00); remove it", input_name=input_name)
    name = name.strip()
    if os.path.isabs(name) or name.startswith(("~", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise TuneLabError(f"{at}'{name}' is an absolute path; give a name relative to {root_label}",
                           input_name=input_name)
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts:
        raise TuneLabError(f"{at}'{name}' contains '..'; give a name inside {root_label}", input_name=input_name)
    root_real = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root_real / Path(*parts)))
    if os.path.commonpath([root_real, target]) != str(root_real):
        raise TuneLabError(f"{at}'{name}' leads outside {root_label} (through a symlink); choose another name",
                           input_name=input_name)
    return target


# ---------------------------------------------------------------------------------------------------------------
# paths given on the command line (or to core functions): checked before any model loads or anything is written


def check_path_text(path, input_name: str, what: str = "path") -> Path:
    """A path the user typed: not empty, no NUL byte (the OS would refuse it deep inside a library)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or not text.strip():
        raise TuneLabError(f"no {what} given", input_name=input_name)
    if "\x00" in text:
        raise TuneLabError(f"{text!r} contains a NUL byte (\\x00); remove it", input_name=input_name)
    return Path(text).expanduser()


def check_input_file(path, input_name: str, *, what: str = "file", suffixes: tuple = ()) -> Path:
    """An existing, readable file (with one of `suffixes`, when given)."""
    p = check_path_text(path, input_name, what)
    if not p.exists():
        raise TuneLabError(f"{what} not found: '{p}'", input_name=input_name)
    if p.is_dir():
        raise TuneLabError(f"'{p}' is a folder; give a {what}", input_name=input_name)
    if suffixes and p.suffix.lower() not in suffixes:
        raise TuneLabError(f"'{p.name}' is not a {' / '.join(suffixes)} file", input_name=input_name)
    if not os.access(p, os.R_OK):
        raise TuneLabError(f"'{p}' is not readable (permissions)", input_name=input_name)
    return p


def check_input_dir(path, input_name: str, *, what: str = "folder", marker: str | None = None) -> Path:
    """An existing folder (holding the file `marker`, when given)."""
    p = check_path_text(path, input_name, what)
    if not p.exists():
        raise TuneLabError(f"{what} not found: '{p}'", input_name=input_name)
    if not p.is_dir():
        raise TuneLabError(f"'{p}' is a file; give a {what}", input_name=input_name)
    if marker and not (p / marker).is_file():
        raise TuneLabError(f"'{p}' has no {marker}; give a {what} that holds one", input_name=input_name)
    return p


def _check_creatable(p: Path, input_name: str) -> None:
    """The nearest existing ancestor of `p` is a writable folder (so `p` can be made there)."""
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TuneLabError(f"cannot create '{p}': '{parent}' is a file, not a folder", input_name=input_name)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TuneLabError(f"cannot write in '{parent}' (permissions); choose another place", input_name=input_name)


def check_output_file(path, input_name: str, *, suffixes: tuple = (), new: bool = False) -> Path:
    """A file to write: not an existing folder, with one of `suffixes` (when given), in a folder that can be
    created or written; with `new`, it must not exist yet."""
    p = check_path_text(path, input_name, "output file")
    if p.is_dir():
        raise TuneLabError(f"'{p}' is an existing folder; give a file name"
                           + (f" ending in {' or '.join(suffixes)}" if suffixes else ""), input_name=input_name)
    if suffixes and p.suffix.lower() not in suffixes:
        raise TuneLabError(f"'{p.name}' has an unsupported extension; end it in {', '.join(suffixes)}",
                           input_name=input_name)
    if new and p.exists():
        raise TuneLabError(f"'{p}' exists; choose a new file name (it is never overwritten)", input_name=input_name)
    if p.exists() and not os.access(p, os.W_OK):
        raise TuneLabError(f"'{p}' is not writable (permissions)", input_name=input_name)
    _check_creatable(p, input_name)
    return p


def check_output_dir(path, input_name: str, *, new: bool = False) -> Path:
    """A folder to write into: not an existing file, creatable or writable; with `new`, missing or empty."""
    p = check_path_text(path, input_name, "output folder")
    if p.exists() and not p.is_dir():
        raise TuneLabError(f"'{p}' is an existing file; give a folder", input_name=input_name)
    if new and p.is_dir() and any(p.iterdir()):
        raise TuneLabError(f"'{p}' is not empty; choose a new folder (it is never overwritten)",
                           input_name=input_name)
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise TuneLabError(f"cannot write in '{p}' (permissions); choose another folder", input_name=input_name)
    else:
        _check_creatable(p, input_name)
    return p
