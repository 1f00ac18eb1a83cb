"""`python -m tunelab train-lora`: Dreambooth LoRA for SDXL from a terminal (also `python -m tunelab.training lora`,
which `accelerate launch -m tunelab.training lora ...` runs on several GPUs).

Every option of `training.lora_sdxl.LoraTrainConfig` is a flag (`rank` -> `--rank`); defaults are diffusers'.
"""
from __future__ import annotations

import dataclasses

from .args import add_device, add_model, add_vae, split_list

# flags with their own spelling or help; every other config field gets `--field-name` and "(default: X)"
HELP = {
    "instance_prompt": "the word the LoRA learns (default: wrong); with pivotal tuning it holds the token abstraction",
    "use_captions": "train on each image's 'text' from metadata.jsonl instead of the instance prompt",
    "resolution": "training size in pixels, a multiple of 8 (default: 1024; on a tiny preset the dataset's "
                  "smallest side, so a tiny synth dataset trains as it is)",
    "allow_upscale": "accept images smaller than the resolution, upscaled with a warning (default: refused)",
    "alpha": "lora_alpha (default: the rank, i.e. scale 1)",
    "target_modules": "UNet modules with LoRA, comma-separated (default: to_k,to_q,to_v,to_out.0)",
    "train_text_encoder": "also train LoRA on both text encoders (q/k/v/out_proj)",
    "max_train_steps": "optimizer steps (default: 500; 0 = use --num-train-epochs)",
    "mixed_precision": "auto (follow the weights), no, fp16 or bf16 (default: auto)",
    "cache_latents": "encode the images with the VAE once instead of every step",
    "pivotal_tuning": "also learn new tokens <s0><s1>.. for --token-abstraction (saved as <out>_emb.safetensors)",
    "with_prior_preservation": "regularise with class images (generated into --class-data-dir when missing)",
    "checkpointing_steps": "save a checkpoint every N steps (default: 500; 0 = only on interrupt)",
    "validation_prompt": "sample validation images with the trained LoRA from this prompt",
    "save_diffusers_copy": "also write <out>_diffusers.safetensors with diffusers keys",
    "snr_gamma": "Min-SNR weighting gamma, e.g. 5 (default: off)",
    "use_8bit_adam": "8-bit AdamW (needs bitsandbytes and a GPU)",
}
_OWN = {"data_dir", "output", "model", "vae", "dtype", "device", "run_dir", "resume", "target_modules"}
_OPTIONAL_FLOATS = {"alpha", "snr_gamma", "embedding_lr"}
_OPTIONAL_INTS = {"max_train_steps", "checkpoints_total_limit", "resolution"}


def add_arguments(p) -> None:
    from ..training.lora_sdxl import LoraTrainConfig

    p.add_argument("--data", required=True, help="dataset folder: images + optional metadata.jsonl (file_name, text)")
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors, kohya keys)")
    add_model(p, "tiny-sdxl", "SDXL base")
    add_vae(p)
    add_device(p, accelerate=True)
    p.add_argument("--run-dir", default=None, help="checkpoints, loss curve and validation images "
                                                   "(default: <out stem>_run beside --out)")
    p.add_argument("--resume", default=None, help="'latest' (newest complete checkpoint in the run dir) or a "
                                                  "checkpoint folder; refused if incompatible")
    p.add_argument("--target-modules", default=",".join(LoraTrainConfig.target_modules), help=HELP["target_modules"])
    for f in dataclasses.fields(LoraTrainConfig):
        if f.name in _OWN:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = HELP.get(f.name, f.name.replace("_", " "))
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=text)
        elif f.name in _OPTIONAL_FLOATS:
            p.add_argument(flag, type=float, default=default, help=f"{text} (default: {default})")
        elif f.name in _OPTIONAL_INTS:
            p.add_argument(flag, type=int, default=default,
                           help=text if f.name in HELP and "default" in text else f"{text} (default: {default})")
        elif f.name == "mixed_precision":
            p.add_argument(flag, default=default, choices=["auto", "no", "fp16", "bf16"], help=text)
        elif isinstance(default, int):
            p.add_argument(flag, type=int, default=default, help=f"{text} (default: {default})")
        elif isinstance(default, float):
            p.add_argument(flag, type=float, default=default, help=f"{text} (default: {default:g})")
        else:
            p.add_argument(flag, default=default, help=f"{text} (default: {default!r})")


def config_from_args(args):
    from ..training.lora_sdxl import LoraTrainConfig

    values = {}
    for f in dataclasses.fields(LoraTrainConfig):
        if f.name not in _OWN and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    if values.get("max_train_steps") == 0:
        values["max_train_steps"] = None
    from .. import host

    return LoraTrainConfig(data_dir=args.data, output=args.out, model=host.resolve_model(args.model), vae=args.vae,
                           dtype=args.dtype, device=args.device, run_dir=args.run_dir, resume=args.resume,
                           target_modules=split_list(args.target_modules),
                           **values)


def run(args) -> int:
    from ..core import tiny
    from ..training.lora_sdxl import train

    config = config_from_args(args)
    if args.model in tiny.PRESETS:
        print(f"note: {args.model} is a toy model that produces noise; train on SDXL 1.0 for a real LoRA")
    result = train(config)
    from accelerate.state import PartialState

    if not PartialState().is_main_process:
        return 0
    print(f"wrote {result.lora_path} ({result.steps} steps, final loss "
          f"{result.losses[-1] if result.losses else float('nan'):.4f})")
    for label, path in (("embeddings", result.embeddings_path), ("diffusers copy", result.diffusers_path)):
        if path:
            print(f"wrote {label} {path}")
    print(f"loss curve {result.loss_curve_png}; checkpoints in {result.run_dir / 'checkpoints'}")
    if result.validation_images:
        print(f"validation images in {result.run_dir / 'validation'}")
    return 0
