"""The seed's proof: N states that share a prompt and a seed, side by side.

Default states (Max Woolf's three-way comparison): base; base + negative `wrong`; wrong LoRA + negative `wrong`.
Each panel is generated with the same seed, so the only differences are the state's pipe and negative prompt.

A fourth state puts the LoRA on the negative branch only (`lora_on="negative"`, Diffusion-NPO's idea): the
negative/unconditional prediction of each step runs with the LoRA, the positive one without it. With guidance
<= 1 there is no negative prediction, so that state equals the base with the same negative prompt.

With a refiner, the refiner stage (the last 1 - high_noise_frac of the steps) cannot run the base's LoRA: it is
another UNet. `refiner_mode` chooses what the negative-only states do there: "plain" (default) finishes them as
every other state, the refiner with its own LoRA stack (usually none) on both branches and the state's negative
prompt, so the states differ in the base stage only; "negative-only" puts a LoRA loaded on the refiner pipe on the
refiner's negative branch only as well.
"""
from __future__ import annotations

import datetime
import json
import logging
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from . import images as images_mod
from .errors import TuneLabError
from .files import write_text_atomic
from .models import PipeHandle

log = logging.getLogger("tunelab")

DEFAULT_NEGATIVE = "wrong"
LORA_ON = ("both", "negative")  # where a state's LoRA stack is active: both CFG branches, or the negative one only
REFINER_MODES = ("plain", "negative-only")
# Built-in states by name (`compare --states`, the Compare node's `default_states`, `evaluate --states`).
STATE_NAMES = ("base", "base_negative", "lora_negative", "lora_negative_only")
DEFAULT_STATE_NAMES = STATE_NAMES[:3]
DEFAULT_PROMPT = ("hyperrealistic death metal album cover featuring edgy moody realistic (human Super Mario)++, "
                  "edgy and moody")


@dataclass(frozen=True)
class State:
    label: str
    handle: PipeHandle
    negative: str = ""
    lora_on: str = "both"  # "negative": the handle's LoRA stack only while the negative prediction is computed

    def branches(self) -> tuple:
        """(handle of the positive prediction, handle of the negative one or None when it is the same)."""
        if self.lora_on == "negative":
            return replace(self.handle, loras=()), self.handle
        return self.handle, None

    def describe(self) -> dict:
        return {"label": self.label, "negative": self.negative, "lora_on": self.lora_on, **self.handle.describe()}


def default_states(base: PipeHandle, lora_handle: Optional[PipeHandle], negative: str = DEFAULT_NEGATIVE) -> list:
    names = DEFAULT_STATE_NAMES if lora_handle is not None else DEFAULT_STATE_NAMES[:2]
    return named_states(names, base, lora_handle, negative)


def parse_state_names(text, input_name: str = "states") -> list:
    """"base, lora_negative_only" (or a list) -> validated names, in the order given."""
    items = text if isinstance(text, (list, tuple)) else str(text or "").replace(";", ",").split(",")
    names = [str(n).strip() for n in items if str(n).strip()]
    if not names:
        raise TuneLabError(f"no states given; choose from {', '.join(STATE_NAMES)}", input_name=input_name)
    unknown = [n for n in names if n not in STATE_NAMES]
    if unknown:
        raise TuneLabError(f"unknown state(s) {', '.join(repr(n) for n in unknown)}; choose from "
                           f"{', '.join(STATE_NAMES)}", input_name=input_name)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TuneLabError(f"state(s) listed twice: {', '.join(dup)}", input_name=input_name)
    return names


def named_states(names, base: PipeHandle, lora_handle: Optional[PipeHandle], negative: str = DEFAULT_NEGATIVE,
                 input_name: str = "states") -> list:
    """The built-in states by name: base (no negative), base_negative, lora_negative (LoRA on both branches) and
    lora_negative_only (LoRA on the negative branch only), the last three with `negative`."""
    names = parse_state_names(names, input_name)
    needs_lora = [n for n in names if n.startswith("lora")]
    if needs_lora and (lora_handle is None or not lora_handle.loras):
        raise TuneLabError(f"the state(s) {', '.join(needs_lora)} need a pipe with a LoRA (connect lora_pipe, or "
                           "pass --lora); or leave them out", input_name=input_name)
    make = {
        "base": lambda: State("base", base, ""),
        "base_negative": lambda: State(f"base + negative '{negative}'", base, negative),
        "lora_negative": lambda: State(f"LoRA + negative '{negative}'", lora_handle, negative),
        "lora_negative_only": lambda: State(f"LoRA on negative only + negative '{negative}'", lora_handle, negative,
                                            "negative"),
    }
    return [make[n]() for n in names]


def check_states(states: Sequence[State], refiner: Optional[PipeHandle] = None, refiner_mode: str = "plain") -> None:
    """Refuse states that cannot run, before any of them does."""
    if not states:
        raise TuneLabError("no states to compare", input_name="states")
    if refiner_mode not in REFINER_MODES:
        raise TuneLabError(f"unknown refiner mode '{refiner_mode}'; choose {' or '.join(REFINER_MODES)}",
                           input_name="refiner_mode")
    for s in states:
        if s.lora_on not in LORA_ON:
            raise TuneLabError(f"state '{s.label}': lora_on must be {' or '.join(LORA_ON)}, not '{s.lora_on}'",
                               input_name="lora_on")
        if s.lora_on == "negative" and not s.handle.loras:
            raise TuneLabError(f"state '{s.label}' puts the LoRA on the negative branch only, but its pipe has no "
                               "LoRA; connect a pipe from TuneLab Load LoRA", input_name="lora_on")
    if refiner_mode == "negative-only" and any(s.lora_on == "negative" for s in states):
        if refiner is None or not refiner.loras:
            raise TuneLabError("refiner mode 'negative-only' puts a LoRA loaded on the refiner on its negative "
                               "branch, but " + ("there is no refiner" if refiner is None else "the refiner has no "
                               "LoRA") + "; choose 'plain' or load a refiner LoRA", input_name="refiner_mode")


def generate_state(state: State, prompt: str, *, seed: int, steps: int, guidance: float, width: int, height: int,
                   refiner: Optional[PipeHandle] = None, high_noise_frac: float = 0.8, scheduler: str = "default",
                   refiner_mode: str = "plain", progress=None):
    """One state's image (IMAGE [1,H,W,3]) for `prompt` at `seed`."""
    from .prompt import encode
    from .sampling import branch_conditioning, generate

    positive, negative_branch = state.branches()
    if negative_branch is None:
        cond = encode(state.handle, prompt, state.negative)
    else:
        cond = branch_conditioning(positive, negative_branch, prompt, state.negative)
        if guidance <= 1:
            log.warning("TuneLab: state '%s': guidance %g <= 1 has no negative prediction, so the negative-only "
                        "LoRA has no effect", state.label, guidance)
    refiner_positive = refiner_negative = None
    if refiner is not None:
        refiner_positive = refiner
        if negative_branch is not None and refiner_mode == "negative-only":
            refiner_positive, refiner_negative = replace(refiner, loras=()), refiner
    return generate(positive, cond, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                    refiner=refiner_positive, high_noise_frac=high_noise_frac, scheduler=scheduler,
                    negative_handle=negative_branch, refiner_negative_handle=refiner_negative, progress=progress)


@dataclass
class Comparison:
    panels: list  # PIL images
    grid: object  # PIL image
    settings: dict

    def tensors(self):
        return images_mod.pil_to_tensor([self.grid]), images_mod.pil_to_tensor(self.panels)


def run(states: Sequence[State], prompt: str, *, seed: int, steps: int = 50, guidance: float = 13.0,
        width: int = 1024, height: int = 1024, refiner: Optional[PipeHandle] = None, high_noise_frac: float = 0.8,
        scheduler: str = "default", refiner_mode: str = "plain", progress=None) -> Comparison:

    check_states(states, refiner, refiner_mode)
    if not prompt or not prompt.strip():
        raise TuneLabError("the prompt is empty; the comparison needs one shared prompt", input_name="prompt")
    check(states, prompt, seed=seed, steps=steps, guidance=guidance, width=width, height=height, scheduler=scheduler,
          high_noise_frac=high_noise_frac if refiner is not None else None)  # refuse before any state runs
    panels = []
    for state in states:
        image = generate_state(state, prompt, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                               refiner=refiner, high_noise_frac=high_noise_frac, scheduler=scheduler,
                               refiner_mode=refiner_mode, progress=progress)
        panels.append(images_mod.tensor_to_pil(image)[0])
    grid = images_mod.labelled_grid(panels, [s.label for s in states], caption=f"seed {seed}: {prompt}",
                                    details=grid_details(states, steps=steps, guidance=guidance, width=width,
                                                         height=height, refiner=refiner))
    settings = {
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "width": width,
        "height": height,
        "scheduler": scheduler,
        "refiner": None if refiner is None else {**refiner.describe(), "high_noise_frac": high_noise_frac,
                                                 "mode": refiner_mode},
        "states": [s.describe() for s in states],
        "versions": versions(),
    }
    return Comparison(panels=panels, grid=grid, settings=settings)


def grid_details(states: Sequence[State], *, steps: int, guidance: float, width: int, height: int,
                 refiner: Optional[PipeHandle] = None) -> str:
    """The line under the grid's caption: what a reader needs to reproduce it besides the prompt and seed."""
    loras = list(dict.fromkeys(f"{Path(r.name).stem}" + ("" if float(r.weight) == 1.0 else f" @ {float(r.weight):g}")
                               for s in states for r in s.handle.loras))
    parts = [f"{steps} steps", f"guidance {guidance:g}", f"{width}x{height}"]
    if refiner is not None:
        parts.append(f"refiner {Path(str(refiner.source)).stem}")
    parts.append("LoRA " + ", ".join(loras) if loras else "no LoRA")
    return " · ".join(parts)
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
