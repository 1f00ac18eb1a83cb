"""Model layer: load SDXL base / refiner / SD1.x / InstructPix2Pix pipelines, cache them, and hand out
immutable pipe handles.

A `PipeHandle` describes *what to run*: the shared, loaded pipeline plus a stack of (adapter, weight). Applying a
LoRA returns a new handle; the sampler activates exactly the handle's adapters before it runs. So the base and LoRA
branches of one graph share one copy of the weights and neither leaks into the other.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from . import tiny
from .errors import TuneLabError
from .files import check_safetensors
from .quiet import dtype_kwargs

FAMILY_NAMES = {
    "sdxl": "SDXL base",
    "sdxl-refiner": "SDXL refiner",
    "sd15": "SD1.x",
    "sd2": "SD2.x",
    "ip2p": "InstructPix2Pix (SD1.x)",
}
# Cross-attention width of the UNet -> the base model it belongs to (the LoRA architecture fingerprint).
WIDTH_NAMES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL base", 1280: "SDXL refiner",
               tiny.TE1_WIDTH: "tiny SD1.x", tiny.TE1_WIDTH + tiny.TE2_WIDTH: "tiny SDXL base",
               tiny.TE2_WIDTH: "tiny SDXL refiner"}

_PIPELINE_FAMILIES = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl-refiner",
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionInstructPix2PixPipeline": "ip2p",
}


def describe_width(width: int) -> str:
    name = WIDTH_NAMES.get(int(width))
    return f"{name} (cross-attention width {width})" if name else f"an unknown model (cross-attention width {width})"


@dataclass(frozen=True)
class LoraRef:
    adapter: str  # peft adapter name inside the shared pipe
    weight: float
    name: str  # what the user picked (file name)
    sha256: str
    embeddings: tuple = ()  # pivotal-tuning tokens loaded with it


@dataclass(frozen=True, eq=False)
class PipeHandle:
    pipe: Any
    family: str
    source: str
    dtype: Any
    device: Any
    loras: tuple = ()
    sha256: str = ""
    info: dict = field(default_factory=dict, compare=False)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.pipe.unet.config.cross_attention_dim)

    @property
    def architecture(self) -> str:
        return describe_width(self.cross_attention_dim)

    @property
    def is_sdxl(self) -> bool:
        return self.family in ("sdxl", "sdxl-refiner")

    def with_lora(self, ref: LoraRef) -> "PipeHandle":
        return replace(self, loras=self.loras + (ref,))

    def describe(self) -> dict:
        return {"model": self.source, "family": self.family, "sha256": self.sha256,
                "loras": [{"name": r.name, "weight": r.weight, "sha256": r.sha256} for r in self.loras]}


def family_of(pipe) -> str:
    cls = type(pipe).__name__
    fam = _PIPELINE_FAMILIES.get(cls)
    if fam is None:
        raise TuneLabError(f"unsupported pipeline {cls}; TuneLab handles SDXL base/refiner, SD1.x/2.x and "
                           "InstructPix2Pix", input_name="model")
    unet = pipe.unet.config
    if fam == "sd15" and unet.in_channels == 8:
        return "ip2p"
    if fam == "sd15" and unet.cross_attention_dim == 1024:
        return "sd2"
    if fam == "sdxl-refiner" and getattr(pipe, "text_encoder", None) is not None:
        return "sdxl"  # an SDXL base loaded for img2img
    return fam


# ---------------------------------------------------------------------------------------------------------------
# dtype / device


def resolve_dtype(dtype, device):
    import torch

    if dtype in (None, "auto"):  # inside ComfyUI the node passes ComfyUI's choice instead
        if torch.device(device).type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise TuneLabError(f"unknown dtype '{dtype}'; choose auto, fp32, fp16 or bf16", input_name="dtype")
    if table[dtype] is torch.float16 and torch.device(device).type == "cpu":
        raise TuneLabError("fp16 does not run on the CPU; choose auto, fp32 or bf16", input_name="dtype")
    return table[dtype]


def resolve_device(device):
    """The torch device for a choice ("auto", "cpu", "cuda:1" ...), refusing one that does not exist here."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise TuneLabError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N", input_name="device") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TuneLabError(f"'{device}': this machine has no CUDA device; use auto or cpu", input_name="device")
        if dev.index is not None and dev.index >= count:
            raise TuneLabError(f"'{device}': this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}",
                               input_name="device")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TuneLabError(f"'{device}': MPS is not available here; use auto or cpu", input_name="device")
    return dev


def check_runtime(device, dtype) -> tuple:
    """(device, dtype) as `load` resolves them, checked before anything loads."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


# ---------------------------------------------------------------------------------------------------------------
# loading

_CACHE: dict = {}
_LOCK = threading.RLock()


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def outside_inference_mode(func):
    """ComfyUI runs nodes under `torch.inference_mode()`. Tensors made there (loaded weights, LoRA adapters assigned
    from a file) are inference tensors, which a later training run on the same shared pipe could never use; so
    everything that builds or changes the shared pipe runs outside it."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode(False):
            return func(*args, **kwargs)

    return wrapper


@outside_inference_mode
def load(source: str, *, vae: Optional[str] = None, dtype=None, device=None, tokenizer_dir=None) -> PipeHandle:
    """Load a pipeline from a tiny preset name, a single-file .safetensors checkpoint or a diffusers folder.

    Cached by (source, vae, dtype, device, tokenizer fallback): a second loader or a second run gets the same pipeline object.
    `tokenizer_dir`: CLIP tokenizer fallback for single-file checkpoints (the caller passes ComfyUI's bundled one,
    `host.comfy_tokenizer_dir()`, since core never imports ComfyUI).
    """
    if not source or not str(source).strip():
        raise TuneLabError("no model given; pick a checkpoint, a diffusers folder or a tiny preset", input_name="model")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    src = str(source).strip()
    path = Path(src).expanduser()
    if src in tiny.PRESETS:
        kind, target = "folder", tiny.ensure(src)
    elif path.is_dir():
        kind, target = "folder", path.resolve()
    elif path.exists() or path.suffix:
        kind, target = "file", path.resolve()
        if not path.exists():
            raise TuneLabError(f"model file not found: {path}", input_name="model")
    else:
        raise TuneLabError(f"unknown model '{src}'. Give a tiny preset ({', '.join(tiny.PRESETS)}), a .safetensors "
                           "checkpoint or a diffusers folder (with model_index.json)", input_name="model")
    key = (str(target), str(Path(vae).resolve()) if vae else None, str(dt), str(dev),
           str(tokenizer_dir) if kind == "file" and tokenizer_dir else None)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if kind == "folder":
            pipe = _load_folder(target, dt)
            sha = ""
        else:
            from .files import sha256_file
            from .single_file import load_single_file

            check_safetensors(target, "model")
            pipe = load_single_file(target, dtype=dt, tokenizer_dir=tokenizer_dir)
            sha = sha256_file(target)
        family = family_of(pipe)
        if vae:
            from .single_file import load_vae

            pipe.vae = load_vae(vae, family=family, dtype=dt)
        pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)  # we report progress ourselves
        handle = PipeHandle(pipe=pipe, family=family, source=src, dtype=dt, device=dev, sha256=sha,
                            info={"path": str(target), "vae": vae})
        _CACHE[key] = handle
        return handle


def _load_folder(folder: Path, dtype):
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise TuneLabError(f"'{folder}' is not a diffusers model folder: model_index.json is missing",
                           input_name="model")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    cls_name = index.get("_class_name", "")
    if cls_name not in _PIPELINE_FAMILIES:
        raise TuneLabError(f"'{folder.name}' holds a {cls_name or 'unknown'} pipeline; TuneLab handles "
                           f"{', '.join(sorted(_PIPELINE_FAMILIES))}", input_name="model")
    for comp, spec in index.items():
        if comp.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / comp
        if comp.startswith("tokenizer"):
            if not ((sub / "tokenizer.json").is_file() or ((sub / "vocab.json").is_file() and (sub / "merges.txt").is_file())):
                raise TuneLabError(f"the tokenizer is missing: provide {sub / 'vocab.json'} and {sub / 'merges.txt'} "
                                   "(or tokenizer.json)", input_name="model")
        elif comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
            weights = list(sub.glob("*.safetensors"))
            if not weights:
                pickled = [p.name for p in sub.glob("*.bin")]
                why = (f"only pickle weights ({', '.join(pickled)}) were found; TuneLab loads safetensors only"
                       if pickled else "no .safetensors weights were found")
                raise TuneLabError(f"'{sub}': {why}", input_name="model")
    import diffusers

    cls = getattr(diffusers, cls_name)
    try:
        return cls.from_pretrained(str(folder), **dtype_kwargs(dtype), use_safetensors=True, local_files_only=True)
    except Exception as e:  # surface diffusers' reason with the folder name, not a deep traceback
        raise TuneLabError(f"could not load '{folder}': {e}", input_name="model") from e
