"""TuneLab Compare and TuneLab Comparison State: same prompt, same seed, N states side by side."""
from __future__ import annotations

from .. import host
from ..core import compare
from .common import (PIPE, STATES, category, guidance_input, high_noise_frac_input, output_images, run_folder,
                     scheduler_input, seed_input, size_input, steps_input)

LORA_ON = {"both branches": "both", "negative branch only": "negative"}


def default_states_input():
    return ("STRING", {"default": ", ".join(compare.DEFAULT_STATE_NAMES), "tooltip":
            "Built-in states to run when 'states' is not connected, comma-separated: base (no negative), "
            "base_negative, lora_negative (LoRA on both branches), lora_negative_only (the LoRA only while the "
            "negative/unconditional prediction is computed, Diffusion-NPO's idea; two UNet calls per step). The "
            "lora_ states need lora_pipe."})


def refiner_mode_input():
    return (list(compare.REFINER_MODES), {"default": "plain", "tooltip":
            "With a refiner, what negative-only states do in the refiner stage (the base's LoRA cannot run on the "
            "refiner). plain: the refiner finishes them like every other state. negative-only: a LoRA loaded on "
            "the refiner pipe goes on the refiner's negative branch only, too."})


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
            "lora_on": (list(LORA_ON), {"default": "both branches", "tooltip":
                        "Where the pipe's LoRA stack is active. both branches: the usual way. negative branch only: "
                        "only while the negative/unconditional prediction is computed, off for the positive one "
                        "(Diffusion-NPO's idea; two UNet calls per step)."}),
        }, "optional": {
            "states": (STATES, {"tooltip": "Earlier states; this one is appended."}),
        }}

    def add(self, label, pipe, negative, states=None, lora_on="both branches"):
        if lora_on not in LORA_ON:
            from ..core.errors import TuneLabError

            raise TuneLabError(f"unknown choice '{lora_on}'; choose {' or '.join(LORA_ON)}", input_name="lora_on")
        state = compare.State(label, pipe, negative, LORA_ON[lora_on])
        compare.check_states([state])
        return ((tuple(states or ()) + (state,)),)


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
            "steps": steps_input(),
            "guidance": guidance_input(),
            "width": size_input("width"),
            "height": size_input("height"),
            "scheduler": scheduler_input(),
            "high_noise_frac": high_noise_frac_input(),
            "output_name": ("STRING", {"default": "tunelab/compare", "tooltip":
                            "Folder under ComfyUI's output directory; each run writes a timestamped subfolder "
                            "with grid.png, 01.png.. and settings.json."}),
            "default_states": default_states_input(),
            "refiner_mode": refiner_mode_input(),
        }, "optional": {
            "lora_pipe": (PIPE, {"tooltip": "Pipe with the LoRA (panel 3 of the default three)."}),
            "refiner": (PIPE, {"tooltip": "Optional SDXL refiner for every panel."}),
            "states": (STATES, {"tooltip": "Custom states from TuneLab Comparison State; replaces the default three."}),
        }}

    def compare(self, pipe, prompt, negative, seed, steps, guidance, width, height, scheduler="default",
                high_noise_frac=0.8, output_name="tunelab/compare", default_states=None, refiner_mode="plain",
                lora_pipe=None, refiner=None, states=None):
        if states:
            chosen = list(states)
        elif default_states is None:  # an older graph without the widget: the seed's three (two without a LoRA)
            chosen = compare.default_states(pipe, lora_pipe, negative)
        else:
            chosen = compare.named_states(default_states, pipe, lora_pipe, negative, input_name="default_states")
        compare.check_states(chosen, refiner, refiner_mode)
        out_dir = run_folder(output_name)
        result = compare.run(chosen, prompt, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                             refiner=refiner, high_noise_frac=high_noise_frac, scheduler=scheduler,
                             refiner_mode=refiner_mode, progress=host.progress_factory())
        paths = compare.save(result, out_dir)
        return {"ui": {"images": output_images([paths["grid"], *paths["panels"]])}, "result": result.tensors()}


NODES = {
    "TuneLabCompare": (Compare, "TuneLab Compare"),
    "TuneLabComparisonState": (ComparisonState, "TuneLab Comparison State"),
}
