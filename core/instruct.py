"""InstructPix2Pix edits: an image plus an instruction -> the edited image, through diffusers' own
`StableDiffusionInstructPix2PixPipeline`.

The instruction is encoded with `core.prompt.encode` (compel syntax allowed) and handed to the pipeline as
`prompt_embeds` / `negative_prompt_embeds`. With guidance on, diffusers builds a 3-way batch from them,
`[instruction, negative, negative]`, against image latents `[image, image, zeros]`, and combines the three noise
predictions as

    eps = eps_uncond + guidance * (eps_text - eps_image) + image_guidance * (eps_image - eps_uncond)

where eps_text sees (instruction, image), eps_image sees (negative, image) and eps_uncond sees (negative, no image).
diffusers' rule for when that happens is kept as is: the 3-way batch runs only when `guidance > 1` and
`image_guidance >= 1`; otherwise the pipeline runs the conditional prediction alone (eps = eps_text), so
`image_guidance` below 1 switches *all* guidance off rather than weakening the image term. With `guidance == 1`
and `image_guidance == 1` the formula reduces to eps_text too, so both roads give the conditional-only result.

Sizes: the VAE works on multiples of 8 pixels. An input whose sides are not multiples of 8 is **padded** on the
right and bottom to the next multiple of 8 (mirror padding; edge replication where the image is too small to
mirror), edited, and the output is cropped back to exactly the input size. Padding, unlike resizing, leaves every
input pixel where it was, so the output is aligned pixel for pixel with the input (which is what PSNR/SSIM against a
ground truth need).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import progress as progress_mod
from .errors import TuneLabError
from .models import PipeHandle

DEFAULT_INSTRUCTION = "Generate a cartoonized version of the natural image"
# The seed's inference settings (instruction-tuned-sd, validation/compare_models.py).
DEFAULT_STEPS = 20
DEFAULT_IMAGE_GUIDANCE = 1.5
DEFAULT_GUIDANCE = 7.0
MAX_BATCH = 64
MAX_GUIDANCE = 100.0


def check_pipe(handle: PipeHandle, input_name: str = "pipe") -> None:
    """Refuse a pipe that is not InstructPix2Pix (its UNet must take 8 channels: 4 noise + 4 image latents)."""
    channels = int(getattr(handle.pipe.unet.config, "in_channels", 0))
    if handle.family != "ip2p" or channels != 8:
        raise TuneLabError(
            f"an instruction edit needs an InstructPix2Pix model, whose UNet takes 8 input channels (4 noise + 4 "
            f"image latents); this pipe is {handle.architecture}, family '{handle.family}', with a {channels}-channel "
            "UNet. Load an InstructPix2Pix checkpoint (e.g. instruct-pix2pix-00-22000.safetensors, or a fine-tuned "
            "one) or the tiny-ip2p preset.", input_name=input_name)


def check_settings(steps, image_guidance, guidance, seed=0, scheduler: str = "default") -> None:
    """Every sampling setting of an edit, before anything loads or runs."""
    from .checks import check_seed
    from .sampling import check_guidance, check_scheduler, check_steps

    check_steps(steps)
    check_guidance(image_guidance, "image_guidance", MAX_GUIDANCE)
    check_guidance(guidance, "guidance", MAX_GUIDANCE)
    check_seed(seed)
    check_scheduler(scheduler)


def check_prompts(instruction, negative="", *, instruction_name: str = "instruction") -> str:
    """The instruction and the negative prompt, together (compel syntax), before any work."""
    from .prompt import check_prompts as check_pair

    text = check_instruction(instruction, instruction_name)
    check_pair(text, negative or "", positive_name=instruction_name, negative_name="negative")
    return text


def check_instruction(instruction, input_name: str = "instruction") -> str:
    text = "" if instruction is None else str(instruction)
    if not text.strip():
        raise TuneLabError("the instruction is empty; write the edit to make, e.g. "
                           f"'{DEFAULT_INSTRUCTION}'", input_name=input_name)
    return text


def check_pairs(pairs, negative: str = "") -> None:
    """The instructions of dataset pairs (with the negative prompt), each named by its pair."""
    for n, pair in enumerate(pairs, 1):
        check_prompts(pair.instruction, negative, instruction_name=f"dataset pair {n} ({pair.name}) instruction")


def _as_batch(images, input_name: str = "image"):
    import torch

    if not isinstance(images, torch.Tensor):
        raise TuneLabError(f"expected an IMAGE tensor [B,H,W,3], got {type(images).__name__}", input_name=input_name)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (3, 4) or images.shape[0] < 1:
        raise TuneLabError(f"expected an IMAGE tensor [B,H,W,3], got shape {tuple(images.shape)}",
                           input_name=input_name)
    if images.shape[0] > MAX_BATCH:
        raise TuneLabError(f"a batch of {images.shape[0]} images is over the limit of {MAX_BATCH}",
                           input_name=input_name)
    from .sampling import MAX_SIDE

    h, w = int(images.shape[1]), int(images.shape[2])
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise TuneLabError(f"{w}x{h} is out of range; sides must be 1..{MAX_SIDE} pixels", input_name=input_name)
    return images[..., :3].float()


def pad_to_multiple(x, multiple: int = 8):
    """[B,C,H,W] -> padded on the right/bottom to multiples of `multiple` (mirror, or edge where too small)."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if (ph < h and pw < w) else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def edit(handle: PipeHandle, images, instruction: str, *, image_guidance: float = DEFAULT_IMAGE_GUIDANCE,
         guidance: float = DEFAULT_GUIDANCE, steps: int = DEFAULT_STEPS, seed: int, negative: str = "",
         progress=None, scheduler: str = "default"):
    """Edit a batch of images (ComfyUI IMAGE [B,H,W,3], 0..1) with one instruction; returns IMAGE [B,H,W,3] of
    the same size.

    Defaults are the seed's: 20 steps, image guidance 1.5, text guidance 7.0. `negative` (compel syntax, may be
    empty) replaces the empty prompt in the two unconditional branches. One CPU generator seeded with `seed` draws
    the starting noise of the whole batch (and the ancestral noise of stochastic schedulers), so the result equals a
    direct pipeline call with `generator=torch.Generator().manual_seed(seed)`. Sizes not divisible by 8 are padded
    and cropped back (see the module docstring). Progress ticks once per step; an interrupt stops at the next step.
    """
    import torch

    from .prompt import PromptSyntaxError, encode
    from .sampling import _run, _StepReporter, generator, to_image_tensor

    check_pipe(handle)
    text = check_prompts(instruction, negative)
    check_settings(steps, image_guidance, guidance, seed, scheduler)
    batch = _as_batch(images)
    b, h, w = int(batch.shape[0]), int(batch.shape[1]), int(batch.shape[2])
    try:
        cond = encode(handle, text, negative or "", batch=b)
    except PromptSyntaxError as e:  # encode names the "positive"/"negative" prompt; here they are these inputs
        raise PromptSyntaxError(e.problem.replace("positive prompt", "instruction"),
                                text if e.input_name == "positive" else negative, e.position,
                                input_name="instruction" if e.input_name == "positive" else "negative") from None
    # NCHW in channels-last memory, the layout diffusers' own PIL/numpy preprocessing hands the VAE (the VAE's
    # convolutions pick their kernels by memory format, so this keeps results bit-identical to a direct call)
    pixels = pad_to_multiple(batch.permute(0, 3, 1, 2).clamp(0, 1)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), progress_mod.make(progress, steps, "instruct edit") as bar:
        bar.check()
        out = _run(handle, scheduler, dict(
            prompt_embeds=cond.embeds, negative_prompt_embeds=cond.negative_embeds, image=pixels,
            num_inference_steps=int(steps), image_guidance_scale=float(image_guidance),
            guidance_scale=float(guidance), generator=generator(seed), output_type="pt",
            callback_on_step_end=_StepReporter(bar)))
    return to_image_tensor(out.images)[:, :h, :w, :].contiguous()


def settings_name(steps: int, image_guidance: float, guidance: float) -> str:
    """The seed's file name for one edit's settings, e.g. 'steps@20-igs@1.5-gs@7.0'."""
    return f"steps@{int(steps)}-igs@{float(image_guidance)}-gs@{float(guidance)}"


# ---------------------------------------------------------------------------------------------------------------
# evaluation: each model on held-out pairs at the seed's settings, PSNR/SSIM against the ground truth


@dataclass
class Evaluation:
    settings: dict
    rows: list  # one dict per (model, example): model, example, task, instruction, psnr, ssim, image
    summary: dict  # {model: {"all": {"n", "psnr", "ssim"}, "tasks": {task: {...}}}}
    table: str  # the summary as a text table
    grids: list = field(default_factory=list)  # (example name, PIL grid): input | each model | ground truth
    paths: dict = field(default_factory=dict)  # what was written, when an output folder was given


class _SubProgress(progress_mod.Progress):
    """Forwards one edit's ticks to the evaluation's overall bar (which stays open between edits)."""

    def __init__(self, parent, total: int = 0, desc: str = ""):
        self.parent, self.total, self.value = parent, max(int(total), 1), 0

    def update(self, n: int = 1, info=None) -> None:
        self.parent.update(n, info)

    def check(self) -> None:
        self.parent.check()

    def close(self) -> None:
        pass


def model_label(handle: PipeHandle) -> str:
    from pathlib import Path

    src = str(handle.source)
    name = src if src.startswith("tiny-") else (Path(src).stem if Path(src).suffix else Path(src).name) or src
    for ref in handle.loras:
        name += f" + {Path(ref.name).stem}" + ("" if float(ref.weight) == 1.0 else f"@{float(ref.weight):g}")
    return name


def _labelled(models) -> list:
    if isinstance(models, PipeHandle) or (isinstance(models, tuple) and len(models) == 2
                                          and isinstance(models[1], PipeHandle)):
        models = [models]
    out, seen = [], {}
    for m in models or ():
        label, handle = (m if isinstance(m, tuple) else (model_label(m), m))
        if not isinstance(handle, PipeHandle):
            raise TuneLabError(f"expected a pipe or (label, pipe), got {type(handle).__name__}", input_name="models")
        label = str(label).strip() or model_label(handle)
        if label in seen:
            seen[label] += 1
            label = f"{label} ({seen[label]})"
        else:
            seen[label] = 1
        check_pipe(handle, input_name=f"model '{label}'")
        out.append((label, handle))
    if not out:
        raise TuneLabError("no models to evaluate; give at least one InstructPix2Pix pipe", input_name="models")
    return out


def _dir_name(label: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.@+-]+", "_", label).strip("._") or "model"


# Caption columns the directional similarity looks for (input caption, edited caption): TuneLab's own, and the
# InstructPix2Pix datasets' (timbrooks/instructpix2pix-clip-filtered: original_prompt / edited_prompt).
CAPTION_COLUMNS = (("input_caption", "edited_caption"), ("original_prompt", "edited_prompt"),
                   ("input_prompt", "output_prompt"), ("caption_before", "caption_after"))


def parse_caption_columns(value, input_name: str = "caption_columns"):
    """"IN,OUT" -> ("IN", "OUT"); "" / None -> None (look for the known names)."""
    if value in (None, ""):
        return None
    if isinstance(value, (tuple, list)):
        parts = [str(v).strip() for v in value]
    else:
        parts = [v.strip() for v in str(value).split(",")]
    if len(parts) != 2 or not all(parts):
        raise TuneLabError(f"'{value}' is not two caption columns; write INPUT_CAPTION,EDITED_CAPTION, e.g. "
                           "original_prompt,edited_prompt", input_name=input_name)
    return tuple(parts)


def caption_pair(pair, columns=None):
    """(input caption, edited caption) of a dataset pair, or None when its row has no captions."""
    row = getattr(pair, "row", None) or {}
    for a, b in ([columns] if columns else CAPTION_COLUMNS):
        if isinstance(row.get(a), str) and row[a].strip() and isinstance(row.get(b), str) and row[b].strip():
            return row[a].strip(), row[b].strip()
    return None


def _check_scorer(scorer, kind: str, input_name: str):
    if scorer is not None and getattr(scorer, "kind", None) not in (kind,) + (("pickscore",) if kind == "clip" else ()):
        raise TuneLabError(f"expected a {kind} model, got {getattr(scorer, 'kind', type(scorer).__name__)}",
                           input_name=input_name)


def evaluate(models, dataset_folder, *, steps: int = DEFAULT_STEPS, image_guidance: float = DEFAULT_IMAGE_GUIDANCE,
             guidance: float = DEFAULT_GUIDANCE, seed: int = 0, limit: int = 0, negative: str = "",
             columns="tunelab", clip=None, dino=None, caption_columns=None, out_dir=None,
             progress=None) -> Evaluation:
    """Run each model on the dataset's held-out pairs (its 'validation'/'test' split if it has one, else every
    pair; the first `limit` when > 0) with the pair's own instruction, at the seed's settings (20 steps, image
    guidance 1.5, text guidance 7.0), and score each output against the ground truth with PSNR and SSIM.

    Every example and every model use the same `seed`, so the models start from the same noise. Metrics are
    computed on the 8-bit images that are saved. With `out_dir` it writes, each file atomically:
    `<model>/<example>/steps@20-igs@1.5-gs@7.0.png` (the seed's layout), `grids/<example>.png` (input | each model |
    ground truth), `report.json`, `report.csv` (one row per model and example), `summary.csv` and `report.txt`
    (mean PSNR/SSIM per model, overall and per task).

    With `clip` (a `core.scoring` CLIP scorer) every output also gets its CLIP image similarity to the ground truth
    and to the input, and, for pairs whose row has captions (`caption_columns`, else the known names in
    `CAPTION_COLUMNS`), the CLIP directional similarity; with `dino` (a DINOv2 scorer) its DINOv2 similarity to the
    ground truth and to the input (see `metrics`). All on the saved 8-bit images.
    """
    from pathlib import Path

    from . import images as images_mod, instruct_data, metrics
    from .compare import versions

    labelled = _labelled(models)
    check_settings(steps, image_guidance, guidance, seed)
    check_prompts(DEFAULT_INSTRUCTION, negative)
    _check_scorer(clip, "clip", "clip_model")
    _check_scorer(dino, "dino", "dino_model")
    caption_columns = parse_caption_columns(caption_columns)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise TuneLabError(f"{limit!r} must be 0 (all) or a positive number of examples", input_name="limit")
    metrics._skimage_metrics()  # fail before any model runs when scikit-image is missing
    pairs = instruct_data.held_out(dataset_folder, columns=columns)
    if limit:
        pairs = pairs[:limit]
    check_pairs(pairs, negative)  # every instruction before the first model runs
    out = Path(out_dir) if out_dir is not None else None
    fname = settings_name(steps, image_guidance, guidance) + ".png"
    rows, grids, paths = [], [], {"images": [], "grids": []}
    total = len(pairs) * len(labelled) * int(steps)
    with progress_mod.make(progress, total, "instruct evaluate") as bar:
        for pair in pairs:
            bar.check()
            source, truth = pair.images()
            tensor = images_mod.pil_to_tensor([source])
            refs = _reference_embeddings(pair, source, truth, clip, dino, caption_columns)
            panels = []
            for label, handle in labelled:
                result = edit(handle, tensor, pair.instruction, image_guidance=image_guidance, guidance=guidance,
                              steps=steps, seed=seed, negative=negative,
                              progress=lambda t, d: _SubProgress(bar, t, d))
                image = images_mod.tensor_to_pil(result)[0]
                panels.append(image)
                rel = f"{_dir_name(label)}/{pair.name}/{fname}"
                if out is not None:
                    paths["images"].append(images_mod.save_png(image, out / rel))
                scores = {**metrics.measure(image, truth), **_learned(image, refs, clip, dino)}
                rows.append({"model": label, "example": pair.name, "task": pair.task, "instruction": pair.instruction,
                             **scores, "image": rel})
            grid = images_mod.labelled_grid([source, *panels, truth], ["input", *[l for l, _ in labelled],
                                                                          "ground truth"],
                                            caption=f"{pair.name}: {pair.instruction}")
            grids.append((pair.name, grid))
            if out is not None:
                paths["grids"].append(images_mod.save_png(grid, out / "grids" / f"{pair.name}.png"))
    summary = summarize(rows, [l for l, _ in labelled])
    settings = {"dataset": Path(dataset_folder).name, "examples": len(pairs), "steps": int(steps),
                "image_guidance": float(image_guidance), "guidance": float(guidance), "seed": int(seed),
                "negative": negative, "limit": limit, "metrics": "PSNR (dB, inf when identical) and SSIM from "
                "scikit-image, on the saved 8-bit images" + (", CLIP image similarity and directional similarity"
                                                             if clip is not None else "")
                + (", DINOv2 similarity" if dino is not None else ""),
                "scorers": {k: v.identity for k, v in (("clip", clip), ("dino", dino)) if v is not None},
                "caption_columns": list(caption_columns) if caption_columns else None,
                "models": [{"label": l, **h.describe()} for l, h in labelled], "versions": versions()}
    evaluation = Evaluation(settings=settings, rows=rows, summary=summary, table=format_table(summary, settings),
                            grids=grids, paths=paths)
    if out is not None:
        save_report(evaluation, out)
    return evaluation


def _reference_embeddings(pair, source, truth, clip, dino, caption_columns) -> dict:
    """The input's and ground truth's embeddings (and the captions'), computed once per pair for every model."""
    refs = {}
    if clip is not None:
        refs["clip_input"], refs["clip_truth"] = clip.image_embedding(source), clip.image_embedding(truth)
        captions = caption_pair(pair, caption_columns)
        if captions:
            refs["text_input"], refs["text_edited"] = (clip.text_embedding(c) for c in captions)
    if dino is not None:
        refs["dino_input"], refs["dino_truth"] = dino.image_embedding(source), dino.image_embedding(truth)
    return refs


def _learned(image, refs: dict, clip, dino) -> dict:
    from . import metrics

    out = {}
    if clip is not None:
        e = clip.image_embedding(image)
        out["clip_to_truth"] = metrics.embedding_similarity(e, refs["clip_truth"])
        out["clip_to_input"] = metrics.embedding_similarity(e, refs["clip_input"])
        if "text_input" in refs:
            out["clip_directional"] = metrics.directional_similarity(refs["clip_input"], e, refs["text_input"],
                                                                     refs["text_edited"])
    if dino is not None:
        e = dino.image_embedding(image)
        out["dino_to_truth"] = metrics.embedding_similarity(e, refs["dino_truth"])
        out["dino_to_input"] = metrics.embedding_similarity(e, refs["dino_input"])
    return out


def metric_keys(rows: list) -> list:
    """The metrics present in the rows, in report order: psnr, ssim, then the learned ones."""
    from . import metrics

    return ["psnr", "ssim"] + [k for k in metrics.LEARNED if any(k in r for r in rows)]


def summarize(rows: list, labels: list) -> dict:
    from . import metrics

    keys = metric_keys(rows)

    def stats(rs):
        out = {"n": len(rs)}
        for k in keys:
            values = [r[k] for r in rs if k in r]
            out[k] = metrics.mean(values)
            if k == "clip_directional":
                out["n_directional"] = len(values)  # only pairs with captions
        return out

    summary = {}
    for label in labels:
        mine = [r for r in rows if r["model"] == label]
        tasks = {}
        for r in mine:
            tasks.setdefault(r["task"], []).append(r)
        summary[label] = {"all": stats(mine), "tasks": {t: stats(rs) for t, rs in sorted(tasks.items())}}
    return summary


def _summary_keys(summary: dict) -> list:
    from . import metrics

    present = {k for s in summary.values() for k in s["all"]}
    return ["psnr", "ssim"] + [k for k in metrics.LEARNED if k in present]


def format_table(summary: dict, settings: dict) -> str:
    from . import metrics

    keys = _summary_keys(summary)
    names = {"psnr": "PSNR (dB)", "ssim": "SSIM", **metrics.LEARNED_NAMES}
    lines = [("model", "task", "n", *[names[k] for k in keys])]
    for label, s in summary.items():
        lines.append((label, "all", str(s["all"]["n"]), *[metrics.fmt(s["all"].get(k, math.nan)) for k in keys]))
        for task, t in s["tasks"].items():
            lines.append(("", task, str(t["n"]), *[metrics.fmt(t.get(k, math.nan)) for k in keys]))
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    text = [f"dataset {settings['dataset']}: {settings['examples']} example(s), steps {settings['steps']}, "
            f"image guidance {settings['image_guidance']}, guidance {settings['guidance']}, seed {settings['seed']}"]
    for k, row in enumerate(lines):
        text.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip())
        if k == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text) + "\n"


def save_report(evaluation: Evaluation, out_dir) -> dict:
    """report.json, report.csv, summary.csv and report.txt in `out_dir` (each atomically)."""
    import csv
    import io
    import json
    from pathlib import Path

    from . import metrics
    from .files import write_text_atomic

    out = Path(out_dir)
    keys = metric_keys(evaluation.rows)
    jrows = [{**r, **{k: metrics.json_value(r[k]) for k in keys if k in r}} for r in evaluation.rows]
    jsummary = {m: {"all": _json_stats(s["all"]), "tasks": {t: _json_stats(v) for t, v in s["tasks"].items()}}
                for m, s in evaluation.summary.items()}
    write_text_atomic(out / "report.json", json.dumps({"settings": evaluation.settings, "summary": jsummary,
                                                       "examples": jrows}, indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "example", "task", "instruction", *keys, "image"])
    for r in evaluation.rows:
        w.writerow([r["model"], r["example"], r["task"], r["instruction"],
                    *[metrics.fmt(r[k], 6) if k in r else "" for k in keys], r["image"]])
    write_text_atomic(out / "report.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "task", "n", *keys])
    for m, s in evaluation.summary.items():
        w.writerow([m, "all", s["all"]["n"], *[metrics.fmt(s["all"].get(k, math.nan), 6) for k in keys]])
        for t, v in s["tasks"].items():
            w.writerow([m, t, v["n"], *[metrics.fmt(v.get(k, math.nan), 6) for k in keys]])
    write_text_atomic(out / "summary.csv", buf.getvalue())
    write_text_atomic(out / "report.txt", evaluation.table)
    evaluation.paths.update({k: out / f for k, f in (("json", "report.json"), ("csv", "report.csv"),
                                                     ("summary_csv", "summary.csv"), ("table", "report.txt"))})
    return evaluation.paths


def _json_stats(s: dict) -> dict:
    from . import metrics

    return {k: (v if k.startswith("n") else metrics.json_value(v)) for k, v in s.items()}


# ---------------------------------------------------------------------------------------------------------------
# guidance sweep: image guidance x text guidance, every metric against image guidance (the InstructPix2Pix
# paper's trade-off: more image guidance keeps the input, more text guidance follows the instruction)

MAX_SWEEP_SETTINGS = 64


def parse_guidance_values(value, input_name: str) -> list:
    """"1, 1.5, 2" / [1, 1.5] -> distinct floats in 0..MAX_GUIDANCE, in order."""
    from .checks import number_list

    return number_list(value, input_name, 0.0, MAX_GUIDANCE, example="1, 1.5, 2", distinct=True)


@dataclass
class Sweep:
    points: list  # {"model", "image_guidance", "guidance", "n", metric: mean, ...} per model and setting
    evaluations: dict  # (image_guidance, guidance) -> Evaluation
    plot: object  # PIL image
    paths: dict = field(default_factory=dict)


def sweep(models, dataset_folder, *, image_guidances, guidances, steps: int = DEFAULT_STEPS, seed: int = 0,
          limit: int = 0, negative: str = "", columns="tunelab", clip=None, dino=None, caption_columns=None,
          out_dir=None, progress=None) -> Sweep:
    """`evaluate` at every (image guidance, text guidance) of the grid, each setting in its own subfolder
    `steps@..-igs@..-gs@../` of `out_dir`, then `sweep.json`, `sweep.csv` and `sweep.png` (one panel per metric
    against image guidance, a line per model and text guidance)."""
    from pathlib import Path

    from . import metrics

    igs = parse_guidance_values(image_guidances, "image_guidance_sweep")
    tgs = parse_guidance_values(guidances, "guidance_sweep")
    if not igs or not tgs:
        raise TuneLabError("the sweep needs at least one image guidance and one text guidance value",
                           input_name="image_guidance_sweep" if not igs else "guidance_sweep")
    if len(igs) * len(tgs) > MAX_SWEEP_SETTINGS:
        raise TuneLabError(f"{len(igs)} x {len(tgs)} settings is over the limit of {MAX_SWEEP_SETTINGS}",
                           input_name="image_guidance_sweep")
    for ig in igs:
        for tg in tgs:
            check_settings(steps, ig, tg)
    labelled = _labelled(models)  # checked before anything runs
    out = Path(out_dir) if out_dir is not None else None
    points, evaluations = [], {}
    n_pairs = len(_held_out(dataset_folder, columns, limit))
    total = len(igs) * len(tgs) * len(labelled) * n_pairs * int(steps)
    with progress_mod.make(progress, total, "guidance sweep") as bar:
        for tg in tgs:
            for ig in igs:
                bar.check()
                sub = None if out is None else out / settings_name(steps, ig, tg)
                ev = evaluate(labelled, dataset_folder, steps=steps, image_guidance=ig, guidance=tg, seed=seed,
                              limit=limit, negative=negative, columns=columns, clip=clip, dino=dino,
                              caption_columns=caption_columns, out_dir=sub,
                              progress=lambda t, d: _SubProgress(bar, t, d))
                evaluations[(ig, tg)] = ev
                points += sweep_points(ev)
    keys = ["psnr", "ssim"] + [k for k in metrics.LEARNED if any(k in p for p in points)]
    chart = guidance_chart(points, steps=steps, seed=seed)
    result = Sweep(points=points, evaluations=evaluations, plot=chart)
    if out is not None:
        result.paths = _save_sweep(result, out, keys, {"image_guidance": igs, "guidance": tgs, "steps": int(steps),
                                                       "seed": int(seed), "limit": limit, "negative": negative})
    return result


def sweep_points(evaluation: Evaluation) -> list:
    """One point per model of an evaluation: its overall means at the evaluation's guidance setting."""
    st = evaluation.settings
    return [{"model": label, "image_guidance": st["image_guidance"], "guidance": st["guidance"], **s["all"]}
            for label, s in evaluation.summary.items()]


def guidance_chart(points: list, *, steps: int, seed: int):
    """One panel per metric against image guidance, a line per (model, text guidance)."""
    from . import metrics
    from .plots import line_chart

    keys = ["psnr", "ssim"] + [k for k in metrics.LEARNED if any(k in p for p in points)]
    names = {"psnr": "PSNR (dB)", "ssim": "SSIM", **metrics.LEARNED_NAMES}
    models = list(dict.fromkeys(p["model"] for p in points))
    tgs = list(dict.fromkeys(p["guidance"] for p in points))
    panels = []
    for k in keys:
        series = []
        for label in models:
            for tg in tgs:
                mine = sorted((p for p in points if p["model"] == label and p["guidance"] == tg),
                              key=lambda p: p["image_guidance"])
                series.append({"label": f"{label}, text guidance {tg:g}", "x": [p["image_guidance"] for p in mine],
                               "y": [p.get(k, math.nan) for p in mine]})
        panels.append({"title": names[k], "series": series})
    return line_chart(panels, title=f"metrics against image guidance ({steps} steps, seed {seed})",
                      xlabel="image guidance")


def _held_out(dataset_folder, columns, limit):
    from . import instruct_data

    pairs = instruct_data.held_out(dataset_folder, columns=columns)
    return pairs[:limit] if limit else pairs


def _save_sweep(result: Sweep, out, keys: list, settings: dict) -> dict:
    import csv
    import io
    import json

    from . import images as images_mod, metrics
    from .files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    jpoints = [{k: (metrics.json_value(v) if k in keys else v) for k, v in p.items()} for p in result.points]
    write_text_atomic(out / "sweep.json", json.dumps({"settings": settings, "metrics": keys, "points": jpoints},
                                                     indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "image_guidance", "guidance", "n", *keys])
    for p in result.points:
        w.writerow([p["model"], p["image_guidance"], p["guidance"], p["n"],
                    *[metrics.fmt(p.get(k, math.nan), 6) for k in keys]])
    write_text_atomic(out / "sweep.csv", buf.getvalue())
    images_mod.save_png(result.plot, out / "sweep.png")
    return {"json": out / "sweep.json", "csv": out / "sweep.csv", "plot": out / "sweep.png"}
