"""TuneLab Load Pipeline: checkpoints, diffusers folders and the built-in tiny presets."""
from __future__ import annotations

from .. import host
from ..core import models
from .common import PIPE, category


class LoadPipeline:
    DESCRIPTION = ("Loads an SDXL base, SDXL refiner, SD1.x or InstructPix2Pix model as a diffusers pipeline. "
                   "Loaded once and shared: a second loader with the same settings reuses it.")
    CATEGORY = category("model")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The loaded pipeline with an empty LoRA stack.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        choices = host.model_choices()
        return {"required": {
            "model": (choices, {"default": choices[0], "tooltip":
                      "A .safetensors checkpoint from models/checkpoints, a diffusers folder from models/diffusers, "
                      "or a built-in tiny preset (toy size, produces noise; for tests and demos)."}),
            "vae": (["none"] + host.filename_list("vae"), {"default": "none", "tooltip":
                    "Optional VAE override, e.g. the SDXL fp16-fix VAE, which avoids black/NaN images in fp16."}),
            "dtype": (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "tooltip":
                      "Weights precision. auto follows ComfyUI: fp16/bf16 on a GPU, fp32 on the CPU."}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto", "tooltip": "auto uses ComfyUI's device."}),
        }}

    def load(self, model, vae="none", dtype="auto", device="auto"):
        from ..core.checks import check_choice

        # names from the lists only: the strings reach the server through POST /prompt
        check_choice(model, host.model_choices(), "model", "model")
        if vae not in (None, "", "none"):
            check_choice(vae, host.filename_list("vae"), "vae", "VAE")
        dev, dt = host.runtime(device, dtype)
        host.free_comfy_models()
        vae_path = None if vae in (None, "", "none") else host.resolve_file("vae", vae)
        return (models.load(host.resolve_model(model), vae=vae_path, dtype=dt, device=dev,
                            tokenizer_dir=host.comfy_tokenizer_dir()),)


NODES = {"TuneLabLoadPipeline": (LoadPipeline, "TuneLab Load Pipeline")}
