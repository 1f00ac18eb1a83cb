"""TuneLab Train LoRA: Dreambooth LoRA for SDXL (optionally with pivotal tuning) inside the graph."""
from __future__ import annotations

from pathlib import Path

from .. import host
from ..core.checks import TRAIN_SEED_MAX
from ..core.errors import TuneLabError
from ..core.files import confined_path
from .common import PIPE, category, dataset_folder, output_images, seed_input

MAX_STEPS = 100_000
# the seed's example prompt (the wrong LoRA's model card), used with `wrong` in the negative prompt
VALIDATION_PROMPT = "realistic human Shrek blogging at a computer workstation, hyperrealistic award-winning photo"
# optional inputs that stay in view where a frontend folds the advanced ones (see _advanced)
TRAIN_LORA_SHOWN = ("recipe", "validation_prompt", "validation_steps")
TRAIN_IP2P_SHOWN = ("rank", "recipe", "validation_image", "validation_prompt", "validation_steps")


def lora_target(lora_name: str) -> tuple:
    """(path of the LoRA file in models/loras, the name LoraLoader lists it under, the run folder for checkpoints,
    curve and validation images under the output directory)."""
    name = (lora_name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name.strip(" /\\."):
        raise TuneLabError("give the LoRA a file name, e.g. tunelab/wrong_lora", input_name="lora_name")
    path = confined_path(host.model_dirs("loras")[0], name + ".safetensors", "lora_name", root_label="models/loras")
    rel = Path(name.replace("\\", "/")).as_posix()
    run_dir = confined_path(host.output_dir(), f"tunelab/train/{rel}", "lora_name")
    return path, rel + ".safetensors", run_dir


def _flt(default, lo, hi, step, tooltip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tooltip})


def _bool(default, tooltip):
    return ("BOOLEAN", {"default": default, "tooltip": tooltip})


def _from(module, name: str) -> str:
    """' Default: <whose>.' for a tooltip (training.lora_sdxl / training.ip2p `default_origin`)."""
    return f" Default: {module.default_origin(name)}."


def _recipe_input(module) -> tuple:
    keys = ", ".join(sorted(module.SCRIPT_RECIPE))
    return (["custom", "seed", "script"], {"default": "custom", "tooltip":
            f"custom: the values set here. seed / script: {keys} take the seed's recipe or {module.SCRIPT}'s own "
            "defaults, whatever the widgets say (the other inputs still apply)."})


def _advanced(inputs: dict, keep: tuple) -> dict:
    """Flag the rarely changed inputs (all but `keep`) ``advanced``. comfyui-frontend 1.58 folds them behind the
    node's "advanced inputs" button in its Vue node renderer and lists them apart in the properties panel; its
    classic canvas and the pinned 1.35 show every widget as before. Names, order, defaults and values stay, so
    saved workflows and API prompts are unchanged."""
    return {name: entry if name in keep else (entry[0], {**entry[1], "advanced": True})
            for name, entry in inputs.items()}


def _apply_recipe(module, recipe: str, values: dict) -> dict:
    if recipe in (None, "", "custom"):
        return values
    return {**values, **module.recipe_values(recipe)}


class TrainLora:
    DESCRIPTION = ("Trains a Dreambooth LoRA for SDXL on a dataset folder (images + metadata.jsonl), following "
                   "diffusers' train_dreambooth_lora_sdxl.py, and saves it to models/loras in the kohya format "
                   "ComfyUI's own LoraLoader reads. Options: AdamW / 8-bit AdamW / Prodigy, DoRA, SDXL aspect-ratio "
                   "buckets, caption dropout and tag shuffle, pivotal tuning, prior preservation. Progress shows the "
                   "loss and, while it trains, the validation images; an interrupt saves a checkpoint (resume: "
                   "latest). Returns the pipe with the new LoRA, its name, the loss curve, the last validation "
                   "images and a grid of the validation images over steps.")
    CATEGORY = category("train")
    RETURN_TYPES = (PIPE, "STRING", "IMAGE", "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora_pipe", "lora_name", "loss_curve", "validation", "validation_grid")
    OUTPUT_TOOLTIPS = ("The input pipe with the trained LoRA on its stack (strength 1), e.g. for TuneLab Compare.",
                       "The LoRA's name under models/loras (what LoraLoader lists).",
                       "Loss per step with its moving average.",
                       "The last validation images, sampled with the trained LoRA (validation prompt and negative).",
                       "Every validation over the run, one row per step, so progress can be compared.")
    OUTPUT_NODE = True
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        from ..training import common
        from ..training import lora_sdxl as t

        return {"required": {
            "pipe": (PIPE, {"tooltip": "SDXL base pipe to train on. It is shared, not changed: the training adapter "
                                       "is removed afterwards."}),
            "dataset_path": ("STRING", {"default": "tunelab/wrong_dataset", "tooltip":
                             "Dataset folder under ComfyUI's output (or input) directory: PNGs + metadata.jsonl. "
                             "Wire the synthesis node's dataset_path here."}),
            "lora_name": ("STRING", {"default": "tunelab/wrong_lora", "tooltip":
                          "File name under models/loras (.safetensors is added). Checkpoints, loss curve and "
                          "validation images go to output/tunelab/train/<name>."}),
            "instance_prompt": ("STRING", {"default": "wrong", "tooltip":
                                "The word the LoRA learns ('wrong' in the seed); with pivotal tuning it holds the "
                                "token abstraction (e.g. TOK)."}),
            "max_train_steps": ("INT", {"default": 500, "min": 1, "max": MAX_STEPS,
                                        "tooltip": "Optimizer steps." + _from(t, "max_train_steps")}),
            "learning_rate": _flt(1e-4, 1e-7, 10.0, 1e-6, "UNet LoRA learning rate (Prodigy: about 1.0)."
                                  + _from(t, "learning_rate")),
            "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "LoRA rank." + _from(t, "rank")}),
            "resolution": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 8, "tooltip":
                           "Training size; images are resized (short side) and cropped to it, or with "
                           "aspect_buckets keep their aspect ratio within resolution x resolution pixels. Images "
                           "smaller than that are refused unless allow_upscale is on." + _from(t, "resolution")}),
            "train_batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per micro-batch."
                                         + _from(t, "train_batch_size")}),
            "gradient_accumulation_steps": ("INT", {"default": 4, "min": 1, "max": 1024, "tooltip":
                                                    "Micro-batches per optimizer step."
                                                    + _from(t, "gradient_accumulation_steps")}),
            "seed": seed_input("Seed of the LoRA init, data order, noise and timesteps." + _from(t, "seed"),
                               default=0, maximum=TRAIN_SEED_MAX),
            "resume": (["none", "latest"], {"default": "none", "tooltip":
                       "latest: continue from the newest complete checkpoint of this lora_name (refused if there "
                       "is none or it was made with other settings)."}),
        }, "optional": _advanced({
            "recipe": _recipe_input(t),
            "alpha": _flt(0.0, 0.0, 1024.0, 0.5, "lora_alpha; 0 = rank (scale 1, as diffusers)."),
            "target_modules": ("STRING", {"default": "to_k,to_q,to_v,to_out.0", "tooltip":
                               "UNet modules that get LoRA, comma-separated." + _from(t, "target_modules")}),
            "use_dora": _bool(False, "DoRA (peft use_dora): a learned magnitude per output row besides the low-rank "
                                     "update. Saved as kohya .dora_scale keys in the convention of ComfyUI's "
                                     "LoraLoader, which then applies the trained weights exactly (so do TuneLab "
                                     "Load LoRA and the diffusers copy; diffusers' own loader drops .dora_scale)."),
            "optimizer": (list(common.OPTIMIZERS), {"default": "adamw", "tooltip":
                          "adamw (torch, fused); adamw8bit (needs bitsandbytes); prodigy (needs prodigyopt; it "
                          "adapts the step size, use learning_rate about 1.0)." + _from(t, "optimizer")}),
            "scale_lr": _bool(False, "Multiply the learning rates by batch x accumulation (the script's --scale_lr)."),
            "prodigy_d_coef": _flt(1.0, 0.01, 1000.0, 0.1, "Prodigy: multiplier of its step-size estimate."
                                   + _from(t, "prodigy_d_coef")),
            "prodigy_safeguard_warmup": _bool(True, "Prodigy: leave the lr out of the estimate during warm-up."
                                              + _from(t, "prodigy_safeguard_warmup")),
            "prodigy_use_bias_correction": _bool(True, "Prodigy: Adam's bias correction."
                                                 + _from(t, "prodigy_use_bias_correction")),
            "lr_scheduler": (list(t.LR_SCHEDULERS), {"default": "constant", "tooltip": "diffusers LR schedule."
                                                     + _from(t, "lr_scheduler")}),
            "lr_warmup_steps": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS, "tooltip": "Warm-up steps."
                                        + _from(t, "lr_warmup_steps")}),
            "train_text_encoder": _bool(False, "Also train LoRA on both text encoders (q/k/v/out_proj)."),
            "text_encoder_lr": _flt(5e-6, 1e-8, 1.0, 1e-7, "Text-encoder (and new token) learning rate."
                                    + _from(t, "text_encoder_lr")),
            "use_captions": _bool(False, "Train on each image's 'text' from metadata.jsonl instead of the instance "
                                         "prompt."),
            "caption_dropout": _flt(0.0, 0.0, 1.0, 0.01, "Per step, replace a caption by the empty one with this "
                                    "probability." + _from(t, "caption_dropout")),
            "shuffle_tags": _bool(False, "Per step, shuffle each caption's comma-separated tags (keeping the first "
                                         "keep_tags in place)."),
            "keep_tags": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                          "With shuffle_tags: the first N tags stay in place (e.g. the trigger word)."}),
            "aspect_buckets": _bool(False, "SDXL aspect-ratio buckets: each image keeps its aspect ratio within "
                                           "resolution x resolution pixels, with its own original size / crop / "
                                           "target size conditioning; batches stay within a bucket."),
            "bucket_step": ("INT", {"default": 64, "min": 32, "max": 1024, "step": 32, "tooltip":
                            "Bucket sides are multiples of this (at least 32 for SDXL)." + _from(t, "bucket_step")}),
            "center_crop": _bool(False, "Center crop (else a seeded random crop)."),
            "random_flip": _bool(False, "Flip half of the images horizontally (once, as the script)."),
            "allow_upscale": _bool(False, "Accept images smaller than the resolution or their bucket (upscaled, "
                                          "with a warning)."),
            "snr_gamma": _flt(0.0, 0.0, 100.0, 0.5, "Min-SNR weighting gamma (5 is common); 0 = off."),
            "mixed_precision": (["auto", "no", "fp16", "bf16"], {"default": "auto", "tooltip":
                                "auto follows the pipe's dtype. fp16 needs the fp16-fix VAE or it may give NaN."}),
            "gradient_checkpointing": _bool(False, "Trade compute for memory (for <16 GB GPUs at 1024 px)."),
            "cache_latents": _bool(True, "Encode every image with the VAE once instead of every step (images are "
                                         "prepared once, so their latents never change)." + _from(t, "cache_latents")),
            "pivotal_tuning": _bool(False, "Also learn new tokens <s0><s1> for the token abstraction in the prompt "
                                           "(saved as <name>_emb.safetensors beside the LoRA)."),
            "token_abstraction": ("STRING", {"default": "TOK", "tooltip": "Word replaced by the new tokens."}),
            "with_prior_preservation": _bool(False, "Regularise with class images (generated when missing)."),
            "class_prompt": ("STRING", {"default": "", "tooltip": "Prompt of the class images."}),
            "num_class_images": ("INT", {"default": 100, "min": 1, "max": 10000, "tooltip": "Class images used."}),
            "prior_loss_weight": _flt(1.0, 0.0, 100.0, 0.05, "Weight of the class-image loss."),
            "checkpointing_steps": ("INT", {"default": 500, "min": 0, "max": MAX_STEPS, "tooltip":
                                    "Save a checkpoint every N steps (0: only on interrupt)."
                                    + _from(t, "checkpointing_steps")}),
            "validation_prompt": ("STRING", {"default": VALIDATION_PROMPT, "multiline": True, "tooltip":
                                  "Validation prompts, one per line, sampled with the LoRA during the run and at "
                                  "the end (empty: no validation). Default: the seed's example prompt."}),
            "validation_negative": ("STRING", {"default": "wrong", "tooltip":
                                    "Negative prompt of the validation images." + _from(t, "validation_negative")}),
            "validation_steps": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS, "tooltip":
                                 "Also validate every N steps, shown in this node's preview while it trains (0: only "
                                 "at the end)." + _from(t, "validation_steps")}),
            "num_validation_images": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip":
                                      "Images per prompt." + _from(t, "num_validation_images")}),
            "validation_guidance": _flt(13.0, 0.0, 100.0, 0.5, "CFG of the validation images."
                                        + _from(t, "validation_guidance")),
            "validation_inference_steps": ("INT", {"default": 25, "min": 1, "max": 1000, "tooltip":
                                           "Denoising steps of the validation images."
                                           + _from(t, "validation_inference_steps")}),
            "validation_seed": ("INT", {"default": -1, "min": -1, "max": 2**63 - 1, "tooltip":
                                "Seed of the validation images, the same at every validation; -1 = the training "
                                "seed."}),
            "report_to": (list(common.REPORT_TO), {"default": "none", "tooltip":
                          "tensorboard: loss, lr, grad norm and validation images in "
                          "output/tunelab/train/<name>/logs (needs tensorboard)." + _from(t, "report_to")}),
            "save_diffusers_copy": _bool(False, "Also write <name>_diffusers.safetensors (diffusers keys)."),
        }, keep=TRAIN_LORA_SHOWN)}

    def train(self, pipe, dataset_path, lora_name, instance_prompt, max_train_steps, learning_rate, rank, resolution,
              train_batch_size, gradient_accumulation_steps, seed, resume="none", recipe="custom", alpha=0.0,
              target_modules="to_k,to_q,to_v,to_out.0", snr_gamma=0.0, validation_prompt=VALIDATION_PROMPT,
              validation_seed=-1, validation_inference_steps=25, **options):
        import torch

        from ..core import images as images_mod
        from ..core import lora
        from ..training import lora_sdxl
        from ..training.lora_sdxl import LoraTrainConfig, train

        data = dataset_folder(dataset_path, "dataset_path")
        out_path, out_name, run_dir = lora_target(lora_name)
        targets = tuple(t.strip() for t in str(target_modules).split(",") if t.strip())
        known = {f for f in LoraTrainConfig.__dataclass_fields__}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TuneLabError(f"unknown option(s) {', '.join(unknown)}", input_name=unknown[0])
        values = _apply_recipe(lora_sdxl, recipe, dict(
            options, max_train_steps=max_train_steps, learning_rate=learning_rate, rank=rank,
            resolution=resolution, train_batch_size=train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps))
        if values.get("max_train_steps") is None and "num_train_epochs" not in values:
            values["num_train_epochs"] = 1
        host.free_comfy_models()
        config = LoraTrainConfig(
            data_dir=str(data), output=str(out_path), model=pipe, run_dir=str(run_dir),
            instance_prompt=instance_prompt, seed=seed, alpha=alpha or None, target_modules=targets,
            snr_gamma=snr_gamma or None, resume=None if resume == "none" else resume,
            validation_prompt=(validation_prompt or "").strip() or None,
            validation_seed=None if validation_seed is None or validation_seed < 0 else validation_seed,
            validation_inference_steps=validation_inference_steps, **values)
        result = train(config, progress=host.progress_factory())
        lora_pipe = lora.load(pipe, result.lora_path, 1.0, name=out_name)
        curve = images_mod.pil_to_tensor([result.loss_curve])
        blank = torch.zeros((1, resolution, resolution, 3))
        # validation is best effort (it never costs the LoRA); keep the outputs valid IMAGEs
        validation = images_mod.pil_to_tensor(result.validation_images) if result.validation_images else blank
        grid = images_mod.pil_to_tensor([result.validation_grid]) if result.validation_grid is not None else blank
        shown = [result.loss_curve_png] + ([result.validation_grid_png] if result.validation_grid_png else [])
        ui = {"images": output_images(shown),
              "text": [f"{out_name}: {result.steps} steps, final loss {result.losses[-1]:.4f}"
                       if result.losses else out_name]}
        return {"ui": ui, "result": (lora_pipe, out_name, curve, validation, grid)}


NODES = {"TuneLabTrainLora": (TrainLora, "TuneLab Train LoRA")}


def ip2p_target(mode: str, output_name: str) -> tuple:
    """(output path: a new folder in models/diffusers (full) or a .safetensors file in models/loras (lora), the name
    the loaders list it under, the run folder for checkpoints and the loss curve under the output directory)."""
    name = (output_name or "").strip().replace("\\", "/")
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    name = name.rstrip("/")
    if not name.strip(" /."):
        raise TuneLabError("give the output a name, e.g. tunelab/ip2p_cartoon", input_name="output_name")
    if mode == "lora":
        path = confined_path(host.model_dirs("loras")[0], name + ".safetensors", "output_name",
                             root_label="models/loras")
        listed = Path(name).as_posix() + ".safetensors"
    else:
        path = confined_path(host.model_dirs("diffusers")[0], name, "output_name", root_label="models/diffusers")
        listed = Path(name).as_posix()
    run_dir = confined_path(host.output_dir(), f"tunelab/train_ip2p/{Path(name).as_posix()}", "output_name")
    return path, listed, run_dir


class TrainInstructPix2Pix:
    DESCRIPTION = ("Fine-tunes InstructPix2Pix on an instruction dataset (TuneLab Instruction Dataset's folder), "
                   "following diffusers' train_instruct_pix2pix.py. mode full trains the whole UNet and saves a "
                   "pipeline to models/diffusers (from SD1.x the UNet gets the 8-channel conv_in first); mode lora "
                   "trains a LoRA on an InstructPix2Pix pipe and saves it to models/loras (kohya keys). Progress "
                   "shows the loss and, with a validation image, its edits while it trains; an interrupt saves a "
                   "checkpoint (resume: latest). Returns the trained pipe, its name, the loss curve and a grid of "
                   "the validation edits over steps.")
    CATEGORY = category("train")
    RETURN_TYPES = (PIPE, "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("trained_pipe", "output_path", "loss_curve", "validation_grid")
    OUTPUT_TOOLTIPS = ("The trained model: the saved pipeline (full) or the input pipe with the new LoRA at strength "
                       "1 (lora); wire it into TuneLab Instruct Edit or Instruct Evaluate.",
                       "Where it was saved, relative to models/diffusers (full) or models/loras (lora): the name "
                       "TuneLab Load Pipeline / Load LoRA list.",
                       "Loss per step with its moving average.",
                       "The validation image's edits over the run, one row per validation step (black without a "
                       "validation image).")
    OUTPUT_NODE = True
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        from ..training import common
        from ..training import ip2p as t
        from ..training.ip2p import LR_SCHEDULERS

        return {"required": {
            "pipe": (PIPE, {"tooltip": "InstructPix2Pix pipe to fine-tune, or an SD1.x pipe (full mode only: its "
                                       "UNet is widened to 8 input channels). It is shared, not changed: training "
                                       "works on a private copy of the UNet."}),
            "dataset_path": ("STRING", {"default": "tunelab/instruct_dataset", "tooltip":
                             "Instruction dataset folder under ComfyUI's output (or input) directory "
                             "(metadata.jsonl). Wire TuneLab Instruction Dataset's dataset_path here."}),
            "mode": (["full", "lora"], {"default": "full", "tooltip":
                     "full: train every UNet weight, save a pipeline to models/diffusers. lora: train a LoRA "
                     "(needs an InstructPix2Pix pipe), save it to models/loras."}),
            "output_name": ("STRING", {"default": "tunelab/ip2p_finetuned", "tooltip":
                            "New folder under models/diffusers (full) or file under models/loras (lora; "
                            ".safetensors is added). Never overwritten. Checkpoints and the loss curve go to "
                            "output/tunelab/train_ip2p/<name>."}),
            "resolution": ("INT", {"default": 256, "min": 64, "max": 4096, "step": 8, "tooltip":
                           "Training size; both images of a pair are resized to it. Pairs smaller than this are refused unless "
                           "allow_upscale is on." + _from(t, "resolution")}),
            "max_train_steps": ("INT", {"default": 15000, "min": 0, "max": MAX_STEPS, "tooltip":
                                        "Optimizer steps; 0: num_train_epochs decides."
                                        + _from(t, "max_train_steps")}),
            "train_batch_size": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip": "Pairs per micro-batch."
                                         + _from(t, "train_batch_size")}),
            "gradient_accumulation_steps": ("INT", {"default": 4, "min": 1, "max": 1024, "tooltip":
                                                    "Micro-batches per optimizer step."
                                                    + _from(t, "gradient_accumulation_steps")}),
            "learning_rate": _flt(5e-5, 1e-7, 1.0, 1e-6, "AdamW learning rate (LoRA usually wants more, e.g. "
                                                         "1e-4)." + _from(t, "learning_rate")),
            "conditioning_dropout_prob": _flt(0.05, 0.0, 1 / 3, 0.01, "Drop the text, the image or both with this "
                                              "probability each (0 = none), for classifier-free guidance."
                                              + _from(t, "conditioning_dropout_prob")),
            "use_ema": _bool(False, "Keep an exponential moving average of the weights and save it (diffusers' "
                                    "EMAModel); holds a second copy of the trained weights."
                                    + _from(t, "use_ema")),
            "seed": seed_input("Seed of the data order, flips, noise, timesteps and dropout." + _from(t, "seed"),
                               default=42, maximum=TRAIN_SEED_MAX),
            "resume": (["none", "latest"], {"default": "none", "tooltip":
                       "latest: continue from the newest complete checkpoint of this output_name (refused if there "
                       "is none or it was made with other settings)."}),
        }, "optional": _advanced({
            "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "LoRA rank (mode lora)."}),
            "alpha": _flt(0.0, 0.0, 1024.0, 0.5, "lora_alpha (mode lora); 0 = rank (scale 1)."),
            "target_modules": ("STRING", {"default": "to_k,to_q,to_v,to_out.0",
                                          "tooltip": "UNet modules that get LoRA, comma-separated (mode lora)."}),
            "lr_scheduler": (list(LR_SCHEDULERS), {"default": "constant", "tooltip": "diffusers LR schedule."
                                                  + _from(t, "lr_scheduler")}),
            "lr_warmup_steps": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS, "tooltip": "Warm-up steps."
                                        + _from(t, "lr_warmup_steps")}),
            "random_flip": _bool(True, "Flip half of the pairs horizontally (both images together)."
                                 + _from(t, "random_flip")),
            "allow_upscale": _bool(False, "Accept pairs smaller than the resolution (upscaled, with a warning); "
                                          "by default they are refused, as in Train LoRA."),
            "mixed_precision": (["auto", "no", "fp16", "bf16"], {"default": "auto", "tooltip":
                                "auto follows the pipe's dtype."}),
            "gradient_checkpointing": _bool(False, "Trade compute for memory."),
            "checkpointing_steps": ("INT", {"default": 5000, "min": 0, "max": MAX_STEPS, "tooltip":
                                            "Save a checkpoint every N steps (0: only on interrupt)."
                                            + _from(t, "checkpointing_steps")}),
            "save_diffusers_copy": _bool(False, "mode lora: also write <name>_diffusers.safetensors (diffusers "
                                                "keys)."),
            "recipe": _recipe_input(t),
            "num_train_epochs": ("INT", {"default": 100, "min": 1, "max": 100_000, "tooltip":
                                 "Epochs, used when max_train_steps is 0." + _from(t, "num_train_epochs")}),
            "max_train_samples": ("INT", {"default": 0, "min": 0, "max": 10_000_000, "tooltip":
                                  "Train on this many pairs, drawn by a shuffle seeded with seed (0: all)."}),
            "scale_lr": _bool(False, "Multiply the learning rate by batch x accumulation (the script's --scale_lr)."),
            "use_8bit_adam": _bool(False, "8-bit AdamW (needs bitsandbytes)." + _from(t, "use_8bit_adam")),
            "adam_beta1": _flt(0.9, 0.0, 1.0, 0.001, "AdamW beta1." + _from(t, "adam_beta1")),
            "adam_beta2": _flt(0.999, 0.0, 1.0, 0.0001, "AdamW beta2." + _from(t, "adam_beta2")),
            "adam_weight_decay": _flt(1e-2, 0.0, 10.0, 1e-4, "AdamW weight decay." + _from(t, "adam_weight_decay")),
            "adam_epsilon": _flt(1e-8, 1e-12, 1.0, 1e-9, "AdamW epsilon." + _from(t, "adam_epsilon")),
            "validation_image": ("IMAGE", {"tooltip": "An image edited with validation_prompt during the run (its "
                                           "first frame); shown in this node's preview while it trains."}),
            "validation_prompt": ("STRING", {"default": "", "tooltip":
                                  "The instruction of the validation edits, e.g. 'Cartoonize the following image.'"}),
            "validation_steps": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS, "tooltip":
                                 "Validate every N steps (0: only at the end)." + _from(t, "validation_steps")}),
            "num_validation_images": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip":
                                      "Edits per validation." + _from(t, "num_validation_images")}),
            "report_to": (list(common.REPORT_TO), {"default": "none", "tooltip":
                          "tensorboard: loss, lr, grad norm and validation edits in "
                          "output/tunelab/train_ip2p/<name>/logs (needs tensorboard)." + _from(t, "report_to")}),
        }, keep=TRAIN_IP2P_SHOWN)}

    def train(self, pipe, dataset_path, mode, output_name, resolution, max_train_steps, train_batch_size,
              gradient_accumulation_steps, learning_rate, conditioning_dropout_prob, use_ema, seed, resume="none",
              rank=4, alpha=0.0, target_modules="to_k,to_q,to_v,to_out.0", lr_scheduler="constant",
              lr_warmup_steps=0, random_flip=True, mixed_precision="auto", gradient_checkpointing=False,
              checkpointing_steps=5000, save_diffusers_copy=False, recipe="custom", max_train_samples=0,
              validation_image=None, validation_prompt="", **options):
        import torch

        from ..core import images as images_mod
        from ..core import lora, models
        from ..training import ip2p
        from ..training.ip2p import Ip2pTrainConfig, train

        if mode not in ("full", "lora"):
            raise TuneLabError(f"unknown mode '{mode}'; choose full or lora", input_name="mode")
        data = dataset_folder(dataset_path, "dataset_path")
        out_path, listed, run_dir = ip2p_target(mode, output_name)
        targets = tuple(t.strip() for t in str(target_modules).split(",") if t.strip())
        unknown = sorted(set(options) - set(Ip2pTrainConfig.__dataclass_fields__))
        if unknown:
            raise TuneLabError(f"unknown option(s) {', '.join(unknown)}", input_name=unknown[0])
        values = _apply_recipe(ip2p, recipe, dict(
            options, random_flip=random_flip, conditioning_dropout_prob=conditioning_dropout_prob,
            learning_rate=learning_rate, lr_warmup_steps=lr_warmup_steps, max_train_steps=max_train_steps or None,
            train_batch_size=train_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            checkpointing_steps=checkpointing_steps))
        image = images_mod.tensor_to_pil(validation_image[:1])[0] if validation_image is not None else None
        host.free_comfy_models()
        config = Ip2pTrainConfig(
            data_dir=str(data), output=str(out_path), model=pipe, run_dir=str(run_dir), mode=mode,
            resolution=resolution, lr_scheduler=lr_scheduler, gradient_checkpointing=gradient_checkpointing,
            mixed_precision=mixed_precision, seed=seed, resume=None if resume == "none" else resume, use_ema=use_ema,
            rank=rank, lora_alpha=alpha or None, target_modules=targets, save_diffusers_copy=save_diffusers_copy,
            max_train_samples=max_train_samples or None, validation_image=image,
            validation_prompt=(validation_prompt or "").strip() or None, **values)
        result = train(config, progress=host.progress_factory())
        if mode == "lora":
            trained = lora.load(pipe, result.output, 1.0, name=listed)
        else:
            trained = models.load(str(result.output), dtype=pipe.dtype, device=pipe.device)
        curve = images_mod.pil_to_tensor([result.loss_curve])
        grid = images_mod.pil_to_tensor([result.validation_grid]) if result.validation_grid is not None else \
            torch.zeros((1, resolution, resolution, 3))
        shown = [result.loss_curve_png] + ([result.validation_grid_png] if result.validation_grid_png else [])
        ui = {"images": output_images(shown),
              "text": [f"{listed}: {result.steps} steps, final loss {result.losses[-1]:.4f}"
                       if result.losses else listed]}
        return {"ui": ui, "result": (trained, listed, curve, grid)}


NODES["TuneLabTrainInstructPix2Pix"] = (TrainInstructPix2Pix, "TuneLab Train InstructPix2Pix")
