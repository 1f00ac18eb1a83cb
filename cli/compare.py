"""`python -m tunelab compare`: the three-way comparison (the README's main job), or any of the four states."""
from __future__ import annotations

import random

from .args import add_device, add_model, add_vae
from ..core.compare import DEFAULT_NEGATIVE, DEFAULT_PROMPT, DEFAULT_STATE_NAMES, REFINER_MODES, STATE_NAMES

TINY_STEPS, TINY_SIZE = 20, 128


def add_arguments(p) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="shared prompt, compel syntax (default: the seed's)")
    p.add_argument("--negative", default=DEFAULT_NEGATIVE, help="negative prompt of panels 2 and 3 (default: wrong)")
    add_model(p, "tiny-sdxl", "SDXL base")
    p.add_argument("--refiner", default=None, help="optional SDXL refiner (name or path)")
    p.add_argument("--lora", default=None, help="LoRA .safetensors; default on tiny-sdxl: the built-in tiny LoRA")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--seed", type=int, default=42, help="seed for every panel; -1 picks one and prints it (default 42)")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default 50; {TINY_STEPS} on tiny models)")
    p.add_argument("--guidance", type=float, default=13.0, help="classifier-free guidance (default 13)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help=f"image size (default 1024 1024; {TINY_SIZE} {TINY_SIZE} on tiny models)")
    p.add_argument("--high-noise-frac", type=float, default=0.8, help="base/refiner split (default 0.8)")
    p.add_argument("--states", default=",".join(DEFAULT_STATE_NAMES),
                   help=f"comma-separated states from {', '.join(STATE_NAMES)} (lora_negative_only: the LoRA only on "
                        f"the negative branch; default {','.join(DEFAULT_STATE_NAMES)})")
    p.add_argument("--refiner-mode", default="plain", choices=REFINER_MODES,
                   help="with --refiner, the refiner stage of negative-only states: plain (like every state) or "
                        "negative-only (a refiner LoRA on its negative branch only; needs --refiner-lora)")
    p.add_argument("--refiner-lora", default=None, help="optional LoRA for the refiner (.safetensors)")
    p.add_argument("--scheduler", default="default", help="diffusers scheduler name (default: the model's)")
    add_vae(p)
    add_device(p)
    p.add_argument("--out", required=True, help="folder for grid.png, 01.png.. and settings.json")


def run(args) -> int:
    import sys

    from .. import host
    from ..core import compare, lora, models, sampling, tiny

    is_tiny = args.model in tiny.PRESETS
    steps = args.steps or (TINY_STEPS if is_tiny else 50)
    width, height = args.size or ((TINY_SIZE, TINY_SIZE) if is_tiny else (1024, 1024))
    seed = random.randint(0, 10**8) if args.seed < 0 else args.seed
    names = compare.parse_state_names(args.states)  # checked before any model loads
    sampling.check_size(width, height)
    sampling.check_steps(steps)
    if args.refiner_mode == "negative-only" and not (args.refiner and args.refiner_lora):
        print("error: --refiner-mode negative-only needs --refiner and --refiner-lora", file=sys.stderr)
        return 2
    base = models.load(host.resolve_model(args.model), vae=args.vae, dtype=args.dtype, device=args.device)
    refiner = None
    if args.refiner:
        refiner = models.load(host.resolve_model(args.refiner), dtype=args.dtype, device=args.device)
        if args.refiner_lora:
            refiner = lora.load(refiner, host.resolve_file("loras", args.refiner_lora), 1.0)
    lora_path = args.lora
    if lora_path is None:
        if args.model != "tiny-sdxl":
            print("error: --lora is required with a real model (the built-in LoRA is for tiny-sdxl only)")
            return 2
        lora_path = tiny.wrong_lora()
        print("note: tiny-sdxl is a toy model that produces noise; the LoRA is TuneLab's built-in tiny LoRA with "
              "fixed random weights, so the three panels differ but show no real improvement.")
    lora_pipe = lora.load(base, host.resolve_file("loras", str(lora_path)), args.strength)
    states = compare.named_states(names, base, lora_pipe, args.negative)
    print(f"comparing {len(states)} states at seed {seed}, {steps} steps, {width}x{height}, guidance {args.guidance}")
    result = compare.run(states, args.prompt, seed=seed, steps=steps, guidance=args.guidance, width=width,
                         height=height, refiner=refiner, high_noise_frac=args.high_noise_frac,
                         scheduler=args.scheduler, refiner_mode=args.refiner_mode)
    paths = compare.save(result, args.out)
    print(f"wrote {paths['grid']}, {len(paths['panels'])} panels and {paths['settings']}")
    return 0
