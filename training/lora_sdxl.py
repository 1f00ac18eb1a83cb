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

from ..core import images as images_mod
from ..core.errors import TuneLabError
from . import common

log = logging.getLogger("tunelab")

DEFAULT_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MAX_STEPS = 1_000_000
MAX_BATCH = 64
MAX_RANK = 1024
MAX_RESOLUTION = 4096


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
    resolution: int = 1024
    center_crop: bool = False
    random_flip: bool = False
    repeats: int = 1
    allow_upscale: bool = False  # images smaller than the resolution are refused unless this is set
    # LoRA
    rank: int = 4
    alpha: Optional[float] = None  # lora_alpha; None = rank (diffusers), i.e. scale 1
    lora_dropout: float = 0.0
    target_modules: tuple = DEFAULT_TARGETS
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
    use_8bit_adam: bool = False
    snr_gamma: Optional[float] = None  # Min-SNR weighting (5.0 is the paper's value)
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (follow the weights) | no | fp16 | bf16
    cache_latents: bool = False
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
    validation_prompt: Optional[str] = None  # None: no validation images
    validation_negative: str = ""
    num_validation_images: int = 1
    validation_steps: int = 0  # every N steps; 0: only after training
    validation_inference_steps: int = 25
    validation_guidance: float = 5.0


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
    _check_int(c.resolution, "resolution", 64, MAX_RESOLUTION)
    if c.resolution % 8:
        raise TuneLabError(f"{c.resolution} is not a multiple of 8 (one latent cell is 8 pixels); try "
                           f"{c.resolution - c.resolution % 8}", input_name="resolution")
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
    _check_int(c.validation_steps, "validation_steps", 0, MAX_STEPS)
    _check_int(c.num_validation_images, "num_validation_images", 1, 16)
    _check_int(c.validation_inference_steps, "validation_inference_steps", 1, 1000)
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
    if c.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TuneLabError("8-bit Adam needs bitsandbytes, which is not installed (pip install bitsandbytes, "
                               "GPU only); or train with the regular AdamW", input_name="use_8bit_adam") from None
    if c.resume not in (None, "", "none", "latest") and not Path(str(c.resume)).expanduser().exists():
        raise TuneLabError(f"checkpoint not found: {c.resume}", input_name="resume")


# What a checkpoint must agree on to resume: everything that changes the math, nothing that only changes length,
# outputs or speed (steps and epochs only where the schedule depends on them).
_RUN_ONLY = {"data_dir", "output", "model", "vae", "dtype", "device", "run_dir", "resume", "checkpointing_steps",
             "checkpoints_total_limit", "max_nonfinite", "save_diffusers_copy", "validation_prompt",
             "validation_negative", "num_validation_images", "validation_steps", "validation_inference_steps",
             "validation_guidance", "cache_latents", "gradient_checkpointing", "class_data_dir",
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


def prepare_examples(records, captions, *, resolution: int, center_crop: bool, random_flip: bool, seed: int,
                     allow_upscale: bool, input_name: str = "dataset") -> list:
    """Resize (short side = resolution, Lanczos), flip (p=0.5), crop, once per image as the SDXL script does, and
    record the micro-conditioning. Images smaller than the resolution are refused unless `allow_upscale`."""
    import random

    import numpy as np
    import torch
    from PIL import Image

    small = [(r.file_name, r.size) for r in records if min(r.size) < resolution]
    if small and not allow_upscale:
        shown = ", ".join(f"{n} ({w}x{h})" for n, (w, h) in small[:4]) + (", ..." if len(small) > 4 else "")
        raise TuneLabError(f"{len(small)} image(s) are smaller than the training resolution {resolution}: {shown}. "
                           "Upscaling blurs what the LoRA learns; lower the resolution, replace the images, or "
                           "allow upscaling", input_name=input_name)
    if small:
        log.warning("TuneLab: upscaling %d image(s) smaller than %d px", len(small), resolution)
    rng = random.Random(seed)
    out = []
    for rec, caption in zip(records, captions):
        img = rec.image if rec.image is not None else Image.open(rec.path).convert("RGB")
        w, h = img.size
        if w <= h:
            size = (resolution, int(resolution * h / w))
        else:
            size = (int(resolution * w / h), resolution)
        img = img.resize(size, Image.Resampling.LANCZOS)
        if random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if center_crop:
            top = max(0, int(round((img.height - resolution) / 2.0)))
            left = max(0, int(round((img.width - resolution) / 2.0)))
        else:
            top = rng.randint(0, img.height - resolution)
            left = rng.randint(0, img.width - resolution)
        img = img.crop((left, top, left + resolution, top + resolution))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        out.append(Example(pixels, (h, w, top, left, resolution, resolution), caption, rec.file_name))
    return out


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
# the run


@common.trainable
def train(config: LoraTrainConfig, progress=None) -> TrainResult:
    """Train a Dreambooth LoRA for SDXL and save it; see the module docstring. Raises TuneLabError for bad input
    (nothing written), Interrupted after saving a checkpoint when stopped."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    from ..core import lora as lora_mod
    from ..core import models, prompt as prompt_mod
    from ..core.models import LoraRef, PipeHandle

    c = config
    check_config(c)
    output = Path(c.output).expanduser().resolve()
    run_dir = Path(c.run_dir).expanduser().resolve() if c.run_dir else output.with_name(output.stem + "_run")
    ckpt_dir = run_dir / "checkpoints"

    # -- data first: a bad dataset is refused before any model loads
    records = _load_records(c.data_dir, c.instance_prompt)
    captions = [r.caption if c.use_captions else c.instance_prompt.strip() for r in records]
    tokens: list = []
    if c.pivotal_tuning:
        tokens = [f"<s{i}>" for i in range(c.num_new_tokens)]
        if not any(c.token_abstraction in cap for cap in captions):
            raise TuneLabError(f"pivotal tuning: no prompt contains the token abstraction '{c.token_abstraction}' "
                               f"(instance prompt: '{c.instance_prompt}'); put it in the prompt, e.g. "
                               f"'{c.token_abstraction}'", input_name="token_abstraction")
        captions = [expand_tokens(cap, c.token_abstraction, tokens) for cap in captions]
    dataset_hash = _dataset_hash(records, captions)
    if c.validation_prompt:
        prompt_mod.check(c.validation_prompt, input_name="validation_prompt")
        prompt_mod.check(c.validation_negative or "", input_name="validation_negative", required=False)

    # -- accelerate and the model
    wanted_device = None
    if isinstance(c.model, PipeHandle):
        wanted_device = c.model.device
    elif c.device not in (None, "auto"):
        wanted_device = c.device
    if isinstance(c.model, PipeHandle):
        handle = c.model
        mp = common.resolve_mixed_precision(c.mixed_precision, handle.device, handle.dtype)
        accelerator = common.make_accelerator(mp, c.gradient_accumulation_steps, wanted_device)
    else:
        probe_dev = models.resolve_device(c.device)
        probe_dtype = models.resolve_dtype(c.dtype, probe_dev)
        mp = common.resolve_mixed_precision(c.mixed_precision, probe_dev, probe_dtype)
        accelerator = common.make_accelerator(mp, c.gradient_accumulation_steps, wanted_device or probe_dev)
        handle = models.load(str(c.model), vae=c.vae, dtype=c.dtype, device=accelerator.device)
    if handle.family != "sdxl":
        raise TuneLabError(f"this trainer needs an SDXL base model; the pipe is {handle.architecture} "
                           f"({handle.family})", input_name="model")
    if handle.loras:
        log.warning("TuneLab: the pipe carries LoRAs (%s); training starts from the base weights without them",
                    lora_mod.describe(handle))
    base = replace(handle, loras=())
    pipe = base.pipe
    device = torch.device(handle.device)
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    rank_id = accelerator.process_index

    # -- schedule (with prior preservation an epoch covers every class image too, as the script's dataset does)
    n_items = len(records) * c.repeats
    if c.with_prior_preservation:
        n_items = max(n_items, c.num_class_images)
    global_batch = c.train_batch_size * world
    batches_per_epoch = math.ceil(n_items / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / c.gradient_accumulation_steps)
    max_steps = c.max_train_steps or c.num_train_epochs * steps_per_epoch
    identity = _identity_config(c, mp, dataset_hash, max_steps)
    base_id = common.base_identity(base)

    # -- resume: validated before any expensive work
    ckpt = None
    if c.resume not in (None, "", "none"):
        ckpt = common.load_checkpoint(common.find_checkpoint(ckpt_dir, c.resume), config=identity, base=base_id)
        if ckpt.step >= max_steps:
            raise TuneLabError(f"the checkpoint {ckpt.path} is at step {ckpt.step}, already at or past "
                               f"max_train_steps={max_steps}; raise max_train_steps to train further",
                               input_name="max_train_steps")

    examples = prepare_examples(records, captions, resolution=c.resolution, center_crop=c.center_crop,
                                random_flip=c.random_flip, seed=c.seed, allow_upscale=c.allow_upscale)
    del records
    class_examples = []
    if c.with_prior_preservation:
        class_recs = _class_records(c, base, run_dir, progress)
        class_examples = prepare_examples(class_recs, [c.class_prompt.strip()] * len(class_recs),
                                          resolution=c.resolution, center_crop=c.center_crop,
                                          random_flip=c.random_flip, seed=c.seed + 1, allow_upscale=c.allow_upscale,
                                          input_name="class_data_dir")

    # -- components: the shared UNet/VAE; text side shared, or private copies for pivotal tuning
    unet, vae = pipe.unet, pipe.vae
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
    gen = torch.Generator("cpu").manual_seed(_seed(c.seed))  # noise, timesteps, latent samples: saved in checkpoints
    new_tokens: list = []
    view = base  # the handle validation samples with
    if c.pivotal_tuning:
        tokenizers = [copy.deepcopy(t) for t in tokenizers]
        text_encoders = [copy.deepcopy(te) for te in text_encoders]
        init_gen = torch.Generator("cpu").manual_seed(_seed(c.seed + 7))
        new_tokens = [NewTokens(te, tok, tokens, init_gen, device) for te, tok in zip(text_encoders, tokenizers)]
        from diffusers import StableDiffusionXLPipeline

        view_pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=pipe.scheduler, add_watermarker=False,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
        view_pipe.set_progress_bar_config(disable=True)
        view = replace(base, pipe=view_pipe)
    text_trainable = c.train_text_encoder or c.pivotal_tuning
    weight_dtype = unet.dtype

    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    alpha = float(c.alpha) if c.alpha is not None else float(c.rank)

    # text embeddings, cached when the encoders are frozen (before any training adapter exists)
    cond_cache: dict = {}
    if not text_trainable:
        for cap in sorted({e.caption for e in examples + class_examples}):
            try:
                cond = prompt_mod.encode(base, cap, "")
            except TuneLabError as e:
                raise TuneLabError(f"caption '{cap[:60]}': {e}", input_name="dataset") from None
            cond_cache[cap] = (cond.embeds[0].to(device, weight_dtype), cond.pooled[0].to(device, weight_dtype))

    # VAE: fp16 SDXL VAEs overflow; encode in an fp32 copy then (as the script keeps the VAE in fp32)
    enc_vae = vae
    if vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", True)):
        enc_vae = copy.deepcopy(vae).to(torch.float32)
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)

    def latent_dist(pixels_u8):
        with torch.no_grad():
            x = (pixels_u8.to(device=device, dtype=torch.float32) / 127.5 - 1.0).to(enc_vae.dtype)
            dist = enc_vae.encode(x).latent_dist
            return dist.mean.float(), dist.std.float()

    latent_cache = None

    unet_lora = LoraConfig(r=c.rank, lora_alpha=alpha, lora_dropout=c.lora_dropout, init_lora_weights="gaussian",
                           target_modules=list(c.target_modules))
    te_lora = LoraConfig(r=c.rank, lora_alpha=alpha, lora_dropout=c.lora_dropout, init_lora_weights="gaussian",
                         target_modules=list(TEXT_TARGETS))

    result_paths: dict = {}
    losses: list = ckpt.state.get("losses", []) if ckpt else []
    step = ckpt.step if ckpt else 0
    micro_step = int(ckpt.state.get("micro_step", 0)) if ckpt else 0
    last_ckpt: Optional[Path] = None
    validation: list = []

    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [t.remove() for t in new_tokens])
        stack.enter_context(common.preserved(unet, vae, *text_encoders))
        # the shared pipe's resting state: nothing runs until activate() picks a handle's stack. Before `preserved`
        # restores requires_grad, since peft < 0.18 also clears it on disabling.
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
        emb_params = {f"embeddings.{k}": t.param for k, t in zip(("clip_l", "clip_g"), new_tokens)}
        trainable = {**unet_params, **te_params, **emb_params}
        for p in trainable.values():
            p.data = p.data.float()
            p.requires_grad_(True)

        groups = [{"params": list(unet_params.values()), "lr": c.learning_rate,
                   "weight_decay": c.adam_weight_decay}]
        if te_params:
            groups.append({"params": list(te_params.values()), "lr": c.text_encoder_lr,
                           "weight_decay": c.adam_weight_decay_text_encoder})
        if emb_params:
            groups.append({"params": list(emb_params.values()), "lr": c.embedding_lr or c.text_encoder_lr,
                           "weight_decay": c.adam_weight_decay_text_encoder})
        adam = dict(betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon)
        if c.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(groups, **adam)
        else:
            # a LoRA is hundreds of small tensors: one fused kernel per step instead of a loop over them (same
            # AdamW math; the plain script's default loops on the CPU)
            try:
                optimizer = torch.optim.AdamW(groups, fused=True, **adam)
            except (RuntimeError, TypeError, ValueError):
                optimizer = torch.optim.AdamW(groups, foreach=True, **adam)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(c.lr_scheduler, optimizer=optimizer,
                                     num_warmup_steps=c.lr_warmup_steps * world,
                                     num_training_steps=max_steps * world, num_cycles=c.lr_num_cycles,
                                     power=c.lr_power)
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        # Several processes (accelerate launch): the CLI loaded a private pipe, so DDP may wrap the models.
        # One process: the models stay unwrapped, so the shared pipe keeps its own forward.
        fwd_unet = accelerator.prepare(unet) if world > 1 else unet
        fwd_tes = [accelerator.prepare(te) if (world > 1 and c.train_text_encoder) else te for te in text_encoders]
        scaler = getattr(accelerator, "scaler", None)
        generators = {"train": gen}

        if ckpt is not None:
            ckpt.load_weights(trainable)
            ckpt.restore(optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler, generators=generators)
            log.info("TuneLab: resumed from %s at step %d", ckpt.path, ckpt.step)
        else:
            import numpy as np
            import random as _random

            torch.manual_seed(_seed(c.seed))
            _random.seed(int(c.seed))
            np.random.seed(int(c.seed) % (1 << 32))

        ctl = stack.enter_context(common.Control(progress if is_main else (lambda t, d: _Silent()), max_steps,
                                                 start=step, desc="train lora", max_nonfinite=c.max_nonfinite))

        if c.cache_latents:
            means, stds = [], []
            for e in examples + class_examples:
                ctl.check()
                m, s = latent_dist(e.pixels[None])
                means.append(m[0])
                stds.append(s[0])
            latent_cache = (torch.stack(means), torch.stack(stds))

        def save_state(at_step: int) -> Optional[Path]:
            path = None
            if is_main:
                common.save_loss_curve(losses, run_dir / "loss_curve.png", title=f"{output.stem}: loss per step")
                path = common.save_checkpoint(
                    ckpt_dir, at_step, weights=trainable, optimizer=optimizer, lr_scheduler=lr_scheduler,
                    scaler=scaler, generators=generators, config=identity, base=base_id,
                    keep=c.checkpoints_total_limit,
                    state={"micro_step": micro_step, "losses": list(losses), "tokens": tokens,
                           "nonfinite_total": ctl.nonfinite_total})
            accelerator.wait_for_everyone()
            return path

        def all_true(flag: bool) -> bool:
            if world == 1:
                return flag
            t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
            return bool(accelerator.reduce(t, reduction="sum").item() == world)

        def any_true(flag: bool) -> bool:
            return not all_true(not flag)

        def batch_indices(ms: int) -> list:
            epoch, b = divmod(ms, batches_per_epoch)
            order = torch.randperm(n_items, generator=torch.Generator().manual_seed(_seed(c.seed * 1_000_003 + epoch)))
            chunk = order[b * global_batch:(b + 1) * global_batch].tolist()
            return chunk[rank_id::world] or chunk[:1]

        def latents_for(exs, cache_offset: int, idx):
            if latent_cache is not None:
                rows = torch.tensor([cache_offset + i for i in idx], device=latent_cache[0].device)
                mean, std = latent_cache[0][rows], latent_cache[1][rows]
            else:
                mean, std = latent_dist(torch.stack([exs[i].pixels for i in idx]))
            sample = mean + std * torch.randn(mean.shape, generator=gen).to(device)
            if shift is not None:
                sample = sample - shift
            return (sample * scaling).to(weight_dtype)

        def conditioning(caps):
            if not text_trainable:
                embeds = torch.stack([cond_cache[cp][0] for cp in caps])
                pooled = torch.stack([cond_cache[cp][1] for cp in caps])
                return embeds, pooled
            embeds, pooled = encode_plain(tokenizers, fwd_tes, caps, device)
            return embeds.to(weight_dtype), pooled.to(weight_dtype)

        def compute_loss(items):
            idx = [i % len(examples) for i in items]
            exs = [examples[i] for i in idx]
            caps = [e.caption for e in exs]
            tids = [e.time_ids for e in exs]
            latents = latents_for(examples, 0, idx)
            if class_examples:
                cidx = [i % len(class_examples) for i in items]
                latents = torch.cat([latents, latents_for(class_examples, len(examples), cidx)])
                caps += [class_examples[i].caption for i in cidx]
                tids += [class_examples[i].time_ids for i in cidx]
            bsz = latents.shape[0]
            noise = torch.randn(latents.shape, generator=gen)
            if c.noise_offset:
                noise = noise + c.noise_offset * torch.randn((bsz, latents.shape[1], 1, 1), generator=gen)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen)
            noise = noise.to(device, weight_dtype)
            timesteps = timesteps.to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            embeds, pooled = conditioning(caps)
            time_ids = torch.tensor(tids, dtype=weight_dtype, device=device)
            with accelerator.autocast():
                pred = fwd_unet(noisy, timesteps, embeds, added_cond_kwargs={"time_ids": time_ids,
                                                                            "text_embeds": pooled},
                                return_dict=False)[0]
            if prediction_type == "epsilon":
                target = noise
            elif prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                raise TuneLabError(f"unsupported prediction type {prediction_type}", input_name="model")
            prior = None
            if class_examples:
                pred, pred_prior = torch.chunk(pred, 2, dim=0)
                target, target_prior = torch.chunk(target, 2, dim=0)
                timesteps = timesteps[: pred.shape[0]]
                prior = torch.nn.functional.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
            if c.snr_gamma is None:
                loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
            else:
                snr = compute_snr(noise_scheduler, timesteps)
                weights = torch.stack([snr, c.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
                if prediction_type == "v_prediction":
                    weights = weights + 1  # the velocity objective is floored to an SNR weight of one
                per = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
                loss = (per.mean(dim=list(range(1, per.ndim))) * weights).mean()
            if prior is not None:
                loss = loss + c.prior_loss_weight * prior
            return loss

        def run_validation(at_step: int) -> list:
            if not c.validation_prompt or not is_main:
                return []
            from ..core import sampling

            vp = expand_tokens(c.validation_prompt, c.token_abstraction, tokens) if tokens else c.validation_prompt
            vn = expand_tokens(c.validation_negative or "", c.token_abstraction, tokens) if tokens \
                else (c.validation_negative or "")
            ref = LoraRef(adapter=common.TRAIN_ADAPTER, weight=1.0, name="training", sha256=f"training-{at_step}")
            h = replace(view, loras=(ref,))
            was_training = [m.training for m in trained_models]
            pics = []
            try:
                for m in trained_models:
                    m.eval()
                for i in range(c.num_validation_images):
                    cond = prompt_mod.encode(h, vp, vn)
                    img = sampling.generate(h, cond, seed=c.seed + i, steps=c.validation_inference_steps,
                                            guidance=c.validation_guidance, width=c.resolution,
                                            height=c.resolution)
                    pics.append(images_mod.tensor_to_pil(img)[0])
            except Exception as e:  # validation never costs the run (B4: sampling after the save, guarded)
                log.warning("TuneLab: validation at step %d failed: %s", at_step, e)
            finally:
                for m, tr in zip(trained_models, was_training):
                    m.train(tr)
                    common.activate_adapter(m)
                for t in new_tokens:
                    t.param.requires_grad_(True)
            vdir = run_dir / "validation"
            for i, im in enumerate(pics):
                images_mod.save_png(im, vdir / f"step-{at_step:06d}-{i:02d}.png",
                                    {"prompt": vp, "negative": vn, "step": at_step, "seed": c.seed + i})
            return pics

        ti_steps = int(math.ceil(c.train_embeddings_frac * max_steps)) if new_tokens else 0
        ctl.check()
        while step < max_steps:
            train_embeddings = step < ti_steps
            for t in new_tokens:
                t.param.requires_grad_(train_embeddings)
            cycle_losses, cycle_bad = [], False
            for _ in range(c.gradient_accumulation_steps):
                idx = batch_indices(micro_step)
                micro_step += 1
                with accelerator.accumulate(fwd_unet):
                    loss = compute_loss(idx)
                    if not all_true(ctl.finite(loss)):
                        cycle_bad = True
                        continue
                    accelerator.backward(loss)
                    cycle_losses.append(float(loss.detach().float().item()))
            if not cycle_bad and accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_([p for p in trainable.values() if p.requires_grad],
                                                   c.max_grad_norm)
                if scaler is None and norm is not None and not all_true(bool(torch.isfinite(norm).item())):
                    cycle_bad = not ctl.finite(float("inf"))  # counted like a non-finite loss
            if cycle_bad:
                optimizer.zero_grad(set_to_none=True)
                if ctl.too_many_nonfinite:
                    last_ckpt = save_state(step)
                    raise ctl.nonfinite_error(step, last_ckpt)
                continue
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if train_embeddings:
                for t in new_tokens:
                    t.retract()
            step += 1
            step_loss = sum(cycle_losses) / len(cycle_losses)
            losses.append(step_loss)
            ctl.stepped(step_loss)
            saved_now = False
            if c.checkpointing_steps and step % c.checkpointing_steps == 0 and step < max_steps:
                last_ckpt = save_state(step)
                saved_now = True
            if c.validation_steps and step % c.validation_steps == 0 and step < max_steps:
                validation = run_validation(step)
            if any_true(ctl.stop_requested()) and step < max_steps:
                if not saved_now:
                    last_ckpt = save_state(step)
                ctl.interrupted(step, last_ckpt)

        # -- save: embeddings and the diffusers copy first, the LoRA last (its presence means "complete")
        if is_main:
            unet_sd = get_peft_model_state_dict(unet, adapter_name=common.TRAIN_ADAPTER)
            te1_sd = te2_sd = None
            if c.train_text_encoder:
                te1_sd = get_peft_model_state_dict(text_encoders[0], adapter_name=common.TRAIN_ADAPTER)
                te2_sd = get_peft_model_state_dict(text_encoders[1], adapter_name=common.TRAIN_ADAPTER)
            settings = settings_dict(c)
            metadata = {
                "base_model": str(handle.source), "base_model_sha256": handle.sha256 or "",
                "base_model_family": handle.family, "instance_prompt": c.instance_prompt,
                "steps": str(step), "resolution": str(c.resolution), "tunelab_trainer": "lora_sdxl",
                "tunelab_settings": json.dumps(settings),
            }
            if new_tokens:
                emb_path = output.with_name(output.stem + "_emb.safetensors")
                from safetensors.torch import save_file

                from ..core.files import atomic_path

                with atomic_path(emb_path) as tmp:
                    save_file({"clip_l": new_tokens[0].param.detach().float().cpu().contiguous(),
                               "clip_g": new_tokens[1].param.detach().float().cpu().contiguous()}, str(tmp),
                              metadata={"format": "pt", "tokens": json.dumps(tokens),
                                        "token_abstraction": c.token_abstraction})
                result_paths["embeddings"] = emb_path
                metadata["tunelab_embeddings"] = emb_path.name
                metadata["tunelab_tokens"] = json.dumps(tokens)
            if c.save_diffusers_copy:
                dpath = output.with_name(output.stem + "_diffusers.safetensors")
                lora_mod.save(dpath, unet=unet_sd, text_encoder=te1_sd, text_encoder_2=te2_sd, rank=c.rank,
                              alpha=alpha, metadata=metadata, fmt="diffusers")
                result_paths["diffusers"] = dpath
            lora_mod.save(output, unet=unet_sd, text_encoder=te1_sd, text_encoder_2=te2_sd, rank=c.rank,
                          alpha=alpha, metadata=metadata, fmt="kohya")
            result_paths["metadata"] = metadata
            # the trained state, sampled after the save (a failing sampler never costs the LoRA)
            if c.validation_prompt:
                validation = run_validation(step)
        accelerator.wait_for_everyone()
        nonfinite_total = ctl.nonfinite_total

    curve_path, curve = run_dir / "loss_curve.png", None
    if is_main:
        curve_path, curve = common.save_loss_curve(losses, curve_path, title=f"{output.stem}: loss per step")
    return TrainResult(lora_path=output, loss_curve_png=curve_path, loss_curve=curve, validation_images=validation,
                       losses=list(losses), steps=step, run_dir=run_dir,
                       embeddings_path=result_paths.get("embeddings"), diffusers_path=result_paths.get("diffusers"),
                       resumed_from=ckpt.path if ckpt else None, last_checkpoint=last_ckpt, tokens=tuple(tokens),
                       nonfinite_skipped=nonfinite_total, metadata=result_paths.get("metadata", {}))


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
