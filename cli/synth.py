"""`python -m tunelab synth`: synthesize the "wrong" dataset (resumable, shardable), or `--merge` the shards."""
from __future__ import annotations

from .args import add_device, add_model, add_scheduler, add_vae, file_source, model_source, runtime
from ..core.synthesis import (DEFAULT_BOOST, DEFAULT_GUIDANCE, DEFAULT_INSTANCE_PROMPT, DEFAULT_KEYWORDS,
                              DEFAULT_TEMPLATE)

TINY_STEPS, TINY_SIZE = 4, 64


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="dataset folder (PNGs, metadata.jsonl, plan.json); rerun to resume")
    p.add_argument("--merge", action="store_true",
                   help="verify that every shard finished and write the sorted metadata.jsonl; loads no model")
    add_model(p, "tiny-sdxl", "SDXL base")
    p.add_argument("--refiner", default=None,
                   help="optional SDXL refiner, a name or a path as --model (the seed used base + refiner at 0.8)")
    add_vae(p)
    p.add_argument("--keywords", nargs="+", default=list(DEFAULT_KEYWORDS), metavar="KW",
                   help="keywords, one boosted per prompt (default: the seed's 13, from 'low quality' to "
                        "'mutilated')")
    p.add_argument("--boost", default=DEFAULT_BOOST,
                   help=f"compel weight of the boosted keyword: pluses, minuses or a number (default {DEFAULT_BOOST})")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="prompt template: {keywords} = the seed's prompt (all keywords, one boosted), {keyword} = "
                        "the boosted keyword, {subject} = a subject (default: {keywords})")
    p.add_argument("--subjects", nargs="+", default=[], metavar="S",
                   help="subjects for {subject} in the template (default: none)")
    p.add_argument("--guidance", nargs="+", type=float, default=list(DEFAULT_GUIDANCE), metavar="G",
                   help="guidance values swept per prompt, 0..50 (default 8 9 10 11 12 13)")
    p.add_argument("--per-entry", type=int, default=1,
                   help="images per (keyword, subject, guidance), each with its own seed (default 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed, 0..2^64-1; each image's seed is derived from it and its index (default 0)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps, 1..1000 (default 50; {TINY_STEPS} on tiny models)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help=f"image size in pixels, multiples of 8 (default 1024 1024; {TINY_SIZE} {TINY_SIZE} on tiny "
                        "models)")
    p.add_argument("--high-noise-frac", type=float, default=0.8,
                   help="with --refiner: the fraction of denoising the base does, between 0 and 1 (default 0.8)")
    add_scheduler(p)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="make only images with index %% N == I (0-based); run every shard, then --merge")
    p.add_argument("--instance-prompt", default=DEFAULT_INSTANCE_PROMPT,
                   help=f"caption written as 'text' for every image (default {DEFAULT_INSTANCE_PROMPT})")
    add_device(p)


def run(args) -> int:
    from ..core import files, models, sampling, synthesis, tiny
    from ..core.checks import check_text

    if args.merge:
        files.check_input_dir(args.out, "out", what="dataset folder")
        report = synthesis.merge(args.out)
        print(report.summary())
        return 0
    # -- every input, before any model loads
    is_tiny = args.model in tiny.PRESETS
    steps = args.steps if args.steps is not None else (TINY_STEPS if is_tiny else 50)
    width, height = args.size or ((TINY_SIZE, TINY_SIZE) if is_tiny else (1024, 1024))
    plan = synthesis.build_plan(args.keywords, boost=args.boost, template=args.template, subjects=args.subjects,
                                guidance=args.guidance, per_entry=args.per_entry, seed=args.seed)
    sampling.check_size(width, height)
    sampling.check_steps(steps)
    sampling.check_scheduler(args.scheduler)
    if args.refiner:
        sampling.check_high_noise_frac(args.high_noise_frac)
    shard = synthesis.parse_shard(args.shard)
    check_text(args.instance_prompt, "instance_prompt", what="instance prompt")
    files.check_output_dir(args.out, "out")
    synthesis.check_folder(args.out, "out")  # a foreign folder is refused now; a different plan once the model is known
    base_source = model_source(args.model)
    refiner_source = model_source(args.refiner, "refiner") if args.refiner else None
    vae = file_source("vae", args.vae, "vae")
    runtime(args)

    # -- the work
    base = models.load(base_source, vae=vae, dtype=args.dtype, device=args.device)
    refiner = models.load(refiner_source, dtype=args.dtype, device=args.device) if refiner_source else None
    if is_tiny:
        print("note: tiny models produce noise; use SDXL 1.0 (+ refiner) for a real dataset")
    i, n = shard
    print(f"plan: {len(plan)} images ({len(plan.keywords)} keywords x {max(1, len(plan.subjects))} subjects x "
          f"{len(plan.guidance)} guidance x {plan.per_entry}), {steps} steps, {width}x{height}"
          + (f", shard {i}/{n}" if n > 1 else ""))
    report = synthesis.run(args.out, base, plan, steps=steps, width=width, height=height, refiner=refiner,
                           high_noise_frac=args.high_noise_frac, scheduler=args.scheduler,
                           instance_prompt=args.instance_prompt, shard=shard)
    print(report.summary())
    return 0
