"""TuneLab Wrong Image Synthesis: the seed's dataset generator as one resumable node."""
from __future__ import annotations

from .. import host
from ..core import synthesis
from ..core.files import confined_path
from .common import PIPE, category, output_images, seed_input, size_input, steps_input

MAX_PREVIEW = 64


def _dataset_dir(dataset_name: str):
    return confined_path(host.output_dir(), dataset_name, "dataset_name", root_label="ComfyUI's output folder")


class WrongImageSynthesis:
    DESCRIPTION = ("Generates the 'wrong' training dataset: for each keyword, a prompt with that keyword boosted "
                   "(compel ++++), swept over the guidance values, no negative prompt (Max Woolf's recipe: 13 x 6 = "
                   "78 images). Writes PNGs + metadata.jsonl under the output folder; queue again to resume.")
    CATEGORY = category("dataset")
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("preview", "dataset_path")
    OUTPUT_TOOLTIPS = ("The first images of the dataset (at most preview_cap).",
                       "The dataset folder, for a trainer's dataset input.")
    OUTPUT_NODE = True
    FUNCTION = "synthesize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipe": (PIPE, {"tooltip": "Base model that makes the images (SDXL base in the seed), without a LoRA."}),
            "keywords": ("STRING", {"default": "\n".join(synthesis.DEFAULT_KEYWORDS), "multiline": True,
                                    "tooltip": "One keyword per line; each prompt boosts one of them."}),
            "boost": ("STRING", {"default": synthesis.DEFAULT_BOOST,
                                 "tooltip": "compel weight added to the boosted keyword: ++++ (= x1.1^4), -- or 1.5."}),
            "template": ("STRING", {"default": synthesis.DEFAULT_TEMPLATE, "multiline": True, "tooltip":
                         "Prompt template. {keywords}: the seed's prompt (all keywords joined, this one boosted); "
                         "{keyword}: just the boosted keyword; {subject}: one subject from the list."}),
            "subjects": ("STRING", {"default": "", "multiline": True,
                                    "tooltip": "Optional subjects, one per line, for {subject} in the template."}),
            "guidance": ("STRING", {"default": ",".join(f"{g:g}" for g in synthesis.DEFAULT_GUIDANCE),
                                    "tooltip": "Guidance values swept for every prompt, comma-separated."}),
            "per_entry": ("INT", {"default": 1, "min": 1, "max": synthesis.MAX_PER_ENTRY,
                                  "tooltip": "Images per (keyword, subject, guidance), each with its own seed."}),
            "seed": seed_input("Base seed; every image's seed is derived from it and the image's index, so any "
                               "image can be regenerated alone. Keep it fixed to resume.", default=0),
            "steps": steps_input("Denoising steps (the seed used diffusers' default, 50)."),
            "width": size_input("width"),
            "height": size_input("height"),
            "instance_prompt": ("STRING", {"default": synthesis.DEFAULT_INSTANCE_PROMPT,
                                           "tooltip": "Caption ('text') of every image: the word the LoRA learns."}),
            "dataset_name": ("STRING", {"default": "tunelab/wrong_dataset", "tooltip":
                             "Folder under ComfyUI's output directory. Queue again with the same settings to resume; "
                             "a different plan in the same folder is refused."}),
            "preview_cap": ("INT", {"default": 16, "min": 1, "max": MAX_PREVIEW,
                                    "tooltip": "Most images returned as the preview batch."}),
        }, "optional": {
            "refiner": (PIPE, {"tooltip": "Optional SDXL refiner; the base hands over at 0.8, as in the seed."}),
        }}

    def synthesize(self, pipe, keywords, boost, template, subjects, guidance, per_entry, seed, steps, width, height,
                   instance_prompt, dataset_name, preview_cap=16, refiner=None):
        from PIL import Image

        from ..core import images as images_mod

        plan = synthesis.build_plan(keywords, boost=boost, template=template, subjects=subjects, guidance=guidance,
                                    per_entry=per_entry, seed=seed)
        folder = _dataset_dir(dataset_name)
        synthesis.check_folder(folder, "dataset_name")
        report = synthesis.run(folder, pipe, plan, steps=steps, width=width, height=height, refiner=refiner,
                               instance_prompt=instance_prompt, progress=host.progress_factory(),
                               input_name="dataset_name")
        shown = synthesis.files_of(folder)[:max(1, min(int(preview_cap), MAX_PREVIEW))]
        pils = []
        for p in shown:
            with Image.open(p) as im:
                pils.append(im.convert("RGB"))
        ui = {"images": output_images(shown), "text": [report.summary()]}
        return {"ui": ui, "result": (images_mod.pil_to_tensor(pils), str(folder))}


NODES = {"TuneLabWrongImageSynthesis": (WrongImageSynthesis, "TuneLab Wrong Image Synthesis")}
