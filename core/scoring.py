"""Learned image scores from local transformers models: CLIP score, PickScore, CLIP and DINOv2 embeddings.

- **CLIP score** (prompt adherence): `100 * max(cos(E_image, E_text), 0)` with a `CLIPModel` such as
  openai/clip-vit-large-patch14 (the definition torchmetrics' `CLIPScore` uses).
- **PickScore** (human preference, Kirstain et al. 2023): `logit_scale.exp() * cos(E_image, E_text)` with the
  PickScore_v1 `CLIPModel` (a fine-tuned CLIP-ViT-H/14), exactly its reference implementation's per-image score
  before the softmax over candidates.
- **Embeddings** for image-to-image similarity: CLIP's projected image embedding, and DINOv2's pooled CLS token
  (`Dinov2Model(...).pooler_output`), each L2-normalised.

Models load from a local folder only (`config.json`, `*.safetensors`, `preprocessor_config.json`, and for CLIP the
tokenizer files), never from a hub and never from pickle weights; or from a built-in tiny preset (`core.tiny`).
Prompts are scored without their compel syntax (`prompt.clean_text`: "(oil on canvas)+++" -> "oil on canvas"),
truncated to CLIP's 77 tokens. Every image is embedded alone (batch 1), so a score never depends on which other
images were scored with it; a resumed run gets the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import tiny
from .errors import TuneLabError

KINDS = ("clip", "pickscore", "dino")
MODEL_TYPES = {"clip": "clip", "pickscore": "clip", "dino": "dinov2"}
WHAT = {"clip": "a CLIP model (e.g. openai/clip-vit-large-patch14)", "pickscore": "PickScore (yuvalkirstain/PickScore_v1)",
        "dino": "a DINOv2 model (e.g. facebook/dinov2-base)"}
DEFAULT_PRESETS = {"clip": "tiny-clip", "pickscore": "tiny-pickscore", "dino": "tiny-dinov2"}

_CACHE: dict = {}
_LOCK = threading.RLock()


@dataclass(eq=False)
class Scorer:
    kind: str  # "clip", "pickscore" or "dino"
    source: str
    model: Any
    processor: Any
    tokenizer: Any  # None for DINOv2
    device: Any
    dtype: Any
    identity: dict
    _texts: dict = field(default_factory=dict)

    # ---- embeddings ---------------------------------------------------------------------------------------------
    def _pixels(self, image):
        pv = self.processor(images=[_rgb(image)], return_tensors="pt")["pixel_values"]
        return pv.to(self.device, self.dtype)

    def image_embedding(self, image):
        """The L2-normalised embedding [D] (float64, CPU) of one image (PIL, or anything `metrics.to_array` takes)."""
        import torch

        with torch.no_grad():
            pv = self._pixels(image)
            if self.kind == "dino":
                emb = self.model(pixel_values=pv).pooler_output
            else:
                emb = self.model.visual_projection(self.model.vision_model(pixel_values=pv).pooler_output)
        return _normalize(emb)[0]

    def text_embedding(self, text: str):
        """The L2-normalised CLIP text embedding [D] of `text` (compel syntax stripped), cached per text."""
        import torch

        if self.kind == "dino":
            raise TuneLabError("DINOv2 has no text tower; use a CLIP model for text scores", input_name="model")
        if text not in self._texts:
            max_len = min(77, int(self.model.config.text_config.max_position_embeddings))
            tokens = self.tokenizer([scoring_text(text)], padding=True, truncation=True, max_length=max_len,
                                    return_tensors="pt")
            with torch.no_grad():
                out = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                            attention_mask=tokens["attention_mask"].to(self.device))
                emb = self.model.text_projection(out.pooler_output)
            self._texts[text] = _normalize(emb)[0]
        return self._texts[text]

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().cpu())

    # ---- scores -------------------------------------------------------------------------------------------------
    def score(self, image, prompt: str) -> float:
        """CLIP score (kind "clip") or PickScore (kind "pickscore") of one image for `prompt`."""
        cos = float((self.image_embedding(image) * self.text_embedding(prompt)).sum())
        if self.kind == "pickscore":
            return self.logit_scale * cos
        if self.kind == "clip":
            return 100.0 * max(cos, 0.0)
        raise TuneLabError("a DINOv2 model gives image similarities, not prompt scores", input_name="model")


def _rgb(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    from . import images as images_mod

    if hasattr(image, "detach"):
        return images_mod.tensor_to_pil(image)[0]
    import numpy as np

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _normalize(x):
    # float64 from here on: the model runs in its dtype, the normalisation and cosine add no rounding of their own
    x = x.detach().cpu().double()
    return x / x.norm(dim=-1, keepdim=True)


def scoring_text(prompt: str) -> str:
    """The words CLIP sees: the prompt without compel syntax."""
    from .prompt import clean_text

    try:
        text = clean_text(prompt)
    except TuneLabError:
        text = prompt
    return text.strip() or str(prompt)


def cosine(a, b) -> float:
    return float((_normalize(a[None])[0] * _normalize(b[None])[0]).sum())


# ---------------------------------------------------------------------------------------------------------------
# loading


def _check_folder(folder: Path, kind: str, input_name: str) -> dict:
    """Refuse a folder that is not a local transformers model of the right kind, naming what is missing."""
    from .files import check_safetensors

    if not folder.is_dir():
        raise TuneLabError(f"'{folder}' is not a folder; give {WHAT[kind]} as a transformers model folder "
                           "(config.json, model.safetensors, preprocessor_config.json)", input_name=input_name)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise TuneLabError(f"'{folder}' has no config.json, so it is not a transformers model folder",
                           input_name=input_name)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TuneLabError(f"'{cfg_path}' is not JSON ({e})", input_name=input_name) from None
    if cfg.get("model_type") != MODEL_TYPES[kind]:
        raise TuneLabError(f"'{folder.name}' is a '{cfg.get('model_type')}' model, but this input needs "
                           f"{WHAT[kind]} (model_type '{MODEL_TYPES[kind]}')", input_name=input_name)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        why = (f"only pickle weights ({', '.join(pickled)}); TuneLab loads safetensors only (convert them, or "
               "download model.safetensors)" if pickled else "no .safetensors weights")
        raise TuneLabError(f"'{folder}' has {why}", input_name=input_name)
    for w in weights:
        check_safetensors(w, input_name)
    if not (folder / "preprocessor_config.json").is_file():
        raise TuneLabError(f"'{folder}' has no preprocessor_config.json (the image preprocessing); copy it from the "
                           "model's original repository" + (" (PickScore_v1 uses laion/CLIP-ViT-H-14-laion2B-s32B-"
                           "b79K's)" if kind == "pickscore" else ""), input_name=input_name)
    if kind != "dino" and not ((folder / "tokenizer.json").is_file() or
                               ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise TuneLabError(f"'{folder}' has no CLIP tokenizer: provide tokenizer.json (or vocab.json and merges.txt)"
                           + (", e.g. from laion/CLIP-ViT-H-14-laion2B-s32B-b79K" if kind == "pickscore" else ""),
                           input_name=input_name)
    return cfg


def _image_processor(folder: Path, input_name: str):
    """The model's image processor, always the PIL implementation (transformers 5 would pick a torchvision one
    when torchvision is installed, whose resize differs slightly), so scores agree on every machine."""
    import transformers

    cfg = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    name = cfg.get("image_processor_type") or str(cfg.get("feature_extractor_type", "")).replace(
        "FeatureExtractor", "ImageProcessor")
    base = name[:-4] if name.endswith("Fast") else name
    if base.endswith("Pil"):
        base = base[:-3]
    cls = getattr(transformers, base + "Pil", None) or getattr(transformers, base, None)
    if cls is None or not base:
        raise TuneLabError(f"'{folder.name}/preprocessor_config.json' names an image processor "
                           f"'{name or '?'}' this transformers does not have", input_name=input_name)
    return cls.from_pretrained(str(folder), local_files_only=True)


def resolve(source: str, kind: str) -> Path:
    """A preset name (built on first use) or a folder path."""
    if source in tiny.SCORER_PRESETS:
        return tiny.ensure_scorer(source)
    return Path(str(source)).expanduser()


def load(source: str, kind: str = "clip", *, device=None, dtype=None, input_name: Optional[str] = None) -> Scorer:
    """Load (once per process and settings) a scoring model: `kind` "clip", "pickscore" or "dino"; `source` a tiny
    preset or a local folder. fp32 unless `dtype` says otherwise (scores compare close images)."""
    import torch

    from .files import sha256_file
    from .models import resolve_device, resolve_dtype

    if kind not in KINDS:
        raise TuneLabError(f"unknown scorer kind '{kind}'; choose {', '.join(KINDS)}", input_name="kind")
    input_name = input_name or f"{kind}_model"
    if not source or not str(source).strip():
        raise TuneLabError(f"no model given for {WHAT[kind]}", input_name=input_name)
    source = str(source).strip()
    dev = resolve_device(device)
    if dev.type == "cpu":  # "cpu:0" (accelerate's CPU ranks) picks other kernels than "cpu": the last digits differ
        dev = torch.device("cpu")
    dt = resolve_dtype(dtype or "fp32", dev)
    key = (source, kind, str(dev), str(dt))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        folder = resolve(source, kind)
        _check_folder(folder, kind, input_name)
        processor = _image_processor(folder, input_name)
        try:
            import transformers

            if kind == "dino":
                model = transformers.Dinov2Model.from_pretrained(str(folder), use_safetensors=True,
                                                                 local_files_only=True)
                tokenizer = None
            else:
                model = transformers.CLIPModel.from_pretrained(str(folder), use_safetensors=True,
                                                               local_files_only=True)
                tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except TuneLabError:
            raise
        except Exception as e:  # surface transformers' reason with the folder name
            raise TuneLabError(f"could not load '{folder}': {e}", input_name=input_name) from e
        with torch.inference_mode(False):
            model = model.to(dev, dt).eval()
        weights = sorted(folder.glob("*.safetensors"))
        identity = {"kind": kind, "model": source if source in tiny.SCORER_PRESETS else folder.name,
                    "sha256": sha256_file(weights[0]) if len(weights) == 1 else
                    [sha256_file(w) for w in weights], "dtype": str(dt).replace("torch.", "")}
        scorer = Scorer(kind=kind, source=str(folder), model=model, processor=processor, tokenizer=tokenizer,
                        device=dev, dtype=dt, identity=identity)
        _CACHE[key] = scorer
        return scorer


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
