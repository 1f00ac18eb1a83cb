"""TuneLab Weighted Prompt (compel syntax -> TUNELAB_COND) and the bridge to native ComfyUI CONDITIONING."""
from __future__ import annotations

from ..core import prompt
from ..core.errors import TuneLabError
from .common import COND, PIPE, category

EXAMPLE_PROMPT = ("hyperrealistic death metal album cover featuring edgy moody realistic (human Super Mario)++, "
                  "edgy and moody")
SYNTAX_HELP = ("compel syntax: word+ / word- (x1.1 / x0.9 per sign), (several words)++, (words)1.3, nesting "
               "multiplies, (\"a\", \"b\").blend(1, 0.5), (\"a\", \"b\").and(), literal parentheses and quotes as "
               "\\( \\) \\\". A1111's (word:1.2), .swap() and spellings compel would read as plain text "
               "(sunset+!, f/1.8+) are refused with how to write them. The SDXL pooled vector sees the first 77 "
               "tokens.")


class WeightedPrompt:
    DESCRIPTION = ("Encodes a positive and a negative prompt in compel syntax with the pipe's text encoders and its "
                   "LoRA stack, exactly as compel does (SDXL: both encoders' penultimate states + TE2 pooled; "
                   "refiner: TE2 only; SD1.x / InstructPix2Pix: the one encoder). Long prompts are split into "
                   "77-token chunks, never truncated; positive and negative are padded to the same length. "
                   "Bad syntax stops the run with the problem and its position. " + SYNTAX_HELP)
    CATEGORY = category("prompt")
    RETURN_TYPES = (COND,)
    RETURN_NAMES = ("cond",)
    OUTPUT_TOOLTIPS = ("The encoded prompt pair for this pipe (and only this model family), batch_size rows.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "The pipeline whose text encoders (and LoRA stack) encode the prompts."}),
                "positive": ("STRING", {"multiline": True, "default": EXAMPLE_PROMPT, "tooltip":
                             "What the image should show, in compel syntax. Required. " + SYNTAX_HELP}),
                "negative": ("STRING", {"multiline": True, "default": "wrong", "tooltip":
                             "What to steer away from, in compel syntax; may be empty (then \"\" is encoded). "
                             "'wrong' is the trigger word of the wrong LoRA."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": prompt.MAX_BATCH, "tooltip":
                               "Rows in the conditioning: one copy of the encoded pair per image in the batch."}),
            },
            "optional": {
                "pooled_from": (list(prompt.POOLED_FROM), {"default": "raw", "tooltip":
                                "SDXL pooled vector: raw = compel's behaviour, TE2 run on the prompt string "
                                "including its syntax characters; clean = on the prompt with the syntax stripped."}),
            },
        }

    def encode(self, pipe, positive, negative, batch_size=1, pooled_from="raw"):
        return (prompt.encode(pipe, positive, negative, int(batch_size), pooled_from=pooled_from),)


def _cpu(t):
    return None if t is None else t.detach().to("cpu").float()


class CondToNative:
    DESCRIPTION = ("Turns a TuneLab conditioning into native ComfyUI CONDITIONING (positive, negative), so that "
                   "ComfyUI's own samplers can use compel-weighted prompts. Valid only with a ComfyUI MODEL of the "
                   "same family and text encoders as the pipe that encoded it: an SDXL base cond with an SDXL base "
                   "model, an SDXL refiner cond with the refiner (it carries aesthetic_score, which the refiner "
                   "needs), an SD1.x / InstructPix2Pix cond with an SD1.x-family model. A text-encoder LoRA in the "
                   "pipe's stack is already baked into the embeddings. The size inputs are SDXL's size "
                   "conditioning and are ignored for SD1.x.")
    CATEGORY = category("prompt")
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Native conditioning of the positive prompt.", "Native conditioning of the negative prompt.")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        def size(default, what):
            return ("INT", {"default": default, "min": 0, "max": 16384, "step": 8, "tooltip": what})

        return {"required": {
            "cond": (COND, {"tooltip": "A TuneLab conditioning from TuneLab Weighted Prompt."}),
            "width": size(1024, "SDXL size conditioning: the original image width the model is told about."),
            "height": size(1024, "SDXL size conditioning: the original image height the model is told about."),
            "crop_w": size(0, "SDXL crop conditioning: left crop offset in pixels; 0 for uncropped images."),
            "crop_h": size(0, "SDXL crop conditioning: top crop offset in pixels; 0 for uncropped images."),
            "target_width": size(1024, "SDXL target size conditioning: the width of the image to be generated."),
            "target_height": size(1024, "SDXL target size conditioning: the height of the image to be generated."),
            "aesthetic_score": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 10.0, "step": 0.5, "tooltip":
                                "Refiner only: aesthetic score of the positive (diffusers' default 6.0)."}),
            "negative_aesthetic_score": ("FLOAT", {"default": 2.5, "min": 0.0, "max": 10.0, "step": 0.5, "tooltip":
                                         "Refiner only: aesthetic score of the negative (diffusers' default 2.5)."}),
        }}

    def convert(self, cond, width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024,
                aesthetic_score=6.0, negative_aesthetic_score=2.5):
        family = cond.family
        if family == "sdxl":
            extra = {"width": int(width), "height": int(height), "crop_w": int(crop_w), "crop_h": int(crop_h),
                     "target_width": int(target_width), "target_height": int(target_height)}
            pos = {"pooled_output": _cpu(cond.pooled), **extra}
            neg = {"pooled_output": _cpu(cond.negative_pooled), **extra}
        elif family == "sdxl-refiner":  # what ComfyUI's CLIPTextEncodeSDXLRefiner produces
            extra = {"width": int(width), "height": int(height)}
            pos = {"pooled_output": _cpu(cond.pooled), "aesthetic_score": float(aesthetic_score), **extra}
            neg = {"pooled_output": _cpu(cond.negative_pooled), "aesthetic_score": float(negative_aesthetic_score),
                   **extra}
        elif family in ("sd15", "sd2", "ip2p"):
            pos, neg = {}, {}
        else:
            raise TuneLabError(f"no native conditioning for the '{family}' family", input_name="cond")
        return ([[_cpu(cond.embeds), pos]], [[_cpu(cond.negative_embeds), neg]])


NODES = {
    "TuneLabWeightedPrompt": (WeightedPrompt, "TuneLab Weighted Prompt"),
    "TuneLabCondToNative": (CondToNative, "TuneLab Conditioning To Native"),
}
