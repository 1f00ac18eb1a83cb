"""`python -m tunelab evaluate`: scored comparison of states over a prompt set and seeds (CLIP score, PickScore).

    python -m tunelab evaluate --out out/eval                                  # tiny demo, four states
    python -m tunelab evaluate --model sd_xl_base_1.0.safetensors --lora sdxl-wrong-lora.safetensors \\
        --prompts woolf-20 --seeds 0 1 2 3 --out out/eval                      # a real run (resumable)
    accelerate launch --multi_gpu --num_processes 8 -m tunelab evaluate ... --out out/eval  # 8 GPUs, one folder
    python -m tunelab evaluate --merge --out out/eval                          # report from copied shards

Under `accelerate launch` every process takes the cells whose index % num_processes == process_index, on its own
device; whichever process finishes last writes the report. `--shard I/N` does the same by hand.
"""
from __future__ import annotations

import os

from .args import add_device, add_model, add_scheduler, add_vae, file_source, model_source, runtime
from ..core.compare import DEFAULT_NEGATIVE, REFINER_MODES, STATE_NAMES
from ..core.evaluation import DEFAULT_PROMPT_SET, DEFAULT_SEEDS, PROMPT_SETS
from ..core.statistics import DEFAULT_RESAMPLES

TINY_STEPS, TINY_SIZE = 4, 64
# folder names looked up in models/scorers when --clip-model / --pickscore-model are "auto" with a real model
DEFAULT_SCORER_FOLDERS = {"clip": "clip-vit-large-patch14", "pickscore": "PickScore_v1"}


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="evaluation folder (plan, cells, reports); rerun to resume")
    p.add_argument("--merge", action="store_true",
                   help="write the report of a folder whose cells are all done (e.g. copied from several machines); "
                        "loads no generation model")
    add_model(p, "tiny-sdxl", "SDXL base")
    add_vae(p)
    p.add_argument("--lora", default=None, help="LoRA .safetensors for the lora_ states; default on tiny-sdxl: the "
                                                "built-in tiny LoRA")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength, -100..100 (default 1.0)")
    p.add_argument("--states", default=",".join(STATE_NAMES),
                   help=f"comma-separated states from {', '.join(STATE_NAMES)} (default: all four)")
    p.add_argument("--negative", default=DEFAULT_NEGATIVE, help="negative prompt of the _negative states (default wrong)")
    p.add_argument("--prompts", default=DEFAULT_PROMPT_SET,
                   help=f"a built-in set ({', '.join(f'{k}: {len(v)} prompts' for k, v in PROMPT_SETS.items())}) or "
                        f"a .txt file with one prompt per line (default {DEFAULT_PROMPT_SET})")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), metavar="SEED",
                   help="seeds; every (prompt, seed) is one paired unit (default 0 1 2 3)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps, 1..1000 (default 50; {TINY_STEPS} on tiny models)")
    p.add_argument("--guidance", type=float, default=13.0, help="classifier-free guidance, 0..100 (default 13)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help=f"image size (default 1024 1024; {TINY_SIZE} {TINY_SIZE} on tiny models)")
    add_scheduler(p)
    p.add_argument("--refiner", default=None, help="optional SDXL refiner for every state")
    p.add_argument("--refiner-lora", default=None, help="optional LoRA on the refiner (for --refiner-mode negative-only)")
    p.add_argument("--refiner-mode", default="plain", choices=REFINER_MODES,
                   help="refiner stage of the negative-only state: plain (as every state) or negative-only")
    p.add_argument("--high-noise-frac", type=float, default=0.8, help="base/refiner split (default 0.8)")
    p.add_argument("--clip-model", default="auto",
                   help="CLIP model for the CLIP score: a folder in models/scorers, a path or tiny-clip; 'none' skips "
                        f"it (auto: tiny-clip on tiny models, else models/scorers/{DEFAULT_SCORER_FOLDERS['clip']})")
    p.add_argument("--pickscore-model", default="auto",
                   help="PickScore model: a folder in models/scorers, a path or tiny-pickscore; 'none' skips it "
                        f"(auto: tiny-pickscore on tiny models, else models/scorers/{DEFAULT_SCORER_FOLDERS['pickscore']})")
    p.add_argument("--score-dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="dtype of the scoring models (default fp32)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="make only cells with index %% N == I (default: the accelerate process index, else all)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples for the intervals (default {DEFAULT_RESAMPLES})")
    p.add_argument("--stats-seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    add_device(p, accelerate=True)


def _distributed(device: str):
    """accelerate's PartialState when started by `accelerate launch` (or torchrun) with several processes. On a
    machine without a GPU (or with --device cpu) the ranks join a gloo group on the CPU: accelerate only does that
    when asked with cpu=True, and its launcher refuses `--cpu --multi_gpu` (while `--cpu --num_processes 2` starts
    one process), so on a CPU the launch is `accelerate launch --multi_gpu --num_processes 2 -m tunelab ...`."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def _scorer_source(value: str, kind: str, is_tiny: bool):
    from .. import host
    from ..core import scoring
    from ..core.errors import TuneLabError

    if value == "none":
        return None
    if value == "auto":
        if is_tiny:
            return scoring.DEFAULT_PRESETS[kind]
        name = DEFAULT_SCORER_FOLDERS[kind]
        found = host.full_path("scorers", name)
        if found is None:
            where = ", ".join(str(d) for d in host.model_dirs("scorers"))
            raise TuneLabError(f"no {scoring.WHAT[kind]} found: put it in {where}/{name} (a transformers folder with "
                               f"config.json, model.safetensors and its processor files), or pass "
                               f"--{kind}-model PATH ('none' to skip this score)",
                               input_name=f"{kind}_model")
        return str(found)
    return host.resolve_scorer(value)


def run(args) -> int:
    from .. import host
    from ..core import compare, evaluation, lora, models, scoring, statistics, tiny
    from ..core.checks import check_number
    from ..core.errors import TuneLabError

    if args.merge:
        result = evaluation.merge(args.out, resamples=args.resamples, stats_seed=args.stats_seed)
        print(result.table, end="")
        print(f"wrote {result.paths['json']}, report.csv, report.md, scores.png and {len(result.paths['grids'])} grid(s)")
        return 0
    is_tiny = args.model in tiny.PRESETS
    steps = args.steps if args.steps is not None else (TINY_STEPS if is_tiny else 50)
    width, height = args.size or ((TINY_SIZE, TINY_SIZE) if is_tiny else (1024, 1024))
    # every check that needs no model, before anything loads
    names = compare.parse_state_names(args.states)
    prompts = evaluation.parse_prompts(args.prompts)
    seeds = evaluation.parse_seeds(args.seeds)
    for prompt in prompts:  # every prompt with the negative and the settings, as one comparison checks them
        compare.check([args.negative], prompt, seed=seeds[0], steps=steps, guidance=args.guidance, width=width,
                      height=height, scheduler=args.scheduler,
                      high_noise_frac=args.high_noise_frac if args.refiner else None)
    check_number(args.strength, "strength", -100.0, 100.0)
    statistics.check_resamples(args.resamples)
    base_source = model_source(args.model)
    refiner_source = model_source(args.refiner, "refiner") if args.refiner else None
    vae = file_source("vae", args.vae, "vae")
    lora_file = file_source("loras", args.lora, "lora")
    refiner_lora = file_source("loras", args.refiner_lora, "refiner_lora")
    if args.refiner_mode == "negative-only" and not (refiner_source and refiner_lora):
        raise TuneLabError("negative-only needs a refiner and a refiner LoRA; give --refiner and --refiner-lora",
                           input_name="refiner_mode")
    if lora_file is None and args.model != "tiny-sdxl" and any(n.startswith("lora") for n in names):
        raise TuneLabError("a LoRA is required with a real model for the lora_ states (the built-in LoRA is for "
                           "tiny-sdxl only)", input_name="lora")
    runtime(args)
    dist = _distributed(args.device)
    shard = evaluation.parse_shard(args.shard) if args.shard else (
        (dist.process_index, dist.num_processes) if dist else (0, 1))
    device = args.device
    if dist is not None and args.device == "auto":  # accelerate's device for this rank ("cpu:0" means the CPU)
        device = "cpu" if dist.device.type == "cpu" else str(dist.device)
    if dist is not None:
        print(f"process {dist.process_index} of {dist.num_processes} on {device} ({dist.backend}): cells with "
              f"index % {shard[1]} == {shard[0]}", flush=True)
    sources = {m: _scorer_source(getattr(args, f"{k}_model"), k, is_tiny)
               for m, k in (("clip_score", "clip"), ("pickscore", "pickscore"))}
    scorers = {m: scoring.load(src, evaluation.SCORER_KINDS[m], device=device, dtype=args.score_dtype)
               for m, src in sources.items() if src is not None}
    evaluation.check_scorers(scorers)

    base = models.load(base_source, vae=vae, dtype=args.dtype, device=device)
    refiner = None
    if refiner_source:
        refiner = models.load(refiner_source, dtype=args.dtype, device=device)
        if refiner_lora:
            refiner = lora.load(refiner, refiner_lora, 1.0)
    lora_pipe = None
    if any(n.startswith("lora") for n in names):
        lora_pipe = lora.load(base, lora_file or tiny.wrong_lora(), args.strength)
    if is_tiny:
        print("note: tiny models produce noise and the tiny scorers are random; the numbers only show the "
              "machinery works. Use SDXL, the wrong LoRA, CLIP ViT-L/14 and PickScore for real ones.")
    states = compare.named_states(names, base, lora_pipe, args.negative)
    i, n = shard
    print(f"evaluating {len(prompts)} prompt(s) x {len(seeds)} seed(s) x {len(states)} state(s) = "
          f"{len(prompts) * len(seeds) * len(states)} images, {steps} steps, {width}x{height}"
          + (f", shard {i}/{n}" if n > 1 else ""), flush=True)
    try:
        report = evaluation.run(args.out, states, prompts, seeds, scorers=scorers, steps=steps,
                                guidance=args.guidance, width=width, height=height, refiner=refiner,
                                high_noise_frac=args.high_noise_frac, scheduler=args.scheduler,
                                refiner_mode=args.refiner_mode, shard=shard, resamples=args.resamples,
                                stats_seed=args.stats_seed)
    finally:
        if dist is not None:
            import torch.distributed as td

            if td.is_available() and td.is_initialized():
                td.destroy_process_group()
    print(report.summary())
    if report.result is not None:
        print(report.result.table, end="")
    return 0
