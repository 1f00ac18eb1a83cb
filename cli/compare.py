"""`python -m tunelab compare`: the three-way comparison (the README's main job), or any of the four states."""
from __future__ import annotations

import random

from .args import add_device, add_model, add_scheduler, add_vae, file_source, model_source, runtime
from ..core.compare import DEFAULT_NEGATIVE, DEFAULT_PROMPT, DEFAULT_STATE_NAMES, REFINER_MODES, STATE_NAMES

TINY_STEPS, TINY_SIZE = 20, 128
RANDOM_SEED = -1


def add_arguments(p) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="shared prompt of every panel, compel syntax (default: the seed's Super Mario album cover)")
    p.add_argument("--negative", default=DEFAULT_NEGATIVE,
                   help="negative prompt of panels 2 and 3, compel syntax (default %(default)s)")
    add_model(p, "tiny-sdxl", "SDXL base")
    p.add_argument("--refiner", default=None,
                   help="optional SDXL refiner (a name or a path, as --model); the base hands over at "
                        "--high-noise-frac")
    p.add_argument("--lora", default=None,
                   help="LoRA .safetensors for panel 3: a name from models/loras or a path (default on tiny-sdxl: "
                        "the built-in tiny LoRA; required with a real model)")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength, -100..100 (default 1.0)")
    p.add_argument("--seed", type=int, default=42,
                   help=f"seed of every panel, 0..2^64-1; {RANDOM_SEED} picks one and prints it (default 42)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps, 1..1000 (default 50; {TINY_STEPS} on tiny models)")
    p.add_argument("--guidance", type=float, default=13.0, help="classifier-free guidance, 0..100 (default 13)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help=f"image size in pixels, multiples of 8 (default 1024 1024; {TINY_SIZE} {TINY_SIZE} on tiny "
                        "models)")
    p.add_argument("--high-noise-frac", type=float, default=0.8,
                   help="with --refiner: the fraction of denoising the base does, between 0 and 1 (default 0.8)")
    p.add_argument("--states", default=",".join(DEFAULT_STATE_NAMES),
                   help=f"comma-separated states from {', '.join(STATE_NAMES)} (lora_negative_only: the LoRA only on "
                        f"the negative branch; default {','.join(DEFAULT_STATE_NAMES)})")
    p.add_argument("--refiner-mode", default="plain", choices=REFINER_MODES,
                   help="with --refiner, the refiner stage of negative-only states: plain (like every state) or "
                        "negative-only (a refiner LoRA on its negative branch only; needs --refiner-lora)")
    p.add_argument("--refiner-lora", default=None,
                   help="optional LoRA for the refiner: a name from models/loras or a path (.safetensors)")
    add_scheduler(p)
    add_vae(p)
    add_device(p)
    p.add_argument("--out", required=True, help="folder for grid.png, 01.png.. and settings.json (made if missing)")


def run(args) -> int:
    from ..core import compare, files, lora, models, tiny
    from ..core.checks import check_number
    from ..core.errors import TuneLabError

    # -- every input, before any model loads
    is_tiny = args.model in tiny.PRESETS
    steps = args.steps if args.steps is not None else (TINY_STEPS if is_tiny else 50)
    width, height = args.size or ((TINY_SIZE, TINY_SIZE) if is_tiny else (1024, 1024))
    seed = random.randint(0, 10**8) if args.seed == RANDOM_SEED else args.seed
    names = compare.parse_state_names(args.states)
    compare.check([args.negative], args.prompt, seed=seed, steps=steps, guidance=args.guidance, width=width,
                  height=height, scheduler=args.scheduler,
                  high_noise_frac=args.high_noise_frac if args.refiner else None)
    check_number(args.strength, "strength", -100.0, 100.0)
    files.check_output_dir(args.out, "out")
    base_source = model_source(args.model)
    refiner_source = model_source(args.refiner, "refiner") if args.refiner else None
    vae = file_source("vae", args.vae, "vae")
    lora_path = file_source("loras", args.lora, "lora")
    refiner_lora = file_source("loras", args.refiner_lora, "refiner_lora")
    if lora_path is None and args.model != "tiny-sdxl":
        raise TuneLabError("a LoRA is required with a real model (the built-in LoRA is for tiny-sdxl only); give "
                           "the wrong LoRA's .safetensors", input_name="lora")
    if args.refiner_mode == "negative-only" and not (refiner_source and refiner_lora):
        raise TuneLabError("negative-only needs a refiner and a refiner LoRA; give --refiner and --refiner-lora",
                           input_name="refiner_mode")
    runtime(args)

    # -- the work
    base = models.load(base_source, vae=vae, dtype=args.dtype, device=args.device)
    refiner = models.load(refiner_source, dtype=args.dtype, device=args.device) if refiner_source else None
    if refiner is not None and refiner_lora:
        refiner = lora.load(refiner, refiner_lora, 1.0)
    if lora_path is None:
        lora_path = tiny.wrong_lora()
        print("note: tiny-sdxl is a toy model that produces noise; the LoRA is TuneLab's built-in tiny LoRA with "
              "fixed random weights, so the three panels differ but show no real improvement.")
    lora_pipe = lora.load(base, lora_path, args.strength)
    states = compare.named_states(names, base, lora_pipe, args.negative)
    print(f"comparing {len(states)} states at seed {seed}, {steps} steps, {width}x{height}, guidance {args.guidance}")
    result = compare.run(states, args.prompt, seed=seed, steps=steps, guidance=args.guidance, width=width,
                         height=height, refiner=refiner, high_noise_frac=args.high_noise_frac,
                         scheduler=args.scheduler, refiner_mode=args.refiner_mode)
    paths = compare.save(result, args.out)
    print(f"wrote {paths['grid']}, {len(paths['panels'])} panels and {paths['settings']}")
    return 0
