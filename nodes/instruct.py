"""InstructPix2Pix nodes: TuneLab Instruct Edit, TuneLab Instruction Dataset and TuneLab Instruct Evaluate."""
from __future__ import annotations

from .. import host
from ..core import instruct, instruct_data, sampling
from ..core.errors import TuneLabError
from ..core.files import confined_path
from .common import PIPE, category, dataset_folder, output_images, run_folder, seed_input

SYNONYMS = "cartoonize synonyms (50 built-in)"
CUSTOM = "custom (instructions below)"
MODES = ("folders", "table", "synthesize")


def _steps(default=instruct.DEFAULT_STEPS):
    return ("INT", {"default": default, "min": 1, "max": sampling.MAX_STEPS,
                    "tooltip": "Denoising steps (20 in the instruction-tuned InstructPix2Pix evaluations)."})


def _image_guidance():
    return ("FLOAT", {"default": instruct.DEFAULT_IMAGE_GUIDANCE, "min": 0.0, "max": 20.0, "step": 0.05,
                      "tooltip": "Image guidance: how closely the result follows the input image (1.5 in the seed). "
                                 "Guidance runs only when this is >= 1 and 'guidance' is > 1 (diffusers' rule)."})


def _guidance():
    return ("FLOAT", {"default": instruct.DEFAULT_GUIDANCE, "min": 0.0, "max": 30.0, "step": 0.5,
                      "tooltip": "Text guidance: how strongly the instruction is followed (7.0 in the seed). "
                                 "1 or less switches guidance off (conditional prediction only)."})


def _relative(path, root) -> str:
    root = root.resolve()
    return str(path.relative_to(root)).replace("\\", "/") if path.is_relative_to(root) else str(path)


class InstructEdit:
    DESCRIPTION = ("Edits images with an instruction using an InstructPix2Pix model (diffusers' pipeline). The output "
                   "has the input's size: sides that are not multiples of 8 are mirror-padded and cropped back.")
    CATEGORY = category("instruct")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The edited images, one per input image, same size as the input.",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipe": (PIPE, {"tooltip": "An InstructPix2Pix pipe (8-channel UNet) from TuneLab Load Pipeline."}),
            "image": ("IMAGE", {"tooltip": "The image(s) to edit; a batch is edited with one instruction."}),
            "instruction": ("STRING", {"default": instruct.DEFAULT_INSTRUCTION, "multiline": True,
                                       "tooltip": "What to change, e.g. 'derain the image'. Compel syntax works "
                                                  "((word)++ to stress a word)."}),
            "image_guidance": _image_guidance(),
            "guidance": _guidance(),
            "steps": _steps(),
            "seed": seed_input("Seed of the starting noise; the same seed gives the same pixels.", default=0),
        }, "optional": {
            "negative": ("STRING", {"default": "", "multiline": True,
                                    "tooltip": "Optional negative prompt (compel syntax) for the unconditional "
                                               "branches; empty is the model's own empty prompt."}),
        }}

    def edit(self, pipe, image, instruction, image_guidance, guidance, steps, seed, negative=""):
        out = instruct.edit(pipe, image, instruction, image_guidance=image_guidance, guidance=guidance, steps=steps,
                            seed=seed, negative=negative or "", progress=host.progress_factory())
        return (out,)


class InstructionDataset:
    DESCRIPTION = ("Builds an instruction dataset (folder + metadata.jsonl with input_image, edit_prompt, "
                   "edited_image) under ComfyUI's output folder: from input/target folders matched by file name, from "
                   "a jsonl/csv/parquet table, or synthesized low-level pairs (rain, noise, blur, low light). "
                   "Sources are read from ComfyUI's input folder. Re-running with the same settings reuses the "
                   "dataset; an interrupted build resumes.")
    CATEGORY = category("dataset")
    RETURN_TYPES = ("STRING", "INT", "IMAGE")
    RETURN_NAMES = ("dataset", "examples", "preview")
    OUTPUT_TOOLTIPS = ("The dataset folder, relative to ComfyUI's output folder (wire it into TuneLab Instruct "
                       "Evaluate).", "Number of examples written.", "The first pairs: input | edited.")
    OUTPUT_NODE = True
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mode": (list(MODES), {"default": "synthesize", "tooltip":
                     "folders: pairs from 'source' (inputs) and 'target' (edited), matched by file name. table: "
                     "import the jsonl/csv/parquet file 'source'. synthesize: degrade the clean images in 'source'."}),
            "source": ("STRING", {"default": ".", "tooltip":
                       "Folder (folders, synthesize) or table file (table), relative to ComfyUI's input folder; "
                       "'.' is the input folder itself."}),
            "target": ("STRING", {"default": "", "tooltip":
                       "folders mode: the folder of edited images, relative to ComfyUI's input folder."}),
            "instruction_set": ([SYNONYMS, CUSTOM], {"default": SYNONYMS, "tooltip":
                                "folders mode: the 50 built-in synonyms of 'Cartoonize the following image.' or your "
                                "own instructions; each example gets one, chosen by seed."}),
            "instructions": ("STRING", {"default": "", "multiline": True, "tooltip":
                             "folders mode with 'custom': one instruction, or several synonyms one per line."}),
            "columns": (list(instruct_data.COLUMN_PRESETS), {"default": "tunelab", "tooltip":
                        "table mode: column names. tunelab = input_image/edit_prompt/edited_image; cartoonization = "
                        "original_image/edit_prompt/cartoonized_image; low-level = input_image/instruction/"
                        "ground_truth_image."}),
            "column_mapping": ("STRING", {"default": "", "tooltip":
                               "table mode, overrides 'columns': input=COL,instruction=COL,edited=COL."}),
            "degradations": ("STRING", {"default": ",".join(instruct_data.DEFAULT_DEGRADATIONS), "tooltip":
                             "synthesize mode, comma-separated: rain, noise (Gaussian or Poisson by seed), "
                             "gaussian_noise, poisson_noise, blur, low_light. Each clean image gets each one."}),
            "seed": seed_input("Seeds instruction choice and degradation parameters; same seed, same bytes.",
                               default=0),
            "resolution": ("INT", {"default": 0, "min": 0, "max": instruct_data.MAX_RESOLUTION, "step": 8, "tooltip":
                           "Resize the shorter side to this (0 keeps the size); both images of a pair get the same "
                           "resize and the same center crop to multiples of 8."}),
            "limit": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                      "Keep the first N examples (0: all)."}),
            "val_fraction": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9, "step": 0.05, "tooltip":
                             "Fraction held out as split 'validation' (evaluation uses it; 0: no split). Split by "
                             "source image, so no ground truth is in both splits, and every task is validated."}),
            "output_name": ("STRING", {"default": "tunelab/instruct_dataset", "tooltip":
                            "Dataset folder under ComfyUI's output folder; it must be new or hold this same build."}),
        }}

    def build(self, mode, source, target, instruction_set, instructions, columns, column_mapping, degradations, seed,
              resolution, limit, val_fraction, output_name):
        in_root, out_root = host.input_dir(), host.output_dir()
        out = confined_path(out_root, output_name, "output_name", root_label="ComfyUI's output folder")
        src = confined_path(in_root, source, "source", root_label="ComfyUI's input folder")
        common = dict(seed=seed, resolution=resolution, limit=limit, val_fraction=val_fraction,
                      progress=host.progress_factory())
        if mode == "folders":
            if not str(target).strip():
                raise TuneLabError("folders mode needs the folder of edited images", input_name="target")
            chosen = None if instruction_set == SYNONYMS else instructions
            if instruction_set == CUSTOM:
                instruct_data.instruction_list(instructions, "instructions")
            tgt = confined_path(in_root, target, "target", root_label="ComfyUI's input folder")
            result = instruct_data.from_folders(src, tgt, out, instructions=chosen, **common)
        elif mode == "table":
            result = instruct_data.from_table(src, out, columns=column_mapping.strip() or columns, **common)
        elif mode == "synthesize":
            result = instruct_data.synthesize(src, out, degradations=degradations, **common)
        else:
            raise TuneLabError(f"unknown mode '{mode}'; choose {', '.join(MODES)}", input_name="mode")
        from ..core.images import pil_to_tensor

        preview = instruct_data.preview(result, count=4)
        rel = _relative(out, out_root)
        return {"ui": {"text": [f"{result['examples']} example(s) in {rel}"]},
                "result": (rel, int(result["examples"]), pil_to_tensor([preview]))}


class InstructEvaluate:
    DESCRIPTION = ("Runs up to four InstructPix2Pix pipes on a dataset's held-out pairs at one seed and scores them "
                   "against the ground truth (PSNR, SSIM; needs scikit-image), and with a CLIP / DINOv2 model their "
                   "learned similarity to the ground truth and to the input (plus CLIP directional similarity "
                   "where the dataset has captions). Saves per-example grids (input | each model | ground truth), "
                   "each output as <model>/<example>/steps@..-igs@..-gs@...png, and report.json / report.csv / "
                   "summary.csv / report.txt in a timestamped folder. With sweep values it runs the image x text "
                   "guidance grid and plots every metric against image guidance (sweep.png).")
    CATEGORY = category("instruct")
    RETURN_TYPES = ("IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("grids", "table", "plot")
    OUTPUT_TOOLTIPS = ("One grid per example (resized to the first grid's size when sizes differ).",
                       "Mean metrics per model, overall and per task, as a text table.",
                       "Every metric against image guidance (a point per model without a sweep).")
    OUTPUT_NODE = True
    FUNCTION = "evaluate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipe": (PIPE, {"tooltip": "First InstructPix2Pix pipe, e.g. the base model."}),
            "label": ("STRING", {"default": "base", "tooltip": "Name of the first pipe in grids and reports."}),
            "dataset": ("STRING", {"default": "tunelab/instruct_dataset", "tooltip":
                        "Dataset folder (with metadata.jsonl) under ComfyUI's output folder, else its input folder. "
                        "Its 'validation'/'test' split is used when it has one, else every pair."}),
            "steps": _steps(),
            "image_guidance": _image_guidance(),
            "guidance": _guidance(),
            "seed": seed_input("One seed for every example and every model, so the models start from the same "
                               "noise.", default=0),
            "limit": ("INT", {"default": 10, "min": 0, "max": 100_000, "tooltip":
                      "Evaluate the first N held-out pairs (0: all; the seed's comparison used 10)."}),
            "output_name": ("STRING", {"default": "tunelab/instruct_eval", "tooltip":
                            "Folder under ComfyUI's output folder; each run writes a timestamped subfolder."}),
        }, "optional": {
            "pipe_2": (PIPE, {"tooltip": "Second pipe, e.g. a fine-tuned model."}),
            "label_2": ("STRING", {"default": "model 2", "tooltip": "Name of the second pipe."}),
            "pipe_3": (PIPE, {"tooltip": "Third pipe."}),
            "label_3": ("STRING", {"default": "model 3", "tooltip": "Name of the third pipe."}),
            "pipe_4": (PIPE, {"tooltip": "Fourth pipe."}),
            "label_4": ("STRING", {"default": "model 4", "tooltip": "Name of the fourth pipe."}),
            "negative": ("STRING", {"default": "", "multiline": True, "tooltip":
                         "Optional negative prompt for every model (empty: none)."}),
            "clip_model": (["none"] + host.scorer_choices("clip"), {"default": "none", "tooltip":
                           "CLIP model (a transformers folder in models/scorers, e.g. openai/clip-vit-large-patch14) "
                           "for CLIP image similarity to the ground truth / input and CLIP directional similarity; "
                           "tiny-clip is a random toy; none skips them."}),
            "dino_model": (["none"] + host.scorer_choices("dino"), {"default": "none", "tooltip":
                           "DINOv2 model folder in models/scorers (e.g. facebook/dinov2-base) for DINOv2 similarity "
                           "to the ground truth / input; tiny-dinov2 is a random toy; none skips it."}),
            "caption_columns": ("STRING", {"default": "", "tooltip":
                                "INPUT,EDITED caption columns of the dataset for the directional similarity (empty: "
                                "input_caption/edited_caption or original_prompt/edited_prompt when present)."}),
            "image_guidance_sweep": ("STRING", {"default": "", "tooltip":
                                     "Image guidance values to sweep, e.g. 1, 1.5, 2 (empty: image_guidance only)."}),
            "guidance_sweep": ("STRING", {"default": "", "tooltip":
                               "Text guidance values to sweep, e.g. 5, 7, 9 (empty: guidance only). With either "
                               "sweep set, every setting of the grid is evaluated into its own subfolder."}),
        }}

    def evaluate(self, pipe, label, dataset, steps, image_guidance, guidance, seed, limit, output_name,
                 pipe_2=None, label_2="model 2", pipe_3=None, label_3="model 3", pipe_4=None, label_4="model 4",
                 negative="", clip_model="none", dino_model="none", caption_columns="", image_guidance_sweep="",
                 guidance_sweep=""):
        from ..core import scoring
        from ..core.images import pil_to_tensor

        folder = dataset_folder(dataset, "dataset", marker=instruct_data.METADATA)
        models = [(label, pipe)] + [(lb, p) for p, lb in ((pipe_2, label_2), (pipe_3, label_3), (pipe_4, label_4))
                                    if p is not None]
        instruct.parse_caption_columns(caption_columns)
        igs = instruct.parse_guidance_values(image_guidance_sweep, "image_guidance_sweep") or [image_guidance]
        tgs = instruct.parse_guidance_values(guidance_sweep, "guidance_sweep") or [guidance]
        scorers = {kind: None if choice in (None, "", "none") else
                   scoring.load(host.resolve_scorer(choice), kind, device=pipe.device, input_name=f"{kind}_model")
                   for kind, choice in (("clip", clip_model), ("dino", dino_model))}
        out_dir = run_folder(output_name)
        common = dict(steps=steps, seed=seed, limit=limit, negative=negative or "", clip=scorers["clip"],
                      dino=scorers["dino"], caption_columns=caption_columns or None, out_dir=out_dir,
                      progress=host.progress_factory())
        if len(igs) * len(tgs) == 1:  # one setting: the report straight in the run folder
            ev = instruct.evaluate(models, folder, image_guidance=igs[0], guidance=tgs[0], **common)
            evs, plot = [ev], instruct.guidance_chart(instruct.sweep_points(ev), steps=steps, seed=seed)
            plot_paths = []
        else:
            sw = instruct.sweep(models, folder, image_guidances=igs, guidances=tgs, **common)
            evs, plot, plot_paths = list(sw.evaluations.values()), sw.plot, [sw.paths["plot"]]
        table = "".join(ev.table for ev in evs)
        grids = grids_tensor([g for ev in evs for _, g in ev.grids])
        shown = plot_paths + [p for ev in evs for p in ev.paths["grids"]]
        reports = [ev.paths[k] for ev in evs for k in ("json", "csv", "summary_csv", "table") if ev.paths.get(k)]
        reports += [sw.paths[k] for k in ("csv", "json")] if plot_paths else []
        ui = {"images": output_images(shown), "text": [table],
              "files": output_images(reports)}  # the reports, for headless clients (`tunelab queue` downloads them)
        return {"ui": ui, "result": (grids, table, pil_to_tensor([plot]))}


def grids_tensor(grids: list):
    """PIL grids -> one IMAGE batch, each resized to the first grid's size."""
    from ..core.images import pil_to_tensor

    size = grids[0].size
    return pil_to_tensor([g if g.size == size else g.resize(size) for g in grids])


NODES = {
    "TuneLabInstructEdit": (InstructEdit, "TuneLab Instruct Edit"),
    "TuneLabInstructionDataset": (InstructionDataset, "TuneLab Instruction Dataset"),
    "TuneLabInstructEvaluate": (InstructEvaluate, "TuneLab Instruct Evaluate"),
}
