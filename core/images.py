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
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def labelled_grid(images: Sequence, labels: Sequence[str], columns: int | None = None, caption: str = ""):
    """Panels side by side, each with a label strip above it (and an optional caption strip on top)."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    cols = columns or len(images)
    rows = (len(images) + cols - 1) // cols
    strip = max(16, min(48, w // 12))
    font = _font(int(strip * 0.6))
    cap_h = strip if caption else 0
    grid = Image.new("RGB", (cols * w, cap_h + rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    if caption:
        draw.text((4, 2), _fit(draw, caption, cols * w - 8, font), fill="black", font=font)
    for i, (im, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * w, cap_h + (i // cols) * (h + strip)
        draw.text((x + 4, y + 2), _fit(draw, label, w - 8, font), fill="black", font=font)
        grid.paste(im.convert("RGB").resize((w, h)), (x, y + strip))
    return grid


def _fit(draw, text: str, width: int, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
