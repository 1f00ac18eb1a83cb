"""`python -m tunelab train-ip2p` (also `python -m tunelab.training ip2p`): InstructPix2Pix fine-tuning, full or
LoRA, from a terminal. Every field of `training.ip2p.Ip2pTrainConfig` is a flag; the defaults are the seed's runs
(`--help` says for each whose it is) and `--recipe script` takes train_instruct_pix2pix.py's own defaults."""
from __future__ import annotations

import dataclasses

from .args import add_config_flags, add_device, model_source, runtime, split_list

INPUT_FLAGS = {"output": "out", "data_dir": "data", "dataset": "data"}

HELP = {
    "mode": "full: train the whole UNet (a pipeline folder); lora: a LoRA on an InstructPix2Pix model",
    "model": "InstructPix2Pix or SD1.x model: a tiny preset, a name `python -m tunelab info` lists, a checkpoint or a "
             "diffusers folder (tiny-ip2p is a built-in tiny model that produces noise)",
    "columns": "dataset column preset or mapping (input=COL,instruction=COL,edited=COL); the imagefolder layout "
               "(*_file_name columns) is read without one",
    "split": "train on this split when the dataset has one; '' for every row",
    "resolution": "training size in pixels, a multiple of 8; both images of a pair are resized to it",
    "allow_upscale": "accept pairs smaller than the resolution, upscaled with a warning; refused otherwise",
    "random_flip": "flip pairs horizontally (both images together)",
    "conditioning_dropout_prob": "drop the instruction / the image with this probability each (0: none)",
    "max_train_steps": "optimizer steps (0 = use --num-train-epochs)",
    "max_train_samples": "train on this many pairs, drawn by a shuffle seeded with --seed",
    "use_ema": "keep an EMA of the trained weights and save it (diffusers' EMAModel)",
    "use_8bit_adam": "8-bit AdamW (bitsandbytes)",
    "scale_lr": "multiply the learning rate by batch x accumulation",
    "save_diffusers_copy": "LoRA mode: also write <out stem>_diffusers.safetensors (diffusers keys)",
    "validation_image": "an image to edit with --validation-prompt during the run",
    "validation_prompt": "the instruction of the validation edits",
    "validation_steps": "validate every N steps (0 = only at the end)",
    "validation_seed": "seed of the validation edits, the same at every validation",
    "report_to": "none, or tensorboard: loss, lr, grad norm and validation edits in <run dir>/logs",
}
_OWN = {"data_dir", "output", "dtype", "device", "run_dir", "resume", "target_modules"}


def add_arguments(p) -> None:
    from ..training import common
    from ..training.ip2p import (LR_SCHEDULERS, MODES, RECIPES, SCRIPT, SCRIPT_RECIPE, Ip2pTrainConfig,
                                 default_origin)

    p.add_argument("--data", required=True, help="instruction dataset folder (metadata.jsonl)")
    p.add_argument("--out", required=True, help="new folder for the fine-tuned pipeline (diffusers format); with "
                                                "--mode lora the LoRA file to write (.safetensors, kohya keys)")
    p.add_argument("--recipe", default="seed", choices=RECIPES,
                   help=f"defaults for {', '.join(sorted(SCRIPT_RECIPE))}: seed (the seed's runs; default) or "
                        f"script ({SCRIPT}'s own argparse defaults); flags given still win")
    p.add_argument("--target-modules", default=",".join(Ip2pTrainConfig.target_modules),
                   help="UNet modules with LoRA, comma-separated (default %(default)s)")
    add_config_flags(p, Ip2pTrainConfig, skip=_OWN, help_text=HELP, origin=default_origin,
                     recipe_keys=set(SCRIPT_RECIPE),
                     choices={"mode": MODES, "lr_scheduler": LR_SCHEDULERS, "mixed_precision": common.MIXED_PRECISION,
                              "report_to": common.REPORT_TO},
                     optional_types={"conditioning_dropout_prob": float, "max_train_steps": int,
                                     "max_train_samples": int, "checkpoints_total_limit": int, "lora_alpha": float,
                                     "validation_image": str, "validation_prompt": str, "validation_seed": int, "resolution": int,
                                     "model": str},
                     shown_defaults={"resolution": "256; on a tiny preset the dataset's smallest side",
                                     "validation_seed": "--seed", "lora_alpha": "the rank, i.e. scale 1"})
    add_device(p)
    p.add_argument("--run-dir", default=None,
                   help="checkpoints and loss curve (default: <out>_run; LoRA: <out stem>_run)")
    p.add_argument("--resume", default=None,
                   help="'latest' or a checkpoint path; refused if incompatible (default: a new run)")


def config_from_args(args):
    from ..training.ip2p import Ip2pTrainConfig, recipe_values

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Ip2pTrainConfig)
              if f.name not in _OWN and hasattr(args, f.name)}
    for name, value in recipe_values(getattr(args, "recipe", "seed")).items():
        values.setdefault(name, value)
    if values.get("max_train_steps") == 0:
        values["max_train_steps"] = None
    if not values.get("split"):
        values["split"] = None
    if values.get("model") is not None:
        values["model"] = model_source(values["model"])
    return Ip2pTrainConfig(data_dir=args.data, output=args.out, dtype=args.dtype, device=args.device,
                           run_dir=args.run_dir, resume=args.resume, target_modules=split_list(args.target_modules),
                           **values)


def run(args) -> int:
    from ..core import files
    from ..training.ip2p import check_config, train

    # -- every input, before any model loads (train() checks the config, the data and --resume first too)
    files.check_input_dir(args.data, "data", what="dataset folder")
    cfg = config_from_args(args)
    if cfg.mode == "lora":
        files.check_output_file(args.out, "out", suffixes=(".safetensors",), new=True)
    else:
        files.check_output_dir(args.out, "out", new=True)
    check_config(cfg)
    runtime(args)
    result = train(cfg)
    print(f"trained {result.steps} step(s); wrote {result.output} and {result.loss_curve_png}")
    if result.diffusers_path:
        print(f"wrote diffusers copy {result.diffusers_path}")
    if result.validation_grid_png:
        print(f"validation edits in {result.run_dir / 'validation'}; grid over steps {result.validation_grid_png}")
    return 0
