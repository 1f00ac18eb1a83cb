"""Generation through diffusers' own pipelines: text-to-image, with an optional SDXL refiner handoff.

The seed's recipe: base with `denoising_end=high_noise_frac` and latent output, then the refiner with
`denoising_start=high_noise_frac` and a generator re-seeded with the same seed. Noise is drawn on the CPU, so a seed
gives the same starting noise on every device.

A LoRA on the negative branch only (Diffusion-NPO's idea): `generate(..., negative_handle=...)` runs diffusers' own
pipeline, but for that one call the UNet's forward splits the classifier-free-guidance batch `[negative; positive]`
(the order every diffusers SD/SDXL pipeline builds) into two calls, the negative half with `negative_handle`'s LoRA
stack active and the positive half with `handle`'s. Everything else (timesteps, noise, guidance, the scheduler step,
decoding) stays diffusers'. Without a negative handle nothing is wrapped, so the ordinary path runs one batched UNet
call per step as before.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from . import adapters, lora, progress as progress_mod
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


def _run(handle: PipeHandle, scheduler_name: str, call_kwargs: dict, negative_handle: Optional[PipeHandle] = None):
    pipe = handle.pipe
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(handle, scheduler_name)
    try:
        if negative_handle is None:
            lora.activate(handle)
            return pipe(**call_kwargs)
        with NegativeBranchLora(handle, negative_handle, call_kwargs):
            return pipe(**call_kwargs)
    finally:
        pipe.scheduler = original


def _split(value, lo: int, hi: int, n: int):
    """The [lo:hi] rows of every tensor in `value` whose first dimension is the CFG batch `n` (dicts recursively);
    everything else (the timestep, scales, None) unchanged."""
    if hasattr(value, "shape") and getattr(value, "ndim", 0) >= 1 and value.shape[0] == n:
        return value[lo:hi]
    if isinstance(value, dict):
        return {k: _split(v, lo, hi, n) for k, v in value.items()}
    return value


def _cat(a, b):
    import torch

    if isinstance(a, tuple):
        return tuple(_cat(x, y) for x, y in zip(a, b))
    if hasattr(a, "sample"):  # UNet2DConditionOutput (return_dict=True)
        return type(a)(sample=torch.cat([a.sample, b.sample]))
    return torch.cat([a, b])


class NegativeBranchLora:
    """For one pipeline call, the UNet runs the negative half of the CFG batch with `negative_handle`'s adapters
    and the positive half with `positive_handle`'s (two UNet calls per step instead of one batched call).

    The instance's `forward` attribute is replaced for the duration and restored after (also when the call
    raises). Each call checks that the halves are really [negative; positive] by comparing the encoder states with
    the embeddings handed to the pipeline, so a diffusers release that changed the order fails loudly instead of
    swapping the branches. A batch without CFG (guidance <= 1) has no negative branch: it runs with the positive
    handle alone."""

    def __init__(self, positive_handle: PipeHandle, negative_handle: PipeHandle, call_kwargs: dict):
        if negative_handle.pipe is not positive_handle.pipe:
            raise TuneLabError("the negative-branch pipe must be the same loaded model as the positive one (a "
                               "LoRA applied to it); load the LoRA on this pipe", input_name="negative_pipe")
        self.positive, self.negative = positive_handle, negative_handle
        self.unet = positive_handle.pipe.unet
        # Switching inside the loop touches the UNet only (the text encoders ran before it). In the usual state, no
        # LoRA on the positive branch, that is one flag per adapter layer (peft's enable_adapters) rather than a
        # pipe-wide set_adapters walk twice per step; other stacks are activated in full each time.
        self._layers = (adapters.tuner_layers(self.unet) if negative_handle.loras and not positive_handle.loras
                        else None)
        self.embeds = call_kwargs.get("prompt_embeds")
        self.negative_embeds = call_kwargs.get("negative_prompt_embeds")
        self.calls = 0

    def __enter__(self):
        own = vars(self.unet)
        self._had_own, self._own = "forward" in own, own.get("forward")
        self._forward = self.unet.forward  # what nn.Module.__call__ would run (accelerate hooks included)
        self.unet.forward = self.forward
        if self._layers is not None:
            lora.activate(self.negative)  # its adapters and strengths; the loop only turns them on and off
        return self

    def _use(self, handle) -> None:
        if self._layers is None:
            lora.activate(handle)
            return
        for layer in self._layers:
            layer.enable_adapters(handle is self.negative)

    def __exit__(self, *exc):
        if self._had_own:
            self.unet.forward = self._own
        else:
            del self.unet.forward
        lora.activate(self.positive)
        return False

    def _check_order(self, states, half: int) -> None:
        import torch

        for part, ref, name in ((states[:half], self.negative_embeds, "negative"),
                                (states[half:], self.embeds, "positive")):
            if ref is not None and not (part.shape[1:] == ref.shape[1:] and
                                        torch.equal(part, ref.to(part.device, part.dtype).repeat_interleave(
                                            part.shape[0] // ref.shape[0], dim=0))):
                raise TuneLabError(f"this diffusers version does not put the {name} prompt where TuneLab expects it "
                                   "in the guidance batch, so the LoRA cannot be put on the negative branch only; "
                                   "use another diffusers version or the 'both branches' state", input_name="lora_on")

    def forward(self, sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        self.calls += 1
        n = int(sample.shape[0])
        batch = int(self.embeds.shape[0]) if self.embeds is not None else n // 2
        if n != 2 * batch:  # no classifier-free guidance: only the positive prediction exists
            self._use(self.positive)
            return self._forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        half = n // 2
        if encoder_hidden_states is not None:
            self._check_order(encoder_hidden_states, half)
        outs = []
        for handle, lo, hi in ((self.negative, 0, half), (self.positive, half, n)):
            self._use(handle)
            outs.append(self._forward(sample[lo:hi], _split(timestep, lo, hi, n),
                                      _split(encoder_hidden_states, lo, hi, n),
                                      *[_split(a, lo, hi, n) for a in args],
                                      **{k: _split(v, lo, hi, n) for k, v in kwargs.items()}))
        return _cat(*outs)


def branch_conditioning(handle: PipeHandle, negative_handle: PipeHandle, prompt: str, negative: str,
                        batch: int = 1) -> Conditioning:
    """The prompt pair for a negative-branch LoRA: the positive embeddings encoded with `handle`'s stack, the
    negative ones with `negative_handle`'s (they differ only when the LoRA has text-encoder weights)."""
    from .prompt import encode

    cond = encode(handle, prompt, negative, batch=batch)
    if negative_handle is handle or negative_handle.loras == handle.loras:
        return cond
    neg = encode(negative_handle, prompt, negative, batch=batch)
    return replace(cond, negative_embeds=neg.negative_embeds, negative_pooled=neg.negative_pooled)


def generate(handle: PipeHandle, cond: Conditioning, *, seed: int, steps: int = 50, guidance: float = 13.0,
             width: int = 1024, height: int = 1024, refiner: Optional[PipeHandle] = None,
             refiner_cond: Optional[Conditioning] = None, high_noise_frac: float = 0.8, scheduler: str = "default",
             negative_handle: Optional[PipeHandle] = None, refiner_negative_handle: Optional[PipeHandle] = None,
             progress=None):
    """Text-to-image on `handle` with `cond`; returns a ComfyUI IMAGE tensor [B,H,W,3].

    With a refiner, the base denoises up to `high_noise_frac` and hands its latents to the refiner, which finishes
    with the same seed. `refiner_cond` defaults to the same prompt pair encoded for the refiner.

    `negative_handle` (the same model with another LoRA stack, usually the LoRA one while `handle` has none): the
    negative/unconditional prediction of every step runs with its adapters and the positive one with `handle`'s
    (see `NegativeBranchLora`); `cond` then comes from `branch_conditioning`. `refiner_negative_handle` does the
    same in the refiner stage (a LoRA loaded on the refiner); without it the refiner runs as in every other state.
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
    if negative_handle is not None and negative_handle.pipe is not handle.pipe:
        raise TuneLabError("the negative-branch pipe must be the same loaded model as the positive one (a LoRA "
                           "applied to it); load the LoRA on this pipe", input_name="negative_pipe")
    if cond.batch > MAX_BATCH:
        raise TuneLabError(f"batch {cond.batch} is over the limit of {MAX_BATCH}", input_name="batch_size")
    if refiner is not None:
        if refiner.family != "sdxl-refiner":
            raise TuneLabError(f"the refiner must be an SDXL refiner; got {refiner.architecture}", input_name="refiner")
        if refiner_negative_handle is not None and refiner_negative_handle.pipe is not refiner.pipe:
            raise TuneLabError("the refiner's negative-branch pipe must be the refiner itself with a LoRA",
                               input_name="refiner")
        if refiner_cond is None:
            refiner_cond = branch_conditioning(refiner, refiner_negative_handle or refiner, cond.prompt,
                                               cond.negative, batch=cond.batch)
    total = progress_total(steps, refiner is not None, high_noise_frac)
    common = dict(num_inference_steps=steps, guidance_scale=float(guidance))
    with torch.no_grad(), progress_mod.make(progress, total, "generate") as bar:
        kwargs = dict(common, **cond.diffusers_kwargs(), height=height, width=width, generator=generator(seed),
                      callback_on_step_end=_StepReporter(bar))
        if refiner is None:
            return to_image_tensor(_run(handle, scheduler, dict(kwargs, output_type="pt"), negative_handle).images)
        latents = _run(handle, scheduler, dict(kwargs, denoising_end=high_noise_frac, output_type="latent"),
                       negative_handle).images
        refined = _run(refiner, scheduler, dict(common, **refiner_cond.diffusers_kwargs(), image=latents,
                                                denoising_start=high_noise_frac, generator=generator(seed),
                                                callback_on_step_end=_StepReporter(bar), output_type="pt"),
                       refiner_negative_handle)
        return to_image_tensor(refined.images)


def progress_total(steps: int, with_refiner: bool, high_noise_frac: float = 0.8) -> int:
    """Progress ticks one generation makes: one per denoising step, split between base and refiner."""
    if not with_refiner:
        return steps
    # an estimate; diffusers decides the exact split from the timesteps
    n = max(1, round(steps * high_noise_frac))
    return n + max(1, steps - n)
