"""TuneLab Compare (native): the wrong-LoRA comparison on the MODEL, CLIP and VAE a user already has, with
ComfyUI's own LoRA loading, sampling (KSampler / KSamplerAdvanced), hooks and VAE Decode."""
from __future__ import annotations

from .. import host
from ..core import compare, images, native_compare
from .common import category, output_images, run_folder, seed_input, size_input


class CompareNative:
    DESCRIPTION = ("Generates one prompt at one seed under several states and saves a labelled grid, the panels "
                   "and settings.json (as TuneLab Compare does), on native ComfyUI objects: base; base + negative; "
                   "LoRA + negative (the LoRA loaded on clones of MODEL and CLIP, as LoraLoader does); and "
                   "optionally the LoRA on the negative only (as ComfyUI LoRA hooks on the negative conditioning, "
                   "so only the negative prediction uses it). Each panel is what Load Checkpoint -> LoraLoader -> "
                   "two text encodes -> KSampler -> VAE Decode gives at the same settings; the MODEL and CLIP you "
                   "wire in are never changed.")
    CATEGORY = category("compare")
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("grid", "panels")
    OUTPUT_TOOLTIPS = ("The labelled grid.", "Each panel as VAE Decode returned it, one batch in state order.")
    OUTPUT_NODE = True
    FUNCTION = "compare"

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = host.sampler_names(), host.scheduler_names()

        def state(default, what):
            return ("BOOLEAN", {"default": default, "tooltip": what})

        return {"required": {
            "model": ("MODEL", {"tooltip": "The base MODEL (e.g. from Load Checkpoint); never changed."}),
            "clip": ("CLIP", {"tooltip": "The base CLIP; never changed. LoRA states patch a clone."}),
            "vae": ("VAE", {"tooltip": "The VAE that decodes every panel."}),
            "lora_name": (["none"] + host.filename_list("loras"), {"tooltip":
                          "The LoRA (a .safetensors file in models/loras) for the LoRA states, e.g. the wrong "
                          "LoRA; 'none' runs only the states without a LoRA."}),
            "prompt": ("STRING", {"default": compare.DEFAULT_PROMPT, "multiline": True,
                                  "tooltip": "Shared positive prompt (syntax: see prompt_syntax)."}),
            "negative": ("STRING", {"default": compare.DEFAULT_NEGATIVE, "multiline": True, "tooltip":
                         "Negative prompt of every state but 'base' (which uses \"\")."}),
            "seed": seed_input("One seed for every panel, re-used for the refiner stage."),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip":
                      "Denoising steps (KSampler); 50 is the notebooks' (diffusers' default)."}),
            "cfg": ("FLOAT", {"default": 13.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance (13 in the wrong-LoRA notebooks)."}),
            "sampler_name": (samplers, {"default": "euler", "tooltip": "KSampler's sampler."}),
            "scheduler": (schedulers, {"default": "normal", "tooltip": "KSampler's scheduler."}),
            "width": size_input("width"),
            "height": size_input("height"),
            "prompt_syntax": (list(native_compare.SYNTAXES), {"default": "compel", "tooltip":
                              "compel: prompts read as TuneLab Weighted Prompt (CLIP) reads them (compel syntax "
                              "and math, SDXL size keys = the image size); comfyui: as CLIPTextEncode reads them "
                              "(ComfyUI's (word:1.2) syntax), for panels equal to a plain native graph."}),
            "base": state(True, "Panel: the model as given, no negative prompt."),
            "base_negative": state(True, "Panel: the model as given, with the negative prompt."),
            "lora_negative": state(True, "Panel: the LoRA on MODEL and CLIP, with the negative prompt."),
            "lora_negative_only": state(False, "Panel: the LoRA only while the negative prediction runs (LoRA hooks "
                                        "on the negative conditioning); both prompts encoded by the base CLIP."),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01,
                                        "tooltip": "LoRA strength on the MODEL (LoraLoader's strength_model)."}),
            "lora_clip_strength": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01, "tooltip":
                                   "LoRA strength on the CLIP (LoraLoader's strength_clip); not used by the "
                                   "negative-only state."}),
            "output_name": ("STRING", {"default": "tunelab/compare_native", "tooltip":
                            "Folder under ComfyUI's output directory; each run writes a timestamped subfolder "
                            "with grid.png, 01.png.. and settings.json."}),
        }, "optional": {
            "refiner_model": ("MODEL", {"tooltip": "Optional SDXL refiner MODEL; wire refiner_clip too."}),
            "refiner_clip": ("CLIP", {"tooltip": "The refiner's CLIP (it encodes the prompts for its stage)."}),
            "refiner_switch": ("FLOAT", {"default": 0.8, "min": 0.05, "max": 0.95, "step": 0.05, "tooltip":
                               "With a refiner: the fraction of the steps the base runs before the refiner takes "
                               "over (KSamplerAdvanced end_at_step / start_at_step)."}),
        }}

    def compare(self, model, clip, vae, lora_name, prompt, negative, seed, steps, cfg, sampler_name, scheduler,
                width, height, prompt_syntax="compel", base=True, base_negative=True, lora_negative=True,
                lora_negative_only=False, lora_strength=1.0, lora_clip_strength=1.0,
                output_name="tunelab/compare_native", refiner_model=None, refiner_clip=None, refiner_switch=0.8):
        flags = {"base": base, "base_negative": base_negative, "lora_negative": lora_negative,
                 "lora_negative_only": lora_negative_only}
        chosen = native_compare.states([k for k, on in flags.items() if on], negative)
        settings = native_compare.Settings(
            prompt=prompt, seed=int(seed), steps=int(steps), cfg=float(cfg), sampler_name=sampler_name,
            scheduler=scheduler, width=int(width), height=int(height), syntax=prompt_syntax,
            lora_name=None if lora_name in (None, "", "none") else lora_name,
            strength_model=float(lora_strength), strength_clip=float(lora_clip_strength),
            refiner_switch=float(refiner_switch))
        refiner = None if refiner_model is None and refiner_clip is None else (refiner_model, refiner_clip)
        native_compare.check(settings, chosen, has_refiner_model=refiner_model is not None,
                             has_refiner_clip=refiner_clip is not None)
        out_dir = run_folder(output_name)
        result, panels = native_compare.run(host, model, clip, vae, chosen, settings, refiner=refiner)
        paths = compare.save(result, out_dir)
        grid = images.pil_to_tensor([result.grid])
        return {"ui": {"images": output_images([paths["grid"], *paths["panels"]])}, "result": (grid, panels)}


NODES = {"TuneLabCompareNative": (CompareNative, "TuneLab Compare (native)")}
