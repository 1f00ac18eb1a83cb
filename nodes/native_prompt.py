"""TuneLab Weighted Prompt (CLIP) and its SDXL text_g/text_l variant: compel syntax and compel's math on the native
CLIP a user already has (Load Checkpoint, LoraLoader, CLIPSetLastLayer ...), giving native CONDITIONING."""
from __future__ import annotations

from .. import host
from ..core import prompt
from .common import category
from .prompt import EXAMPLE_PROMPT, SYNTAX_HELP

EXACTNESS = ("The result equals compel's embeddings and pooled vector for the same text-encoder weights (measured "
             "within 2e-6 on SDXL, the refiner and SD1.x, every syntax form, prompts of 1-4 chunks). Encoding runs "
             "through the CLIP's own tokenize/encode_from_tokens as CLIPTextEncode does, so LoRAs on the CLIP, "
             "CLIPSetLastLayer and ComfyUI's offloading apply; weights below 1 re-encode with the fragment masked "
             "out of attention, which ComfyUI's encode_from_tokens cannot express, so those windows run the same "
             "text-encoder module with an attention mask added. Textual-inversion 'embedding:' names and scheduled "
             "CLIP hooks are not read.")


def _size(default, what):
    return ("INT", {"default": default, "min": 0, "max": 16384, "step": 8, "tooltip": what})


def size_inputs() -> dict:
    return {
        "width": _size(1024, "SDXL size conditioning: the original image width the model is told about."),
        "height": _size(1024, "SDXL size conditioning: the original image height the model is told about."),
        "crop_w": _size(0, "SDXL crop conditioning: left crop offset in pixels; 0 for uncropped images."),
        "crop_h": _size(0, "SDXL crop conditioning: top crop offset in pixels; 0 for uncropped images."),
        "target_width": _size(1024, "SDXL target size conditioning: the width of the image to be generated."),
        "target_height": _size(1024, "SDXL target size conditioning: the height of the image to be generated."),
    }


def _pooled_input():
    return (list(prompt.POOLED_FROM), {"default": "raw", "tooltip":
            "SDXL / refiner pooled vector: raw = compel's behaviour, CLIP-G run on the prompt string including its "
            "syntax characters; clean = on the prompt with the syntax stripped (a .blend() blends the parts')."})


class WeightedPromptCLIP:
    DESCRIPTION = ("Encodes a positive and a negative prompt in compel syntax with a native CLIP (from Load "
                   "Checkpoint, LoraLoader ...) and returns native CONDITIONING for KSampler: SDXL gets CLIP-L + "
                   "CLIP-G with the pooled vector and the size keys, the refiner CLIP-G with its aesthetic score, "
                   "SD1.x / SD2.x their one encoder. Long prompts are split into 77-token chunks at compel's split "
                   "points, never truncated; positive and negative are padded to one length as compel pads them "
                   "(ComfyUI would otherwise repeat the shorter one). " + SYNTAX_HELP + " " + EXACTNESS)
    CATEGORY = category("prompt")
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Conditioning of the positive prompt, for KSampler's positive input.",
                       "Conditioning of the negative prompt, for KSampler's negative input.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The native CLIP to encode with (SD1.x, SD2.x, SDXL or SDXL refiner); "
                                  "LoRAs and CLIPSetLastLayer on it apply."}),
                "positive": ("STRING", {"multiline": True, "default": EXAMPLE_PROMPT, "tooltip":
                             "What the image should show, in compel syntax. Required. " + SYNTAX_HELP}),
                "negative": ("STRING", {"multiline": True, "default": "wrong", "tooltip":
                             "What to steer away from, in compel syntax; may be empty (then \"\" is encoded, as "
                             "compel does). 'wrong' is the trigger word of the wrong LoRA."}),
            },
            "optional": {
                **size_inputs(),
                "aesthetic_score": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 1000.0, "step": 0.01, "tooltip":
                                    "Refiner only: aesthetic score of the positive (diffusers' default 6.0)."}),
                "negative_aesthetic_score": ("FLOAT", {"default": 2.5, "min": 0.0, "max": 1000.0, "step": 0.01,
                                             "tooltip": "Refiner only: aesthetic score of the negative "
                                                        "(diffusers' default 2.5)."}),
                "pooled_from": _pooled_input(),
            },
        }

    def encode(self, clip, positive, negative, width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024,
               target_height=1024, aesthetic_score=6.0, negative_aesthetic_score=2.5, pooled_from="raw"):
        sizes = {"width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h, "target_width": target_width,
                 "target_height": target_height}
        return host.clip_encode_pair(clip, positive, negative, pooled_from=pooled_from, sizes=sizes,
                           aesthetic_scores=(aesthetic_score, negative_aesthetic_score))


class WeightedPromptSDXLCLIP:
    DESCRIPTION = ("SDXL with a different prompt per encoder, as CLIPTextEncodeSDXL's text_g / text_l: the *_g "
                   "texts go to CLIP-G (and give the pooled vector), the *_l texts to CLIP-L; this is compel's "
                   "style prompt (_g) beside its main prompt (_l). An empty *_l text means the same as its *_g. "
                   "All four are compel syntax, padded to one length as CompelForSDXL pads them. " + EXACTNESS)
    CATEGORY = category("prompt")
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = WeightedPromptCLIP.OUTPUT_TOOLTIPS
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        def text(default, tip):
            return ("STRING", {"multiline": True, "default": default, "tooltip": tip + " Compel syntax."})

        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "An SDXL base CLIP (CLIP-L + CLIP-G)."}),
                "positive_g": text(EXAMPLE_PROMPT, "Positive prompt for CLIP-G and the pooled vector (text_g)."),
                "positive_l": text("", "Positive prompt for CLIP-L (text_l); empty = the same as positive_g."),
                "negative_g": text("wrong", "Negative prompt for CLIP-G and its pooled vector; may be empty."),
                "negative_l": text("", "Negative prompt for CLIP-L; empty = the same as negative_g."),
            },
            "optional": {**size_inputs(), "pooled_from": _pooled_input()},
        }

    def encode(self, clip, positive_g, positive_l, negative_g, negative_l, width=1024, height=1024, crop_w=0,
               crop_h=0, target_width=1024, target_height=1024, pooled_from="raw"):
        sizes = {"width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h, "target_width": target_width,
                 "target_height": target_height}
        pos_l = positive_l if (positive_l or "").strip() else positive_g
        neg_l = negative_l if (negative_l or "").strip() else negative_g
        names_l = ("positive_l" if (positive_l or "").strip() else "positive_g",
                   "negative_l" if (negative_l or "").strip() else "negative_g")
        return host.clip_encode_pair(clip, positive_g, negative_g, pooled_from=pooled_from, sizes=sizes,
                                     text_l=(pos_l, neg_l), names_l=names_l, names_g=("positive_g", "negative_g"))


NODES = {
    "TuneLabWeightedPromptCLIP": (WeightedPromptCLIP, "TuneLab Weighted Prompt (CLIP)"),
    "TuneLabWeightedPromptSDXLCLIP": (WeightedPromptSDXLCLIP, "TuneLab Weighted Prompt SDXL (CLIP)"),
}
