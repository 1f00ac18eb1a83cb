"""Generation through diffusers' own pipelines: text-to-image, with an optional SDXL refiner handoff.

The seed's recipe: base with `denoising_end=high_noise_frac` and latent output, then the refiner with
`denoising_start=high_noise_frac` and a generator re-seeded with the same seed. Noise is drawn on the CPU, so a seed
gives the same starting noise on every device.
"""
from __future__ import annotations

from typing import Optional

from . import lora, progress as progress_mod
from .checks import check_choice, check_number, check_seed
from .conditioning import Conditioning
from .errors import TuneLabError
from .models import PipeHandle

MAX_STEPS = 1000
MAX_SIDE = 8192
MAX_BATCH = 64
MAX_GUIDANCE = 100.0

# name -> (diffusers scheduler class, config overrides). "default" keeps the pipeline's own.
SCHEDULERS = {
    "default": (None, {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_sde_karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v < 8 or v > MAX_SIDE:
            raise TuneLabError(f"{v} is out of range; use 8..{MAX_SIDE} pixels", input_name=name)
        if v % 8:
            raise TuneLabError(f"{v} is not a multiple of 8 (one latent cell is 8 pixels); try {v - v % 8 or 8}",
                               input_name=name)


def check_steps(steps: int, input_name: str = "steps") -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise TuneLabError(f"{steps!r} is out of range; use a whole number from 1 to {MAX_STEPS}",
                           input_name=input_name)


def check_guidance(value, input_name: str = "guidance", hi: float = MAX_GUIDANCE) -> float:
    """A guidance scale: a finite number from 0 to `hi` (NaN or infinity would make every pixel NaN)."""
    return check_number(value, input_name, 0.0, hi)


def check_high_noise_frac(value, input_name: str = "high_noise_frac") -> float:
    return check_number(value, input_name, 0.0, 1.0, lo_open=True, hi_open=True,
                        hint="the fraction of denoising the base does before the refiner; the seed uses 0.8")


def check_scheduler(name) -> str:
    return check_choice(name, SCHEDULERS, "scheduler", "scheduler")


def check_generation(*, seed, steps, guidance, width, height, scheduler="default", high_noise_frac=None) -> None:
    """Every sampling setting of one text-to-image run, before anything loads or runs."""
    check_seed(seed)
    check_steps(steps)
    check_guidance(guidance)
    check_size(width, height)
    check_scheduler(scheduler)
    if high_noise_frac is not None:
        check_high_noise_frac(high_noise_frac)


def make_scheduler(handle: PipeHandle, name: str):
    check_scheduler(name)
    cls_name, overrides = SCHEDULERS[name]
    if cls_name is None:
        return handle.pipe.scheduler
    import diffusers

    return getattr(diffusers, cls_name).from_config(handle.pipe.scheduler.config, **overrides)


def generator(seed: int):
    import torch

    # refused, not wrapped: a seed outside 0..2^64-1 would run as another seed than the one recorded
    return torch.Generator("cpu").manual_seed(check_seed(seed))


def to_image_tensor(images):
    """diffusers "pt" output [B,3,H,W] in 0..1 -> ComfyUI IMAGE [B,H,W,3] float32 on the CPU."""
    return images.permute(0, 2, 3, 1).float().cpu().contiguous()


class _StepReporter:
    """diffusers' callback_on_step_end: one progress tick per step; raises at the step boundary on interrupt."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, pipe, step, timestep, kwargs):
        self.bar.update(1)
        self.bar.check()
        return kwargs


def _run(handle: PipeHandle, scheduler_name: str, call_kwargs: dict):
    pipe = handle.pipe
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(handle, scheduler_name)
    try:
        lora.activate(handle)
        return pipe(**call_kwargs)
    finally:
        pipe.scheduler = original


def generate(handle: PipeHandle, cond: Conditioning, *, seed: int, steps: int = 50, guidance: float = 13.0,
             width: int = 1024, height: int = 1024, refiner: Optional[PipeHandle] = None,
             refiner_cond: Optional[Conditioning] = None, high_noise_frac: float = 0.8, scheduler: str = "default",
             progress=None):
    """Text-to-image on `handle` with `cond`; returns a ComfyUI IMAGE tensor [B,H,W,3].

    With a refiner, the base denoises up to `high_noise_frac` and hands its latents to the refiner, which finishes
    with the same seed. `refiner_cond` defaults to the same prompt pair encoded for the refiner.
    """
    import torch

    if handle.family not in ("sdxl", "sd15", "sd2"):
        raise TuneLabError(f"TuneLab Generate needs a text-to-image model; this pipe is {handle.architecture} "
                           f"({handle.family})", input_name="pipe")
    if cond.family != handle.family:
        raise TuneLabError(f"the conditioning was encoded for a {cond.family} model but the pipe is {handle.family}; "
                           "encode the prompt with the same pipe", input_name="conditioning")
    check_generation(seed=seed, steps=steps, guidance=guidance, width=width, height=height, scheduler=scheduler,
                     high_noise_frac=high_noise_frac if refiner is not None else None)
    if cond.batch > MAX_BATCH:
        raise TuneLabError(f"batch {cond.batch} is over the limit of {MAX_BATCH}", input_name="batch_size")
    if refiner is not None:
        if refiner.family != "sdxl-refiner":
            raise TuneLabError(f"the refiner must be an SDXL refiner; got {refiner.architecture}", input_name="refiner")
        if refiner_cond is None:
            from .prompt import encode

            refiner_cond = encode(refiner, cond.prompt, cond.negative, batch=cond.batch)
    total = progress_total(steps, refiner is not None, high_noise_frac)
    common = dict(num_inference_steps=steps, guidance_scale=float(guidance))
    with torch.no_grad(), progress_mod.make(progress, total, "generate") as bar:
        kwargs = dict(common, **cond.diffusers_kwargs(), height=height, width=width, generator=generator(seed),
                      callback_on_step_end=_StepReporter(bar))
        if refiner is None:
            return to_image_tensor(_run(handle, scheduler, dict(kwargs, output_type="pt")).images)
        latents = _run(handle, scheduler, dict(kwargs, denoising_end=high_noise_frac, output_type="latent")).images
        refined = _run(refiner, scheduler, dict(common, **refiner_cond.diffusers_kwargs(), image=latents,
                                                denoising_start=high_noise_frac, generator=generator(seed),
                                                callback_on_step_end=_StepReporter(bar), output_type="pt"))
        return to_image_tensor(refined.images)


def progress_total(steps: int, with_refiner: bool, high_noise_frac: float = 0.8) -> int:
    """Progress ticks one generation makes: one per denoising step, split between base and refiner."""
    if not with_refiner:
        return steps
    # an estimate; diffusers decides the exact split from the timesteps
    n = max(1, round(steps * high_noise_frac))
    return n + max(1, steps - n)
