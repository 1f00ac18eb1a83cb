"""`python -m tunelab edit`: one InstructPix2Pix edit of an image file."""
from __future__ import annotations

from .args import add_device, add_model, add_scheduler, file_source, model_source, runtime
from ..core.instruct import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_INSTRUCTION, DEFAULT_STEPS


def add_arguments(p) -> None:
    from ..core.images import IMAGE_FORMATS

    p.add_argument("--image", required=True, help="the image file to edit (any size; the output keeps it)")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION,
                   help=f"the edit, compel syntax allowed (default: '{DEFAULT_INSTRUCTION}')")
    p.add_argument("--out", required=True,
                   help=f"the output image file; its ending picks the format ({', '.join(IMAGE_FORMATS)})")
    add_model(p, "tiny-ip2p", "InstructPix2Pix model")
    p.add_argument("--negative", default="", help="optional negative prompt, compel syntax (default: none)")
    p.add_argument("--image-guidance", type=float, default=DEFAULT_IMAGE_GUIDANCE,
                   help=f"image guidance scale, 0..100; guidance runs when it is >= 1 "
                        f"(default {DEFAULT_IMAGE_GUIDANCE})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"text guidance scale, 0..100 (default {DEFAULT_GUIDANCE})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"denoising steps, 1..1000 (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise, 0..2^64-1 (default 0)")
    p.add_argument("--lora", default=None,
                   help="optional LoRA for the model: a name from models/loras or a .safetensors path")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength, -100..100 (default 1.0)")
    add_scheduler(p)
    add_device(p)


def run(args) -> int:
    import json

    from ..core import files, images, instruct, instruct_data, lora, models, tiny
    from ..core.checks import check_number

    # -- every input, before any model loads
    instruct.check_prompts(args.instruction, args.negative)
    instruct.check_settings(args.steps, args.image_guidance, args.guidance, args.seed, args.scheduler)
    check_number(args.strength, "strength", -100.0, 100.0)
    out = files.check_output_file(args.out, "out", suffixes=tuple(images.IMAGE_FORMATS))
    image_path = files.check_input_file(args.image, "image", what="image file")
    source = instruct_data.load_image(image_path, args.image, "image")
    model = model_source(args.model)
    lora_path = file_source("loras", args.lora, "lora")
    runtime(args)

    # -- the work
    handle = models.load(model, dtype=args.dtype, device=args.device)
    if lora_path:
        handle = lora.load(handle, lora_path, args.strength)
    if args.model in tiny.PRESETS:
        print(f"note: {args.model} is a toy model that produces noise; use a real InstructPix2Pix checkpoint for "
              "real edits.")
    result = instruct.edit(handle, images.pil_to_tensor([source]), args.instruction,
                           image_guidance=args.image_guidance, guidance=args.guidance, steps=args.steps,
                           seed=args.seed, negative=args.negative, scheduler=args.scheduler)
    settings = {"instruction": args.instruction, "negative": args.negative, "image_guidance": args.image_guidance,
                "guidance": args.guidance, "steps": args.steps, "seed": args.seed, "scheduler": args.scheduler,
                **handle.describe()}
    path = images.save_image(images.tensor_to_pil(result)[0], out,
                             {"tunelab": json.dumps(settings, allow_nan=False)})
    print(f"wrote {path} ({source.size[0]}x{source.size[1]})")
    return 0
