"""TuneLab Generate: text-to-image with an optional SDXL refiner handoff."""
from __future__ import annotations

from .. import host
from ..core import sampling
from .common import (COND, PIPE, category, guidance_input, high_noise_frac_input, scheduler_input, seed_input,
                     size_input, steps_input)


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
            "steps": steps_input("Denoising steps (the notebooks use diffusers' default, 50)."),
            "guidance": guidance_input("Classifier-free guidance. 13 works best with the wrong LoRA (Max Woolf)."),
            "width": size_input("width"),
            "height": size_input("height"),
            "scheduler": scheduler_input("diffusers scheduler; 'default' keeps the pipeline's own."),
            "high_noise_frac": high_noise_frac_input("With a refiner: fraction of denoising done by the base model."),
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
