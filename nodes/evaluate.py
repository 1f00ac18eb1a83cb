"""TuneLab Score Comparison: every (prompt, seed, state) image generated and scored, with paired statistics."""
from __future__ import annotations

from .. import host
from ..core import compare, evaluation, statistics
from ..core.errors import TuneLabError
from ..core.files import confined_path
from .common import (PIPE, STATES, category, guidance_input, high_noise_frac_input, output_images, scheduler_input,
                     size_input, steps_input)
from .compare import refiner_mode_input

CUSTOM = "custom (prompts below)"
FILE = "file (prompt_file)"


class ScoreComparison:
    DESCRIPTION = ("Generates every prompt x seed x state image, scores each with CLIP score (prompt adherence) and "
                   "PickScore (human preference), and reports the mean per state with 95% bootstrap intervals and "
                   "the win rate of every pair of states, paired by (prompt, seed). Resumable: queue again with the "
                   "same settings and finished cells are skipped. 'shard' splits the cells over several queued runs "
                   "or servers sharing the output folder.")
    CATEGORY = category("compare")
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("plot", "grids", "table")
    OUTPUT_TOOLTIPS = ("Per-state mean scores with their 95% intervals, one panel per score.",
                       "One grid per prompt (a row per seed, a column per state), resized to the first one's size; "
                       "while other shards are unfinished, this shard's images.",
                       "The report as a Markdown table (report.md), or this shard's progress.")
    OUTPUT_NODE = True
    FUNCTION = "evaluate"

    @classmethod
    def INPUT_TYPES(cls):
        from .compare import default_states_input

        states = default_states_input()
        states = (states[0], {**states[1], "default": ", ".join(compare.STATE_NAMES)})
        return {"required": {
            "pipe": (PIPE, {"tooltip": "Base pipe (SDXL base in the seed), without the LoRA."}),
            "prompt_set": (list(evaluation.PROMPT_SETS) + [CUSTOM, FILE], {"default": evaluation.DEFAULT_PROMPT_SET,
                           "tooltip": "woolf: the wrong-LoRA article's 9 prompts; woolf-20: those plus 11 prompts "
                                      "probing hands, text, faces and clutter; custom: the prompts below; file: a "
                                      ".txt file (one prompt per line) in ComfyUI's input folder."}),
            "prompts": ("STRING", {"default": "", "multiline": True, "tooltip":
                        "With 'custom': one prompt per line (compel syntax; lines starting with # are skipped)."}),
            "prompt_file": ("STRING", {"default": "prompts.txt", "tooltip":
                            "With 'file': a text file relative to ComfyUI's input folder."}),
            "seeds": ("STRING", {"default": ", ".join(str(s) for s in evaluation.DEFAULT_SEEDS), "tooltip":
                      "Seeds, comma-separated; every (prompt, seed) is one paired unit of the statistics."}),
            "default_states": states,
            "negative": ("STRING", {"default": compare.DEFAULT_NEGATIVE,
                                    "tooltip": "Negative prompt of the _negative states."}),
            "steps": steps_input(),
            "guidance": guidance_input(),
            "width": size_input("width"),
            "height": size_input("height"),
            "scheduler": scheduler_input(),
            "high_noise_frac": high_noise_frac_input(),
            "refiner_mode": refiner_mode_input(),
            "clip_model": (["none"] + host.scorer_choices("clip"), {"default": "tiny-clip", "tooltip":
                           "CLIP model for the CLIP score: a transformers folder in models/scorers (e.g. "
                           "openai/clip-vit-large-patch14 with config.json, model.safetensors, tokenizer and "
                           "preprocessor files); tiny-clip is a random toy for a first run; none skips it."}),
            "pickscore_model": (["none"] + host.scorer_choices("pickscore"), {"default": "tiny-pickscore",
                                "tooltip": "PickScore_v1 folder in models/scorers (model.safetensors plus the "
                                           "tokenizer and preprocessor files of laion/CLIP-ViT-H-14-laion2B-s32B-"
                                           "b79K); tiny-pickscore is a random toy; none skips it."}),
            "output_name": ("STRING", {"default": "tunelab/scored", "tooltip":
                            "Folder under ComfyUI's output directory holding the cells and the report. Queue again "
                            "with the same settings to resume; other settings need another folder."}),
            "shard": ("STRING", {"default": "0/1", "tooltip":
                      "I/N: make only the cells with index % N == I. Sweep it (0/2,1/2) over several servers that "
                      "share the output folder; the run that completes the plan writes the report."}),
            "resamples": ("INT", {"default": statistics.DEFAULT_RESAMPLES, "min": 100,
                                  "max": statistics.MAX_RESAMPLES, "tooltip": "Bootstrap resamples for the intervals."}),
            "stats_seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": False,
                                   "tooltip": "Seed of the bootstrap resamples (same seed, same intervals)."}),
        }, "optional": {
            "lora_pipe": (PIPE, {"tooltip": "Pipe with the LoRA, for the lora_ states."}),
            "refiner": (PIPE, {"tooltip": "Optional SDXL refiner for every state."}),
            "states": (STATES, {"tooltip": "Custom states from TuneLab Comparison State; replace default_states."}),
        }}

    def evaluate(self, pipe, prompt_set, prompts, prompt_file, seeds, default_states, negative, steps, guidance,
                 width, height, scheduler, high_noise_frac, refiner_mode, clip_model, pickscore_model, output_name,
                 shard, resamples, stats_seed, lora_pipe=None, refiner=None, states=None):
        from ..core import scoring

        # every check before a model runs or a file is written
        if prompt_set == CUSTOM:
            chosen_prompts = evaluation.parse_prompts(prompts or "", "prompts")
        elif prompt_set == FILE:
            path = confined_path(host.input_dir(), prompt_file, "prompt_file")
            chosen_prompts = evaluation.parse_prompts(evaluation.read_prompt_file(path, "prompt_file"), "prompt_file")
        elif prompt_set in evaluation.PROMPT_SETS:
            chosen_prompts = evaluation.parse_prompts(prompt_set)
        else:
            raise TuneLabError(f"unknown prompt set '{prompt_set}'", input_name="prompt_set")
        chosen_seeds = evaluation.parse_seeds(seeds)
        chosen = list(states) if states else compare.named_states(default_states, pipe, lora_pipe, negative,
                                                                  input_name="default_states")
        compare.check_states(chosen, refiner, refiner_mode)
        shard_value = evaluation.parse_shard(shard)
        folder = confined_path(host.output_dir(), output_name, "output_name")
        scorers = {}
        for metric, choice in (("clip_score", clip_model), ("pickscore", pickscore_model)):
            if choice != "none":
                kind = evaluation.SCORER_KINDS[metric]
                scorers[metric] = scoring.load(host.resolve_scorer(choice), kind, device=pipe.device,
                                               input_name=f"{kind}_model")
        evaluation.check_scorers(scorers)
        report = evaluation.run(folder, chosen, chosen_prompts, chosen_seeds, scorers=scorers, steps=steps,
                                guidance=guidance, width=width, height=height, refiner=refiner,
                                high_noise_frac=high_noise_frac, scheduler=scheduler, refiner_mode=refiner_mode,
                                shard=shard_value, resamples=resamples, stats_seed=stats_seed,
                                progress=host.progress_factory(), input_name="output_name")
        return self._outputs(report, folder, shard_value)

    @staticmethod
    def _outputs(report, folder, shard):
        from PIL import Image

        from ..core.images import pil_to_tensor
        from ..core.plots import message_image
        from .instruct import grids_tensor

        if report.result is None:
            text = report.summary()
            shown = evaluation.shard_images(folder, shard)
            pils = []
            for p in shown:
                with Image.open(p) as im:
                    pils.append(im.convert("RGB"))
            plot = message_image(text.replace("; ", "\n"))
            grids = grids_tensor(pils) if pils else pil_to_tensor([plot])
            return {"ui": {"images": output_images(shown[:16]), "text": [text]},
                    "result": (pil_to_tensor([plot]), grids, text)}
        res = report.result
        table = res.table
        return {"ui": {"images": output_images([res.paths["plot"], *res.paths["grids"]]), "text": [table]},
                "result": (pil_to_tensor([res.plot]), grids_tensor([g for _, g in res.grids]), table)}


NODES = {"TuneLabScoreComparison": (ScoreComparison, "TuneLab Score Comparison")}
