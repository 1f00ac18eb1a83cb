"""Conversions between ComfyUI IMAGE tensors, PIL images and files, plus labelled grids."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .files import atomic_path


def tensor_to_pil(image) -> list:
    """IMAGE [B,H,W,3] (or one [H,W,3]) in 0..1 -> list of PIL RGB images."""
    import numpy as np
    from PIL import Image

    if image.ndim == 3:
        image = image[None]
    arr = (image.detach().cpu().float().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def pil_to_tensor(images: Sequence):
    """PIL images of one size -> IMAGE [B,H,W,3] float32 0..1."""
    import numpy as np
    import torch

    arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrs))


def save_png(image, path, metadata: dict | None = None) -> Path:
    """Write one PIL image as PNG atomically (temporary name, then rename), with optional text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if metadata:
        info = PngInfo()
        for k, v in metadata.items():
            info.add_text(k, str(v))
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


MIN_FONT = 9
# file endings `save_image` writes, and the format each one gets
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def save_image(image, path, metadata: dict | None = None) -> Path:
    """Write one PIL image in the format its file ending names (`IMAGE_FORMATS`), atomically: PNG with the
    metadata as text chunks, JPEG (quality 95) with it as a comment. Another ending is refused before writing."""
    from .errors import TuneLabError

    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TuneLabError(f"'{path.name}': TuneLab writes {', '.join(IMAGE_FORMATS)} images; change the ending",
                           input_name="out")
    if fmt == "PNG":
        return save_png(image, path, metadata)
    comment = "\n".join(f"{k}: {v}" for k, v in (metadata or {}).items())
    with atomic_path(path) as tmp:
        image.convert("RGB").save(tmp, format="JPEG", quality=95, **({"comment": comment} if comment else {}))
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes: one bitmap size, so text wraps but cannot shrink
        return ImageFont.load_default()


def wrap(text: str, width: float, measure) -> list:
    """Lines of `text` no wider than `width` by `measure(str) -> pixels`: broken at spaces, and inside a word only
    when the word alone is too wide. Nothing is dropped: the lines joined by spaces give the text back."""
    lines, current = [], ""
    for word in str(text).split():
        candidate = f"{current} {word}" if current else word
        if measure(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while measure(word) > width and len(word) > 1:  # a word wider than the panel: break it
            cut = len(word) - 1
            while cut > 1 and measure(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current or not lines:
        lines.append(current)
    return lines


def fit_text(text: str, width: float, size: int, *, max_lines: int = 2, min_size: int = MIN_FONT):
    """(font, lines, line height) for `text` in `width` pixels: the largest font from `size` down to `min_size`
    at which it wraps into `max_lines` lines or fewer; at the smallest size it takes as many lines as it needs."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = max(int(size), min_size)
    for s in range(size, min_size - 1, -1):
        font = _font(s)
        lines = wrap(text, width, lambda t: draw.textlength(t, font=font))
        if len(lines) <= max_lines or s == min_size:
            return font, lines, _line_height(draw, font)
    raise AssertionError("unreachable")


def _line_height(draw, font) -> int:
    box = draw.textbbox((0, 0), "Ag|", font=font)
    return int(box[3] - min(0, box[1])) + 2


def _block(draw, xy, lines, font, line_h, fill) -> None:
    x, y = xy
    for i, line in enumerate(lines):
        draw.text((x, y + i * line_h), line, fill=fill, font=font)


def grid_layout(images: Sequence, labels: Sequence[str], columns: int | None = None, caption: str = "",
                details: str = "") -> dict:
    """Where the text of a labelled grid goes: every label wrapped (and shrunk) to its panel, the caption and the
    details line wrapped to the grid's width. Nothing is cut off."""
    w, h = images[0].size
    cols = columns or len(images)
    rows = (len(images) + cols - 1) // cols
    base = max(MIN_FONT + 1, min(28, w // 12))
    label_fits = [fit_text(label, w - 8, base) for label in labels]
    strip = max([len(lines) * lh for _, lines, lh in label_fits] or [0]) + 4
    cap = fit_text(caption, cols * w - 8, base, max_lines=3) if caption else None
    det = fit_text(details, cols * w - 8, max(MIN_FONT, base - 3), max_lines=2) if details else None
    head = 2 + (len(cap[1]) * cap[2] if cap else 0) + (len(det[1]) * det[2] if det else 0) + (2 if cap or det else 0)
    return {"panel": (w, h), "columns": cols, "rows": rows, "strip": strip, "labels": label_fits,
            "caption": cap, "details": det, "header": head if (cap or det) else 0,
            "size": (cols * w, (head if (cap or det) else 0) + rows * (h + strip))}


def labelled_grid(images: Sequence, labels: Sequence[str], columns: int | None = None, caption: str = "",
                  details: str = ""):
    """Panels side by side, each with a label strip above it, under an optional caption and a details line (e.g.
    steps, guidance, size and LoRA). Long text wraps and shrinks to fit; it is never cut off."""
    from PIL import Image, ImageDraw

    lay = grid_layout(images, labels, columns, caption, details)
    (w, h), cols, strip = lay["panel"], lay["columns"], lay["strip"]
    grid = Image.new("RGB", lay["size"], "white")
    draw = ImageDraw.Draw(grid)
    y = 2
    for part, fill in ((lay["caption"], "black"), (lay["details"], (90, 90, 90))):
        if part:
            font, lines, lh = part
            _block(draw, (4, y), lines, font, lh, fill)
            y += len(lines) * lh
    for i, (im, (font, lines, lh)) in enumerate(zip(images, lay["labels"])):
        x, y = (i % cols) * w, lay["header"] + (i // cols) * (h + strip)
        _block(draw, (x + 4, y + 2), lines, font, lh, "black")
        grid.paste(im.convert("RGB").resize((w, h)), (x, y + strip))
    return grid
