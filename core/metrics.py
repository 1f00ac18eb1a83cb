"""Image quality against a ground truth: PSNR and SSIM, computed by scikit-image (`skimage.metrics`).

scikit-image is a dependency (requirements.txt), imported inside the
functions, so without it only evaluation is unavailable and the error says what to install.

Conventions:
- Inputs are one image each: a ComfyUI IMAGE tensor [H,W,3] or [1,H,W,3] (float, 0..1), a float numpy array
  (0..1), a uint8 numpy array, or a PIL image. Floats are compared with data range 1.0, uint8/PIL with 255; the two
  images of a pair must have the same size and kind of range.
- PSNR of identical images is **infinite**: `psnr` returns `math.inf` (no cap), and reports write it as "inf".
- SSIM is scikit-image's default: a 7x7 uniform window, computed per RGB channel and averaged
  (`channel_axis=-1`). For images smaller than 7 pixels on a side the window shrinks to the largest odd size that
  fits (3 at least).
"""
from __future__ import annotations

import math

from .errors import TuneLabError


def _skimage_metrics():
    try:
        from skimage import metrics
    except ImportError:
        raise TuneLabError("PSNR/SSIM need scikit-image, which is not installed: "
                           "pip install -r requirements.txt (or pip install \"scikit-image>=0.22\")",
                           input_name="metrics") from None
    return metrics


def to_array(image, input_name: str = "image"):
    """(float64 array [H,W,C], data range) of one image."""
    import numpy as np

    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64), 255.0
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu()
        if image.ndim == 4:
            if image.shape[0] != 1:
                raise TuneLabError(f"expected one image, got a batch of {image.shape[0]}", input_name=input_name)
            image = image[0]
        image = image.float().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise TuneLabError(f"expected an image [H,W,C], got shape {arr.shape}", input_name=input_name)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64), 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise TuneLabError(f"unsupported image data type {arr.dtype}; give floats in 0..1 or uint8",
                           input_name=input_name)
    return arr.astype(np.float64), 1.0


def _pair(a, b):
    x, rx = to_array(a, "image")
    y, ry = to_array(b, "reference")
    if x.shape != y.shape:
        raise TuneLabError(f"the images differ in size: {x.shape[1]}x{x.shape[0]} vs {y.shape[1]}x{y.shape[0]} "
                           "(width x height); compare images of the same size", input_name="reference")
    if rx != ry:
        raise TuneLabError("one image is 0..1 floats and the other 0..255 integers; convert one of them",
                           input_name="reference")
    return x, y, rx


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB (`skimage.metrics.peak_signal_noise_ratio`); `math.inf` when identical."""
    import numpy as np

    x, y, data_range = _pair(image, reference)
    if np.array_equal(x, y):
        return math.inf
    m = _skimage_metrics()
    return float(m.peak_signal_noise_ratio(y, x, data_range=data_range))


def ssim(image, reference) -> float:
    """Structural similarity (`skimage.metrics.structural_similarity`, default window, mean over channels)."""
    x, y, data_range = _pair(image, reference)
    m = _skimage_metrics()
    side = min(x.shape[0], x.shape[1])
    if side < 3:
        raise TuneLabError(f"SSIM needs images of at least 3x3 pixels; these are {x.shape[1]}x{x.shape[0]}",
                           input_name="image")
    win = 7 if side >= 7 else (side if side % 2 else side - 1)
    return float(m.structural_similarity(y, x, data_range=data_range, channel_axis=-1, win_size=win))


def measure(image, reference) -> dict:
    """{"psnr": dB, "ssim": value} of one image against its reference."""
    return {"psnr": psnr(image, reference), "ssim": ssim(image, reference)}


def mean(values) -> float:
    """Mean of metric values; inf if any is inf (identical pairs), nan for none."""
    values = [float(v) for v in values]
    if not values:
        return math.nan
    return math.fsum(values) / len(values) if all(math.isfinite(v) for v in values) else \
        (math.inf if any(v == math.inf for v in values) else math.nan)


def fmt(value: float, digits: int = 4) -> str:
    """A metric as text: 'inf' for identical images, 'nan' when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def json_value(value):
    """JSON has no infinity: finite values stay numbers, inf/nan become the strings "inf"/"nan"."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else fmt(value)


# ---------------------------------------------------------------------------------------------------------------
# learned similarities (embeddings from `core.scoring`: CLIP's projected image/text embeddings, DINOv2's CLS)
#
# - CLIP image similarity: cos(E(image), E(reference)) with CLIP's image tower (how close in content/style).
# - DINOv2 similarity: the same with DINOv2's pooled CLS token (more sensitive to structure and identity).
# - CLIP directional similarity (InstructPix2Pix, Brooks et al. 2023, and diffusers' evaluation guide):
#   cos(E(edited) - E(input), T(edited caption) - T(input caption)), each embedding L2-normalised first: does the
#   change in the image follow the change the captions describe. Needs captions of the input and of the edit.

LEARNED = ("clip_to_truth", "clip_to_input", "dino_to_truth", "dino_to_input", "clip_directional")
LEARNED_NAMES = {"clip_to_truth": "CLIP sim. to truth", "clip_to_input": "CLIP sim. to input",
                 "dino_to_truth": "DINOv2 sim. to truth", "dino_to_input": "DINOv2 sim. to input",
                 "clip_directional": "CLIP directional"}


def embedding_similarity(a, b) -> float:
    """Cosine similarity of two embeddings (float64)."""
    from .scoring import cosine

    return cosine(a, b)


def directional_similarity(input_embedding, edited_embedding, input_text, edited_text) -> float:
    """cos(edited - input, edited_text - input_text) over L2-normalised embeddings."""
    from .scoring import _normalize, cosine

    img = _normalize(edited_embedding[None])[0] - _normalize(input_embedding[None])[0]
    txt = _normalize(edited_text[None])[0] - _normalize(input_text[None])[0]
    return cosine(img, txt)


def clip_image_similarity(scorer, image, reference) -> float:
    return embedding_similarity(scorer.image_embedding(image), scorer.image_embedding(reference))


def dino_similarity(scorer, image, reference) -> float:
    if getattr(scorer, "kind", None) != "dino":
        raise TuneLabError("DINOv2 similarity needs a DINOv2 model", input_name="dino_model")
    return embedding_similarity(scorer.image_embedding(image), scorer.image_embedding(reference))


def clip_directional_similarity(scorer, input_image, edited_image, input_caption: str, edited_caption: str) -> float:
    return directional_similarity(scorer.image_embedding(input_image), scorer.image_embedding(edited_image),
                                  scorer.text_embedding(input_caption), scorer.text_embedding(edited_caption))
