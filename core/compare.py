"""The seed's proof: N states that share a prompt and a seed, side by side.

Default states (Max Woolf's three-way comparison): base; base + negative `wrong`; wrong LoRA + negative `wrong`.
Each panel is generated with the same seed, so the only differences are the state's pipe and negative prompt.
"""
from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass
from typing import Optional, Sequence

from . import images as images_mod
from .errors import TuneLabError
from .files import write_text_atomic
from .models import PipeHandle

DEFAULT_NEGATIVE = "wrong"
DEFAULT_PROMPT = ("hyperrealistic death metal album cover featuring edgy moody realistic (human Super Mario)++, "
                  "edgy and moody")


@dataclass(frozen=True)
class State:
    label: str
    handle: PipeHandle
    negative: str = ""


def default_states(base: PipeHandle, lora_handle: Optional[PipeHandle], negative: str = DEFAULT_NEGATIVE) -> list:
    states = [State("base", base, ""), State(f"base + negative '{negative}'", base, negative)]
    if lora_handle is not None:
        states.append(State(f"LoRA + negative '{negative}'", lora_handle, negative))
    return states


@dataclass
class Comparison:
    panels: list  # PIL images
    grid: object  # PIL image
    settings: dict

    def tensors(self):
        return images_mod.pil_to_tensor([self.grid]), images_mod.pil_to_tensor(self.panels)


def run(states: Sequence[State], prompt: str, *, seed: int, steps: int = 50, guidance: float = 13.0,
        width: int = 1024, height: int = 1024, refiner: Optional[PipeHandle] = None, high_noise_frac: float = 0.8,
        scheduler: str = "default", progress=None) -> Comparison:
    from .prompt import encode
    from .sampling import generate

    if not states:
        raise TuneLabError("no states to compare", input_name="states")
    if not prompt or not prompt.strip():
        raise TuneLabError("the prompt is empty; the comparison needs one shared prompt", input_name="prompt")
    check(states, prompt, seed=seed, steps=steps, guidance=guidance, width=width, height=height, scheduler=scheduler,
          high_noise_frac=high_noise_frac if refiner is not None else None)  # refuse before any state runs
    panels = []
    for state in states:
        cond = encode(state.handle, prompt, state.negative)
        image = generate(state.handle, cond, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                         refiner=refiner, high_noise_frac=high_noise_frac, scheduler=scheduler, progress=progress)
        panels.append(images_mod.tensor_to_pil(image)[0])
    grid = images_mod.labelled_grid(panels, [s.label for s in states], caption=f"seed {seed}: {prompt}")
    settings = {
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "width": width,
        "height": height,
        "scheduler": scheduler,
        "refiner": None if refiner is None else {**refiner.describe(), "high_noise_frac": high_noise_frac},
        "states": [{"label": s.label, "negative": s.negative, **s.handle.describe()} for s in states],
        "versions": versions(),
    }
    return Comparison(panels=panels, grid=grid, settings=settings)


def check(states_or_negatives, prompt: str, *, seed, steps, guidance, width, height, scheduler="default",
          high_noise_frac=None) -> None:
    """Every input of a comparison, before any model loads or any panel runs: the shared prompt and every state's
    negative (together, so a bad negative is not found after the first panel), and the sampling settings.
    `states_or_negatives`: the states, or just their negative prompts (the CLI checks before it loads models)."""
    from .prompt import check_prompts
    from .sampling import check_generation

    negatives = [getattr(s, "negative", s) for s in states_or_negatives]
    check_prompts(prompt, negatives, positive_name="prompt", negative_name="negative")
    check_generation(seed=seed, steps=steps, guidance=guidance, width=width, height=height, scheduler=scheduler,
                     high_noise_frac=high_noise_frac)


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("tunelab", "torch", "diffusers", "transformers", "peft", "compel"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def save(comparison: Comparison, out_dir, input_name: str = "out") -> dict:
    """Write grid.png, 01.png.. and settings.json into `out_dir` (each atomically). Returns the paths."""
    from .files import check_output_dir

    out = check_output_dir(out_dir, input_name)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"tunelab": json.dumps(comparison.settings, allow_nan=False)}  # settings are checked finite
    paths = {"grid": images_mod.save_png(comparison.grid, out / "grid.png", meta)}
    paths["panels"] = [images_mod.save_png(p, out / f"{i:02d}.png", meta) for i, p in enumerate(comparison.panels, 1)]
    write_text_atomic(out / "settings.json", json.dumps(comparison.settings, indent=2, allow_nan=False))
    paths["settings"] = out / "settings.json"
    return paths


def timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
