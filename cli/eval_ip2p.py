"""`python -m tunelab eval-ip2p`: InstructPix2Pix models on held-out pairs, PSNR/SSIM per model and task."""
from __future__ import annotations

from .args import add_device, model_source, runtime
from ..core.instruct import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="instruction dataset folder (with metadata.jsonl)")
    p.add_argument("--model", action="append", default=None, metavar="[LABEL=]MODEL",
                   help="an InstructPix2Pix model (a tiny preset, a name `python -m tunelab info` lists, a "
                        "checkpoint or a diffusers folder), optionally labelled; repeat to compare several "
                        "(default tiny-ip2p, a built-in tiny model that produces noise)")
    p.add_argument("--columns", default="tunelab",
                   help="column preset or mapping of the dataset, e.g. input=COL,instruction=COL,edited=COL "
                        "(default %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"denoising steps, 1..1000 (default {DEFAULT_STEPS})")
    p.add_argument("--image-guidance", type=float, default=DEFAULT_IMAGE_GUIDANCE,
                   help=f"image guidance, 0..100 (default {DEFAULT_IMAGE_GUIDANCE})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"text guidance, 0..100 (default {DEFAULT_GUIDANCE})")
    p.add_argument("--seed", type=int, default=0,
                   help="one seed for every example and model, 0..2^64-1 (default 0)")
    p.add_argument("--limit", type=int, default=10, help="the first N held-out pairs; 0: all (default 10)")
    p.add_argument("--negative", default="",
                   help="optional negative prompt for every model, compel syntax (default: none)")
    add_device(p)
    p.add_argument("--out", required=True, help="output folder for images, grids and reports (made if missing)")


def _labelled(specs) -> list:
    """[(label, model source)] from --model values: 'LABEL=MODEL' or 'MODEL' (a path or a name with '=' in it
    counts as a model)."""
    from pathlib import Path

    from ..core import tiny

    out = []
    for spec in specs:
        label, sep, source = spec.partition("=")
        if not sep or not label.strip() or spec in tiny.PRESETS or Path(spec).exists():
            label, source = "", spec
        out.append((label.strip(), model_source(source.strip())))
    return out


def run(args) -> int:
    from ..core import files, instruct, instruct_data, models, tiny
    from ..core.checks import check_int

    # -- every input, before any model loads
    specs = args.model or ["tiny-ip2p"]
    instruct.check_settings(args.steps, args.image_guidance, args.guidance, args.seed)
    instruct.check_prompts(instruct.DEFAULT_INSTRUCTION, args.negative)
    check_int(args.limit, "limit", 0, hint="0: every held-out pair")
    files.check_input_dir(args.dataset, "dataset", what="dataset folder", marker=instruct_data.METADATA)
    pairs = instruct_data.held_out(args.dataset, columns=args.columns)
    instruct.check_pairs(pairs[:args.limit] if args.limit else pairs, args.negative)
    files.check_output_dir(args.out, "out")
    sources = _labelled(specs)
    runtime(args)

    # -- the work
    labelled = []
    for label, source in sources:
        handle = models.load(source, dtype=args.dtype, device=args.device)
        labelled.append((label, handle) if label else handle)
    if any(s.split("=")[-1].strip() in tiny.PRESETS for s in specs):
        print("note: tiny presets are toy models that produce noise; their scores mean nothing.")
    ev = instruct.evaluate(labelled, args.dataset, steps=args.steps, image_guidance=args.image_guidance,
                           guidance=args.guidance, seed=args.seed, limit=args.limit, negative=args.negative,
                           columns=args.columns, out_dir=args.out)
    print(ev.table, end="")
    print(f"wrote {len(ev.paths['images'])} image(s), {len(ev.paths['grids'])} grid(s) and reports to {args.out}")
    return 0
