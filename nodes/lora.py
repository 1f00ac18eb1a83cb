"""TuneLab Load LoRA and TuneLab Apply Wrong LoRA."""
from __future__ import annotations

from pathlib import Path

from .. import host
from ..core import lora, tiny
from ..core.compare import DEFAULT_NEGATIVE, DEFAULT_PROMPT
from .common import COND, PIPE, category

BUILTIN_TINY_LORA = "tiny-sdxl-wrong-lora (built-in)"


def lora_choices() -> list[str]:
    return host.filename_list("loras") + [BUILTIN_TINY_LORA]


def resolve_lora(name: str) -> Path:
    from ..core.checks import check_choice

    check_choice(name, lora_choices(), "lora_name", "LoRA")  # a listed name only: it comes through POST /prompt
    if name == BUILTIN_TINY_LORA:
        return tiny.wrong_lora()
    return Path(host.resolve_file("loras", name))


def _lora_input():
    return (lora_choices(), {"tooltip": "A LoRA from models/loras (.safetensors; kohya, diffusers/PEFT or the old "
                                        "diffusers attention-processor format). The built-in one is for tiny-sdxl."})


def _strength_input():
    return ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                      "tooltip": "LoRA scale; 0 is the same as no LoRA, negative values invert it."})


class LoadLora:
    DESCRIPTION = ("Adds a LoRA to the pipe's stack and returns a new pipe; the incoming pipe is unchanged, so base "
                   "and LoRA branches share one copy of the weights. Refuses a LoRA made for another base model.")
    CATEGORY = category("lora")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The same model with this LoRA added to its stack.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipe": (PIPE, {"tooltip": "The pipe to add the LoRA to (it is not modified)."}),
            "lora_name": _lora_input(),
            "strength": _strength_input(),
        }}

    def load(self, pipe, lora_name, strength):
        return (lora.load(pipe, resolve_lora(lora_name), strength, name=lora_name),)


class ApplyWrongLora:
    DESCRIPTION = ("Max Woolf's recipe in one node: load the wrong LoRA and put 'wrong' in the negative prompt. "
                   "Returns the LoRA pipe and the matching conditioning.")
    CATEGORY = category("lora")
    RETURN_TYPES = (PIPE, COND)
    RETURN_NAMES = ("pipe", "conditioning")
    OUTPUT_TOOLTIPS = ("The pipe with the LoRA on its stack.", "Prompt + negative encoded with that pipe.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipe": (PIPE, {"tooltip": "The SDXL base pipe."}),
            "lora_name": _lora_input(),
            "strength": _strength_input(),
            "prompt": ("STRING", {"default": DEFAULT_PROMPT, "multiline": True,
                                  "tooltip": "Positive prompt, compel syntax: (words)++ boosts, word- lowers."}),
            "negative": ("STRING", {"default": DEFAULT_NEGATIVE, "multiline": True,
                                    "tooltip": "Negative prompt; 'wrong' is the LoRA's instance prompt."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
        }}

    def apply(self, pipe, lora_name, strength, prompt, negative, batch_size=1):
        from ..core.prompt import encode

        lora_pipe = lora.load(pipe, resolve_lora(lora_name), strength, name=lora_name)
        return (lora_pipe, encode(lora_pipe, prompt, negative, batch=batch_size))


NODES = {
    "TuneLabLoadLora": (LoadLora, "TuneLab Load LoRA"),
    "TuneLabApplyWrongLora": (ApplyWrongLora, "TuneLab Apply Wrong LoRA"),
}
