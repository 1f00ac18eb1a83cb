"""TuneLab Generate: text-to-image with an optional SDXL refiner handoff."""
from __future__ import annotations

from .. import host
from ..core import sampling
from .common import COND, PIPE, category, seed_input, size_input


class Generate:
    DESCRIPTION = ("Generates images from a TuneLab conditioning with diffusers. With a refiner, the base stops at "
                   "high_noise_frac and the refiner finishes with the same seed (the wrong-LoRA notebooks' recipe).")
    CATEGORY = category("sample")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Generated images, one per conditioning batch row.",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipe": (PIPE, {"tooltip": "The model (with its LoRA stack) to sample with."}),
            "conditioning": (COND, {"tooltip": "Prompt and negative encoded by TuneLab Weighted Prompt with this pipe."}),
            "seed": seed_input(),
            "steps": ("INT", {"default": 50, "min": 1, "max": sampling.MAX_STEPS,
                              "tooltip": "Denoising steps (the notebooks use diffusers' default, 50)."}),
            "guidance": ("FLOAT", {"default": 13.0, "min": 0.0, "max": 30.0, "step": 0.5,
                                   "tooltip": "Classifier-free guidance. 13 works best with the wrong LoRA (Max Woolf)."}),
            "width": size_input("width"),
            "height": size_input("height"),
            "scheduler": (list(sampling.SCHEDULERS), {"default": "default",
                          "tooltip": "diffusers scheduler; 'default' keeps the pipeline's own."}),
            "high_noise_frac": ("FLOAT", {"default": 0.8, "min": 0.05, "max": 0.95, "step": 0.05,
                                "tooltip": "With a refiner: fraction of denoising done by the base model."}),
        }, "optional": {
            "refiner": (PIPE, {"tooltip": "Optional SDXL refiner pipe; the prompt is re-encoded for it."}),
        }}

    def generate(self, pipe, conditioning, seed, steps, guidance, width, height, scheduler="default",
                 high_noise_frac=0.8, refiner=None):
        images = sampling.generate(pipe, conditioning, seed=seed, steps=steps, guidance=guidance, width=width,
                                   height=height, refiner=refiner, high_noise_frac=high_noise_frac,
                                   scheduler=scheduler, progress=host.progress_factory())
        return (images,)


NODES = {"TuneLabGenerate": (Generate, "TuneLab Generate")}
