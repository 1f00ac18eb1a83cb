"""Dreambooth LoRA for SDXL, with optional pivotal tuning: one readable pass from config to saved weights.

It follows diffusers' `examples/dreambooth/train_dreambooth_lora_sdxl.py` step by step (and, for pivotal tuning,
`train_dreambooth_lora_sdxl_advanced.py`): the dataset is resized, flipped and cropped once with SDXL's
micro-conditioning recorded (original size, crop top-left, target size); LoRA (PEFT, gaussian init) on the UNet's
attention projections and optionally on both text encoders; DDPM noise at uniform timesteps; epsilon or v target;
optional prior preservation and Min-SNR weighting; AdamW (or 8-bit AdamW) with diffusers' LR schedulers; grad-norm
clipping; accelerate for devices, mixed precision and gradient accumulation.

What TuneLab adds:
- Frozen parts are cached: text embeddings are computed once per distinct caption when the text encoders are not
  trained (the usual case), VAE latent distributions once per image with `cache_latents`. The plain script encodes
  every step.
- It trains on the shared pipe of a ComfyUI graph without changing it: a fresh adapter is added for the run and
  removed afterwards, requires_grad / train mode / gradient checkpointing are restored; pivotal tuning works on
  private copies of the tokenizers and text encoders.
- Checkpoints, exact resume, the non-finite guard and interrupts from `training.common`.
- Outputs: the LoRA in kohya keys (`.alpha` = lora_alpha, what ComfyUI's LoraLoader maps), an optional
  diffusers-format copy, `<name>_emb.safetensors` (clip_l / clip_g) for pivotal tuning, the loss curve and
  validation images.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from ..core import adapters
from ..core import images as images_mod
from ..core.adapters import DORA_SCALE_BASE_NORM
from ..core.checks import TRAIN_SEED_MAX, check_seed
from ..core.errors import TuneLabError, ref
from . import common

log = logging.getLogger("tunelab")

DEFAULT_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MAX_STEPS = 1_000_000
MAX_BATCH = 64
MAX_RANK = 1024
MAX_RESOLUTION = 4096
DEFAULT_RESOLUTION = 1024  # the script's; on the tiny presets the dataset's size (common.training_resolution)


@dataclass
class LoraTrainConfig:
    """Options and defaults follow train_dreambooth_lora_sdxl.py (README reference run: batch 1 x accumulation 4,
    lr 1e-4 constant, no warmup, 500 steps, 1024 px)."""

    data_dir: str  # folder of images + optional metadata.jsonl (file_name, text)
    output: str  # the LoRA file (.safetensors)
    model: Any = "tiny-sdxl"  # a PipeHandle, or what core.models.load takes
    vae: Optional[str] = None  # VAE override when `model` is a path (e.g. the SDXL fp16-fix VAE)
    dtype: str = "auto"
    device: str = "auto"
    run_dir: Optional[str] = None  # checkpoints, loss curve, validation images; default "<output stem>_run"
    # data
    instance_prompt: str = "wrong"
    use_captions: bool = False  # per-image `text` from metadata.jsonl instead of the instance prompt
    resolution: Optional[int] = None  # None: 1024, or on the tiny presets the dataset's smallest side
    center_crop: bool = False
    random_flip: bool = False
    repeats: int = 1
    allow_upscale: bool = False  # images smaller than the resolution are refused unless this is set
    aspect_buckets: bool = False  # keep each image's aspect ratio within resolution^2 pixels (SDXL buckets)
    bucket_step: int = 64  # bucket sides are multiples of this (kohya: 64; at least 32 for SDXL)
    min_bucket_side: Optional[int] = None  # None: resolution / 4
    max_bucket_side: Optional[int] = None  # None: 2 x resolution
    caption_dropout: float = 0.0  # per step, each caption becomes "" with this probability
    shuffle_tags: bool = False  # per step, shuffle each caption's comma-separated tags ...
    keep_tags: int = 0  # ... keeping the first N in place
    # LoRA
    rank: int = 4
    alpha: Optional[float] = None  # lora_alpha; None = rank (diffusers), i.e. scale 1
    lora_dropout: float = 0.0
    target_modules: tuple = DEFAULT_TARGETS
    use_dora: bool = False  # DoRA (peft use_dora): a magnitude per output row besides the low-rank update
    train_text_encoder: bool = False  # LoRA on both text encoders (q/k/v/out_proj)
    text_encoder_lr: float = 5e-6
    # optimisation
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    max_train_steps: Optional[int] = 500  # None: num_train_epochs decides
    num_train_epochs: int = 1
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_weight_decay_text_encoder: float = 1e-3
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False  # the script's flag: the same as optimizer="adamw8bit"
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | prodigy (prodigyopt)
    scale_lr: bool = False  # learning rates x batch x accumulation x processes (the script's --scale_lr)
    prodigy_beta3: Optional[float] = None  # None: sqrt(beta2)
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    prodigy_d_coef: float = 1.0
    snr_gamma: Optional[float] = None  # Min-SNR weighting (5.0 is the paper's value)
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (follow the weights) | no | fp16 | bf16
    cache_latents: Optional[bool] = None  # None: cached (pixels are fixed once prepared, so their latents are)
    seed: int = 0
    # prior preservation
    with_prior_preservation: bool = False
    class_data_dir: Optional[str] = None  # default "<run_dir>/class_images"; missing images are generated
    class_prompt: str = ""
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_generation_steps: int = 25
    class_generation_guidance: float = 5.0
    # pivotal tuning (textual inversion + LoRA)
    pivotal_tuning: bool = False
    token_abstraction: str = "TOK"
    num_new_tokens: int = 2  # TOK -> <s0><s1>
    embedding_lr: Optional[float] = None  # None: text_encoder_lr (as the advanced script)
    train_embeddings_frac: float = 0.5  # share of the steps during which the new embeddings train
    # checkpoints, resume, guard
    checkpointing_steps: int = 500  # 0: only on interrupt / failure
    checkpoints_total_limit: Optional[int] = 2
    resume: Optional[str] = None  # None | "latest" | a checkpoint path
    max_nonfinite: int = 5
    # outputs
    save_diffusers_copy: bool = False
    validation_prompt: Optional[str] = None  # one prompt per line; None: no validation images
    validation_negative: str = "wrong"  # the seed's: the wrong LoRA is used in the negative prompt
    num_validation_images: int = 1  # per prompt
    validation_steps: int = 0  # every N steps; 0: only after training
    validation_inference_steps: int = 25
    validation_guidance: float = 13.0  # the seed's cfg 13 (the script: the pipeline's 5.0)
    validation_seed: Optional[int] = None  # None: the training seed; the same at every validation
    report_to: str = "none"  # none | tensorboard (accelerate's tracker: loss, lr, grad norm, validation images)


# Where each default comes from. LoraTrainConfig's defaults are the seed's recipe: the wrong LoRA was trained with
# train_dreambooth_lora_sdxl.py "out of the box", i.e. its README's reference run (batch 1 x accumulation 4, no
# warm-up, 500 steps), and is used with `wrong` in the negative prompt at cfg 13. Where the script's own argparse
# defaults differ, they are listed here; recipe="script" (`--recipe script`) takes them all at once.
SCRIPT = "train_dreambooth_lora_sdxl.py"
SCRIPT_RECIPE = {"train_batch_size": 4, "gradient_accumulation_steps": 1, "lr_warmup_steps": 500,
                 "max_train_steps": None, "num_validation_images": 4, "validation_negative": "",
                 "validation_guidance": 5.0}
RECIPES = ("seed", "script")
_TUNELAB_DEFAULTS = {  # options the script does not have (or has as a flag TuneLab fixes differently)
    "seed": "TuneLab's (the script has none, so it is not reproducible)",
    "cache_latents": "TuneLab's: cached (the advanced script's --cache_latents; the plain script encodes every step)",
    "mixed_precision": "TuneLab's: follow the weights (the script: no)",
    "report_to": "TuneLab's (the script: tensorboard)",
    "validation_steps": "TuneLab's (the script validates every 50 epochs)",
    "validation_inference_steps": "the pipeline's 25, as the script",
}
_TUNELAB_ONLY = {"aspect_buckets", "bucket_step", "min_bucket_side", "max_bucket_side", "caption_dropout",
                 "shuffle_tags", "keep_tags", "allow_upscale", "max_nonfinite", "validation_seed",
                 "class_generation_steps", "class_generation_guidance", "run_dir", "prodigy_d_coef"}
_ADVANCED = {"pivotal_tuning", "token_abstraction", "num_new_tokens", "embedding_lr", "train_embeddings_frac"}


def recipe_values(recipe: str) -> dict:
    """The defaults a recipe sets: "seed" (LoraTrainConfig's own) or "script" (the script's argparse defaults)."""
    if recipe not in RECIPES:
        raise TuneLabError(f"unknown recipe '{recipe}'; choose seed or script", input_name="recipe")
    if recipe == "script":
        return dict(SCRIPT_RECIPE)
    defaults = {f.name: f.default for f in fields(LoraTrainConfig)}
    return {k: defaults[k] for k in SCRIPT_RECIPE}


def default_origin(name: str) -> str:
    """Whose default a field has, for --help and the node tooltips."""
    if name in SCRIPT_RECIPE:
        return f"the seed's; the script's is {SCRIPT_RECIPE[name]!r}"
    if name in _TUNELAB_DEFAULTS:
        return _TUNELAB_DEFAULTS[name]
    if name in _TUNELAB_ONLY:
        return "TuneLab's (not in the script)"
    if name in _ADVANCED:
        return "train_dreambooth_lora_sdxl_advanced.py's"
    if name == "prodigy_d_coef":
        return "prodigyopt's"
    return "the script's"


@dataclass
class TrainResult:
    lora_path: Path
    loss_curve_png: Path
    loss_curve: Any  # PIL image
    validation_images: list  # PIL images of the last validation
    losses: list  # one mean loss per optimizer step
    steps: int
    run_dir: Path
    embeddings_path: Optional[Path] = None
    diffusers_path: Optional[Path] = None
    resumed_from: Optional[Path] = None
    last_checkpoint: Optional[Path] = None
    tokens: tuple = ()
    nonfinite_skipped: int = 0
    metadata: dict = field(default_factory=dict)
    validation_grid: Any = None  # PIL: validation images over steps (one row per validation step)
    validation_grid_png: Optional[Path] = None


# ---------------------------------------------------------------------------------------------------------------
# checks


def _check_int(value, name: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TuneLabError(f"{value!r} is out of range; use a whole number from {lo} to {hi}", input_name=name)


def _check_float(value, name: str, lo: float = 0.0, hi: float = math.inf, allow_lo: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value >= lo if allow_lo else value > lo) and value <= hi
    if not ok:
        raise TuneLabError(f"{value!r} is out of range; use a number {'>=' if allow_lo else '>'} {lo:g}",
                           input_name=name)


def check_config(c: LoraTrainConfig) -> None:
    """Refuse bad settings before anything is loaded or written."""
    out = Path(str(c.output or ""))
    if not str(c.output or "").strip():
        raise TuneLabError("no output file given", input_name="output")
    if out.suffix.lower() != ".safetensors":
        raise TuneLabError(f"'{out.name}' must end in .safetensors (TuneLab writes safetensors only)",
                           input_name="output")
    _check_int(c.rank, "rank", 1, MAX_RANK)
    if c.alpha is not None:
        _check_float(c.alpha, "alpha")
    _check_float(c.lora_dropout, "lora_dropout", 0.0, 0.99, allow_lo=True)
    if not c.target_modules or not all(isinstance(t, str) and t.strip() for t in c.target_modules):
        raise TuneLabError("give at least one module name, e.g. to_k,to_q,to_v,to_out.0", input_name="target_modules")
    _check_float(c.learning_rate, "learning_rate", hi=10.0)
    _check_float(c.text_encoder_lr, "text_encoder_lr", hi=10.0)
    if c.embedding_lr is not None:
        _check_float(c.embedding_lr, "embedding_lr", hi=10.0)
    if c.lr_scheduler not in LR_SCHEDULERS:
        raise TuneLabError(f"unknown scheduler '{c.lr_scheduler}'; choose one of {', '.join(LR_SCHEDULERS)}",
                           input_name="lr_scheduler")
    _check_int(c.lr_warmup_steps, "lr_warmup_steps", 0, MAX_STEPS)
    _check_int(c.lr_num_cycles, "lr_num_cycles", 1, 1000)
    if c.max_train_steps is not None:
        _check_int(c.max_train_steps, "max_train_steps", 1, MAX_STEPS)
    _check_int(c.num_train_epochs, "num_train_epochs", 1, 100_000)
    _check_int(c.train_batch_size, "train_batch_size", 1, MAX_BATCH)
    _check_int(c.gradient_accumulation_steps, "gradient_accumulation_steps", 1, 1024)
    _check_int(c.repeats, "repeats", 1, 10_000)
    if c.resolution is not None:  # None: chosen from the dataset in train() (common.training_resolution)
        _check_int(c.resolution, "resolution", 64, MAX_RESOLUTION)
        if c.resolution % 8:
            raise TuneLabError(f"{c.resolution} is not a multiple of 8 (one latent cell is 8 pixels); try "
                               f"{c.resolution - c.resolution % 8}", input_name="resolution")
    if c.aspect_buckets:
        _check_int(c.bucket_step, "bucket_step", 32, 1024)
        if c.bucket_step % 8:
            raise TuneLabError(f"{c.bucket_step} is not a multiple of 8; SDXL buckets need a step of at least 32 "
                               "(kohya: 'smaller values than 32 will not work for SDXL'), e.g. 64",
                               input_name="bucket_step")
        for name in ("min_bucket_side", "max_bucket_side"):
            if getattr(c, name) is not None:
                _check_int(getattr(c, name), name, c.bucket_step, MAX_RESOLUTION * 4)
        if c.min_bucket_side and c.max_bucket_side and c.min_bucket_side > c.max_bucket_side:
            raise TuneLabError(f"min_bucket_side {c.min_bucket_side} is above max_bucket_side {c.max_bucket_side}",
                               input_name="min_bucket_side")
    _check_float(c.caption_dropout, "caption_dropout", 0.0, 1.0, allow_lo=True)
    _check_int(c.keep_tags, "keep_tags", 0, 1000)
    _check_float(c.max_grad_norm, "max_grad_norm")
    _check_float(c.adam_epsilon, "adam_epsilon")
    for name in ("adam_weight_decay", "adam_weight_decay_text_encoder", "noise_offset"):
        _check_float(getattr(c, name), name, 0.0, 10.0, allow_lo=True)
    if c.snr_gamma is not None:
        _check_float(c.snr_gamma, "snr_gamma")
    common.resolve_mixed_precision(c.mixed_precision, None)
    _check_int(c.checkpointing_steps, "checkpointing_steps", 0, MAX_STEPS)
    if c.checkpoints_total_limit is not None:
        _check_int(c.checkpoints_total_limit, "checkpoints_total_limit", 1, 10_000)
    _check_int(c.max_nonfinite, "max_nonfinite", 1, 10_000)
    check_seed(c.seed, hi=TRAIN_SEED_MAX)
    _check_int(c.validation_steps, "validation_steps", 0, MAX_STEPS)
    _check_int(c.num_validation_images, "num_validation_images", 1, 16)
    _check_int(c.validation_inference_steps, "validation_inference_steps", 1, 1000)
    _check_float(c.validation_guidance, "validation_guidance", 0.0, 100.0, allow_lo=True)
    if c.validation_seed is not None:
        _check_int(c.validation_seed, "validation_seed", 0, 2**63 - 1)
    if c.validation_prompt is not None and str(c.validation_prompt).strip() and len(validation_prompts(c)) > 16:
        raise TuneLabError("more than 16 validation prompts; keep a few (one per line)", input_name="validation_prompt")
    common.check_report_to(c.report_to)
    if not c.use_captions and not (c.instance_prompt or "").strip():
        raise TuneLabError("the instance prompt is empty; give one (the wrong LoRA uses 'wrong') or use the "
                           "dataset's captions", input_name="instance_prompt")
    if c.with_prior_preservation:
        if not (c.class_prompt or "").strip():
            raise TuneLabError("prior preservation needs a class prompt, e.g. 'a photo'", input_name="class_prompt")
        _check_int(c.num_class_images, "num_class_images", 1, 100_000)
        _check_float(c.prior_loss_weight, "prior_loss_weight", 0.0, 100.0, allow_lo=True)
        _check_int(c.class_generation_steps, "class_generation_steps", 1, 1000)
    if c.pivotal_tuning:
        if not (c.token_abstraction or "").strip() or any(ch.isspace() for ch in c.token_abstraction.strip()):
            raise TuneLabError("give one word, e.g. TOK, that stands for the new tokens in the prompts",
                               input_name="token_abstraction")
        _check_int(c.num_new_tokens, "num_new_tokens", 1, 16)
        _check_float(c.train_embeddings_frac, "train_embeddings_frac", 0.0, 1.0)
    optimizer_name(c)  # an unknown optimizer, or one whose package is missing, is refused here
    if c.prodigy_beta3 is not None:
        _check_float(c.prodigy_beta3, "prodigy_beta3", 0.0, 1.0)
    _check_float(c.prodigy_d_coef, "prodigy_d_coef", 0.0, 1000.0)
    if c.resume not in (None, "", "none"):  # a missing checkpoint is refused before the data is read
        common.find_checkpoint(_run_dir(c) / "checkpoints", c.resume)


def _run_dir(c: LoraTrainConfig) -> Path:
    output = Path(c.output).expanduser().resolve()
    return Path(c.run_dir).expanduser().resolve() if c.run_dir else output.with_name(output.stem + "_run")


def validation_prompts(c) -> list:
    """The validation prompts: one per line of `validation_prompt` (empty lines skipped)."""
    return [line.strip() for line in str(c.validation_prompt or "").splitlines() if line.strip()]


def optimizer_name(c) -> str:
    """The optimizer a config asks for (use_8bit_adam is the script's spelling of adamw8bit), checked."""
    name = str(c.optimizer or "adamw").lower()
    if c.use_8bit_adam:
        if name not in ("adamw", "adamw8bit"):
            raise TuneLabError(f"use_8bit_adam is 8-bit AdamW, but the optimizer is {name}; turn one of them off",
                               input_name="use_8bit_adam")
        name = "adamw8bit"
    common.check_optimizer(name, "use_8bit_adam" if c.use_8bit_adam else "optimizer")
    return name


# What a checkpoint must agree on to resume: everything that changes the math, nothing that only changes length,
# outputs or speed (steps and epochs only where the schedule depends on them).
_RUN_ONLY = {"data_dir", "output", "model", "vae", "dtype", "device", "run_dir", "resume", "checkpointing_steps",
             "checkpoints_total_limit", "max_nonfinite", "save_diffusers_copy", "validation_prompt",
             "validation_negative", "num_validation_images", "validation_steps", "validation_inference_steps",
             "validation_guidance", "validation_seed", "report_to", "cache_latents", "gradient_checkpointing", "class_data_dir",
             "class_generation_steps", "class_generation_guidance", "max_train_steps", "num_train_epochs"}


def _identity_config(c: LoraTrainConfig, mixed_precision: str, dataset_hash: str, max_steps: int) -> dict:
    out = {k: v for k, v in settings_dict(c).items() if k not in _RUN_ONLY}
    out["mixed_precision"] = mixed_precision
    out["dataset"] = dataset_hash
    if c.lr_scheduler not in ("constant", "constant_with_warmup") or c.pivotal_tuning:
        out["max_train_steps"] = max_steps  # the schedule (or the embeddings' share) depends on it
    return out


def settings_dict(c: LoraTrainConfig) -> dict:
    """The config as JSON-able values (a pipe handle by its source; never `asdict`, which would deep-copy it)."""
    return {f.name: common.describe(getattr(c, f.name)) for f in fields(c)}


# ---------------------------------------------------------------------------------------------------------------
# data


@dataclass
class Example:
    pixels: Any  # uint8 [3, R, R]
    time_ids: tuple  # original (h, w) + crop top-left (top, left) + target (R, R)
    caption: str
    name: str


def _dataset_hash(records, captions) -> str:
    h = hashlib.sha256()
    for rec, cap in zip(records, captions):
        h.update(rec.file_name.encode())
        h.update(hashlib.sha256(Path(rec.path).read_bytes()).digest())
        h.update(cap.encode())
    return h.hexdigest()[:32]


def bucket_sizes(resolution: int, step: int, min_side: Optional[int] = None,
                 max_side: Optional[int] = None) -> list:
    """SDXL aspect-ratio buckets: (width, height) pairs, multiples of `step`, each side within [min_side,
    max_side] (default resolution/4 .. 2 x resolution, as kohya's SDXL settings), the largest height per width whose
    area stays within resolution^2 (kohya's construction), both orientations."""
    lo = max(step, (min_side or resolution // 4) // step * step)
    hi = max(lo, (max_side or 2 * resolution) // step * step)
    budget = resolution * resolution
    found = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, budget // w // step * step)
        if h >= lo:
            found.update({(w, h), (h, w)})
    return sorted(found)


def assign_bucket(width: int, height: int, buckets: list, step: int, allow_upscale: bool) -> tuple:
    """The bucket (width, height) for an image: the one whose aspect ratio is closest to the image's (ties: the
    larger area). An image smaller than that bucket gets, unless `allow_upscale`, a bucket of its own aspect at its
    own size (sides floored to `step`), so it is never upscaled (kohya's bucket_no_upscale)."""
    aspect = math.log(width / height)
    bw, bh = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1], b))
    if allow_upscale or (width >= bw and height >= bh):
        return bw, bh
    scale = min(1.0, math.sqrt(bw * bh / (width * height)))  # at most the budget's area
    return max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step)


def prepare_examples(records, captions, *, resolution: int, center_crop: bool, random_flip: bool, seed: int,
                     allow_upscale: bool, input_name: str = "dataset", buckets: Optional[list] = None,
                     bucket_step: int = 64) -> list:
    """Resize, flip (p=0.5) and crop once per image, as the SDXL script does, and record the micro-conditioning.

    Without `buckets`: short side = resolution (Lanczos), crop to resolution x resolution; images smaller than the
    resolution are refused unless `allow_upscale`. With `buckets` (see `bucket_sizes`): each image is scaled, keeping
    its aspect ratio, just enough to cover its bucket (`assign_bucket`) and cropped to it, so the only pixels lost
    are the sliver the bucket's rounding needs; `original_size`, `crops_coords_top_left` and `target_size` (the
    bucket) are the image's own."""
    import random

    import numpy as np
    import torch
    from PIL import Image

    if buckets:
        targets = [assign_bucket(*r.size, buckets, bucket_step, allow_upscale) for r in records]
        small = [(r.file_name, r.size) for r, (bw, bh) in zip(records, targets) if r.size[0] < bw or r.size[1] < bh]
        if small:
            log.warning("TuneLab: upscaling %d image(s) smaller than their bucket", len(small))
    else:
        targets = [(resolution, resolution)] * len(records)
        common.check_upscale([(r.file_name, r.size) for r in records], resolution, allow_upscale, input_name)
    rng = random.Random(seed)
    out = []
    for rec, caption, (tw, th) in zip(records, captions, targets):
        img = rec.image if rec.image is not None else Image.open(rec.path).convert("RGB")
        w, h = img.size
        if not buckets:
            if w <= h:
                size = (resolution, int(resolution * h / w))
            else:
                size = (int(resolution * w / h), resolution)
        else:  # one scale for both sides, just enough to cover the bucket
            scale = max(tw / w, th / h)
            size = (max(tw, round(w * scale)), max(th, round(h * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
        if random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if center_crop:
            top = max(0, int(round((img.height - th) / 2.0)))
            left = max(0, int(round((img.width - tw) / 2.0)))
        else:
            top = rng.randint(0, img.height - th)
            left = rng.randint(0, img.width - tw)
        img = img.crop((left, top, left + tw, top + th))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        out.append(Example(pixels, (h, w, top, left, th, tw), caption, rec.file_name))
    return out


def epoch_batches(bucket_ids: list, global_batch: int, seed: int, epoch: int) -> list:
    """The batches of one epoch as lists of item indices: a seeded permutation of the items, cut into batches
    within each bucket, the batches then shuffled by the same generator. A function of (seed, epoch) only, so any
    micro-step is known on resume. With one bucket it is the plain permutation cut in order."""
    import torch

    g = torch.Generator().manual_seed(_seed(seed * 1_000_003 + epoch))
    order = torch.randperm(len(bucket_ids), generator=g).tolist()
    groups: dict = {}
    for i in order:
        groups.setdefault(bucket_ids[i], []).append(i)
    if len(groups) == 1:
        return [order[k:k + global_batch] for k in range(0, len(order), global_batch)]
    batches = [items[k:k + global_batch] for key in sorted(groups) for items in [groups[key]]
               for k in range(0, len(items), global_batch)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def process_caption(caption: str, rng, *, dropout: float = 0.0, shuffle: bool = False, keep: int = 0) -> str:
    """Per step: with probability `dropout` the empty caption; otherwise, with `shuffle`, the comma-separated tags
    in a random order after the first `keep` (kohya's shuffle_caption / keep_tokens). `rng` is a torch.Generator."""
    import torch

    if dropout and float(torch.rand((), generator=rng)) < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    tail = [tail[i] for i in torch.randperm(len(tail), generator=rng).tolist()]
    return ", ".join(t for t in head + tail if t)


def _load_records(folder, prompt: Optional[str]):
    from ..core.datasets import load_image_dataset

    return load_image_dataset(folder, instance_prompt=prompt).records


def _class_records(c: LoraTrainConfig, handle, run_dir: Path, progress):
    """Prior-preservation images: the class folder's, with missing ones generated by the synthesis core (resumable:
    a rerun continues where it stopped)."""
    from ..core import synthesis

    folder = Path(c.class_data_dir) if c.class_data_dir else run_dir / "class_images"
    prompt = c.class_prompt.strip()
    have = []
    if folder.is_dir() and any(p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") for p in folder.iterdir()):
        if not (folder / synthesis.PLAN_FILE).is_file():
            have = _load_records(folder, prompt)
            if len(have) < c.num_class_images:
                raise TuneLabError(f"{folder} has {len(have)} class images but {c.num_class_images} are needed; add "
                                   "images, lower num_class_images, or give an empty folder to have them generated",
                                   input_name="class_data_dir")
            return have[:c.num_class_images]
    guidance = float(c.class_generation_guidance)
    entries = tuple(synthesis.Entry(i, prompt, prompt, "", guidance, synthesis.image_seed(c.seed, i), i)
                    for i in range(c.num_class_images))
    plan = synthesis.Plan(entries, (prompt,), "", "{keyword}", (), (guidance,), c.num_class_images, c.seed)
    report = synthesis.run(folder, replace(handle, loras=()), plan, steps=c.class_generation_steps,
                           width=c.resolution, height=c.resolution, instance_prompt=prompt, progress=progress,
                           input_name="class_data_dir")
    if report.generated:
        log.info("TuneLab: generated %d class image(s) in %s", len(report.generated), folder)
    return _load_records(folder, prompt)[:c.num_class_images]


# ---------------------------------------------------------------------------------------------------------------
# text


def encode_plain(tokenizers, text_encoders, prompts: list, device):
    """diffusers' SDXL encode_prompt for training: both encoders' penultimate hidden states concatenated, pooled
    output of the second. Differentiable (used when the encoders or new token embeddings train). For plain text it
    gives the same tensors as TuneLab's prompt encoder (compel), which the frozen path caches."""
    import torch

    embeds, pooled = [], None
    for tok, te in zip(tokenizers, text_encoders):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = te(ids, output_hidden_states=True, return_dict=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


class NewTokens:
    """Pivotal tuning's new token embeddings for one (private) text encoder: a small trainable matrix spliced into
    the embedding lookup by a forward hook, initialised randn * std of the existing embeddings and pulled back
    towards that std after each step (the advanced script's retraction)."""

    def __init__(self, text_encoder, tokenizer, tokens: list, generator, device):
        import torch

        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if len(set(ids)) != len(tokens) or any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise TuneLabError(f"could not add the tokens {tokens} to the tokenizer", input_name="token_abstraction")
        text_encoder.resize_token_embeddings(len(tokenizer))
        emb = text_encoder.get_input_embeddings()
        self.std = float(emb.weight.detach().float()[: min(ids)].std())
        self.ids = list(ids)
        lookup = torch.full((emb.weight.shape[0],), -1, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        self.lookup = lookup.to(device)
        init = torch.randn(len(ids), emb.weight.shape[1], generator=generator) * self.std
        self.param = torch.nn.Parameter(init.to(device=device, dtype=torch.float32))
        self._hook = emb.register_forward_hook(self._splice)
        self.embedding = emb

    def _splice(self, module, inputs, output):
        import torch

        idx = self.lookup[inputs[0]]
        mask = idx >= 0
        if not bool(mask.any()):
            return output
        rows = self.param[idx.clamp(min=0)].to(output.dtype)
        return torch.where(mask.unsqueeze(-1), rows, output)

    def retract(self) -> None:
        import torch

        with torch.no_grad():
            ratio = self.std / float(self.param.float().std().clamp_min(1e-12))
            self.param.mul_(ratio ** 0.1)

    def write_back(self) -> None:
        import torch

        with torch.no_grad():
            self.embedding.weight[self.ids] = self.param.detach().to(self.embedding.weight.dtype)

    def remove(self) -> None:
        self._hook.remove()


def _seed(value: int) -> int:
    return int(value) % (1 << 63)


def expand_tokens(text: str, abstraction: str, tokens: list) -> str:
    return text.replace(abstraction, "".join(tokens))


# ---------------------------------------------------------------------------------------------------------------
# the run, in stages: data -> model -> schedule and resume -> examples -> text side -> caches -> adapters ->
# optimizer and LR schedule -> the loop (step, checkpoint, validate) -> save


@dataclass
class _Data:
    records: list
    captions: list
    tokens: list  # pivotal tuning's new tokens, e.g. ["<s0>", "<s1>"]
    dataset_hash: str
    resolution: int = 0  # the training resolution, resolved from the dataset when the config left it None
    buckets: Optional[list] = None  # aspect-ratio buckets (width, height), when on
    record_buckets: Optional[list] = None  # each record's bucket


def _prepare_data(c: LoraTrainConfig) -> _Data:
    """The dataset and the prompts: a bad dataset or prompt is refused before any model loads."""
    from ..core import prompt as prompt_mod

    records = _load_records(c.data_dir, c.instance_prompt)
    c = replace(c, resolution=common.training_resolution(c.resolution, c.model, [r.size for r in records],
                                                         DEFAULT_RESOLUTION))
    if not c.allow_upscale:  # refused before any model loads (prepare_examples warns when upscaling is allowed)
        common.check_upscale([(r.file_name, r.size) for r in records], c.resolution, False)
    captions = [r.caption if c.use_captions else c.instance_prompt.strip() for r in records]
    tokens: list = []
    if c.pivotal_tuning:
        tokens = [f"<s{i}>" for i in range(c.num_new_tokens)]
        if not any(c.token_abstraction in cap for cap in captions):
            raise TuneLabError(f"pivotal tuning: no prompt contains the token abstraction '{c.token_abstraction}' "
                               f"(instance prompt: '{c.instance_prompt}'); put it in the prompt, e.g. "
                               f"'{c.token_abstraction}'", input_name="token_abstraction")
        captions = [expand_tokens(cap, c.token_abstraction, tokens) for cap in captions]
    for vp in validation_prompts(c):
        prompt_mod.check(vp, input_name="validation_prompt")
    if validation_prompts(c):
        prompt_mod.check(c.validation_negative or "", input_name="validation_negative", required=False)
    data = _Data(records, captions, tokens, _dataset_hash(records, captions), resolution=c.resolution)
    if c.aspect_buckets:
        data.buckets = bucket_sizes(c.resolution, c.bucket_step, c.min_bucket_side, c.max_bucket_side)
        data.record_buckets = [assign_bucket(*r.size, data.buckets, c.bucket_step, c.allow_upscale)
                               for r in records]
    return data


@dataclass
class _Env:
    accelerator: Any
    handle: Any  # the pipe handle as given (it may carry LoRAs)
    base: Any  # the same pipe without LoRAs: what training starts from
    mixed_precision: str
    device: Any
    is_main: bool
    world: int
    rank: int


def _load_model(c: LoraTrainConfig, logging_dir: Optional[Path] = None) -> _Env:
    """accelerate (devices, precision, accumulation) and the SDXL pipe: the given handle, or loaded."""
    import torch

    from ..core import lora as lora_mod
    from ..core import models
    from ..core.models import PipeHandle

    wanted_device = None
    if isinstance(c.model, PipeHandle):
        wanted_device = c.model.device
    elif c.device not in (None, "auto"):
        wanted_device = c.device
    if isinstance(c.model, PipeHandle):
        handle = c.model
        mp = common.resolve_mixed_precision(c.mixed_precision, handle.device, handle.dtype)
        accelerator = common.make_accelerator(mp, c.gradient_accumulation_steps, wanted_device, c.report_to,
                                              logging_dir)
    else:
        probe_dev = models.resolve_device(c.device)
        probe_dtype = models.resolve_dtype(c.dtype, probe_dev)
        mp = common.resolve_mixed_precision(c.mixed_precision, probe_dev, probe_dtype)
        accelerator = common.make_accelerator(mp, c.gradient_accumulation_steps, wanted_device or probe_dev,
                                              c.report_to, logging_dir)
        handle = models.load(str(c.model), vae=c.vae, dtype=c.dtype, device=accelerator.device)
    if handle.family != "sdxl":
        raise TuneLabError(f"this trainer needs an SDXL base model; the pipe is {handle.architecture} "
                           f"({handle.family})", input_name="model")
    if handle.loras:
        log.warning("TuneLab: the pipe carries LoRAs (%s); training starts from the base weights without them",
                    lora_mod.describe(handle))
    return _Env(accelerator=accelerator, handle=handle, base=replace(handle, loras=()), mixed_precision=mp,
                device=torch.device(handle.device), is_main=accelerator.is_main_process,
                world=accelerator.num_processes, rank=accelerator.process_index)


@dataclass
class _Schedule:
    bucket_ids: list  # each item's bucket (item i is record i % records; one bucket without buckets)
    global_batch: int
    batches_per_epoch: int
    max_steps: int


def _schedule(c: LoraTrainConfig, data: _Data, world: int) -> _Schedule:
    n_records = len(data.records)
    n_items = n_records * c.repeats
    if c.with_prior_preservation:
        n_items = max(n_items, c.num_class_images)  # an epoch covers every class image too, as the script's
    ids = [data.record_buckets[i % n_records] if data.record_buckets else 0 for i in range(n_items)]
    global_batch = c.train_batch_size * world
    counts: dict = {}
    for b in ids:
        counts[b] = counts.get(b, 0) + 1
    batches_per_epoch = sum(math.ceil(n / global_batch) for n in counts.values())  # batches stay within a bucket
    steps_per_epoch = math.ceil(batches_per_epoch / c.gradient_accumulation_steps)
    return _Schedule(ids, global_batch, batches_per_epoch, c.max_train_steps or c.num_train_epochs * steps_per_epoch)


def _open_checkpoint(c: LoraTrainConfig, ckpt_dir: Path, identity: dict, base_id: dict, max_steps: int):
    """The checkpoint to resume from (validated against the settings and the base model), or None."""
    if c.resume in (None, "", "none"):
        return None
    ckpt = common.load_checkpoint(common.find_checkpoint(ckpt_dir, c.resume), config=identity, base=base_id)
    if ckpt.step >= max_steps:
        raise TuneLabError(f"the checkpoint {ckpt.path} is at step {ckpt.step}, already at or past "
                           f"{ref('max_train_steps')} {max_steps}; raise it to train further",
                           input_name="max_train_steps")
    return ckpt


def _examples(c: LoraTrainConfig, data: _Data, base, run_dir: Path, progress) -> tuple:
    """(instance examples, class examples): resized, flipped and cropped once, with their micro-conditioning."""
    examples = prepare_examples(data.records, data.captions, resolution=c.resolution, center_crop=c.center_crop,
                                random_flip=c.random_flip, seed=c.seed, allow_upscale=c.allow_upscale,
                                buckets=data.buckets, bucket_step=c.bucket_step)
    class_examples: list = []
    if c.with_prior_preservation:
        class_recs = _class_records(c, base, run_dir, progress)
        class_examples = prepare_examples(class_recs, [c.class_prompt.strip()] * len(class_recs),
                                          resolution=c.resolution, center_crop=c.center_crop,
                                          random_flip=c.random_flip, seed=c.seed + 1, allow_upscale=c.allow_upscale,
                                          input_name="class_data_dir", buckets=data.buckets,
                                          bucket_step=c.bucket_step)
    return examples, class_examples


@dataclass
class _TextSide:
    tokenizers: list
    text_encoders: list
    new_tokens: list  # NewTokens per encoder (pivotal tuning)
    view: Any  # the handle validation samples with
    trainable: bool  # the text side changes during training: encode every step, differentiably


def _text_side(c: LoraTrainConfig, base, tokens: list, device) -> _TextSide:
    """The shared tokenizers and text encoders, or private copies with the new tokens for pivotal tuning."""
    import torch

    pipe = base.pipe
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
    new_tokens: list = []
    view = base
    if c.pivotal_tuning:
        tokenizers = [copy.deepcopy(t) for t in tokenizers]
        text_encoders = [copy.deepcopy(te) for te in text_encoders]
        init_gen = torch.Generator("cpu").manual_seed(_seed(c.seed + 7))
        new_tokens = [NewTokens(te, tok, tokens, init_gen, device) for te, tok in zip(text_encoders, tokenizers)]
        from diffusers import StableDiffusionXLPipeline

        view_pipe = StableDiffusionXLPipeline(
            vae=pipe.vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=pipe.unet, scheduler=pipe.scheduler, add_watermarker=False,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
        view_pipe.set_progress_bar_config(disable=True)
        view = replace(base, pipe=view_pipe)
    return _TextSide(tokenizers, text_encoders, new_tokens, view, c.train_text_encoder or c.pivotal_tuning)


def _cache_text(base, captions, device, dtype) -> dict:
    """{caption: (embeds, pooled)} for frozen text encoders, computed before any training adapter exists."""
    from ..core import prompt as prompt_mod

    cache: dict = {}
    for cap in sorted(set(captions)):
        try:
            cond = prompt_mod.encode(base, cap, "")
        except TuneLabError as e:
            raise TuneLabError(f"caption '{cap[:60]}': {e}", input_name="dataset") from None
        cache[cap] = (cond.embeds[0].to(device, dtype), cond.pooled[0].to(device, dtype))
    return cache


class _LatentEncoder:
    """VAE latent distributions of uint8 pixels. fp16 SDXL VAEs overflow, so they encode in an fp32 copy (as the
    script keeps the VAE in fp32)."""

    def __init__(self, vae, device):
        import torch

        self.vae = vae
        if vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", True)):
            self.vae = copy.deepcopy(vae).to(torch.float32)
        self.device = device
        self.scaling = float(vae.config.scaling_factor)
        self.shift = getattr(vae.config, "shift_factor", None)

    def dist(self, pixels_u8):
        import torch

        with torch.no_grad():
            x = (pixels_u8.to(device=self.device, dtype=torch.float32) / 127.5 - 1.0).to(self.vae.dtype)
            d = self.vae.encode(x).latent_dist
            return d.mean.float(), d.std.float()


@dataclass
class _Adapted:
    trainable: dict  # name -> fp32 parameter (LoRA weights, new token embeddings): what checkpoints hold
    unet_params: dict
    te_params: dict
    emb_params: dict
    trained_models: list  # the modules whose train/eval mode validation toggles


def _add_adapters(stack, c: LoraTrainConfig, pipe, text: _TextSide, device, alpha: float) -> _Adapted:
    """Fresh training adapters on the UNet (and the text encoders), every base weight frozen; all restored when
    `stack` closes, so the shared pipe is left as it was."""
    import torch
    from peft import LoraConfig

    from ..core import lora as lora_mod

    unet, vae = pipe.unet, pipe.vae
    dora = {"use_dora": True} if c.use_dora else {}
    unet_lora = LoraConfig(r=c.rank, lora_alpha=alpha, lora_dropout=c.lora_dropout, init_lora_weights="gaussian",
                           target_modules=list(c.target_modules), **dora)
    te_lora = LoraConfig(r=c.rank, lora_alpha=alpha, lora_dropout=c.lora_dropout, init_lora_weights="gaussian",
                         target_modules=list(TEXT_TARGETS), **dora)
    text_encoders = text.text_encoders
    stack.callback(lambda: [t.remove() for t in text.new_tokens])
    stack.enter_context(common.preserved(unet, vae, *text_encoders))
    # the shared pipe's resting state afterwards: nothing runs until activate() picks a handle's stack. Registered
    # after `preserved`, so it runs before requires_grad is restored (peft < 0.18 also clears it on disabling).
    stack.callback(lambda: pipe.disable_lora() if lora_mod.loaded_adapters(pipe) else None)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    for te in text_encoders:
        te.requires_grad_(False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_seed(c.seed))  # the adapters' gaussian init
        stack.enter_context(common.training_adapter(unet, unet_lora))
        if c.train_text_encoder:
            for te in text_encoders:
                stack.enter_context(common.training_adapter(te, te_lora))
    trained_models = [unet] + (list(text_encoders) if c.train_text_encoder else [])
    unet.train()
    if c.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if c.train_text_encoder:
        for te in text_encoders:
            te.train()
            if c.gradient_checkpointing:
                te.gradient_checkpointing_enable()

    # trainable weights, fp32 (LoRA and embeddings are small; fp32 keeps Adam's updates from rounding away)
    def adapter_params(model, prefix):
        return {f"{prefix}.{n}": p for n, p in model.named_parameters()
                if f".{common.TRAIN_ADAPTER}." in n or n.endswith(f".{common.TRAIN_ADAPTER}")}

    unet_params = adapter_params(unet, "unet")
    te_params = {}
    if c.train_text_encoder:
        te_params.update(adapter_params(text_encoders[0], "text_encoder"))
        te_params.update(adapter_params(text_encoders[1], "text_encoder_2"))
    emb_params = {f"embeddings.{k}": t.param for k, t in zip(("clip_l", "clip_g"), text.new_tokens)}
    trainable = {**unet_params, **te_params, **emb_params}
    for p in trainable.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return _Adapted(trainable, unet_params, te_params, emb_params, trained_models)


def _optimizer(c: LoraTrainConfig, adapted: _Adapted, env: _Env):
    """The optimizer over the parameter groups (UNet; text encoders and new embeddings at their own rate)."""
    name = optimizer_name(c)

    def lr(value):
        return common.scaled_lr(value, c.scale_lr, c.train_batch_size, c.gradient_accumulation_steps, env.world)

    te_lr, emb_lr = lr(c.text_encoder_lr), lr(c.embedding_lr or c.text_encoder_lr)
    if name == "prodigy":  # one step size for all groups: the text side follows learning_rate (as the script)
        if c.learning_rate <= 0.1:
            log.warning("TuneLab: learning rate %g is low for Prodigy, which adapts the step size itself; "
                        "around 1.0 is usual", c.learning_rate)
        if adapted.te_params or adapted.emb_params:
            log.warning("TuneLab: with Prodigy only learning_rate is used; the text side trains at it too")
        te_lr = emb_lr = lr(c.learning_rate)
    groups = [{"params": list(adapted.unet_params.values()), "lr": lr(c.learning_rate),
               "weight_decay": c.adam_weight_decay}]
    if adapted.te_params:
        groups.append({"params": list(adapted.te_params.values()), "lr": te_lr,
                       "weight_decay": c.adam_weight_decay_text_encoder})
    if adapted.emb_params:
        groups.append({"params": list(adapted.emb_params.values()), "lr": emb_lr,
                       "weight_decay": c.adam_weight_decay_text_encoder})
    return common.make_optimizer(name, groups, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon,
                                 device=env.device, prodigy=dict(
                                     beta3=c.prodigy_beta3, decouple=c.prodigy_decouple,
                                     use_bias_correction=c.prodigy_use_bias_correction,
                                     safeguard_warmup=c.prodigy_safeguard_warmup, d_coef=c.prodigy_d_coef))


def _lr_scheduler(c: LoraTrainConfig, optimizer, world: int, max_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(c.lr_scheduler, optimizer=optimizer, num_warmup_steps=c.lr_warmup_steps * world,
                         num_training_steps=max_steps * world, num_cycles=c.lr_num_cycles, power=c.lr_power)


class _Loop:
    """The training state of one run (step, micro-step, losses, the noise generator) and one optimizer step: draw
    the micro-batches, compute the loss, accumulate, clip, step, guard against non-finite values."""

    def __init__(self, c: LoraTrainConfig, env: _Env, sched: _Schedule, text: _TextSide, adapted: _Adapted,
                 optimizer, lr_scheduler, *, unet, weight_dtype, examples, class_examples, cond_cache,
                 encoder: _LatentEncoder, ckpt):
        import torch
        from diffusers import DDPMScheduler

        self.c, self.env, self.sched, self.text, self.adapted = c, env, sched, text, adapted
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.examples, self.class_examples, self.cond_cache, self.encoder = examples, class_examples, cond_cache, \
            encoder
        pipe = env.base.pipe
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.weight_dtype = weight_dtype
        accelerator, world = env.accelerator, env.world
        # Several processes (accelerate launch): the CLI loaded a private pipe, so DDP may wrap the models.
        # One process: the models stay unwrapped, so the shared pipe keeps its own forward.
        self.fwd_unet = accelerator.prepare(unet) if world > 1 else unet
        self.fwd_tes = [accelerator.prepare(te) if (world > 1 and c.train_text_encoder) else te
                        for te in text.text_encoders]
        self.scaler = getattr(accelerator, "scaler", None)
        self.gen = torch.Generator("cpu").manual_seed(_seed(c.seed))  # noise, timesteps, latent samples
        self.generators = {"train": self.gen}
        self.captions_vary = bool(c.caption_dropout or c.shuffle_tags)
        if self.captions_vary:  # its own stream, so turning caption options on leaves the noise as it was
            self.caption_gen = torch.Generator("cpu").manual_seed(_seed(c.seed + 13))
            self.generators["captions"] = self.caption_gen
        self._epoch: tuple = (None, None)  # (epoch, its batches)
        self.latent_cache = None
        self.losses: list = ckpt.state.get("losses", []) if ckpt else []
        self.step = ckpt.step if ckpt else 0
        self.micro_step = int(ckpt.state.get("micro_step", 0)) if ckpt else 0
        self.ti_steps = int(math.ceil(c.train_embeddings_frac * sched.max_steps)) if text.new_tokens else 0
        self.grad_norm: Optional[float] = None  # of the last optimizer step, before clipping

    # -- resume or a fresh start
    def restore(self, ckpt) -> None:
        import torch

        if ckpt is not None:
            ckpt.load_weights(self.adapted.trainable)
            ckpt.restore(optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, scaler=self.scaler,
                         generators=self.generators)
            log.info("TuneLab: resumed from %s at step %d", ckpt.path, ckpt.step)
        else:
            import random as _random

            import numpy as np

            torch.manual_seed(_seed(self.c.seed))
            _random.seed(int(self.c.seed))
            np.random.seed(int(self.c.seed) % (1 << 32))

    def cache_latents(self, ctl) -> None:
        """Each image's latent distribution, once (its pixels never change after preparation)."""
        means, stds = [], []
        for e in self.examples + self.class_examples:
            ctl.check()
            m, s = self.encoder.dist(e.pixels[None])
            means.append(m[0])
            stds.append(s[0])
        self.latent_cache = (means, stds)

    # -- collective flags (several processes agree on skipping and stopping)
    def all_true(self, flag: bool) -> bool:
        import torch

        if self.env.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.env.accelerator.device)
        return bool(self.env.accelerator.reduce(t, reduction="sum").item() == self.env.world)

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)

    # -- one micro-batch
    def batch_indices(self, ms: int) -> list:
        """This process's items of micro-batch `ms`: the epoch's seeded batches (`epoch_batches`, within a bucket),
        so any micro-step is known from the seed alone (exact resume)."""
        s = self.sched
        epoch, b = divmod(ms, s.batches_per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(s.bucket_ids, s.global_batch, self.c.seed, epoch))
        chunk = self._epoch[1][b]
        return chunk[self.env.rank::self.env.world] or chunk[:1]

    def latents_for(self, exs, cache_offset: int, idx):
        import torch

        device = self.env.device
        if self.latent_cache is not None:
            mean = torch.stack([self.latent_cache[0][cache_offset + i] for i in idx])
            std = torch.stack([self.latent_cache[1][cache_offset + i] for i in idx])
        else:
            mean, std = self.encoder.dist(torch.stack([exs[i].pixels for i in idx]))
        sample = mean + std * torch.randn(mean.shape, generator=self.gen).to(device)
        if self.encoder.shift is not None:
            sample = sample - self.encoder.shift
        return (sample * self.encoder.scaling).to(self.weight_dtype)

    def conditioning(self, caps):
        """(embeds, pooled) for a batch's captions, each distinct caption encoded once: from the cache while the
        text side is frozen (captions that vary per step are encoded then, without gradients), else differentiably
        through the training adapters / new tokens."""
        import torch

        distinct = list(dict.fromkeys(caps))
        if not self.text.trainable:
            missing = [cp for cp in distinct if cp not in self.cond_cache]
            fresh = {}
            if missing:
                with torch.no_grad(), _adapters_off(self.text.text_encoders):
                    e, p = encode_plain(self.text.tokenizers, self.fwd_tes, missing, self.env.device)
                fresh = {cp: (e[i].to(self.weight_dtype), p[i].to(self.weight_dtype)) for i, cp in enumerate(missing)}
            table = {cp: self.cond_cache.get(cp) or fresh[cp] for cp in distinct}
            return torch.stack([table[cp][0] for cp in caps]), torch.stack([table[cp][1] for cp in caps])
        embeds, pooled = encode_plain(self.text.tokenizers, self.fwd_tes, distinct, self.env.device)
        rows = torch.tensor([distinct.index(cp) for cp in caps], device=embeds.device)
        return embeds[rows].to(self.weight_dtype), pooled[rows].to(self.weight_dtype)

    def captions(self, exs) -> list:
        c = self.c
        if not self.captions_vary:
            return [e.caption for e in exs]
        return [process_caption(e.caption, self.caption_gen, dropout=c.caption_dropout, shuffle=c.shuffle_tags,
                                keep=c.keep_tags) for e in exs]

    def denoise(self, latents, caps, tids):
        """Noise the latents at uniform timesteps and predict: (prediction, target, timesteps)."""
        import torch

        c, gen, device, dtype = self.c, self.gen, self.env.device, self.weight_dtype
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen)
        if c.noise_offset:
            noise = noise + c.noise_offset * torch.randn((bsz, latents.shape[1], 1, 1), generator=gen)
        scheduler = self.noise_scheduler
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=gen)
        noise = noise.to(device, dtype)
        timesteps = timesteps.to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        embeds, pooled = self.conditioning(caps)
        time_ids = torch.tensor(tids, dtype=dtype, device=device)
        with self.env.accelerator.autocast():
            pred = self.fwd_unet(noisy, timesteps, embeds, added_cond_kwargs={"time_ids": time_ids,
                                                                             "text_embeds": pooled},
                                 return_dict=False)[0]
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise TuneLabError(f"unsupported prediction type {self.prediction_type}", input_name="model")
        return pred, target, timesteps

    def compute_loss(self, items):
        import torch
        from diffusers.training_utils import compute_snr

        c = self.c
        examples, class_examples = self.examples, self.class_examples
        idx = [i % len(examples) for i in items]
        exs = [examples[i] for i in idx]
        caps = self.captions(exs)
        tids = [e.time_ids for e in exs]
        latents = self.latents_for(examples, 0, idx)
        prior = None
        if class_examples:
            cidx = [i % len(class_examples) for i in items]
            class_latents = self.latents_for(class_examples, len(examples), cidx)
            class_caps = [class_examples[i].caption for i in cidx]
            class_tids = [class_examples[i].time_ids for i in cidx]
            if class_latents.shape[2:] == latents.shape[2:]:  # one forward over both halves (the script's way)
                pred, target, timesteps = self.denoise(torch.cat([latents, class_latents]), caps + class_caps,
                                                       tids + class_tids)
                pred, pred_prior = torch.chunk(pred, 2, dim=0)
                target, target_prior = torch.chunk(target, 2, dim=0)
                timesteps = timesteps[: pred.shape[0]]
            else:  # the instance batch is in another bucket than the (square) class images: two forwards
                pred, target, timesteps = self.denoise(latents, caps, tids)
                pred_prior, target_prior, _ = self.denoise(class_latents, class_caps, class_tids)
            prior = torch.nn.functional.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
        else:
            pred, target, timesteps = self.denoise(latents, caps, tids)
        if c.snr_gamma is None:
            loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
        else:
            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.stack([snr, c.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
            if self.prediction_type == "v_prediction":
                weights = weights + 1  # the velocity objective is floored to an SNR weight of one
            per = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
            loss = (per.mean(dim=list(range(1, per.ndim))) * weights).mean()
        if prior is not None:
            loss = loss + c.prior_loss_weight * prior
        return loss

    # -- one optimizer step
    def optimizer_step(self, ctl, save_state) -> Optional[float]:
        """Accumulate, clip and step once; the step's mean loss, or None when a non-finite loss or gradient
        skipped it (after too many in a row: save, then raise)."""
        import torch

        accelerator, optimizer = self.env.accelerator, self.optimizer
        train_embeddings = self.step < self.ti_steps
        for t in self.text.new_tokens:
            t.param.requires_grad_(train_embeddings)
        cycle_losses, cycle_bad = [], False
        for _ in range(self.c.gradient_accumulation_steps):
            idx = self.batch_indices(self.micro_step)
            self.micro_step += 1
            with accelerator.accumulate(self.fwd_unet):
                loss = self.compute_loss(idx)
                if not self.all_true(ctl.finite(loss)):
                    cycle_bad = True
                    continue
                accelerator.backward(loss)
                cycle_losses.append(float(loss.detach().float().item()))
        if not cycle_bad and accelerator.sync_gradients:
            params = [p for p in self.adapted.trainable.values() if p.requires_grad]
            if self.env.world == 1 and self.scaler is None:  # one fused pass over the LoRA's many small tensors
                norm = torch.nn.utils.clip_grad_norm_(params, self.c.max_grad_norm, foreach=True)
            else:  # accelerate unscales fp16 gradients and reduces across processes first
                norm = accelerator.clip_grad_norm_(params, self.c.max_grad_norm)
            if self.scaler is None and norm is not None and not self.all_true(bool(torch.isfinite(norm).item())):
                cycle_bad = not ctl.finite(float("inf"))  # counted like a non-finite loss
            self.grad_norm = float(norm) if norm is not None else None
        if cycle_bad:
            optimizer.zero_grad(set_to_none=True)
            if ctl.too_many_nonfinite:
                raise ctl.nonfinite_error(self.step, save_state(self.step))
            return None
        optimizer.step()
        self.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if train_embeddings:
            for t in self.text.new_tokens:
                t.retract()
        self.step += 1
        step_loss = sum(cycle_losses) / len(cycle_losses)
        self.losses.append(step_loss)
        ctl.stepped(step_loss)
        return step_loss


@contextlib.contextmanager
def _adapters_off(models):
    """The frozen text encoders without any adapter of the shared pipe (an earlier node's LoRA), restored after."""
    layers = adapters.tuner_layers(*models)
    saved = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, off in zip(layers, saved):
            layer.enable_adapters(not off)


class _Validator:
    """Images sampled with the training adapter from each validation prompt and the negative prompt, at one fixed
    seed (the same at every validation, so the images compare across steps), saved per step as
    <run_dir>/validation/step-<step>-<nn>.png. Best effort: a failing sampler never costs the run."""

    def __init__(self, c: LoraTrainConfig, text: _TextSide, adapted: _Adapted, tokens: list, run_dir: Path):
        self.c, self.text, self.adapted, self.tokens, self.run_dir = c, text, adapted, tokens, run_dir
        self.folder = run_dir / "validation"
        self.seed = c.seed if c.validation_seed is None else c.validation_seed

    def _expand(self, text: str) -> str:
        return expand_tokens(text, self.c.token_abstraction, self.tokens) if self.tokens else text

    def __call__(self, at_step: int) -> list:
        from ..core import prompt as prompt_mod
        from ..core import sampling
        from ..core.models import LoraRef

        c = self.c
        vn = self._expand(c.validation_negative or "")
        ref = LoraRef(adapter=common.TRAIN_ADAPTER, weight=1.0, name="training", sha256=f"training-{at_step}")
        h = replace(self.text.view, loras=(ref,))
        trained_models = self.adapted.trained_models
        was_training = [m.training for m in trained_models]
        pics = []  # (prompt, image index, PIL)
        try:
            for m in trained_models:
                m.eval()
            for vp in map(self._expand, validation_prompts(c)):
                cond = prompt_mod.encode(h, vp, vn)
                for i in range(c.num_validation_images):
                    img = sampling.generate(h, cond, seed=self.seed + i, steps=c.validation_inference_steps,
                                            guidance=c.validation_guidance, width=c.resolution, height=c.resolution)
                    pics.append((vp, i, images_mod.tensor_to_pil(img)[0]))
        except Exception as e:  # validation never costs the run (sampling after the save, guarded)
            log.warning("TuneLab: validation at step %d failed: %s", at_step, e)
        finally:
            for m, tr in zip(trained_models, was_training):
                m.train(tr)
                common.activate_adapter(m)
            for t in self.text.new_tokens:
                t.param.requires_grad_(True)
        for n, (vp, i, im) in enumerate(pics):
            images_mod.save_png(im, self.folder / f"step-{at_step:06d}-{n:02d}.png",
                                {"prompt": vp, "negative": vn, "step": at_step, "seed": self.seed + i})
        return [im for _, _, im in pics]

    def grid(self, last_step: int):
        """(PIL, path) of the validation images over steps (see common.validation_grid)."""
        return common.validation_grid(self.folder, last_step, self.run_dir / "validation_grid.png",
                                      caption=" | ".join(validation_prompts(self.c)))


def _base_norm_scales(model, sd: dict) -> dict:
    """`sd` with each DoRA magnitude m as ComfyUI's .dora_scale: m * ||W|| / ||W + dW|| (core.adapters)."""
    ratios = adapters.dora_norm_ratios(model, common.TRAIN_ADAPTER)
    out = dict(sd)
    for key, value in sd.items():
        if key.endswith(".lora_magnitude_vector"):
            out[key] = value * ratios[key[: -len(".lora_magnitude_vector")]].to(value.device, value.dtype)
    return out


def _save_lora(c: LoraTrainConfig, output: Path, handle, unet, text: _TextSide, tokens: list, step: int,
               alpha: float) -> dict:
    """Embeddings and the diffusers copy first, the LoRA last (its presence means "complete"). Returns the paths
    written and the LoRA's metadata."""
    from peft import get_peft_model_state_dict

    from ..core import lora as lora_mod

    paths: dict = {}
    unet_sd = get_peft_model_state_dict(unet, adapter_name=common.TRAIN_ADAPTER)
    te1_sd = te2_sd = None
    if c.train_text_encoder:
        te1_sd = get_peft_model_state_dict(text.text_encoders[0], adapter_name=common.TRAIN_ADAPTER)
        te2_sd = get_peft_model_state_dict(text.text_encoders[1], adapter_name=common.TRAIN_ADAPTER)
    metadata = {
        "base_model": str(handle.source), "base_model_sha256": handle.sha256 or "",
        "base_model_family": handle.family, "instance_prompt": c.instance_prompt,
        "steps": str(step), "resolution": str(c.resolution), "tunelab_trainer": "lora_sdxl",
        "tunelab_settings": json.dumps(settings_dict(c)),
    }
    if text.new_tokens:
        emb_path = output.with_name(output.stem + "_emb.safetensors")
        from safetensors.torch import save_file

        from ..core.files import atomic_path

        with atomic_path(emb_path) as tmp:
            save_file({"clip_l": text.new_tokens[0].param.detach().float().cpu().contiguous(),
                       "clip_g": text.new_tokens[1].param.detach().float().cpu().contiguous()}, str(tmp),
                      metadata={"format": "pt", "tokens": json.dumps(tokens),
                                "token_abstraction": c.token_abstraction})
        paths["embeddings"] = emb_path
        metadata["tunelab_embeddings"] = emb_path.name
        metadata["tunelab_tokens"] = json.dumps(tokens)
    if c.save_diffusers_copy:  # peft's own DoRA magnitudes
        dpath = output.with_name(output.stem + "_diffusers.safetensors")
        lora_mod.save(dpath, unet=unet_sd, text_encoder=te1_sd, text_encoder_2=te2_sd, rank=c.rank,
                      alpha=alpha, metadata=metadata, fmt="diffusers")
        paths["diffusers"] = dpath
    kohya_meta = dict(metadata)
    if c.use_dora:  # ComfyUI's convention for .dora_scale, so its LoraLoader applies the trained weights exactly
        unet_sd = _base_norm_scales(unet, unet_sd)
        if c.train_text_encoder:
            te1_sd = _base_norm_scales(text.text_encoders[0], te1_sd)
            te2_sd = _base_norm_scales(text.text_encoders[1], te2_sd)
        kohya_meta["tunelab_dora_scale"] = DORA_SCALE_BASE_NORM
    lora_mod.save(output, unet=unet_sd, text_encoder=te1_sd, text_encoder_2=te2_sd, rank=c.rank,
                  alpha=alpha, metadata=kohya_meta, fmt="kohya")
    paths["metadata"] = metadata
    return paths


@common.trainable
def train(config: LoraTrainConfig, progress=None) -> TrainResult:
    """Train a Dreambooth LoRA for SDXL and save it; see the module docstring. Raises TuneLabError for bad input
    (nothing written), Interrupted after saving a checkpoint when stopped."""
    from ..core import lora as lora_mod

    c = config
    check_config(c)
    output = Path(c.output).expanduser().resolve()
    run_dir = _run_dir(c)
    ckpt_dir = run_dir / "checkpoints"

    data = _prepare_data(c)
    c = replace(c, resolution=data.resolution)
    env = _load_model(c, run_dir / "logs")
    sched = _schedule(c, data, env.world)
    identity = _identity_config(c, env.mixed_precision, data.dataset_hash, sched.max_steps)
    base_id = common.base_identity(env.base)
    ckpt = _open_checkpoint(c, ckpt_dir, identity, base_id, sched.max_steps)  # before any expensive work
    examples, class_examples = _examples(c, data, env.base, run_dir, progress)
    pipe = env.base.pipe
    unet, vae = pipe.unet, pipe.vae
    text = _text_side(c, env.base, data.tokens, env.device)
    weight_dtype = unet.dtype
    cond_cache = {} if text.trainable else _cache_text(env.base, [e.caption for e in examples + class_examples],
                                                      env.device, weight_dtype)
    encoder = _LatentEncoder(vae, env.device)
    alpha = float(c.alpha) if c.alpha is not None else float(c.rank)

    result_paths: dict = {}
    last_ckpt: Optional[Path] = None
    validation: list = []
    grid = grid_path = None
    with contextlib.ExitStack() as stack:
        adapted = _add_adapters(stack, c, pipe, text, env.device, alpha)
        optimizer = _optimizer(c, adapted, env)
        lr_scheduler = _lr_scheduler(c, optimizer, env.world, sched.max_steps)
        optimizer, lr_scheduler = env.accelerator.prepare(optimizer, lr_scheduler)
        loop = _Loop(c, env, sched, text, adapted, optimizer, lr_scheduler, unet=unet, weight_dtype=weight_dtype,
                     examples=examples, class_examples=class_examples, cond_cache=cond_cache, encoder=encoder,
                     ckpt=ckpt)
        loop.restore(ckpt)
        ctl = stack.enter_context(common.Control(progress if env.is_main else (lambda t, d: _Silent()),
                                                 sched.max_steps, start=loop.step, desc="train lora",
                                                 max_nonfinite=c.max_nonfinite))
        if c.cache_latents is not False:
            loop.cache_latents(ctl)
        validate = _Validator(c, text, adapted, data.tokens, run_dir)
        tracker = common.Tracker(env.accelerator, c.report_to, "tunelab-lora", settings_dict(c))
        stack.callback(tracker.close)

        def validation_at(step: int) -> list:
            pics = validate(step)
            ctl.preview(common.image_row(pics))  # ComfyUI: the node's progress preview while it trains
            tracker.images("validation", pics, step)
            return pics

        def save_state(at_step: int) -> Optional[Path]:
            nonlocal last_ckpt
            path = None
            if env.is_main:
                common.save_loss_curve(loop.losses, run_dir / "loss_curve.png",
                                       title=f"{output.stem}: loss per step")
                path = common.save_checkpoint(
                    ckpt_dir, at_step, weights=adapted.trainable, optimizer=optimizer, lr_scheduler=lr_scheduler,
                    scaler=loop.scaler, generators=loop.generators, config=identity, base=base_id,
                    keep=c.checkpoints_total_limit,
                    state={"micro_step": loop.micro_step, "losses": list(loop.losses), "tokens": data.tokens,
                           "nonfinite_total": ctl.nonfinite_total})
            env.accelerator.wait_for_everyone()
            last_ckpt = path
            return path

        ctl.check()
        max_steps = sched.max_steps
        while loop.step < max_steps:
            if loop.optimizer_step(ctl, save_state) is None:
                continue
            step = loop.step
            tracker.log(step, loss=loop.losses[-1], lr=lr_scheduler.get_last_lr()[0], grad_norm=loop.grad_norm)
            saved_now = False
            if c.checkpointing_steps and step % c.checkpointing_steps == 0 and step < max_steps:
                save_state(step)
                saved_now = True
            if validation_prompts(c) and env.is_main and c.validation_steps and step % c.validation_steps == 0 \
                    and step < max_steps:
                validation = validation_at(step)
            if loop.any_true(ctl.stop_requested()) and step < max_steps:
                if not saved_now:
                    save_state(step)
                ctl.interrupted(step, last_ckpt)

        if env.is_main:
            result_paths = _save_lora(c, output, env.handle, unet, text, data.tokens, loop.step, alpha)
            if validation_prompts(c):  # the trained state, sampled after the save (never costs the LoRA)
                validation = validation_at(loop.step)
                grid, grid_path = validate.grid(loop.step)
        env.accelerator.wait_for_everyone()
        nonfinite_total = ctl.nonfinite_total

    curve_path, curve = run_dir / "loss_curve.png", None
    if env.is_main:
        curve_path, curve = common.save_loss_curve(loop.losses, curve_path, title=f"{output.stem}: loss per step")
    return TrainResult(lora_path=output, loss_curve_png=curve_path, loss_curve=curve, validation_images=validation,
                       losses=list(loop.losses), steps=loop.step, run_dir=run_dir,
                       embeddings_path=result_paths.get("embeddings"), diffusers_path=result_paths.get("diffusers"),
                       resumed_from=ckpt.path if ckpt else None, last_checkpoint=last_ckpt,
                       tokens=tuple(data.tokens), nonfinite_skipped=nonfinite_total,
                       metadata=result_paths.get("metadata", {}), validation_grid=grid, validation_grid_png=grid_path)


class _Silent:
    """Progress for non-main processes: no bar, never interrupted on its own."""

    def update(self, n=1, info=None):
        pass

    def interrupted(self):
        return False

    def check(self):
        pass

    def close(self):
        pass
