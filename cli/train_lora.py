"""`python -m tunelab train-lora`: Dreambooth LoRA for SDXL from a terminal (also `python -m tunelab.training lora`,
which `accelerate launch -m tunelab.training lora ...` runs on several GPUs).

Every option of `training.lora_sdxl.LoraTrainConfig` is a flag (`rank` -> `--rank`). The defaults are the seed's
recipe (the README run of train_dreambooth_lora_sdxl.py that the wrong LoRA followed, used with `wrong` in the
negative prompt); `--help` says for each default whose it is, and `--recipe script` takes the script's own argparse
defaults for all of them at once (flags given on the command line still win).
"""
from __future__ import annotations

import dataclasses

from .args import add_config_flags, add_device, add_model, add_vae, file_source, model_source, runtime, split_list

INPUT_FLAGS = {"output": "out", "data_dir": "data", "dataset": "data"}

# what each config field does; add_config_flags adds its default once, and whose default it is
HELP = {
    "instance_prompt": "the word the LoRA learns; with pivotal tuning it holds the token abstraction",
    "use_captions": "train on each image's 'text' from metadata.jsonl instead of the instance prompt",
    "resolution": "training size in pixels, a multiple of 8 (with --aspect-buckets: the pixel budget's side); a "
                  "tiny synth dataset trains as it is",
    "center_crop": "crop at the center instead of a seeded random crop",
    "random_flip": "flip half of the images horizontally",
    "repeats": "times each image appears per epoch",
    "allow_upscale": "accept images smaller than the resolution (or their bucket); refused otherwise",
    "rank": "LoRA rank",
    "alpha": "lora_alpha",
    "lora_dropout": "dropout on the LoRA layers",
    "train_text_encoder": "also train LoRA on both text encoders (q/k/v/out_proj)",
    "text_encoder_lr": "learning rate of the text-encoder LoRA (and of new tokens)",
    "learning_rate": "UNet LoRA learning rate",
    "lr_scheduler": "learning-rate schedule (diffusers' get_scheduler)",
    "lr_warmup_steps": "learning-rate warm-up steps",
    "lr_num_cycles": "cycles of cosine_with_restarts",
    "lr_power": "power of the polynomial schedule",
    "max_train_steps": "optimizer steps (0 = use --num-train-epochs)",
    "num_train_epochs": "epochs, when --max-train-steps is 0",
    "train_batch_size": "images per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_weight_decay": "AdamW weight decay of the UNet LoRA",
    "adam_weight_decay_text_encoder": "AdamW weight decay of the text-encoder LoRA",
    "adam_epsilon": "AdamW epsilon",
    "max_grad_norm": "gradient-norm clipping",
    "use_8bit_adam": "the script's spelling of --optimizer adamw8bit",
    "snr_gamma": "Min-SNR weighting gamma, e.g. 5",
    "noise_offset": "noise offset added to the training noise",
    "gradient_checkpointing": "trade compute for memory (for GPUs under 16 GB at 1024 px)",
    "mixed_precision": "auto (follow the weights), no, fp16 or bf16",
    "cache_latents": "encode each image with the VAE once (auto: yes; images are prepared once, so their latents "
                     "never change)",
    "seed": "seed of the LoRA init, data order, noise and timesteps, 0..2^63-1",
    "with_prior_preservation": "regularise with class images (generated into --class-data-dir when missing)",
    "class_data_dir": "folder of class images",
    "class_prompt": "prompt of the class images (needed with --with-prior-preservation)",
    "num_class_images": "class images used",
    "prior_loss_weight": "weight of the class-image loss",
    "class_generation_steps": "denoising steps of generated class images",
    "class_generation_guidance": "guidance of generated class images",
    "pivotal_tuning": "also learn new tokens <s0><s1>.. for --token-abstraction (saved as <out>_emb.safetensors)",
    "token_abstraction": "the word in the prompts that the new tokens replace",
    "num_new_tokens": "new tokens per abstraction",
    "embedding_lr": "learning rate of the new tokens",
    "train_embeddings_frac": "share of the steps during which the new tokens train",
    "checkpointing_steps": "save a checkpoint every N steps (0 = only on interrupt)",
    "checkpoints_total_limit": "complete checkpoints kept",
    "max_nonfinite": "non-finite losses in a row before the run stops and saves",
    "save_diffusers_copy": "also write <out>_diffusers.safetensors with diffusers keys",
    "validation_prompt": "sample validation images with the LoRA from this prompt (repeat the flag for several)",
    "validation_negative": "negative prompt of the validation images",
    "num_validation_images": "validation images per validation",
    "validation_steps": "also validate every N steps (0 = only at the end)",
    "validation_inference_steps": "denoising steps of the validation images",
    "validation_guidance": "guidance of the validation images",
    "aspect_buckets": "SDXL aspect-ratio buckets: each image keeps its aspect ratio within resolution^2 pixels, "
                      "with its own original size / crop / target size conditioning; batches stay within a bucket",
    "bucket_step": "bucket sides are multiples of this (at least 32 for SDXL)",
    "min_bucket_side": "smallest bucket side",
    "max_bucket_side": "largest bucket side",
    "caption_dropout": "probability that a caption is replaced by the empty one, per image and step",
    "shuffle_tags": "shuffle each caption's comma-separated tags every step",
    "keep_tags": "with --shuffle-tags, keep the first N tags in place",
    "use_dora": "DoRA (peft use_dora); saved as kohya .dora_scale keys that ComfyUI's LoraLoader applies exactly",
    "optimizer": "adamw; adamw8bit (bitsandbytes); prodigy (prodigyopt; use a learning rate near 1.0)",
    "scale_lr": "multiply the learning rates by batch x accumulation x processes",
    "validation_seed": "seed of the validation images, the same at every validation",
    "report_to": "none, or tensorboard: loss, lr, grad norm and validation images in <run dir>/logs",
}
# defaults that need words rather than the config's value
DEFAULTS = {"alpha": "the rank, i.e. scale 1", "snr_gamma": "off", "embedding_lr": "--text-encoder-lr",
            "class_data_dir": "<run dir>/class_images", "class_prompt": "none", "validation_seed": "--seed",
            "min_bucket_side": "resolution/4", "max_bucket_side": "2 x resolution",
            "resolution": "1024; on a tiny preset the dataset's smallest side"}
_OWN = {"data_dir", "output", "model", "vae", "dtype", "device", "run_dir", "resume", "target_modules",
        "validation_prompt"}


def add_arguments(p) -> None:
    from ..training import common
    from ..training.lora_sdxl import (LR_SCHEDULERS, RECIPES, SCRIPT, SCRIPT_RECIPE, LoraTrainConfig,
                                      default_origin)

    p.add_argument("--data", required=True, help="dataset folder: images + optional metadata.jsonl (file_name, text)")
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors, kohya keys)")
    add_model(p, "tiny-sdxl", "SDXL base")
    add_vae(p)
    add_device(p, accelerate=True)
    p.add_argument("--recipe", default="seed", choices=RECIPES,
                   help=f"defaults for {', '.join(sorted(SCRIPT_RECIPE))}: seed (the README run the wrong LoRA "
                        f"followed; default) or script ({SCRIPT}'s own argparse defaults); flags given still win")
    p.add_argument("--run-dir", default=None, help="checkpoints, loss curve and validation images "
                                                   "(default: <out stem>_run beside --out)")
    p.add_argument("--resume", default=None, help="'latest' (newest complete checkpoint in the run dir) or a "
                                                  "checkpoint folder; refused if incompatible (default: a new run)")
    p.add_argument("--target-modules", default=",".join(LoraTrainConfig.target_modules),
                   help="UNet modules with LoRA, comma-separated (default %(default)s; the script's)")
    p.add_argument("--validation-prompt", action="append", default=None, help=HELP["validation_prompt"])
    add_config_flags(p, LoraTrainConfig, skip=_OWN, help_text=HELP, origin=default_origin,
                     recipe_keys=set(SCRIPT_RECIPE),
                     choices={"optimizer": common.OPTIMIZERS, "report_to": common.REPORT_TO,
                              "mixed_precision": common.MIXED_PRECISION, "lr_scheduler": LR_SCHEDULERS},
                     optional_types={"alpha": float, "snr_gamma": float, "embedding_lr": float,
                                     "max_train_steps": int, "checkpoints_total_limit": int, "prodigy_beta3": float,
                                     "min_bucket_side": int, "max_bucket_side": int, "resolution": int, "validation_seed": int,
                                     "cache_latents": bool, "class_data_dir": str},
                     shown_defaults=DEFAULTS)


def config_from_args(args):
    from ..training.lora_sdxl import LoraTrainConfig, recipe_values

    values = {}
    for f in dataclasses.fields(LoraTrainConfig):
        if f.name not in _OWN and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    for name, value in recipe_values(getattr(args, "recipe", "seed")).items():
        values.setdefault(name, value)
    if values.get("max_train_steps") == 0:
        values["max_train_steps"] = None
    return LoraTrainConfig(data_dir=args.data, output=args.out, model=model_source(args.model),
                           vae=file_source("vae", args.vae, "vae"), dtype=args.dtype, device=args.device,
                           run_dir=args.run_dir, resume=args.resume, target_modules=split_list(args.target_modules),
                           validation_prompt="\n".join(args.validation_prompt) if args.validation_prompt else None,
                           **values)


def run(args) -> int:
    from ..core import files, tiny
    from ..training.lora_sdxl import check_config, train

    # -- every input, before any model loads (train() checks the config, the data and --resume first too)
    files.check_input_dir(args.data, "data", what="dataset folder")
    files.check_output_file(args.out, "out", suffixes=(".safetensors",))
    config = config_from_args(args)
    check_config(config)
    runtime(args)

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
    print(f"loss curve {result.loss_curve_png}")
    if result.last_checkpoint:  # only a folder that exists: with checkpointing off none is ever made
        print(f"last checkpoint {result.last_checkpoint} (--resume latest continues from it)")
    if result.validation_images:
        print(f"validation images in {result.run_dir / 'validation'}"
              + (f"; grid over steps {result.validation_grid_png}" if result.validation_grid_png else ""))
    if config.report_to == "tensorboard":
        print(f"logs: tensorboard --logdir {result.run_dir / 'logs'}")
    return 0
