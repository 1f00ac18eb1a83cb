"""TuneLab Compare and TuneLab Comparison State: same prompt, same seed, N states side by side."""
from __future__ import annotations

from .. import host
from ..core import compare, sampling
from .common import PIPE, STATES, category, output_images, run_folder, seed_input, size_input


class ComparisonState:
    DESCRIPTION = "One panel of a comparison: a label, a pipe (with its LoRA stack) and a negative prompt. Chain them."
    CATEGORY = category("compare")
    RETURN_TYPES = (STATES,)
    RETURN_NAMES = ("states",)
    OUTPUT_TOOLTIPS = ("The states so far, this one last.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "label": ("STRING", {"default": "LoRA + negative 'wrong'", "tooltip": "Caption above this panel."}),
            "pipe": (PIPE, {"tooltip": "The pipe this panel samples with."}),
            "negative": ("STRING", {"default": "wrong", "multiline": True, "tooltip": "This panel's negative prompt."}),
        }, "optional": {
            "states": (STATES, {"tooltip": "Earlier states; this one is appended."}),
        }}

    def add(self, label, pipe, negative, states=None):
        return ((tuple(states or ()) + (compare.State(label, pipe, negative),)),)


class Compare:
    DESCRIPTION = ("Generates the same prompt at the same seed under several states and saves a labelled grid. "
                   "Without 'states' it runs the seed's three: base; base + negative; LoRA + negative.")
    CATEGORY = category("compare")
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("grid", "panels")
    OUTPUT_TOOLTIPS = ("The labelled grid.", "Each panel as a batch, in state order.")
    OUTPUT_NODE = True
    FUNCTION = "compare"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipe": (PIPE, {"tooltip": "Base pipe (panels 1 and 2 of the default three)."}),
            "prompt": ("STRING", {"default": compare.DEFAULT_PROMPT, "multiline": True,
                                  "tooltip": "Shared positive prompt, compel syntax."}),
            "negative": ("STRING", {"default": compare.DEFAULT_NEGATIVE,
                                    "tooltip": "Negative for the default states 2 and 3."}),
            "seed": seed_input("One seed for every panel, re-used for the refiner stage."),
            "steps": ("INT", {"default": 50, "min": 1, "max": sampling.MAX_STEPS, "tooltip": "Denoising steps."}),
            "guidance": ("FLOAT", {"default": 13.0, "min": 0.0, "max": 30.0, "step": 0.5,
                                   "tooltip": "Classifier-free guidance (13 in the wrong-LoRA notebooks)."}),
            "width": size_input("width"),
            "height": size_input("height"),
            "scheduler": (list(sampling.SCHEDULERS), {"default": "default", "tooltip": "diffusers scheduler."}),
            "high_noise_frac": ("FLOAT", {"default": 0.8, "min": 0.05, "max": 0.95, "step": 0.05,
                                "tooltip": "With a refiner: fraction of denoising done by the base."}),
            "output_name": ("STRING", {"default": "tunelab/compare", "tooltip":
                            "Folder under ComfyUI's output directory; each run writes a timestamped subfolder "
                            "with grid.png, 01.png.. and settings.json."}),
        }, "optional": {
            "lora_pipe": (PIPE, {"tooltip": "Pipe with the LoRA (panel 3 of the default three)."}),
            "refiner": (PIPE, {"tooltip": "Optional SDXL refiner for every panel."}),
            "states": (STATES, {"tooltip": "Custom states from TuneLab Comparison State; replaces the default three."}),
        }}

    def compare(self, pipe, prompt, negative, seed, steps, guidance, width, height, scheduler="default",
                high_noise_frac=0.8, output_name="tunelab/compare", lora_pipe=None, refiner=None, states=None):
        out_dir = run_folder(output_name)
        chosen = list(states) if states else compare.default_states(pipe, lora_pipe, negative)
        result = compare.run(chosen, prompt, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                             refiner=refiner, high_noise_frac=high_noise_frac, scheduler=scheduler,
                             progress=host.progress_factory())
        paths = compare.save(result, out_dir)
        return {"ui": {"images": output_images([paths["grid"], *paths["panels"]])}, "result": result.tensors()}


NODES = {
    "TuneLabCompare": (Compare, "TuneLab Compare"),
    "TuneLabComparisonState": (ComparisonState, "TuneLab Comparison State"),
}
