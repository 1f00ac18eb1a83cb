"""`python -m tunelab eval-ip2p`: InstructPix2Pix models on held-out pairs, PSNR/SSIM per model and task."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .args import add_device, file_source, model_source, runtime
from ..core.errors import TuneLabError
from ..core.instruct import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="instruction dataset folder (with metadata.jsonl)")
    p.add_argument("--model", action="append", default=None, metavar="[LABEL=]MODEL[+LORA[:WEIGHT]]",
                   help="an InstructPix2Pix model (a tiny preset, a name `python -m tunelab info` lists, a "
                        "checkpoint or a diffusers folder), optionally labelled and with LoRAs, e.g. "
                        "tuned=tiny-ip2p+out/derain.safetensors:0.8; repeat to compare several "
                        "(default tiny-ip2p, a built-in tiny model that produces noise)")
    p.add_argument("--lora", action="append", default=[], metavar="LABEL=FILE[:WEIGHT]",
                   help="also evaluate the first --model with this LoRA (e.g. a train-ip2p --mode lora result), "
                        "labelled LABEL; repeat for several")
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
    p.add_argument("--clip-model", default=None,
                   help="CLIP model (folder in models/scorers, a path, or tiny-clip) for CLIP image similarity to the "
                        "ground truth / input and CLIP directional similarity (default: none)")
    p.add_argument("--dino-model", default=None,
                   help="DINOv2 model (folder in models/scorers, a path, or tiny-dinov2) for DINOv2 similarity "
                        "(default: none)")
    p.add_argument("--caption-columns", default=None, metavar="IN,OUT",
                   help="dataset columns with the input and edited captions, for the directional similarity "
                        "(default: input_caption,edited_caption or original_prompt,edited_prompt when present)")
    p.add_argument("--sweep-image-guidance", type=float, nargs="+", default=None, metavar="IG",
                   help="sweep these image guidance values (with --sweep-guidance: the grid); writes sweep.png")
    p.add_argument("--sweep-guidance", type=float, nargs="+", default=None, metavar="G",
                   help="sweep these text guidance values")
    add_device(p)
    p.add_argument("--out", required=True, help="output folder for images, grids and reports (made if missing)")


@dataclass(frozen=True)
class ModelSpec:
    label: str  # "" = TuneLab's label (the model's name and its LoRAs)
    base: str
    loras: tuple = ()  # ((file, weight), ...)


def _known(text: str) -> bool:
    from ..core import tiny

    return text in tiny.PRESETS or Path(text).exists()


def _lora_weight(text: str, flag: str) -> tuple:
    """'FILE[:WEIGHT]' -> (file, weight); a colon that is not followed by a number belongs to the path."""
    name, colon, weight = text.rpartition(":")
    if colon and name and not _known(text):
        try:
            return name.strip(), float(weight)
        except ValueError:
            pass
    if not text.strip():
        raise TuneLabError(f"'{text}': give a LoRA file, e.g. out/derain.safetensors or out/derain.safetensors:0.8",
                           input_name=flag)
    return text.strip(), 1.0


def parse_model_spec(spec: str) -> ModelSpec:
    """'[LABEL=]BASE[+LORA[:WEIGHT]]...' (a whole value that names an existing file or a preset is taken as it
    is, so paths may hold '=' or '+')."""
    label, source = "", spec.strip()
    head, sep, tail = source.partition("=")
    if sep and head.strip() and not _known(source):
        label, source = head.strip(), tail.strip()
    if _known(source):
        return ModelSpec(label, source)
    base, *loras = source.split("+")
    if not base.strip():
        raise TuneLabError(f"'{spec}' names no model before '+'; write e.g. tuned=tiny-ip2p+out/lora.safetensors",
                           input_name="model")
    return ModelSpec(label, base.strip(), tuple(_lora_weight(x, "model") for x in loras))


def parse_lora_spec(spec: str, base: str) -> ModelSpec:
    """'LABEL=FILE[:WEIGHT]' -> the base model with that LoRA, labelled."""
    label, sep, file = spec.partition("=")
    if not sep or not label.strip() or _known(spec):
        label, file = "", spec
    return ModelSpec(label.strip(), base, (_lora_weight(file, "lora"),))


def model_specs(models, loras) -> list:
    specs = [parse_model_spec(m) for m in (models or ["tiny-ip2p"])]
    return specs + [parse_lora_spec(x, specs[0].base) for x in loras or ()]


def run(args) -> int:
    from .. import host
    from ..core import files, instruct, instruct_data, lora, models, scoring, tiny
    from ..core.checks import check_int

    # -- every input, before any model loads
    specs = model_specs(args.model, args.lora)
    instruct.check_settings(args.steps, args.image_guidance, args.guidance, args.seed)
    instruct.check_prompts(instruct.DEFAULT_INSTRUCTION, args.negative)
    check_int(args.limit, "limit", 0, hint="0: every held-out pair")
    instruct.parse_caption_columns(args.caption_columns)
    for values, name in ((args.sweep_image_guidance, "image_guidance_sweep"), (args.sweep_guidance, "guidance_sweep")):
        instruct.parse_guidance_values(values or [], name)
    files.check_input_dir(args.dataset, "dataset", what="dataset folder", marker=instruct_data.METADATA)
    pairs = instruct_data.held_out(args.dataset, columns=args.columns)
    instruct.check_pairs(pairs[:args.limit] if args.limit else pairs, args.negative)
    files.check_output_dir(args.out, "out")
    sources = [(spec.label, model_source(spec.base),
                [(file_source("loras", file, "lora"), weight) for file, weight in spec.loras]) for spec in specs]
    runtime(args)
    scorers = {kind: None if not source or source == "none" else
               scoring.load(host.resolve_scorer(source), kind, device=args.device, input_name=f"{kind}_model")
               for kind, source in (("clip", args.clip_model), ("dino", args.dino_model))}

    # -- the work
    labelled = []
    for label, source, loras in sources:
        handle = models.load(source, dtype=args.dtype, device=args.device)
        for file, weight in loras:
            handle = lora.load(handle, file, weight)
        labelled.append((label, handle) if label else handle)
    if any(spec.base in tiny.PRESETS for spec in specs):
        print("note: tiny presets are toy models that produce noise; their scores mean nothing.")
    common = dict(steps=args.steps, seed=args.seed, limit=args.limit, negative=args.negative, columns=args.columns,
                  clip=scorers["clip"], dino=scorers["dino"], caption_columns=args.caption_columns, out_dir=args.out)
    if args.sweep_image_guidance or args.sweep_guidance:
        sw = instruct.sweep(labelled, args.dataset, image_guidances=args.sweep_image_guidance or [args.image_guidance],
                            guidances=args.sweep_guidance or [args.guidance], **common)
        for ev in sw.evaluations.values():
            print(ev.table, end="")
        print(f"wrote {len(sw.evaluations)} setting(s) and {sw.paths['plot']} (metrics against image guidance), "
              f"{sw.paths['csv'].name}, {sw.paths['json'].name} to {args.out}")
        return 0
    ev = instruct.evaluate(labelled, args.dataset, image_guidance=args.image_guidance, guidance=args.guidance,
                           **common)
    print(ev.table, end="")
    print(f"wrote {len(ev.paths['images'])} image(s), {len(ev.paths['grids'])} grid(s) and reports to {args.out}")
    return 0
