"""`python -m tunelab train-ip2p` (also `python -m tunelab.training ip2p`): InstructPix2Pix fine-tuning, full or
LoRA, from a terminal. Every flag maps onto a field of `training.ip2p.Ip2pTrainConfig`."""
from __future__ import annotations

from .args import add_device, model_source, runtime, split_list

INPUT_FLAGS = {"output": "out", "data_dir": "data", "dataset": "data", "lora_alpha": "lora_alpha"}

# what each numeric option does; its default is added once, from the config
HELP = {
    "resolution": "training size in pixels, a multiple of 8; both images of a pair are resized to it",
    "conditioning_dropout_prob": "drop the text, the image or both with this probability each, for "
                                 "classifier-free guidance; 0: none",
    "learning_rate": "AdamW learning rate (LoRA usually wants more, e.g. 1e-4)",
    "lr_warmup_steps": "learning-rate warm-up steps",
    "max_train_steps": "optimizer steps",
    "train_batch_size": "pairs per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_grad_norm": "gradient-norm clipping",
    "seed": "seed of the data order, flips, noise, timesteps and dropout, 0..2^63-1",
    "checkpointing_steps": "save a checkpoint every N steps; 0: only on interrupt",
    "checkpoints_total_limit": "complete checkpoints kept",
    "rank": "LoRA rank (--mode lora)",
    "lora_alpha": "lora_alpha (--mode lora; default: the rank, i.e. scale 1)",
}


def add_arguments(p) -> None:
    from ..training import common
    from ..training.ip2p import LR_SCHEDULERS, MODES, Ip2pTrainConfig

    d = Ip2pTrainConfig("", "")
    p.add_argument("--data", required=True, help="instruction dataset folder (metadata.jsonl)")
    p.add_argument("--out", required=True, help="new folder for the fine-tuned pipeline (diffusers format); with "
                                                "--mode lora the LoRA file to write (.safetensors, kohya keys)")
    p.add_argument("--mode", default=d.mode, choices=MODES,
                   help="full: train the whole UNet; lora: a LoRA on an InstructPix2Pix model (default %(default)s)")
    p.add_argument("--model", default=d.model,
                   help="InstructPix2Pix or SD1.x model: a tiny preset, a name `python -m tunelab info` lists, a "
                        "checkpoint or a diffusers folder (default %(default)s, a built-in tiny model that "
                        "produces noise)")
    p.add_argument("--columns", default=d.columns,
                   help="dataset column preset or mapping input=COL,instruction=COL,edited=COL (default %(default)s)")
    p.add_argument("--split", default=d.split,
                   help="train on this split when the dataset has one; '' for every row (default %(default)s)")
    for name, kind in (("resolution", int), ("conditioning_dropout_prob", float), ("learning_rate", float),
                       ("lr_warmup_steps", int), ("max_train_steps", int), ("train_batch_size", int),
                       ("gradient_accumulation_steps", int), ("max_grad_norm", float), ("seed", int),
                       ("checkpointing_steps", int), ("checkpoints_total_limit", int), ("rank", int),
                       ("lora_alpha", float)):
        default = getattr(d, name)
        shown = "" if default is None else f" (default {default:g})" if kind is float else f" (default {default})"
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=HELP[name] + shown)
    p.add_argument("--target-modules", default=",".join(d.target_modules),
                   help="UNet modules with LoRA, comma-separated (default %(default)s)")
    p.add_argument("--use-ema", action="store_true",
                   help="keep an EMA of the trained weights and save it (diffusers' EMAModel)")
    p.add_argument("--save-diffusers-copy", action="store_true",
                   help="LoRA mode: also write <out stem>_diffusers.safetensors (diffusers keys)")
    p.add_argument("--lr-scheduler", default=d.lr_scheduler, choices=LR_SCHEDULERS,
                   help="learning-rate schedule (diffusers' get_scheduler; default %(default)s)")
    p.add_argument("--no-random-flip", action="store_true", help="do not flip pairs (default: random flip)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--mixed-precision", default=d.mixed_precision, choices=common.MIXED_PRECISION,
                   help="auto (follow the weights), no, fp16 or bf16 (default %(default)s)")
    add_device(p)
    p.add_argument("--run-dir", default=None,
                   help="checkpoints and loss curve (default: <out>_run; LoRA: <out stem>_run)")
    p.add_argument("--resume", default=None,
                   help="'latest' or a checkpoint path; refused if incompatible (default: a new run)")


def run(args) -> int:
    from ..core import files
    from ..training.ip2p import Ip2pTrainConfig, check_config, train

    # -- every input, before any model loads (train() checks the config, the data and --resume first too)
    files.check_input_dir(args.data, "data", what="dataset folder")
    if args.mode == "lora":
        files.check_output_file(args.out, "out", suffixes=(".safetensors",), new=True)
    else:
        files.check_output_dir(args.out, "out", new=True)
    cfg = Ip2pTrainConfig(
        data_dir=args.data, output=args.out, model=model_source(args.model), columns=args.columns,
        split=args.split or None,
        resolution=args.resolution, conditioning_dropout_prob=args.conditioning_dropout_prob,
        learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
        max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
        seed=args.seed, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, random_flip=not args.no_random_flip,
        gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision, dtype=args.dtype,
        device=args.device, run_dir=args.run_dir, resume=args.resume, use_ema=args.use_ema, mode=args.mode,
        rank=args.rank, lora_alpha=args.lora_alpha, save_diffusers_copy=args.save_diffusers_copy,
        target_modules=split_list(args.target_modules))
    check_config(cfg)
    runtime(args)
    result = train(cfg)
    print(f"trained {result.steps} step(s); wrote {result.output} and {result.loss_curve_png}")
    if result.diffusers_path:
        print(f"wrote diffusers copy {result.diffusers_path}")
    return 0
