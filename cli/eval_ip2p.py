"""`python -m tunelab eval-ip2p`: InstructPix2Pix models on held-out pairs, PSNR/SSIM per model and task."""
from __future__ import annotations

from .args import add_device
from ..core.instruct import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="instruction dataset folder (with metadata.jsonl)")
    p.add_argument("--model", action="append", default=None, metavar="[LABEL=]MODEL",
                   help="an InstructPix2Pix model (checkpoint, diffusers folder or tiny preset), optionally labelled; "
                        "repeat to compare several (default: tiny-ip2p)")
    p.add_argument("--columns", default="tunelab", help="column preset or mapping of the dataset (default tunelab)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--image-guidance", type=float, default=DEFAULT_IMAGE_GUIDANCE,
                   help=f"image guidance (default {DEFAULT_IMAGE_GUIDANCE})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"text guidance (default {DEFAULT_GUIDANCE})")
    p.add_argument("--seed", type=int, default=0, help="one seed for every example and model (default 0)")
    p.add_argument("--limit", type=int, default=10, help="first N held-out pairs (default 10; 0: all)")
    p.add_argument("--negative", default="", help="optional negative prompt for every model")
    add_device(p)
    p.add_argument("--out", required=True, help="output folder for images, grids and reports")


def run(args) -> int:
    from pathlib import Path

    from .. import host
    from ..core import instruct, models, tiny

    specs = args.model or ["tiny-ip2p"]
    labelled = []
    for spec in specs:
        label, sep, source = spec.partition("=")
        if not sep or not label.strip() or spec in tiny.PRESETS or Path(spec).exists():
            label, source = "", spec
        handle = models.load(host.resolve_model(source.strip()), dtype=args.dtype, device=args.device)
        labelled.append((label.strip(), handle) if label.strip() else handle)
    if any(s.split("=")[-1].strip() in tiny.PRESETS for s in specs):
        print("note: tiny presets are toy models that produce noise; their scores mean nothing.")
    ev = instruct.evaluate(labelled, args.dataset, steps=args.steps, image_guidance=args.image_guidance,
                           guidance=args.guidance, seed=args.seed, limit=args.limit, negative=args.negative,
                           columns=args.columns, out_dir=args.out)
    print(ev.table, end="")
    print(f"wrote {len(ev.paths['images'])} image(s), {len(ev.paths['grids'])} grid(s) and reports to {args.out}")
    return 0
