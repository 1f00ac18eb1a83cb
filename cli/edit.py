"""`python -m tunelab edit`: one InstructPix2Pix edit of an image file."""
from __future__ import annotations

from .args import add_device, add_model
from ..core.instruct import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_INSTRUCTION, DEFAULT_STEPS


def add_arguments(p) -> None:
    p.add_argument("--image", required=True, help="the image file to edit (any size; the output keeps it)")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION,
                   help=f"the edit, compel syntax allowed (default: '{DEFAULT_INSTRUCTION}')")
    p.add_argument("--out", required=True, help="output PNG file")
    add_model(p, "tiny-ip2p", "InstructPix2Pix model")
    p.add_argument("--negative", default="", help="optional negative prompt")
    p.add_argument("--image-guidance", type=float, default=DEFAULT_IMAGE_GUIDANCE,
                   help=f"image guidance scale (default {DEFAULT_IMAGE_GUIDANCE})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"text guidance scale (default {DEFAULT_GUIDANCE})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--lora", default=None, help="optional LoRA .safetensors for the model")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength (default 1.0)")
    add_device(p)


def run(args) -> int:
    import json

    from .. import host
    from ..core import images, instruct, instruct_data, lora, models, tiny

    source = instruct_data.load_image(args.image, args.image, "image")
    handle = models.load(host.resolve_model(args.model), dtype=args.dtype, device=args.device)
    if args.lora:
        handle = lora.load(handle, host.resolve_file("loras", args.lora), args.strength)
    if args.model in tiny.PRESETS:
        print(f"note: {args.model} is a toy model that produces noise; use a real InstructPix2Pix checkpoint for "
              "real edits.")
    out = instruct.edit(handle, images.pil_to_tensor([source]), args.instruction, image_guidance=args.image_guidance,
                        guidance=args.guidance, steps=args.steps, seed=args.seed, negative=args.negative)
    settings = {"instruction": args.instruction, "negative": args.negative, "image_guidance": args.image_guidance,
                "guidance": args.guidance, "steps": args.steps, "seed": args.seed, **handle.describe()}
    path = images.save_png(images.tensor_to_pil(out)[0], args.out, {"tunelab": json.dumps(settings)})
    print(f"wrote {path} ({source.size[0]}x{source.size[1]})")
    return 0
