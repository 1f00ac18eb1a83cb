"""The seed's comparison on native ComfyUI objects: the user's MODEL, CLIP and VAE, ComfyUI's own LoRA loading,
sampling, hooks and decoding, and the same grid, panels and settings.json as TuneLab Compare (core/compare.py).

States (each one panel, same prompt and seed):
- base: the model and CLIP as given, negative "";
- base + negative: the same with the negative prompt (default `wrong`);
- LoRA + negative: the LoRA loaded on clones of the MODEL and CLIP (what LoraLoader does), with the negative;
- LoRA on the negative only: the base model and CLIP encode both prompts; the LoRA rides on the negative
  conditioning as ComfyUI LoRA hooks (Create Hook LoRA + Cond Set Props), so it is active only while the
  negative prediction is computed. Its text-encoder part is not used (the negative is encoded by the base CLIP).

With a refiner (MODEL + CLIP) every panel hands off at `refiner_switch` of the steps as KSamplerAdvanced pairs do
(base: steps 0..switch, leftover noise kept; refiner: switch..end, no new noise, same seed). The refiner encodes
the prompt and the state's negative itself and never gets the LoRA (a base LoRA does not fit the refiner).

This module never imports ComfyUI: `backend` is the host module (or a stand-in in tests) with clip_encode_pair,
native_text_encode, native_lora, lora_hooks, with_hooks, empty_latent, ksample, vae_decode and check_interrupt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from . import compare, images as images_mod
from .errors import TuneLabError

STATE_KEYS = ("base", "base_negative", "lora_negative", "lora_negative_only")
SYNTAXES = ("compel", "comfyui")


@dataclass(frozen=True)
class NativeState:
    key: str
    label: str
    negative: str
    lora: str  # "none", "model+clip" or "negative-only"


def states(chosen: Sequence[str], negative: str = compare.DEFAULT_NEGATIVE) -> list:
    """The states in `chosen` (keys of STATE_KEYS), in the canonical order."""
    table = {
        "base": NativeState("base", "base", "", "none"),
        "base_negative": NativeState("base_negative", f"base + negative '{negative}'", negative, "none"),
        "lora_negative": NativeState("lora_negative", f"LoRA + negative '{negative}'", negative, "model+clip"),
        "lora_negative_only": NativeState("lora_negative_only", f"LoRA on the negative only, negative "
                                          f"'{negative}'", negative, "negative-only"),
    }
    unknown = [c for c in chosen if c not in table]
    if unknown:
        raise TuneLabError(f"unknown state(s) {unknown}; choose from {', '.join(STATE_KEYS)}", input_name="states")
    return [table[k] for k in STATE_KEYS if k in chosen]


@dataclass(frozen=True)
class Settings:
    prompt: str
    seed: int
    steps: int = 50
    cfg: float = 13.0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    width: int = 1024
    height: int = 1024
    syntax: str = "compel"
    lora_name: Optional[str] = None
    strength_model: float = 1.0
    strength_clip: float = 1.0
    refiner_switch: float = 0.8

    def switch_step(self) -> int:
        """The step at which the refiner takes over (KSamplerAdvanced's end_at_step / start_at_step)."""
        return max(0, min(self.steps, math.floor(self.steps * self.refiner_switch + 0.5)))


def check(settings: Settings, chosen: list, *, has_refiner_model: bool, has_refiner_clip: bool) -> None:
    """Every input problem, before any model work."""
    from .prompt import check as check_prompt
    from .sampling import check_size, check_steps

    if not chosen:
        raise TuneLabError("no state is switched on; turn on at least one of base, base_negative, lora_negative, "
                           "lora_negative_only", input_name="states")
    if not settings.prompt or not settings.prompt.strip():
        raise TuneLabError("the prompt is empty; the comparison needs one shared prompt", input_name="prompt")
    if settings.syntax not in SYNTAXES:
        raise TuneLabError(f"unknown prompt syntax '{settings.syntax}'; choose {' or '.join(SYNTAXES)}",
                           input_name="prompt_syntax")
    if settings.syntax == "compel":
        check_prompt(settings.prompt, input_name="prompt", required=True)
        for negative in {s.negative for s in chosen}:
            check_prompt(negative, input_name="negative", required=False)
    check_size(settings.width, settings.height)
    check_steps(settings.steps)
    if any(s.lora != "none" for s in chosen) and not settings.lora_name:
        raise TuneLabError("the LoRA states need a LoRA: put its .safetensors file in models/loras and pick it",
                           input_name="lora_name")
    if has_refiner_model != has_refiner_clip:
        raise TuneLabError("a refiner needs both its MODEL and its CLIP; wire both refiner inputs or neither",
                           input_name="refiner_clip" if has_refiner_model else "refiner_model")
    if has_refiner_model and not 0.0 < settings.refiner_switch < 1.0:
        raise TuneLabError(f"{settings.refiner_switch} is out of range; the refiner takes over between 0 and 1",
                           input_name="refiner_switch")


def _encode(backend, clip, text: str, negative: str, settings: Settings, *, refiner: bool):
    if settings.syntax == "comfyui":
        return backend.native_text_encode(clip, text), backend.native_text_encode(clip, negative)
    size = {"width": settings.width, "height": settings.height}
    if not refiner:  # diffusers' defaults: original = target = the image size, no crop
        size.update(crop_w=0, crop_h=0, target_width=settings.width, target_height=settings.height)
    return backend.clip_encode_pair(clip, text, negative, sizes=size)


def run(backend, model, clip, vae, chosen: Sequence[NativeState], settings: Settings, *, refiner=None):
    """Generate every state's panel. Returns (core.compare.Comparison, panels as one IMAGE tensor [N,H,W,3]
    straight from VAE Decode)."""
    import torch

    check(settings, list(chosen), has_refiner_model=refiner is not None and refiner[0] is not None,
          has_refiner_clip=refiner is not None and refiner[1] is not None)
    if refiner is not None and refiner[0] is None:
        refiner = None
    lora = None
    if any(s.lora != "none" for s in chosen):
        lora_model, lora_clip, lora_sd, mapped = backend.native_lora(model, clip, settings.lora_name,
                                                                     settings.strength_model, settings.strength_clip)
        lora = {"model": lora_model, "clip": lora_clip, "tensors": lora_sd, "mapped": mapped}
    images, described = [], []
    for state in chosen:
        backend.check_interrupt()
        m, c = (lora["model"], lora["clip"]) if state.lora == "model+clip" else (model, clip)
        positive, negative = _encode(backend, c, settings.prompt, state.negative, settings, refiner=False)
        if state.lora == "negative-only":
            hooks = backend.lora_hooks(lora["tensors"], settings.strength_model, settings.strength_clip)
            negative = backend.with_hooks(negative, hooks)
        latent = backend.empty_latent(settings.width, settings.height)
        common = (settings.seed, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler)
        if refiner is None:
            latent = backend.ksample(m, *common, positive, negative, latent)
        else:
            switch = settings.switch_step()
            latent = backend.ksample(m, *common, positive, negative, latent, start_step=0, last_step=switch,
                                     add_noise=True, force_full_denoise=False)
            r_pos, r_neg = _encode(backend, refiner[1], settings.prompt, state.negative, settings, refiner=True)
            latent = backend.ksample(refiner[0], *common, r_pos, r_neg, latent, start_step=switch, last_step=10000,
                                     add_noise=False, force_full_denoise=True)
        images.append(backend.vae_decode(vae, latent))
        described.append({"label": state.label, "state": state.key, "negative": state.negative,
                          "lora": None if state.lora == "none" else {
                              "name": settings.lora_name, "applied": state.lora,
                              "strength_model": settings.strength_model,
                              "strength_clip": settings.strength_clip if state.lora == "model+clip" else None}})
    panels_tensor = torch.cat([im[:1] for im in images])
    panels = images_mod.tensor_to_pil(panels_tensor)
    grid = images_mod.labelled_grid(panels, [s.label for s in chosen], caption=f"seed {settings.seed}: "
                                                                                f"{settings.prompt}")
    settings_json = {
        "prompt": settings.prompt, "seed": settings.seed, "steps": settings.steps, "cfg": settings.cfg,
        "sampler_name": settings.sampler_name, "scheduler": settings.scheduler, "width": settings.width,
        "height": settings.height, "prompt_syntax": settings.syntax,
        "lora": None if lora is None else {"name": settings.lora_name, "mapped_modules": lora["mapped"],
                                           "strength_model": settings.strength_model,
                                           "strength_clip": settings.strength_clip},
        "refiner": None if refiner is None else {"switch": settings.refiner_switch,
                                                 "switch_step": settings.switch_step()},
        "states": described, "native": True,
        "versions": {**compare.versions(), "comfyui": getattr(backend, "comfyui_version", lambda: None)()},
    }
    return compare.Comparison(panels=panels, grid=grid, settings=settings_json), panels_tensor
