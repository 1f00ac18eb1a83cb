"""TuneLab Train LoRA: Dreambooth LoRA for SDXL (optionally with pivotal tuning) inside the graph."""
from __future__ import annotations

from pathlib import Path

from .. import host
from ..core.checks import TRAIN_SEED_MAX
from ..core.errors import TuneLabError
from ..core.files import confined_path
from .common import PIPE, category, dataset_folder, output_images, seed_input

MAX_STEPS = 100_000


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


class TrainLora:
    DESCRIPTION = ("Trains a Dreambooth LoRA for SDXL on a dataset folder (images + metadata.jsonl), following "
                   "diffusers' train_dreambooth_lora_sdxl.py, and saves it to models/loras in the kohya format "
                   "ComfyUI's own LoraLoader reads. Progress shows the loss; an interrupt saves a checkpoint "
                   "(resume: latest). Returns the pipe with the new LoRA, its name, the loss curve and validation "
                   "images.")
    CATEGORY = category("train")
    RETURN_TYPES = (PIPE, "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora_pipe", "lora_name", "loss_curve", "validation")
    OUTPUT_TOOLTIPS = ("The input pipe with the trained LoRA on its stack (strength 1), e.g. for TuneLab Compare.",
                       "The LoRA's name under models/loras (what LoraLoader lists).",
                       "Loss per step with its moving average.",
                       "Images sampled with the trained LoRA from the validation prompt.")
    OUTPUT_NODE = True
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        from ..training.lora_sdxl import LR_SCHEDULERS

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
                                        "tooltip": "Optimizer steps (diffusers' reference run: 500)."}),
            "learning_rate": _flt(1e-4, 1e-7, 1.0, 1e-6, "UNet LoRA learning rate (1e-4 in diffusers)."),
            "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "LoRA rank (diffusers' default 4)."}),
            "resolution": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 8, "tooltip":
                           "Training size; images are resized (short side) and cropped to it. Images smaller than "
                           "this are refused unless allow_upscale is on."}),
            "train_batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per micro-batch."}),
            "gradient_accumulation_steps": ("INT", {"default": 4, "min": 1, "max": 1024,
                                                    "tooltip": "Micro-batches per optimizer step."}),
            "seed": seed_input("Seed of the LoRA init, data order, noise and timesteps.", default=0,
                               maximum=TRAIN_SEED_MAX),
            "resume": (["none", "latest"], {"default": "none", "tooltip":
                       "latest: continue from the newest complete checkpoint of this lora_name (refused if there "
                       "is none or it was made with other settings)."}),
        }, "optional": {
            "alpha": _flt(0.0, 0.0, 1024.0, 0.5, "lora_alpha; 0 = rank (scale 1, as diffusers)."),
            "target_modules": ("STRING", {"default": "to_k,to_q,to_v,to_out.0",
                                          "tooltip": "UNet modules that get LoRA, comma-separated."}),
            "lr_scheduler": (list(LR_SCHEDULERS), {"default": "constant", "tooltip": "diffusers LR schedule."}),
            "lr_warmup_steps": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS, "tooltip": "Warm-up steps."}),
            "train_text_encoder": _bool(False, "Also train LoRA on both text encoders (q/k/v/out_proj)."),
            "text_encoder_lr": _flt(5e-6, 1e-8, 1.0, 1e-7, "Text-encoder (and new token) learning rate."),
            "use_captions": _bool(False, "Train on each image's 'text' from metadata.jsonl instead of the instance "
                                         "prompt."),
            "center_crop": _bool(False, "Center crop (else a seeded random crop)."),
            "random_flip": _bool(False, "Flip half of the images horizontally."),
            "allow_upscale": _bool(False, "Accept images smaller than the resolution (upscaled, with a warning)."),
            "snr_gamma": _flt(0.0, 0.0, 100.0, 0.5, "Min-SNR weighting gamma (5 is common); 0 = off."),
            "mixed_precision": (["auto", "no", "fp16", "bf16"], {"default": "auto", "tooltip":
                                "auto follows the pipe's dtype. fp16 needs the fp16-fix VAE or it may give NaN."}),
            "gradient_checkpointing": _bool(False, "Trade compute for memory (for <16 GB GPUs at 1024 px)."),
            "cache_latents": _bool(True, "Encode every image with the VAE once instead of every step."),
            "pivotal_tuning": _bool(False, "Also learn new tokens <s0><s1> for the token abstraction in the prompt "
                                           "(saved as <name>_emb.safetensors beside the LoRA)."),
            "token_abstraction": ("STRING", {"default": "TOK", "tooltip": "Word replaced by the new tokens."}),
            "with_prior_preservation": _bool(False, "Regularise with class images (generated when missing)."),
            "class_prompt": ("STRING", {"default": "", "tooltip": "Prompt of the class images."}),
            "num_class_images": ("INT", {"default": 100, "min": 1, "max": 10000, "tooltip": "Class images used."}),
            "prior_loss_weight": _flt(1.0, 0.0, 100.0, 0.05, "Weight of the class-image loss."),
            "checkpointing_steps": ("INT", {"default": 500, "min": 0, "max": MAX_STEPS,
                                            "tooltip": "Save a checkpoint every N steps (0: only on interrupt)."}),
            "validation_prompt": ("STRING", {"default": "", "tooltip":
                                  "Prompt of the validation images; empty = the instance prompt."}),
            "validation_steps": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS,
                                         "tooltip": "Also sample every N steps (0: only at the end)."}),
            "validation_inference_steps": ("INT", {"default": 25, "min": 1, "max": 1000,
                                                   "tooltip": "Denoising steps of the validation images."}),
            "save_diffusers_copy": _bool(False, "Also write <name>_diffusers.safetensors (diffusers keys)."),
        }}

    def train(self, pipe, dataset_path, lora_name, instance_prompt, max_train_steps, learning_rate, rank, resolution,
              train_batch_size, gradient_accumulation_steps, seed, resume="none", alpha=0.0,
              target_modules="to_k,to_q,to_v,to_out.0", lr_scheduler="constant", lr_warmup_steps=0,
              train_text_encoder=False, text_encoder_lr=5e-6, use_captions=False, center_crop=False,
              random_flip=False, allow_upscale=False, snr_gamma=0.0, mixed_precision="auto",
              gradient_checkpointing=False, cache_latents=True, pivotal_tuning=False, token_abstraction="TOK",
              with_prior_preservation=False, class_prompt="", num_class_images=100, prior_loss_weight=1.0,
              checkpointing_steps=500, validation_prompt="", validation_steps=0, validation_inference_steps=25,
              save_diffusers_copy=False):
        import torch

        from ..core import images as images_mod
        from ..core import lora
        from ..training.lora_sdxl import LoraTrainConfig, train

        data = dataset_folder(dataset_path, "dataset_path")
        out_path, out_name, run_dir = lora_target(lora_name)
        targets = tuple(t.strip() for t in str(target_modules).split(",") if t.strip())
        host.free_comfy_models()
        config = LoraTrainConfig(
            data_dir=str(data), output=str(out_path), model=pipe, run_dir=str(run_dir),
            instance_prompt=instance_prompt, use_captions=use_captions, resolution=resolution,
            center_crop=center_crop, random_flip=random_flip, allow_upscale=allow_upscale, rank=rank,
            alpha=alpha or None, target_modules=targets, train_text_encoder=train_text_encoder,
            text_encoder_lr=text_encoder_lr, learning_rate=learning_rate, lr_scheduler=lr_scheduler,
            lr_warmup_steps=lr_warmup_steps, max_train_steps=max_train_steps, train_batch_size=train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps, snr_gamma=snr_gamma or None,
            gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
            cache_latents=cache_latents, seed=seed, with_prior_preservation=with_prior_preservation,
            class_prompt=class_prompt, num_class_images=num_class_images, prior_loss_weight=prior_loss_weight,
            pivotal_tuning=pivotal_tuning, token_abstraction=token_abstraction,
            checkpointing_steps=checkpointing_steps, resume=None if resume == "none" else resume,
            save_diffusers_copy=save_diffusers_copy,
            validation_prompt=(validation_prompt or "").strip() or instance_prompt,
            validation_steps=validation_steps, validation_inference_steps=validation_inference_steps)
        result = train(config, progress=host.progress_factory())
        lora_pipe = lora.load(pipe, result.lora_path, 1.0, name=out_name)
        curve = images_mod.pil_to_tensor([result.loss_curve])
        if result.validation_images:
            validation = images_mod.pil_to_tensor(result.validation_images)
        else:  # validation is best effort (it never costs the LoRA); keep the output a valid IMAGE
            validation = torch.zeros((1, resolution, resolution, 3))
        ui = {"images": output_images([result.loss_curve_png]),
              "text": [f"{out_name}: {result.steps} steps, final loss {result.losses[-1]:.4f}"
                       if result.losses else out_name]}
        return {"ui": ui, "result": (lora_pipe, out_name, curve, validation)}


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
                   "shows the loss; an interrupt saves a checkpoint (resume: latest). Returns the trained pipe, its "
                   "name and the loss curve.")
    CATEGORY = category("train")
    RETURN_TYPES = (PIPE, "STRING", "IMAGE")
    RETURN_NAMES = ("trained_pipe", "output_path", "loss_curve")
    OUTPUT_TOOLTIPS = ("The trained model: the saved pipeline (full) or the input pipe with the new LoRA at strength "
                       "1 (lora); wire it into TuneLab Instruct Edit or Instruct Evaluate.",
                       "Where it was saved, relative to models/diffusers (full) or models/loras (lora): the name "
                       "TuneLab Load Pipeline / Load LoRA list.",
                       "Loss per step with its moving average.")
    OUTPUT_NODE = True
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
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
                           "Training size; both images of a pair are resized to it (256 in the seed's runs)."}),
            "max_train_steps": ("INT", {"default": 15000, "min": 1, "max": MAX_STEPS,
                                        "tooltip": "Optimizer steps (15000 in the seed's runs)."}),
            "train_batch_size": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip": "Pairs per micro-batch."}),
            "gradient_accumulation_steps": ("INT", {"default": 4, "min": 1, "max": 1024,
                                                    "tooltip": "Micro-batches per optimizer step."}),
            "learning_rate": _flt(5e-5, 1e-7, 1.0, 1e-6, "AdamW learning rate (5e-5 in the seed's runs; LoRA "
                                                         "usually wants more, e.g. 1e-4)."),
            "conditioning_dropout_prob": _flt(0.05, 0.0, 1 / 3, 0.01, "Drop the text, the image or both with this "
                                              "probability each (0.05 as diffusers' README; 0 = none), for "
                                              "classifier-free guidance."),
            "use_ema": _bool(False, "Keep an exponential moving average of the weights and save it (diffusers' "
                                    "EMAModel, the seed's --use_ema); holds a second copy of the trained weights."),
            "seed": seed_input("Seed of the data order, flips, noise, timesteps and dropout.", default=42,
                               maximum=TRAIN_SEED_MAX),
            "resume": (["none", "latest"], {"default": "none", "tooltip":
                       "latest: continue from the newest complete checkpoint of this output_name (refused if there "
                       "is none or it was made with other settings)."}),
        }, "optional": {
            "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "LoRA rank (mode lora)."}),
            "alpha": _flt(0.0, 0.0, 1024.0, 0.5, "lora_alpha (mode lora); 0 = rank (scale 1)."),
            "target_modules": ("STRING", {"default": "to_k,to_q,to_v,to_out.0",
                                          "tooltip": "UNet modules that get LoRA, comma-separated (mode lora)."}),
            "lr_scheduler": (list(LR_SCHEDULERS), {"default": "constant", "tooltip": "diffusers LR schedule."}),
            "lr_warmup_steps": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS, "tooltip": "Warm-up steps."}),
            "random_flip": _bool(True, "Flip half of the pairs horizontally (both images together)."),
            "mixed_precision": (["auto", "no", "fp16", "bf16"], {"default": "auto", "tooltip":
                                "auto follows the pipe's dtype."}),
            "gradient_checkpointing": _bool(False, "Trade compute for memory."),
            "checkpointing_steps": ("INT", {"default": 5000, "min": 0, "max": MAX_STEPS,
                                            "tooltip": "Save a checkpoint every N steps (0: only on interrupt)."}),
            "save_diffusers_copy": _bool(False, "mode lora: also write <name>_diffusers.safetensors (diffusers "
                                                "keys)."),
        }}

    def train(self, pipe, dataset_path, mode, output_name, resolution, max_train_steps, train_batch_size,
              gradient_accumulation_steps, learning_rate, conditioning_dropout_prob, use_ema, seed, resume="none",
              rank=4, alpha=0.0, target_modules="to_k,to_q,to_v,to_out.0", lr_scheduler="constant",
              lr_warmup_steps=0, random_flip=True, mixed_precision="auto", gradient_checkpointing=False,
              checkpointing_steps=5000, save_diffusers_copy=False):
        from ..core import images as images_mod
        from ..core import lora, models
        from ..training.ip2p import Ip2pTrainConfig, train

        if mode not in ("full", "lora"):
            raise TuneLabError(f"unknown mode '{mode}'; choose full or lora", input_name="mode")
        data = dataset_folder(dataset_path, "dataset_path")
        out_path, listed, run_dir = ip2p_target(mode, output_name)
        targets = tuple(t.strip() for t in str(target_modules).split(",") if t.strip())
        host.free_comfy_models()
        config = Ip2pTrainConfig(
            data_dir=str(data), output=str(out_path), model=pipe, run_dir=str(run_dir), mode=mode,
            resolution=resolution, random_flip=random_flip, conditioning_dropout_prob=conditioning_dropout_prob,
            learning_rate=learning_rate, lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps,
            max_train_steps=max_train_steps, train_batch_size=train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps, gradient_checkpointing=gradient_checkpointing,
            mixed_precision=mixed_precision, seed=seed, checkpointing_steps=checkpointing_steps,
            resume=None if resume == "none" else resume, use_ema=use_ema, rank=rank, lora_alpha=alpha or None,
            target_modules=targets, save_diffusers_copy=save_diffusers_copy)
        result = train(config, progress=host.progress_factory())
        if mode == "lora":
            trained = lora.load(pipe, result.output, 1.0, name=listed)
        else:
            trained = models.load(str(result.output), dtype=pipe.dtype, device=pipe.device)
        curve = images_mod.pil_to_tensor([result.loss_curve])
        ui = {"images": output_images([result.loss_curve_png]),
              "text": [f"{listed}: {result.steps} steps, final loss {result.losses[-1]:.4f}"
                       if result.losses else listed]}
        return {"ui": ui, "result": (trained, listed, curve)}


NODES["TuneLabTrainInstructPix2Pix"] = (TrainInstructPix2Pix, "TuneLab Train InstructPix2Pix")
