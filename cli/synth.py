"""`python -m tunelab synth`: synthesize the "wrong" dataset (resumable, shardable), or `--merge` the shards."""
from __future__ import annotations

from .args import add_device, add_model, add_vae
from ..core.synthesis import DEFAULT_BOOST, DEFAULT_GUIDANCE, DEFAULT_INSTANCE_PROMPT, DEFAULT_KEYWORDS, DEFAULT_TEMPLATE

TINY_STEPS, TINY_SIZE = 4, 64


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="dataset folder (PNGs, metadata.jsonl, plan.json); rerun to resume")
    p.add_argument("--merge", action="store_true",
                   help="verify that every shard finished and write the sorted metadata.jsonl; loads no model")
    add_model(p, "tiny-sdxl", "SDXL base")
    p.add_argument("--refiner", default=None, help="optional SDXL refiner (the seed used base + refiner at 0.8)")
    add_vae(p)
    p.add_argument("--keywords", nargs="+", default=list(DEFAULT_KEYWORDS), metavar="KW",
                   help="keywords, one boosted per prompt (default: the seed's 13)")
    p.add_argument("--boost", default=DEFAULT_BOOST, help=f"compel weight of the boosted keyword (default {DEFAULT_BOOST})")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="prompt template: {keywords} = the seed's prompt (all keywords, one boosted), {keyword} = "
                        "the boosted keyword, {subject} = a subject (default: {keywords})")
    p.add_argument("--subjects", nargs="+", default=[], metavar="S", help="subjects for {subject} in the template")
    p.add_argument("--guidance", nargs="+", type=float, default=list(DEFAULT_GUIDANCE), metavar="G",
                   help="guidance values swept per prompt (default 8 9 10 11 12 13)")
    p.add_argument("--per-entry", type=int, default=1, help="images per (keyword, subject, guidance) (default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed is derived from it and its index")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default 50; {TINY_STEPS} on tiny models)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help=f"image size (default 1024 1024; {TINY_SIZE} {TINY_SIZE} on tiny models)")
    p.add_argument("--high-noise-frac", type=float, default=0.8, help="base/refiner split (default 0.8)")
    p.add_argument("--scheduler", default="default", help="diffusers scheduler name (default: the model's)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="make only images with index %% N == I (0-based); run every shard, then --merge")
    p.add_argument("--instance-prompt", default=DEFAULT_INSTANCE_PROMPT,
                   help=f"caption written as 'text' for every image (default {DEFAULT_INSTANCE_PROMPT})")
    add_device(p)


def run(args) -> int:
    from .. import host
    from ..core import models, sampling, synthesis, tiny

    if args.merge:
        report = synthesis.merge(args.out)
        print(report.summary())
        return 0
    is_tiny = args.model in tiny.PRESETS
    steps = args.steps or (TINY_STEPS if is_tiny else 50)
    width, height = args.size or ((TINY_SIZE, TINY_SIZE) if is_tiny else (1024, 1024))
    # refuse a bad plan, size or shard before loading any model
    plan = synthesis.build_plan(args.keywords, boost=args.boost, template=args.template, subjects=args.subjects,
                                guidance=args.guidance, per_entry=args.per_entry, seed=args.seed)
    sampling.check_size(width, height)
    sampling.check_steps(steps)
    shard = synthesis.parse_shard(args.shard)
    base = models.load(host.resolve_model(args.model), vae=args.vae, dtype=args.dtype, device=args.device)
    refiner = None
    if args.refiner:
        refiner = models.load(host.resolve_model(args.refiner), dtype=args.dtype, device=args.device)
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
