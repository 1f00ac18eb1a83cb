"""Image datasets as the trainers read them: a folder of images plus an optional `metadata.jsonl`.

The convention is the diffusers/datasets ImageFolder one: each metadata line names an image by `file_name` (relative
to the folder) and carries its caption in `text`. Images without a caption get the instance prompt. Every image is
checked before training starts, so a corrupt file stops the run with its name instead of crashing at step 900.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import TuneLabError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"


@dataclass
class ImageRecord:
    file_name: str  # relative to the folder, with forward slashes
    path: Path
    caption: str
    size: tuple  # (width, height) after EXIF orientation
    image: Any = None  # PIL RGB image (None when loaded with keep_images=False)
    meta: dict = field(default_factory=dict)  # the whole metadata line, if any


@dataclass
class ImageDataset:
    folder: Path
    records: list

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _image_files(folder: Path) -> list:
    """Image files under `folder`, hidden files and folders skipped (as datasets' ImageFolder does)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            p = Path(root) / name
            rel = p.relative_to(folder)
            if not _hidden(rel) and p.suffix.lower() in IMAGE_SUFFIXES:
                out.append(rel.as_posix())
    return sorted(out)


def _read_metadata(folder: Path, caption_column: str) -> dict:
    """file_name -> metadata line; refuses malformed lines, names outside the folder and duplicates."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    out, where = {}, {}
    for n, text in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError as e:
            raise TuneLabError(f"{path}, line {n}: not valid JSON ({e}); fix or delete the line",
                               input_name="dataset") from None
        name = line.get("file_name") if isinstance(line, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise TuneLabError(f"{path}, line {n}: no 'file_name'; every line names its image",
                               input_name="dataset")
        rel = Path(name.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or name.startswith(("/", "\\")) or ":" in name[:3]:
            raise TuneLabError(f"{path}, line {n}: file_name '{name}' is not a relative name inside the dataset "
                               "folder", input_name="dataset")
        key = rel.as_posix()
        if key in out:
            raise TuneLabError(f"{path}: '{key}' is listed twice (lines {where[key]} and {n}); keep one line per "
                               "image", input_name="dataset")
        caption = line.get(caption_column)
        if caption is not None and not isinstance(caption, str):
            raise TuneLabError(f"{path}, line {n}: '{caption_column}' is not text", input_name="dataset")
        out[key], where[key] = line, n
    return out


def _open_checked(path: Path, file_name: str):
    """Verify the file, then reopen it (verify leaves the image unusable), apply EXIF orientation, force RGB."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()  # decodes all pixel data: catches truncation that verify() lets through (e.g. JPEG)
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise TuneLabError(f"'{file_name}' in {path.parent} is not a readable image ({e}); replace or remove it",
                           input_name="dataset") from None


def load_image_dataset(folder, *, instance_prompt: Optional[str] = None, caption_column: str = "text",
                       keep_images: bool = True) -> ImageDataset:
    """Load and validate an image dataset folder.

    Images: every image file in the folder (hidden ones skipped) plus any `file_name` in metadata.jsonl, which must
    exist. Caption: the metadata line's `caption_column` when present and not empty, else `instance_prompt`;
    an image with neither is refused. Returns records in file-name order.
    """
    if folder is None or not str(folder).strip():
        raise TuneLabError("no dataset folder given", input_name="dataset")
    folder = Path(folder)
    if not folder.is_dir():
        raise TuneLabError(f"dataset folder not found: {folder}", input_name="dataset")
    meta = _read_metadata(folder, caption_column)
    names = set(_image_files(folder))
    for name in meta:
        if not (folder / name).is_file():
            raise TuneLabError(f"{folder / METADATA_FILE} lists '{name}', which is not in the folder; restore the "
                               "image or remove its line", input_name="dataset")
        names.add(name)
    if not names:
        seen = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        what = f" (it holds only: {', '.join(seen[:6])}{', ...' if len(seen) > 6 else ''})" if seen else " (it is empty)"
        raise TuneLabError(f"no images in {folder}{what}; add PNG or JPEG files", input_name="dataset")
    prompt = instance_prompt.strip() if isinstance(instance_prompt, str) else ""
    records = []
    for name in sorted(names):
        line = meta.get(name, {})
        caption = line.get(caption_column) if isinstance(line.get(caption_column), str) else ""
        caption = caption.strip() or prompt
        if not caption:
            raise TuneLabError(f"'{name}' has no caption ('{caption_column}' in {METADATA_FILE}) and no instance "
                               "prompt was given; give an instance prompt such as 'wrong'",
                               input_name="instance_prompt")
        image = _open_checked(folder / name, name)
        records.append(ImageRecord(name, folder / name, caption, image.size, image if keep_images else None,
                                   dict(line)))
        if not keep_images:
            image.close()
    return ImageDataset(folder, records)
