"""InstructPix2Pix fine-tuning on an instruction dataset: one readable pass from config to a saved pipeline.

It follows diffusers' `examples/instruct_pix2pix/train_instruct_pix2pix.py` (and the seed's
`finetune_instruct_pix2pix.py`, which is the same loop started from an InstructPix2Pix model):

- the model is an InstructPix2Pix pipe (fine-tuning) or an SD1.x text-to-image pipe, whose UNet `conv_in` is widened
  from 4 to 8 input channels with the new weights zero (the script's surgery);
- both images of a pair are resized to `resolution` x `resolution` and flipped together; pairs smaller than the
  resolution are refused unless `allow_upscale` (the rule of the LoRA trainer too); the default resolution is
  256, or on the tiny presets the dataset's smallest side;
- the edited image's latents (VAE sample x scaling factor) are noised at uniform DDPM timesteps; the original
  image's latents (`latent_dist.mode()`, unscaled, as the script) are concatenated on the channel axis;
- conditioning dropout with probability p: text -> the empty prompt when r < 2p, image latents zeroed when
  p <= r < 3p (so [0,p) text only, [p,2p) both, [2p,3p) image only);
- MSE against the noise (or the velocity for v-prediction models), AdamW, diffusers' LR schedulers, grad-norm
  clipping, accelerate for device, mixed precision and gradient accumulation;
- optional EMA (`use_ema`, as the script's `--use_ema`): diffusers' `EMAModel` over the trained parameters, stepped
  after each optimizer step; the EMA weights are what is saved, and checkpoints hold the EMA state.

Defaults are the seed's runs (reference §2.2): 256 px, random flip, batch 2 x accumulation 4, lr 5e-5 constant,
no warmup, 15000 steps, seed 42; conditioning dropout 0.05 as diffusers' README (the seed passes none: set 0 for
that). The seed trains with `--use_ema`; here EMA is off unless asked for (it holds a second copy of the UNet).

Two modes:
- `full` (the script): every UNet weight is trained; output: a diffusers pipeline folder.
- `lora` (diffusers' research `train_instruct_pix2pix_lora.py`): a peft LoRA (rank/alpha, default targets
  to_k,to_q,to_v,to_out.0) on the UNet copy; output: a .safetensors LoRA (kohya keys, optional diffusers copy) that
  `core.lora.load` / TuneLab Load LoRA put on the InstructPix2Pix pipe. LoRA mode needs an InstructPix2Pix model
  (8-channel UNet): from SD1.x the widened conv_in would have to be trained in full, which a LoRA file cannot carry,
  so it is refused -- train `full` from SD1.x, or start the LoRA from an InstructPix2Pix model.

What TuneLab adds: the UNet is trained as a private copy, so the shared pipe of a ComfyUI graph is never changed;
text embeddings are cached per distinct instruction (the text encoder is frozen); checkpoints, exact resume, the
non-finite guard and interrupts come from `training.common`. Output: a diffusers folder (safetensors) that
`core.models.load` and TuneLab Load Pipeline (models/diffusers) open as an InstructPix2Pix model, plus the loss curve.
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

from ..core.checks import TRAIN_SEED_MAX, check_seed
from ..core.errors import TuneLabError, ref
from ..core.files import write_text_atomic
from . import common

log = logging.getLogger("tunelab")

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MAX_STEPS = 1_000_000
DEFAULT_RESOLUTION = 256  # the seed's runs; on the tiny presets the dataset's size (common.training_resolution)


@dataclass
class Ip2pTrainConfig:
    data_dir: str  # instruction dataset folder (metadata.jsonl)
    output: str  # new folder for the fine-tuned pipeline (diffusers format)
    model: Any = "tiny-ip2p"  # a PipeHandle or what core.models.load takes: InstructPix2Pix, or SD1.x (surgery)
    dtype: str = "auto"
    device: str = "auto"
    run_dir: Optional[str] = None  # checkpoints and loss curve; default "<output>_run"
    columns: str = "tunelab"  # column preset or mapping of the dataset
    split: Optional[str] = "train"  # train on this split when the dataset has splits; None: every row
    resolution: Optional[int] = None  # None: 256, or on the tiny presets the dataset's smallest side
    allow_upscale: bool = False  # pairs smaller than the resolution are refused unless this is set (as train-lora)
    random_flip: bool = True
    conditioning_dropout_prob: Optional[float] = 0.05  # 0 (or None): no dropout, as the seed's commands
    learning_rate: float = 5e-5
    scale_lr: bool = False  # learning rate x batch x accumulation (the script's --scale_lr)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: Optional[int] = 15000  # None: num_train_epochs decides
    num_train_epochs: int = 100  # the script's; used when max_train_steps is None
    max_train_samples: Optional[int] = None  # train on this many pairs, drawn by a seeded shuffle (the script's)
    train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    seed: int = 42
    checkpointing_steps: int = 5000  # 0: only on interrupt / failure
    checkpoints_total_limit: Optional[int] = 1
    resume: Optional[str] = None  # None | "latest" | a checkpoint path
    max_nonfinite: int = 5
    use_ema: bool = False  # EMA of the trained weights (diffusers' EMAModel); the EMA weights are saved
    mode: str = "full"  # "full": the whole UNet -> pipeline folder; "lora": a LoRA -> .safetensors file
    rank: int = 4  # LoRA rank (mode="lora")
    lora_alpha: Optional[float] = None  # lora_alpha; None: the rank (scale 1)
    target_modules: tuple = ("to_k", "to_q", "to_v", "to_out.0")  # UNet modules with LoRA
    save_diffusers_copy: bool = False  # LoRA mode: also write <out stem>_diffusers.safetensors (diffusers keys)
    validation_image: Any = None  # an image (path or PIL) edited with validation_prompt during the run
    validation_prompt: Optional[str] = None  # the instruction of the validation edits
    num_validation_images: int = 1
    validation_steps: int = 0  # every N steps; 0: only after training
    validation_seed: Optional[int] = None  # None: the training seed; the same at every validation
    report_to: str = "none"  # none | tensorboard


# Where each default comes from: Ip2pTrainConfig's defaults are the seed's runs (instruction-tuned-sd's README
# commands: 256 px, random flip, batch 2 x accumulation 4, lr 5e-5, no warm-up, 15000 steps, seed 42) with
# diffusers' README conditioning dropout 0.05; recipe "script" takes train_instruct_pix2pix.py's argparse defaults.
SCRIPT = "train_instruct_pix2pix.py"
SCRIPT_RECIPE = {"train_batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
                 "lr_warmup_steps": 500, "max_train_steps": None, "conditioning_dropout_prob": None,
                 "random_flip": False, "checkpointing_steps": 500, "checkpoints_total_limit": None,
                 "num_validation_images": 4}
RECIPES = ("seed", "script")
_ORIGINS = {
    "conditioning_dropout_prob": "diffusers' README command's (the seed passes none; the script: none)",
    "seed": "the seed's (the script has none)",
    "use_ema": "TuneLab's: off (the seed trains with --use_ema; it holds a second UNet)",
    "validation_steps": "TuneLab's (the script validates every epoch)",
    "mixed_precision": "TuneLab's: follow the weights (the seed: fp16)",
    "report_to": "TuneLab's (the script: tensorboard)",
    "mode": "TuneLab's (full is the script)",
}
_TUNELAB_ONLY = {"rank", "lora_alpha", "target_modules", "save_diffusers_copy", "max_nonfinite", "validation_seed",
                 "columns", "split"}


def recipe_values(recipe: str) -> dict:
    if recipe not in RECIPES:
        raise TuneLabError(f"unknown recipe '{recipe}'; choose seed or script", input_name="recipe")
    if recipe == "script":
        return dict(SCRIPT_RECIPE)
    defaults = {f.name: f.default for f in fields(Ip2pTrainConfig)}
    return {k: defaults[k] for k in SCRIPT_RECIPE}


def default_origin(name: str) -> str:
    if name in SCRIPT_RECIPE:
        return f"the seed's; the script's is {SCRIPT_RECIPE[name]!r}"
    if name in _ORIGINS:
        return _ORIGINS[name]
    if name in _TUNELAB_ONLY:
        return "TuneLab's (not in the script)"
    return "the script's"


@dataclass
class Ip2pTrainResult:
    output: Path  # the pipeline folder (full) or the LoRA file (lora)
    loss_curve_png: Path
    loss_curve: Any
    losses: list
    steps: int
    run_dir: Path
    resumed_from: Optional[Path] = None
    last_checkpoint: Optional[Path] = None
    nonfinite_skipped: int = 0
    metadata: dict = field(default_factory=dict)
    mode: str = "full"
    diffusers_path: Optional[Path] = None  # LoRA mode with save_diffusers_copy
    validation_images: list = field(default_factory=list)  # PIL edits of the last validation
    validation_grid: Any = None  # PIL: the validation edits over steps
    validation_grid_png: Optional[Path] = None


MODES = ("full", "lora")


def _check_int(value, name: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TuneLabError(f"{value!r} is out of range; use a whole number from {lo} to {hi}", input_name=name)


def _check_float(value, name: str, lo: float, hi: float, lo_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value >= lo if lo_ok else value > lo) and value <= hi
    if not ok:
        raise TuneLabError(f"{value!r} is out of range; use a number {'>=' if lo_ok else '>'} {lo:g} and <= {hi:g}",
                           input_name=name)


def check_config(c: Ip2pTrainConfig) -> None:
    """Refuse bad settings before anything is loaded or written."""
    if not str(c.output or "").strip():
        raise TuneLabError("no output folder given", input_name="output")
    if c.mode not in MODES:
        raise TuneLabError(f"unknown mode '{c.mode}'; choose full or lora", input_name="mode")
    out = Path(c.output).expanduser()
    if c.mode == "lora":
        if out.suffix.lower() != ".safetensors":
            raise TuneLabError(f"'{out}': in LoRA mode the output is a .safetensors file; try '{out}.safetensors'",
                               input_name="output")
        if out.exists():
            raise TuneLabError(f"'{out}' exists; choose a new LoRA file name (a LoRA is never overwritten)",
                               input_name="output")
        _check_int(c.rank, "rank", 1, 1024)
        if c.lora_alpha is not None:
            _check_float(c.lora_alpha, "lora_alpha", 0.0, 1e6)
        if not c.target_modules or not all(isinstance(t, str) and t.strip() for t in c.target_modules):
            raise TuneLabError("no target modules; e.g. to_k,to_q,to_v,to_out.0", input_name="target_modules")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TuneLabError(f"'{out}' exists and is not an empty folder; choose a new output folder",
                           input_name="output")
    if c.resolution is not None:  # None: chosen from the dataset in train() (common.training_resolution)
        _check_int(c.resolution, "resolution", 64, 4096)
        if c.resolution % 8:
            raise TuneLabError(f"{c.resolution} is not a multiple of 8; try {c.resolution - c.resolution % 8}",
                               input_name="resolution")
    if c.conditioning_dropout_prob is not None:
        _check_float(c.conditioning_dropout_prob, "conditioning_dropout_prob", 0.0, 1 / 3, lo_ok=True)
    _check_float(c.learning_rate, "learning_rate", 0.0, 10.0)
    if c.lr_scheduler not in LR_SCHEDULERS:
        raise TuneLabError(f"unknown scheduler '{c.lr_scheduler}'; choose one of {', '.join(LR_SCHEDULERS)}",
                           input_name="lr_scheduler")
    _check_int(c.lr_warmup_steps, "lr_warmup_steps", 0, MAX_STEPS)
    if c.max_train_steps is not None:
        _check_int(c.max_train_steps, "max_train_steps", 1, MAX_STEPS)
    _check_int(c.num_train_epochs, "num_train_epochs", 1, 100_000)
    if c.max_train_samples is not None:
        _check_int(c.max_train_samples, "max_train_samples", 1, 10_000_000)
    if c.use_8bit_adam:
        common.check_optimizer("adamw8bit", "use_8bit_adam")
    _check_float(c.adam_beta1, "adam_beta1", 0.0, 1.0, lo_ok=True)
    _check_float(c.adam_beta2, "adam_beta2", 0.0, 1.0, lo_ok=True)
    common.check_report_to(c.report_to)
    _check_int(c.validation_steps, "validation_steps", 0, MAX_STEPS)
    _check_int(c.num_validation_images, "num_validation_images", 1, 16)
    if c.validation_seed is not None:
        _check_int(c.validation_seed, "validation_seed", 0, 2**63 - 1)
    if (c.validation_image is None) != (not (c.validation_prompt or "").strip()):
        which = "validation_prompt" if c.validation_image is not None else "validation_image"
        raise TuneLabError("validation needs both an image and an instruction (validation_image and "
                           "validation_prompt); give the other one too, or neither", input_name=which)
    _check_int(c.train_batch_size, "train_batch_size", 1, 64)
    _check_int(c.gradient_accumulation_steps, "gradient_accumulation_steps", 1, 1024)
    _check_float(c.max_grad_norm, "max_grad_norm", 0.0, 1e6)
    _check_float(c.adam_epsilon, "adam_epsilon", 0.0, 1.0)
    _check_float(c.adam_weight_decay, "adam_weight_decay", 0.0, 10.0, lo_ok=True)
    common.resolve_mixed_precision(c.mixed_precision, None)
    _check_int(c.checkpointing_steps, "checkpointing_steps", 0, MAX_STEPS)
    if c.checkpoints_total_limit is not None:
        _check_int(c.checkpoints_total_limit, "checkpoints_total_limit", 1, 10_000)
    _check_int(c.max_nonfinite, "max_nonfinite", 1, 10_000)
    check_seed(c.seed, hi=TRAIN_SEED_MAX)
    if c.resume not in (None, "", "none"):  # a missing checkpoint is refused before the data is read
        common.find_checkpoint(_run_dir(c) / "checkpoints", c.resume)


def _run_dir(c: Ip2pTrainConfig) -> Path:
    output = Path(c.output).expanduser().resolve()
    default_run = output.with_name((output.stem if c.mode == "lora" else output.name) + "_run")
    return Path(c.run_dir).expanduser().resolve() if c.run_dir else default_run


# what a checkpoint must agree on to resume (run length and outputs may change; the LR schedule needs the length)
_RUN_ONLY = {"data_dir", "output", "model", "dtype", "device", "run_dir", "resume", "checkpointing_steps",
             "checkpoints_total_limit", "max_nonfinite", "gradient_checkpointing", "max_train_steps",
             "num_train_epochs", "save_diffusers_copy", "validation_image", "validation_prompt",
             "num_validation_images", "validation_steps", "validation_seed", "report_to", "allow_upscale"}


def settings_dict(c: Ip2pTrainConfig) -> dict:
    return {f.name: common.describe(getattr(c, f.name)) for f in fields(c)}


def _dataset_hash(pairs) -> str:
    h = hashlib.sha256()
    for p in pairs:
        for path in (p.input_path, p.edited_path):
            h.update(hashlib.sha256(Path(path).read_bytes()).digest())
        h.update(p.instruction.encode("utf-8"))
    return h.hexdigest()[:32]


def widen_conv_in(unet) -> None:
    """The script's surgery for a text-to-image UNet: conv_in takes 8 channels, the 4 new ones start at zero."""
    import torch

    old = unet.conv_in
    new = torch.nn.Conv2d(8, old.out_channels, old.kernel_size, old.stride, old.padding).to(old.weight.device,
                                                                                          old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :4].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=8)


@common.trainable
def train(config: Ip2pTrainConfig, progress=None) -> Ip2pTrainResult:
    """Fine-tune InstructPix2Pix and save the pipeline; see the module docstring. Raises TuneLabError for bad input
    (nothing written), Interrupted after saving a checkpoint when stopped."""
    import torch
    import torch.nn.functional as F

    from ..core import instruct_data, models
    from ..core.models import PipeHandle

    c = config
    check_config(c)
    output = Path(c.output).expanduser().resolve()
    run_dir = _run_dir(c)
    ckpt_dir = run_dir / "checkpoints"

    # -- data first: a bad dataset is refused before any model loads
    pairs = instruct_data.read(c.data_dir, columns=c.columns)
    if c.split and any(p.split for p in pairs):
        pairs = [p for p in pairs if p.split == c.split]
    if not pairs:
        raise TuneLabError(f"the dataset has no '{c.split}' rows to train on", input_name="split")
    if c.max_train_samples is not None and c.max_train_samples < len(pairs):  # a seeded shuffle, then the first N
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(int(c.seed) % (1 << 63)))
        pairs = [pairs[i] for i in order[: c.max_train_samples].tolist()]
    sizes = [(p.input_path.name, p.images()[0].size) for p in pairs]  # corrupt files, mismatched pairs: named now
    c = replace(c, resolution=common.training_resolution(c.resolution, c.model, [s for _, s in sizes],
                                                         DEFAULT_RESOLUTION))
    common.check_upscale(sizes, c.resolution, c.allow_upscale)
    dataset_hash = _dataset_hash(pairs)
    validation_image = _load_validation_image(c.validation_image)
    max_steps = c.max_train_steps or c.num_train_epochs * math.ceil(
        math.ceil(len(pairs) / c.train_batch_size) / c.gradient_accumulation_steps)

    # -- accelerate and the model
    if isinstance(c.model, PipeHandle):
        handle = c.model
        mp = common.resolve_mixed_precision(c.mixed_precision, handle.device, handle.dtype)
        accelerator = common.make_accelerator(mp, c.gradient_accumulation_steps, handle.device, c.report_to,
                                              run_dir / "logs")
    else:
        dev = models.resolve_device(c.device)
        mp = common.resolve_mixed_precision(c.mixed_precision, dev, models.resolve_dtype(c.dtype, dev))
        accelerator = common.make_accelerator(mp, c.gradient_accumulation_steps, dev, c.report_to, run_dir / "logs")
        handle = models.load(str(c.model), dtype=c.dtype, device=accelerator.device)
    if handle.family not in ("ip2p", "sd15"):
        raise TuneLabError(f"InstructPix2Pix training starts from an InstructPix2Pix or SD1.x model; this pipe is "
                           f"{handle.architecture} ({handle.family})", input_name="model")
    if accelerator.num_processes > 1:
        raise TuneLabError("the InstructPix2Pix trainer runs in one process; start it without accelerate launch "
                           "(python -m tunelab train-ip2p ...)", input_name="model")
    if c.mode == "lora" and int(handle.pipe.unet.config.in_channels) != 8:
        raise TuneLabError(f"LoRA mode needs an InstructPix2Pix model (8-channel UNet); {handle.architecture} has a "
                           f"{handle.pipe.unet.config.in_channels}-channel UNet whose widened conv_in must be trained "
                           f"in full, which a LoRA cannot hold. Use {ref('mode')} full from SD1.x, or start the LoRA "
                           "from an InstructPix2Pix model", input_name="mode")
    pipe = handle.pipe
    device = torch.device(handle.device)
    identity = {k: v for k, v in settings_dict(c).items() if k not in _RUN_ONLY}
    identity.update(mixed_precision=mp, dataset=dataset_hash)
    if c.mode == "full":  # the LoRA settings mean nothing to a full run; they must not block its resume
        for k in ("rank", "lora_alpha", "target_modules"):
            identity.pop(k, None)
    if c.lr_scheduler not in ("constant", "constant_with_warmup"):
        identity["max_train_steps"] = max_steps
    base_id = common.base_identity(handle)
    ckpt = None
    if c.resume not in (None, "", "none"):
        ckpt = common.load_checkpoint(common.find_checkpoint(ckpt_dir, c.resume), config=identity, base=base_id)
        if ckpt.step >= max_steps:
            raise TuneLabError(f"the checkpoint {ckpt.path} is at step {ckpt.step}, already at or past "
                               f"{ref('max_train_steps')} {max_steps}; raise it to train on",
                               input_name="max_train_steps")

    # -- components: a private UNet copy (trained, fp32), the shared VAE and text encoder (frozen)
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    if handle.loras:
        log.warning("TuneLab: the pipe carries LoRAs; training starts from the base weights without them")
    unet = copy.deepcopy(pipe.unet).to(device=device, dtype=torch.float32)
    if getattr(unet, "peft_config", None):  # LoRAs loaded on the shared pipe: the copy keeps the base weights only
        unet.unload_lora()
    if unet.config.in_channels == 4:
        widen_conv_in(unet)
    vae, text_encoder = pipe.vae, pipe.text_encoder
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise TuneLabError(f"unsupported prediction type {prediction_type}", input_name="model")
    scaling = float(vae.config.scaling_factor)

    from ..core import lora as lora_mod

    lora_mod.activate(replace(handle, loras=()))  # embeddings from the base text encoder

    def embed(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(text_encoder.device)
        with torch.no_grad():
            return text_encoder(ids)[0].float()

    instructions = sorted({p.instruction for p in pairs})
    cache = dict(zip(instructions, embed(instructions)))
    null = embed([""])[0]

    alpha = float(c.lora_alpha) if c.lora_alpha is not None else float(c.rank)
    stack = contextlib.ExitStack()
    with stack:
        if c.mode == "lora":  # a fresh peft adapter on the private copy; only its weights train
            from peft import LoraConfig

            unet.requires_grad_(False)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(c.seed) % (1 << 63))  # the adapter's gaussian init
                stack.enter_context(common.training_adapter(unet, LoraConfig(
                    r=c.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                    target_modules=[t.strip() for t in c.target_modules])))
        else:
            unet.requires_grad_(True)
        unet.train()
        if c.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

        params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        lr = common.scaled_lr(c.learning_rate, c.scale_lr, c.train_batch_size, c.gradient_accumulation_steps, 1)
        optimizer = common.make_optimizer(
            "adamw8bit" if c.use_8bit_adam else "adamw",
            [{"params": list(params.values()), "lr": lr, "weight_decay": c.adam_weight_decay}],
            betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon, device=device,
            input_name="use_8bit_adam" if c.use_8bit_adam else "optimizer")
        lr_scheduler = get_scheduler(c.lr_scheduler, optimizer=optimizer, num_warmup_steps=c.lr_warmup_steps,
                                     num_training_steps=max_steps)
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        scaler = getattr(accelerator, "scaler", None)
        gen = torch.Generator("cpu").manual_seed(int(c.seed) % (1 << 63))  # order, flips, noise, timesteps, dropout
        generators = {"train": gen}
        losses: list = ckpt.state.get("losses", []) if ckpt else []
        step = ckpt.step if ckpt else 0
        micro = int(ckpt.state.get("micro_step", 0)) if ckpt else 0
        if ckpt is not None:
            ckpt.load_weights(params)
            ckpt.restore(optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler, generators=generators)
        ema = None
        if c.use_ema:  # diffusers' EMAModel with the script's defaults (decay 0.9999, warm-up (1+t)/(10+t))
            from diffusers.training_utils import EMAModel

            ema = EMAModel(list(params.values()))
            if ckpt is not None:
                saved = ckpt.state.get("ema") or {}
                shadow = saved.get("shadow") or {}
                if set(shadow) != set(params):
                    raise TuneLabError(f"{ckpt.path} holds no EMA state for this run's weights",
                                       input_name="resume")
                with torch.no_grad():
                    for s, name in zip(ema.shadow_params, params):
                        s.copy_(shadow[name].to(device=s.device, dtype=s.dtype))
                ema.optimization_step = int(saved["optimization_step"])
        if ckpt is not None:
            log.info("TuneLab: resumed from %s at step %d", ckpt.path, ckpt.step)

        batches_per_epoch = math.ceil(len(pairs) / c.train_batch_size)

        def batch(ms: int):
            epoch, b = divmod(ms, batches_per_epoch)
            order = torch.randperm(len(pairs),
                                   generator=torch.Generator().manual_seed((int(c.seed) * 1_000_003 + epoch)
                                                                           % (1 << 63)))
            idx = order[b * c.train_batch_size:(b + 1) * c.train_batch_size].tolist()
            originals, edited, embeds = [], [], []
            for i in idx:
                a, e = pairs[i].images()
                x = torch.cat([_to_tensor(a, c.resolution), _to_tensor(e, c.resolution)])  # one flip for both
                if c.random_flip and torch.rand((), generator=gen) < 0.5:
                    x = x.flip(-1)
                originals.append(x[:3])
                edited.append(x[3:])
                embeds.append(cache[pairs[i].instruction])
            return torch.stack(originals), torch.stack(edited), torch.stack(embeds)

        def compute_loss(ms: int):
            original, edited, embeds = batch(ms)
            bsz = original.shape[0]
            with torch.no_grad():
                vdt = vae.dtype
                latents = vae.encode(edited.to(device, vdt)).latent_dist
                latents = latents.mean + latents.std * torch.randn(latents.mean.shape, generator=gen).to(device, vdt)
                latents = latents.float() * scaling
                image_latents = vae.encode(original.to(device, vdt)).latent_dist.mode().float()
            noise = torch.randn(latents.shape, generator=gen).to(device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen).to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            embeds = embeds.to(device)
            p = c.conditioning_dropout_prob
            if p:
                r = torch.rand(bsz, generator=gen).to(device)
                embeds = torch.where((r < 2 * p)[:, None, None], null.to(device)[None], embeds)
                keep = 1.0 - ((r >= p) & (r < 3 * p)).float()
                image_latents = image_latents * keep[:, None, None, None]
            with accelerator.autocast():
                pred = unet(torch.cat([noisy, image_latents], dim=1), timesteps, embeds, return_dict=False)[0]
            target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
            return F.mse_loss(pred.float(), target.float())

        def save_state(at_step: int) -> Path:
            state = {"micro_step": micro, "losses": list(losses)}
            if ema is not None:
                state["ema"] = {"optimization_step": int(ema.optimization_step),
                                "shadow": dict(zip(params, ema.shadow_params))}
            return common.save_checkpoint(ckpt_dir, at_step, weights=params, optimizer=optimizer,
                                          lr_scheduler=lr_scheduler, scaler=scaler, generators=generators,
                                          config=identity, base=base_id, keep=c.checkpoints_total_limit,
                                          state=state)

        last_ckpt = None
        tracker = common.Tracker(accelerator, c.report_to, "tunelab-ip2p", settings_dict(c))
        stack.callback(tracker.close)
        validate = _Validator(c, handle, unet, run_dir, validation_image, ema, params, accelerator)
        validation: list = []
        grad_norm = None
        with common.preserved(vae, text_encoder), common.Control(progress, max_steps, start=step,
                                                                 desc="train ip2p",
                                                                 max_nonfinite=c.max_nonfinite) as ctl:
            vae.requires_grad_(False)
            text_encoder.requires_grad_(False)
            ctl.check()
            accum = []
            while step < max_steps:
                if not accum and ctl.stop_requested():  # only between optimizer steps, so a resume is exact
                    last_ckpt = save_state(step)
                    ctl.interrupted(step, last_ckpt)
                with accelerator.accumulate(unet):
                    loss = compute_loss(micro)
                    micro += 1
                    if not ctl.finite(loss):
                        optimizer.zero_grad(set_to_none=True)
                        accum = []
                        if ctl.too_many_nonfinite:
                            last_ckpt = save_state(step) if step else None
                            raise ctl.nonfinite_error(step, last_ckpt)
                        continue
                    accelerator.backward(loss)
                    accum.append(float(loss.detach()))
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params.values(), c.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    if ema is not None:
                        ema.step(params.values())
                    step += 1
                    losses.append(sum(accum) / max(len(accum), 1))
                    accum = []
                    ctl.stepped(losses[-1])
                    tracker.log(step, loss=losses[-1], lr=lr_scheduler.get_last_lr()[0],
                                grad_norm=float(grad_norm) if grad_norm is not None else None)
                    if c.checkpointing_steps and step % c.checkpointing_steps == 0 and step < max_steps:
                        last_ckpt = save_state(step)
                    if validate.on and c.validation_steps and step % c.validation_steps == 0 and step < max_steps:
                        validation = validate(step)
                        ctl.preview(common.image_row(validation))
                        tracker.images("validation", validation, step)
            nonfinite = ctl.nonfinite_total

        unet.eval()
        if c.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        if ema is not None:
            ema.copy_to(params.values())  # the EMA weights are the result
        if c.mode == "lora":
            from peft import get_peft_model_state_dict

            lora_sd = {k: v.detach().to("cpu").clone()
                       for k, v in get_peft_model_state_dict(unet, adapter_name=common.TRAIN_ADAPTER).items()}
        grid = grid_path = None
        if validate.on:  # the trained weights (the EMA's, when on); best effort, never costs the model
            validation = validate(step, final=True)
            tracker.images("validation", validation, step)
            grid, grid_path = common.validation_grid(run_dir / "validation", step, run_dir / "validation_grid.png",
                                                     caption=str(c.validation_prompt))

    settings = settings_dict(c)
    curve_path, curve = common.save_loss_curve(losses, run_dir / "loss_curve.png",
                                               title="InstructPix2Pix training loss")
    result = Ip2pTrainResult(output=output, loss_curve_png=curve_path, loss_curve=curve, losses=losses, steps=step,
                             run_dir=run_dir, resumed_from=ckpt.path if ckpt else None, last_checkpoint=last_ckpt,
                             nonfinite_skipped=nonfinite, mode=c.mode, validation_images=validation,
                             validation_grid=grid, validation_grid_png=grid_path)
    if c.mode == "lora":  # the diffusers copy first, the kohya file last (its presence means "complete")
        result.metadata = {
            "base_model": str(handle.source), "base_model_sha256": handle.sha256 or "",
            "base_model_family": handle.family, "steps": str(step), "resolution": str(c.resolution),
            "tunelab_trainer": "instruct_pix2pix_lora", "use_ema": str(bool(c.use_ema)).lower(),
            "tunelab_settings": json.dumps(settings),
        }
        if c.save_diffusers_copy:
            result.diffusers_path = output.with_name(output.stem + "_diffusers.safetensors")
            lora_mod.save(result.diffusers_path, unet=lora_sd, rank=c.rank, alpha=alpha, metadata=result.metadata,
                          fmt="diffusers")
        lora_mod.save(output, unet=lora_sd, rank=c.rank, alpha=alpha, metadata=result.metadata, fmt="kohya")
        return result

    # -- full: the pipeline with the trained UNet (the shared pipe keeps its own)
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from ..core import adapters

    unet.to(handle.dtype)
    te_out = text_encoder
    if adapters.tuner_layers(text_encoder):  # LoRA layers of the shared pipe
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        te_out = recurse_remove_peft_layers(copy.deepcopy(text_encoder))
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if hasattr(te_out, attr):
                delattr(te_out, attr)
    trained = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=te_out, tokenizer=pipe.tokenizer, unet=unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    _save_pipeline(trained, output)
    result.metadata = {"base_model": str(handle.source), "trainer": "tunelab instruct_pix2pix", "steps": step,
                       "use_ema": bool(c.use_ema), "settings": settings}
    write_text_atomic(output / "tunelab_training.json", json.dumps(result.metadata, indent=2) + "\n")
    return result


def _load_validation_image(image):
    """The validation image as RGB PIL (a path is opened now, before any model loads), or None."""
    if image is None:
        return None
    if hasattr(image, "convert"):
        return image.convert("RGB")
    from PIL import Image, UnidentifiedImageError

    path = Path(str(image)).expanduser()
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise TuneLabError(f"cannot read the validation image {path} ({e})", input_name="validation_image") from None


class _Validator:
    """The script's validation: the validation image edited with the validation instruction by the model being
    trained (20 steps, image guidance 1.5, guidance 7, the seed's settings), at a fixed seed, saved per step as
    <run_dir>/validation/step-<step>-<nn>.png. With EMA the EMA weights are shown. Best effort."""

    def __init__(self, c, handle, unet, run_dir: Path, image, ema, params, accelerator):
        self.c, self.handle, self.unet, self.image, self.ema, self.params = c, handle, unet, image, ema, params
        self.accelerator = accelerator
        self.folder = run_dir / "validation"
        self.on = image is not None and bool((c.validation_prompt or "").strip())
        self.seed = c.seed if c.validation_seed is None else c.validation_seed

    def __call__(self, at_step: int, final: bool = False) -> list:
        import torch
        from diffusers import StableDiffusionInstructPix2PixPipeline

        from ..core import images as images_mod
        from ..core import instruct
        from ..core.models import LoraRef

        c, unet, pipe = self.c, self.unet, self.handle.pipe
        was_training = unet.training
        pics = []
        use_ema = self.ema is not None and not final  # at the end the EMA weights are already in place
        try:
            if use_ema:
                self.ema.store(self.params.values())
                self.ema.copy_to(self.params.values())
            unet.eval()
            view = StableDiffusionInstructPix2PixPipeline(
                vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
            view.set_progress_bar_config(disable=True)
            loras = (LoraRef(adapter=common.TRAIN_ADAPTER, weight=1.0, name="training",
                             sha256=f"training-{at_step}"),) if c.mode == "lora" else ()
            h = replace(self.handle, pipe=view, loras=loras)
            batch = images_mod.pil_to_tensor([self.image])
            with torch.no_grad(), self.accelerator.autocast():
                for i in range(c.num_validation_images):
                    out = instruct.edit(h, batch, c.validation_prompt, seed=self.seed + i)
                    pics.append(images_mod.tensor_to_pil(out)[0])
        except Exception as e:  # validation never costs the run
            log.warning("TuneLab: validation at step %d failed: %s", at_step, e)
        finally:
            if use_ema:
                self.ema.restore(self.params.values())
            unet.train(was_training)
            if c.mode == "lora":
                common.activate_adapter(unet)
        for i, im in enumerate(pics):
            images_mod.save_png(im, self.folder / f"step-{at_step:06d}-{i:02d}.png",
                                {"instruction": c.validation_prompt, "step": at_step, "seed": self.seed + i})
        return pics


def _to_tensor(image, resolution: int):
    """PIL -> [3, R, R] in -1..1, resized as the script does (square, aspect ratio not kept)."""
    import numpy as np
    import torch

    from PIL import Image

    arr = np.asarray(image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC),
                     dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def _save_pipeline(pipe, output: Path) -> None:
    """save_pretrained into a temporary folder beside `output`, then rename it into place."""
    import os
    import shutil
    import tempfile

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if output.exists():
            output.rmdir()  # check_config allowed only an empty folder
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
