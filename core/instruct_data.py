"""Instruction datasets for InstructPix2Pix: (input image, instruction, edited image) triples.

Three ways to build one, all writing the same format (DESIGN, Formats): a folder with `input/`, `edited/` and
`metadata.jsonl`, one line per example with `input_image_file_name`, `edit_prompt`, `edited_image_file_name` (paths
relative to the folder) plus `task`, `source` and, for synthesized pairs, the degradation and its parameters. That is
datasets' ImageFolder layout (a column `X_file_name` is the image feature `X`), so
`load_dataset("imagefolder", data_dir=...)` gives the columns `input_image`, `edit_prompt`, `edited_image`: the
default columns of diffusers' `train_instruct_pix2pix.py`. TuneLab reads that layout, and the older one with plain
`input_image` / `edited_image` path columns, with the `tunelab` preset.

- `from_folders`: a folder of inputs and a folder of targets, matched by file name (stem), with one instruction or a
  list of synonyms chosen per example by seed (the seed's cartoonization style; `CARTOON_INSTRUCTIONS` is a default
  list of 50 synonyms for "Cartoonize the following image.").
- `from_table`: a local jsonl / csv / parquet (parquet needs pyarrow) table of image paths and instructions, with
  its columns mapped by a preset (`COLUMN_PRESETS`) or by hand.
- `synthesize`: low-level pairs from a folder of clean images: rain streaks, Gaussian/Poisson noise, blur and low
  light, each with the seed's fixed prompt (`TASK_PROMPTS`); the clean image is the target.

Rules: both images of a pair get the identical preprocessing (optional resize of the shorter side to `resolution`,
then a center crop to multiples of 8); a pair whose two images differ in size, a corrupt image, a missing column or
an empty instruction is refused with an error naming the file/row/column, before anything is written. Every
example has its own random stream derived from (seed, example key), so a build is reproducible: the same sources and
seed give byte-identical files. Files are written atomically; `metadata.jsonl` and `dataset_info.json` last. An
interrupted build resumes in the same folder without duplicates, a finished one with the same settings is reused as
it is, and a folder holding anything else is refused.

Splits (`val_fraction`) are made by *source*, not by example: examples that share an image (the clean image behind
each of its degradations, a table's input or ground truth used by several rows) form one group, and a group goes
whole to `train` or to `validation`, so no ground truth is scored that the model trained on. Within that rule the
split is stratified by task: every task with at least two groups gets one in validation first, then groups are added
where their tasks are furthest below the fraction, until validation holds at least `val_fraction` of the examples
(rounded up to whole groups); at least one group stays in train. `dataset_info.json` records the rule, the groups
and the sources of each split.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import progress as progress_mod
from .checks import check_number, check_seed
from .errors import TuneLabError
from .files import atomic_path, confined_path, write_text_atomic

FORMAT_VERSION = 1
METADATA = "metadata.jsonl"
INFO = "dataset_info.json"
PARTIAL = ".tunelab-partial.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_RESOLUTION = 4096

# Our column names (DESIGN) and the published datasets' (reference §2.1).
COLUMN_PRESETS = {
    "tunelab": ("input_image", "edit_prompt", "edited_image"),
    "cartoonization": ("original_image", "edit_prompt", "cartoonized_image"),
    "low-level": ("input_image", "instruction", "ground_truth_image"),
}
COLUMN_ROLES = ("input", "instruction", "edited")
FILE_NAME = "_file_name"  # datasets' ImageFolder: the column `X_file_name` holds the path of the image feature `X`

# The low-level dataset's fixed prompts, one per task (no synonyms).
TASK_PROMPTS = {
    "derain": "derain the image",
    "denoise": "denoise the noisy image",
    "deblur": "deblur the blurry image",
    "low-light": "enhance the low-light image",
}
# degradation -> task
DEGRADATIONS = {
    "rain": "derain",
    "noise": "denoise",  # Gaussian or Poisson, picked per example by seed
    "gaussian_noise": "denoise",
    "poisson_noise": "denoise",
    "blur": "deblur",
    "low_light": "low-light",
}
DEFAULT_DEGRADATIONS = ("rain", "noise", "blur", "low_light")

CARTOON_TASK = "cartoonize"
# 50 synonyms for "Cartoonize the following image.", written for TuneLab in the style of the seed's list.
CARTOON_INSTRUCTIONS = (
    "Cartoonize the following image.",
    "Turn this image into a cartoon.",
    "Make the photo look like a cartoon.",
    "Convert the picture into cartoon style.",
    "Render this image as a cartoon.",
    "Give the image a cartoon look.",
    "Transform the photo into a cartoon drawing.",
    "Redraw the picture in a cartoon style.",
    "Make a cartoon version of this image.",
    "Cartoonify the photo.",
    "Apply a cartoon effect to the image.",
    "Change the image into a cartoon illustration.",
    "Turn the photograph into cartoon art.",
    "Create a cartoon rendition of the picture.",
    "Stylize the image as a cartoon.",
    "Make this picture look hand-drawn like a cartoon.",
    "Recreate the image in cartoon form.",
    "Convert this photo to a cartoon.",
    "Produce a cartoonized version of the image.",
    "Turn the natural image into a cartoon.",
    "Generate a cartoon of this photograph.",
    "Draw this image the way a cartoonist would.",
    "Give this photo a cartoonish style.",
    "Make the scene look animated, like a cartoon.",
    "Transform the picture into cartoon-style artwork.",
    "Turn this shot into a cartoon image.",
    "Reimagine the photo as a cartoon.",
    "Cartoonize this photograph.",
    "Convert the natural image into a cartoon.",
    "Make the image resemble a cartoon frame.",
    "Render the photograph in a cartoon style.",
    "Change this photo into cartoon artwork.",
    "Illustrate the image as a cartoon.",
    "Turn the image into a cartoon-like picture.",
    "Make a cartoon out of the picture.",
    "Give the picture the look of a cartoon.",
    "Convert the image into a cartoon rendering.",
    "Apply cartoon styling to the photo.",
    "Make the photograph cartoonish.",
    "Transform this image into a cartoon scene.",
    "Paint the image in a flat cartoon style.",
    "Turn the photo into a comic-style cartoon.",
    "Cartoonify this picture.",
    "Produce a cartoon from the image.",
    "Make this image look like it was drawn for a cartoon.",
    "Convert the photograph into cartoon style.",
    "Restyle the image as a cartoon.",
    "Turn the picture into a cartoon illustration.",
    "Make the natural image look like a cartoon.",
    "Generate a cartoonized version of the natural image.",
)


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def example_seed(seed: int, key: str) -> int:
    """The seed of one example's random stream: stable under adding or removing other examples. 53 bits, so
    it survives JSON readers that hold numbers as doubles."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 11


def _rng(seed: int, key: str):
    import numpy as np

    return np.random.default_rng(example_seed(seed, key))


def _safe_stem(name: str, limit: int = 40) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem).strip("_")
    return stem[:limit] or "image"


def task_of(instruction: str) -> str:
    """The task an instruction belongs to: a low-level task for its fixed prompt, 'cartoonize' for a built-in
    synonym, otherwise the instruction itself."""
    text = instruction.strip()
    low = text.lower().rstrip(".")
    for task, prompt in TASK_PROMPTS.items():
        if low == prompt:
            return task
    if text in CARTOON_INSTRUCTIONS:
        return CARTOON_TASK
    return text


def instruction_list(instructions, input_name: str = "instruction") -> list[str]:
    """One instruction, a multiline string (one per line), or a list -> a non-empty list of instructions.
    None means the built-in cartoonization synonyms."""
    if instructions is None:
        return list(CARTOON_INSTRUCTIONS)
    if isinstance(instructions, str):
        items = instructions.splitlines()
    else:
        items = list(instructions)
    items = [str(i).strip() for i in items if str(i).strip()]
    if not items:
        raise TuneLabError("no instruction given; write one instruction, or several synonyms one per line",
                           input_name=input_name)
    return items


def load_image(source, name: str, input_name: str):
    """Open an image file (or bytes) fully and return it as RGB; a corrupt or non-image file gets a clear error."""
    import io

    from PIL import Image, ImageOps

    try:
        if isinstance(source, (bytes, bytearray)):
            im = Image.open(io.BytesIO(source))
        else:
            im = Image.open(source)
        with im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im.convert("RGBA"))
            return im.convert("RGB")
    except FileNotFoundError:
        raise TuneLabError(f"image not found: '{name}'", input_name=input_name) from None
    except Exception as e:  # PIL raises several types for truncated/unknown data
        raise TuneLabError(f"'{name}' is not a readable image ({type(e).__name__}: {e}); replace or remove it",
                           input_name=input_name) from None


def prepare(image, resolution: int = 0):
    """The preprocessing applied identically to both images of a pair: resize the shorter side to `resolution`
    (Lanczos; 0 keeps the size), then center-crop to multiples of 8."""
    from PIL import Image

    w, h = image.size
    if resolution:
        scale = resolution / min(w, h)
        nw, nh = max(8, round(w * scale)), max(8, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.Resampling.LANCZOS)
            w, h = nw, nh
    cw, ch = w - w % 8, h - h % 8
    if (cw, ch) != (w, h):
        left, top = (w - cw) // 2, (h - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
    return image


def prepare_pair(a, b, names: tuple, resolution: int):
    if a.size != b.size:
        raise TuneLabError(f"the pair '{names[0]}' ({a.size[0]}x{a.size[1]}) and '{names[1]}' ({b.size[0]}x"
                           f"{b.size[1]}) differ in size; an input and its edited image must have the same size",
                           input_name="pair")
    if min(a.size) < 8:
        raise TuneLabError(f"'{names[0]}' is {a.size[0]}x{a.size[1]}; pairs must be at least 8x8 pixels",
                           input_name="pair")
    return prepare(a, resolution), prepare(b, resolution)


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not (
            resolution == 0 or 8 <= resolution <= MAX_RESOLUTION):
        raise TuneLabError(f"{resolution!r} is out of range; use 0 (keep the size) or 8..{MAX_RESOLUTION}",
                           input_name="resolution")
    return resolution


def _check_limit(limit) -> int:
    if limit is None:
        return 0
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise TuneLabError(f"{limit!r} must be 0 (all) or a positive number of examples", input_name="limit")
    return limit


def _check_fraction(val_fraction) -> float:
    return check_number(val_fraction, "val_fraction", 0.0, 1.0, hi_open=True,
                        hint="the share of examples held out for validation; 0: none")


def list_images(folder, input_name: str) -> dict:
    """{stem: path} of the image files directly in `folder` (other files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TuneLabError(f"'{folder}' is not a folder", input_name=input_name)
    found: dict = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in found:
                raise TuneLabError(f"'{found[p.stem].name}' and '{p.name}' in '{folder.name}' share the name "
                                   f"'{p.stem}'; pairs are matched by name, so keep one", input_name=input_name)
            found[p.stem] = p
    if not found:
        raise TuneLabError(f"'{folder}' has no images ({', '.join(IMAGE_SUFFIXES)})", input_name=input_name)
    return found


# ---------------------------------------------------------------------------------------------------------------
# degradations (numpy float32 [H,W,3] in 0..1, one numpy Generator per example)


def _shift(a, dy: int, dx: int):
    import numpy as np

    out = np.zeros_like(a)
    h, w = a.shape[:2]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def _rain(x, rng) -> tuple:
    import numpy as np

    h, w = x.shape[:2]
    density = float(rng.uniform(0.002, 0.008))
    length = int(max(3, round(float(rng.uniform(0.05, 0.15)) * min(h, w))))
    angle = float(rng.uniform(-25.0, 25.0))  # degrees from vertical
    intensity = float(rng.uniform(0.5, 0.9))
    drops = (rng.random((h, w)) < density).astype(np.float32)
    streaks = np.zeros_like(drops)
    rad = np.deg2rad(angle)
    for k in range(length):
        streaks += _shift(drops, int(round(k * np.cos(rad))), int(round(k * np.sin(rad))))
    streaks = np.clip(streaks, 0.0, 1.0)[..., None] * intensity
    y = 1.0 - (1.0 - x) * (1.0 - streaks)  # screen blend: light streaks
    return y, {"density": density, "length": length, "angle": angle, "intensity": intensity}


def _gaussian_noise(x, rng) -> tuple:
    sigma = float(rng.uniform(0.02, 0.12))
    return x + rng.normal(0.0, sigma, x.shape).astype("float32"), {"sigma": sigma}


def _poisson_noise(x, rng) -> tuple:
    peak = float(rng.uniform(10.0, 60.0))  # photons at full brightness
    return rng.poisson(x * peak).astype("float32") / peak, {"peak": peak}


def _blur(x, rng) -> tuple:
    import numpy as np
    from PIL import Image, ImageFilter

    radius = float(rng.uniform(0.8, 2.5)) * max(1.0, min(x.shape[:2]) / 256.0)
    im = Image.fromarray(_to_uint8(x)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(im, dtype=np.float32) / 255.0, {"radius": radius}


def _low_light(x, rng) -> tuple:
    gamma = float(rng.uniform(1.5, 3.0))
    gain = float(rng.uniform(0.15, 0.45))
    sigma = float(rng.uniform(0.0, 0.02))
    y = gain * x ** gamma + rng.normal(0.0, sigma, x.shape).astype("float32")
    return y, {"gamma": gamma, "gain": gain, "sigma": sigma}


_DEGRADE: dict = {"rain": _rain, "gaussian_noise": _gaussian_noise, "poisson_noise": _poisson_noise,
                  "blur": _blur, "low_light": _low_light}


def _to_uint8(x):
    import numpy as np

    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def degrade(image, name: str, rng) -> tuple:
    """(degraded PIL image, params) for one clean PIL image; params include the noise model for "noise"."""
    import numpy as np
    from PIL import Image

    if name not in DEGRADATIONS:
        raise TuneLabError(f"unknown degradation '{name}'; choose from {', '.join(DEGRADATIONS)}",
                           input_name="degradations")
    params: dict = {}
    kind = name
    if name == "noise":
        kind = "gaussian_noise" if rng.random() < 0.5 else "poisson_noise"
        params["model"] = "gaussian" if kind == "gaussian_noise" else "poisson"
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    y, p = _DEGRADE[kind](x, rng)
    params.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in p.items()})
    return Image.fromarray(_to_uint8(y)), params


# ---------------------------------------------------------------------------------------------------------------
# planning: every example is described (and its sources checked) before anything is written


@dataclass
class _Example:
    key: str  # stable identity, seeds the example's random stream
    name: str  # file stem in the output
    load: Callable  # () -> (input PIL, edited PIL, extra metadata), already preprocessed
    instruction: str
    task: str
    meta: dict = field(default_factory=dict)
    images: tuple = ()  # identities of the source images it uses (paths, or content hashes of embedded bytes)


SPLIT_RULE = "by-source-stratified/1"


def source_groups(examples: list) -> list:
    """Examples joined when they share a source image (union-find over `images`): [[example, ...], ...] in the
    order of their first example."""
    parent = list(range(len(examples)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict = {}
    for i, ex in enumerate(examples):
        for ident in ex.images or (ex.key,):
            j = owner.setdefault(ident, i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict = {}
    for i, ex in enumerate(examples):
        groups.setdefault(root(i), []).append(ex)
    return list(groups.values())


def assign_splits(examples: list, seed: int, val_fraction: float) -> tuple:
    """({example key: "train" | "validation"}, split report) by source group, stratified by task (module
    docstring). Refuses a split that cannot hold out anything: fewer than two groups."""
    if not val_fraction:
        return {}, None
    groups = source_groups(examples)
    if len(groups) < 2:
        raise TuneLabError(f"a validation split needs at least two source images, and every example here comes from "
                           f"one source group ({len(examples)} example(s)); add sources or set val_fraction to 0",
                           input_name="val_fraction")
    # a stable, seeded order of the groups: ties below are broken by it
    order = sorted(range(len(groups)), key=lambda g: example_seed(seed, "split\x00" + min(e.key for e in groups[g])))
    rank = {g: n for n, g in enumerate(order)}
    tasks_of = [{} for _ in groups]  # group -> {task: examples}
    task_count: dict = {}
    task_groups: dict = {}
    for g, members in enumerate(groups):
        for e in members:
            tasks_of[g][e.task] = tasks_of[g].get(e.task, 0) + 1
            task_count[e.task] = task_count.get(e.task, 0) + 1
            task_groups.setdefault(e.task, []).append(g)
    in_train = {t: len(gs) for t, gs in task_groups.items()}  # groups of each task still in train
    held = {t: 0 for t in task_count}  # examples of each task in validation
    val: list = []
    n_val = max(1, round(len(examples) * val_fraction))

    def take(g):
        val.append(g)
        for t, n in tasks_of[g].items():
            held[t] += n
            in_train[t] -= 1

    def free():  # groups that may still go to validation: train always keeps one
        chosen = set(val)
        return [g for g in order if g not in chosen] if len(val) < len(groups) - 1 else []

    def keeps_tasks(g):  # every task of g still has a group in train afterwards
        return all(in_train[t] > 1 for t in tasks_of[g])

    def gain(g):  # how far g brings its tasks towards the fraction (0..1 per example)
        return sum(n * min(1.0, max(0.0, val_fraction * task_count[t] - held[t]))
                   for t, n in tasks_of[g].items()) / len(groups[g])

    # 1. coverage: each task with two or more groups gets one in validation (rarest tasks first)
    for task in sorted(task_count, key=lambda t: (len(task_groups[t]), t)):
        if held[task] or len(task_groups[task]) < 2:
            continue
        options = [g for g in free() if task in tasks_of[g]]
        if options:
            take(max(options, key=lambda g: (keeps_tasks(g), -rank[g])))
    # 2. fill: prefer groups that leave every task in train, then those whose tasks are furthest below the
    # fraction, until the target count is reached
    while sum(len(groups[g]) for g in val) < n_val and free():
        take(max(free(), key=lambda g: (keeps_tasks(g), gain(g), -rank[g])))
    chosen = set(val)
    splits = {e.key: ("validation" if g in chosen else "train") for g, members in enumerate(groups) for e in members}
    report = {"rule": SPLIT_RULE, "val_fraction": val_fraction, "groups": len(groups),
              "validation_groups": len(chosen),
              "tasks": {t: {"train": task_count[t] - held[t], "validation": held[t]} for t in sorted(task_count)},
              "tasks_not_in_validation": sorted(t for t in task_count if not held[t])}
    return splits, report


def _write(examples: list, out_dir, *, settings: dict, seed: int, val_fraction: float, progress) -> dict:
    out = Path(out_dir)
    if not examples:
        raise TuneLabError("the dataset would be empty: no examples were found", input_name="source")
    splits, split_report = assign_splits(examples, seed, val_fraction)
    if splits:  # a dataset split by an older rule is rebuilt, not reused
        settings = {**settings, "split_rule": SPLIT_RULE}
    fingerprint = hashlib.sha256(json.dumps({"settings": settings, "keys": [e.key for e in examples]},
                                            sort_keys=True).encode("utf-8")).hexdigest()
    done = _finished(out, fingerprint)
    if done is not None:  # the same build is already complete: reuse it (nodes re-run after a restart)
        return {"folder": out, "examples": done["examples"], "tasks": done["tasks"], "metadata": out / METADATA,
                "info": done, "reused": True}
    _claim(out, fingerprint)
    rows = []
    with progress_mod.make(progress, len(examples), "instruction dataset") as bar:
        for i, ex in enumerate(examples):
            bar.check()
            in_rel, ed_rel = f"input/{i:05d}_{ex.name}.png", f"edited/{i:05d}_{ex.name}.png"
            a, b, extra = ex.load()
            for image, rel in ((a, in_rel), (b, ed_rel)):
                if not (out / rel).is_file():  # a resumed build keeps what it wrote (atomic, deterministic)
                    _save_png(image, out / rel)
            row = {"input_image" + FILE_NAME: in_rel, "edit_prompt": ex.instruction,
                   "edited_image" + FILE_NAME: ed_rel, "task": ex.task}
            if ex.key in splits:
                row["split"] = splits[ex.key]
            row.update({k: v for k, v in ex.meta.items() if not k.startswith("_")})
            row.update(extra)
            rows.append(row)
            bar.update(1)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows)
    tasks: dict = {}
    for r in rows:
        tasks[r["task"]] = tasks.get(r["task"], 0) + 1
    columns = dict(zip(COLUMN_ROLES, COLUMN_PRESETS["tunelab"]))
    columns.update(input=columns["input"] + FILE_NAME, edited=columns["edited"] + FILE_NAME)
    info = {"format": "tunelab-instruction-dataset", "format_version": FORMAT_VERSION, "columns": columns,
            "examples": len(rows), "tasks": tasks,
            "splits": {s: sum(1 for r in rows if r.get("split") == s) for s in ("train", "validation")}
            if splits else None, "fingerprint": fingerprint, **settings}
    if split_report is not None:
        split_report["sources"] = {s: sorted({str(r.get("source")) for r in rows if r.get("split") == s})
                                   for s in ("train", "validation")}
        info["split"] = split_report
    write_text_atomic(out / METADATA, text)
    write_text_atomic(out / INFO, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    (out / PARTIAL).unlink(missing_ok=True)
    return {"folder": out, "examples": len(rows), "tasks": tasks, "metadata": out / METADATA, "info": info,
            "reused": False}


def _save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _finished(out: Path, fingerprint: str) -> Optional[dict]:
    try:
        info = json.loads((out / INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("fingerprint") == fingerprint and (out / METADATA).is_file() and not (out / PARTIAL).exists():
        return info
    return None


def _claim(out: Path, fingerprint: str) -> None:
    """Start a build in `out`, or resume the same build; refuse a folder that holds anything else."""
    marker = out / PARTIAL
    if out.exists() and not out.is_dir():
        raise TuneLabError(f"'{out}' exists and is not a folder; choose another output name", input_name="output")
    if out.is_dir() and any(out.iterdir()):
        same = False
        if marker.is_file():
            try:
                same = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
            except ValueError:
                same = False
        if not same:
            raise TuneLabError(f"'{out}' is not empty; choose a new output name or delete that folder (a build "
                               "only resumes an interrupted run of the same settings)", input_name="output")
        return
    write_text_atomic(marker, json.dumps({"fingerprint": fingerprint}) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# the three builders


def from_folders(input_dir, target_dir, out_dir, *, instructions=None, task: Optional[str] = None, seed: int = 0,
                 resolution: int = 0, limit: int = 0, val_fraction: float = 0.0, progress=None) -> dict:
    """Pairs from two folders matched by file stem (`cat.jpg` <-> `cat.png`), one instruction per example chosen
    by seed from `instructions` (None: the 50 built-in cartoonization synonyms)."""
    resolution, limit, val_fraction = _check_resolution(resolution), _check_limit(limit), _check_fraction(val_fraction)
    seed = check_seed(seed)
    items = instruction_list(instructions)
    inputs = list_images(input_dir, "input_dir")
    targets = list_images(target_dir, "target_dir")
    missing = [inputs[s].name for s in inputs if s not in targets]
    if missing:
        raise TuneLabError(f"no target image in '{Path(target_dir).name}' for {_names(missing)}; pairs are matched "
                           "by file name: add the targets or remove those inputs", input_name="target_dir")
    extra = [targets[s].name for s in targets if s not in inputs]
    if extra:
        raise TuneLabError(f"no input image in '{Path(input_dir).name}' for {_names(extra)}; pairs are matched by "
                           "file name: add the inputs or remove those targets", input_name="input_dir")
    stems = sorted(inputs)
    if limit:
        stems = stems[:limit]
    examples = []
    for stem in stems:
        a_path, b_path = inputs[stem], targets[stem]
        names = (a_path.name, b_path.name)
        _load_pair(a_path, b_path, names, ("input_dir", "target_dir"))  # check every pair before writing any
        rng = _rng(seed, stem)
        instruction = items[int(rng.integers(len(items)))]

        def load(a_path=a_path, b_path=b_path, names=names):
            a, b = _load_pair(a_path, b_path, names, ("input_dir", "target_dir"))
            return prepare(a, resolution), prepare(b, resolution), {}

        examples.append(_Example(key=stem, name=_safe_stem(stem), load=load, instruction=instruction,
                                 task=task or task_of(instruction),
                                 meta={"source": a_path.name, "target_source": b_path.name},
                                 images=(_identity(a_path), _identity(b_path))))
    settings = {"kind": "folders", "seed": int(seed), "resolution": resolution, "limit": limit,
                "val_fraction": val_fraction, "instructions": items, "task": task,
                "sources": [Path(input_dir).name, Path(target_dir).name]}
    return _write(examples, out_dir, settings=settings, seed=seed, val_fraction=val_fraction, progress=progress)


def _load_pair(a_src, b_src, names: tuple, input_names: tuple):
    a = load_image(a_src, names[0], input_names[0])
    b = load_image(b_src, names[1], input_names[1])
    prepare_pair(a, b, names, 0)  # refuses mismatched sizes
    return a, b


def _identity(src) -> str:
    """What makes two examples share a source: the real path of a file, the hash of embedded image bytes."""
    if isinstance(src, (bytes, bytearray)):
        return "sha256:" + hashlib.sha256(src).hexdigest()
    return str(Path(src).resolve())


def _names(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(f"'{x}'" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def synthesize(clean_dir, out_dir, *, degradations: Sequence[str] = DEFAULT_DEGRADATIONS, seed: int = 0,
               resolution: int = 0, limit: int = 0, val_fraction: float = 0.0, progress=None) -> dict:
    """Low-level pairs from clean images: each clean image x each degradation; the degraded image is the input,
    the clean one the target, the instruction the task's fixed prompt. Parameters are drawn per example from its
    own seeded stream and recorded in the metadata (`degradation`, `params`, `example_seed`)."""
    resolution, limit, val_fraction = _check_resolution(resolution), _check_limit(limit), _check_fraction(val_fraction)
    seed = check_seed(seed)
    if isinstance(degradations, str):
        degradations = [d.strip() for d in degradations.split(",") if d.strip()]
    degradations = list(dict.fromkeys(degradations))
    if not degradations:
        raise TuneLabError(f"choose at least one degradation: {', '.join(DEGRADATIONS)}", input_name="degradations")
    for d in degradations:
        if d not in DEGRADATIONS:
            raise TuneLabError(f"unknown degradation '{d}'; choose from {', '.join(DEGRADATIONS)}",
                               input_name="degradations")
    clean = list_images(clean_dir, "clean_dir")
    examples = []
    for stem in sorted(clean):
        if limit and len(examples) >= limit:
            break
        path = clean[stem]
        size = load_image(path, path.name, "clean_dir").size  # check every image before writing any
        if min(size) < 8:
            raise TuneLabError(f"'{path.name}' is {size[0]}x{size[1]}; images must be at least 8x8",
                               input_name="clean_dir")
        for d in degradations:
            key = f"{stem}\x00{d}"

            def load(path=path, d=d, key=key):
                target = prepare(load_image(path, path.name, "clean_dir"), resolution)
                degraded, params = degrade(target, d, _rng(seed, key))
                return degraded, target, {"params": params}

            task = DEGRADATIONS[d]
            examples.append(_Example(key=key, name=f"{_safe_stem(stem, 32)}_{d}", load=load,
                                     instruction=TASK_PROMPTS[task], task=task,
                                     images=(_identity(path),),
                                     meta={"source": path.name, "degradation": d,
                                           "example_seed": example_seed(seed, key)}))
    if limit:
        examples = examples[:limit]
    settings = {"kind": "synthesize", "seed": int(seed), "resolution": resolution, "limit": limit,
                "val_fraction": val_fraction, "degradations": degradations, "prompts": TASK_PROMPTS,
                "sources": [Path(clean_dir).name]}
    return _write(examples, out_dir, settings=settings, seed=seed, val_fraction=val_fraction, progress=progress)


def resolve_columns(columns) -> dict:
    """A preset name, a {role: column} dict, or 'input=a,instruction=b,edited=c' -> {role: column}."""
    if columns is None:
        columns = "tunelab"
    if isinstance(columns, str):
        if columns in COLUMN_PRESETS:
            return dict(zip(COLUMN_ROLES, COLUMN_PRESETS[columns]))
        if "=" not in columns:
            raise TuneLabError(f"unknown column preset '{columns}'; choose {', '.join(COLUMN_PRESETS)} or map "
                               "them as input=COL,instruction=COL,edited=COL", input_name="columns")
        mapping = {}
        for part in columns.split(","):
            role, _, col = part.partition("=")
            mapping[role.strip()] = col.strip()
        columns = mapping
    mapping = dict(columns)
    unknown = [r for r in mapping if r not in COLUMN_ROLES]
    missing = [r for r in COLUMN_ROLES if not mapping.get(r)]
    if unknown or missing:
        raise TuneLabError(f"a column mapping needs exactly the roles {', '.join(COLUMN_ROLES)}"
                           + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                           + (f"; missing: {', '.join(missing)}" if missing else ""), input_name="columns")
    return {r: mapping[r] for r in COLUMN_ROLES}


def match_columns(mapping: dict, cols, where: str) -> dict:
    """{role: the table's column}: each mapped column as it is, or, for the images, its ImageFolder spelling
    `<column>_file_name`. A column that is missing is refused with the table's columns and a suggested mapping."""
    cols = list(cols)
    out = {}
    for role in COLUMN_ROLES:
        col = mapping[role]
        if col in cols:
            out[role] = col
        elif role != "instruction" and col + FILE_NAME in cols:
            out[role] = col + FILE_NAME
        else:
            raise TuneLabError(f"column '{col}' ({role}) is not in {where}; its columns are: {', '.join(cols) or 'none'}"
                               f". {suggest_columns(cols)}", input_name="columns")
    return out


def suggest_columns(cols) -> str:
    """A preset or a mapping that fits these columns, as advice for an error message."""
    cols = list(cols)
    plain = [c[: -len(FILE_NAME)] if c.endswith(FILE_NAME) else c for c in cols]
    for name, preset in COLUMN_PRESETS.items():
        if all(c in plain for c in preset):
            return f"Use the column preset '{name}' (--columns {name})"
    images = [c[: -len(FILE_NAME)] for c in cols if c.endswith(FILE_NAME)] or [c for c in cols if "image" in c]
    text = next((c for c in ("edit_prompt", "instruction", "edit", "prompt", "text", "caption") if c in cols), None)
    if len(images) >= 2 and text:
        return (f"Map them, e.g. --columns input={images[0]},instruction={text},edited={images[1]} "
                "(input image, instruction, edited image)")
    return "Map them as --columns input=COL,instruction=COL,edited=COL"


def read_table(path) -> tuple[list, list]:
    """(rows as dicts, column names) of a jsonl, csv or parquet file."""
    path = Path(path)
    if not path.is_file():
        raise TuneLabError(f"table not found: '{path}'", input_name="table")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise TuneLabError(f"'{path.name}' line {n} is not valid JSON ({e})", input_name="table") from None
                if not isinstance(row, dict):
                    raise TuneLabError(f"'{path.name}' line {n} is not a JSON object", input_name="table")
                rows.append(row)
        cols = list(dict.fromkeys(k for r in rows for k in r))
        return rows, cols
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            try:
                reader = csv.DictReader(f)
                rows = [dict(r) for r in reader]
                cols = list(reader.fieldnames or [])
            except csv.Error as e:
                raise TuneLabError(f"'{path.name}' is not a readable CSV file ({e})", input_name="table") from None
        return rows, cols
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TuneLabError("reading parquet needs pyarrow, which is not installed (pip install pyarrow); or "
                               "export the table as jsonl or csv", input_name="table") from None
        try:
            table = pq.read_table(str(path))
        except Exception as e:
            raise TuneLabError(f"'{path.name}' is not a readable parquet file ({e})", input_name="table") from None
        return table.to_pylist(), list(table.column_names)
    raise TuneLabError(f"'{path.name}': unsupported table type '{suffix}'; use .jsonl, .csv or .parquet",
                       input_name="table")


def _cell_image(cell, root: Path, column: str, row_no: int, table_name: str, root_label: str = "the image root"):
    """(image source, display name) of one image cell: a relative path inside `root` (`root_label` names it in
    messages), or a datasets-style {"bytes": ..., "path": ...} struct (parquet)."""
    where = f"row {row_no}, column '{column}'"
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"]), f"{table_name} {where}"
        cell = cell.get("path")
    if not isinstance(cell, str) or not cell.strip():
        raise TuneLabError(f"{table_name} {where}: no image path", input_name=column)
    # table contents are untrusted too: no escaping the root
    path = confined_path(root, cell.strip(), column, root_label=f"{root_label} ({root})",
                         where=f"{table_name} {where}")
    return path, cell.strip()


def from_table(table, out_dir, *, columns="tunelab", image_root=None, seed: int = 0, resolution: int = 0,
               limit: int = 0, val_fraction: float = 0.0, progress=None) -> dict:
    """Import a local table of (input image, instruction, edited image). Image paths are relative to
    `image_root` (default: the table's folder) and must stay inside it."""
    resolution, limit, val_fraction = _check_resolution(resolution), _check_limit(limit), _check_fraction(val_fraction)
    seed = check_seed(seed)
    mapping = resolve_columns(columns)
    table = Path(table)
    rows, cols = read_table(table)
    if not rows:
        raise TuneLabError(f"'{table.name}' has no rows", input_name="table")
    mapping = match_columns(mapping, cols, f"'{table.name}'")
    root = Path(image_root) if image_root else table.parent
    if limit:
        rows = rows[:limit]
    examples = []
    for n, row in enumerate(rows, 1):
        instruction = row.get(mapping["instruction"])
        if not isinstance(instruction, str) or not instruction.strip():
            raise TuneLabError(f"'{table.name}' row {n}, column '{mapping['instruction']}': the instruction is empty",
                               input_name=mapping["instruction"])
        label = "the image root" if image_root else "the table's folder"
        a_src, a_name = _cell_image(row.get(mapping["input"]), root, mapping["input"], n, table.name, label)
        b_src, b_name = _cell_image(row.get(mapping["edited"]), root, mapping["edited"], n, table.name, label)
        names, roles = (a_name, b_name), (mapping["input"], mapping["edited"])
        _load_pair(a_src, b_src, names, roles)  # check every pair before writing any

        def load(a_src=a_src, b_src=b_src, names=names, roles=roles):
            a, b = _load_pair(a_src, b_src, names, roles)
            return prepare(a, resolution), prepare(b, resolution), {}

        task = row.get("task") if isinstance(row.get("task"), str) and row.get("task").strip() else None
        source = a_name if not isinstance(a_src, bytes) else f"row {n}"
        examples.append(_Example(key=f"{n}\x00{a_name}", name=_safe_stem(a_name if not isinstance(a_src, bytes)
                                                                         else f"row{n}"), load=load,
                                 instruction=instruction.strip(), task=task or task_of(instruction),
                                 meta={"source": source}, images=(_identity(a_src), _identity(b_src))))
    settings = {"kind": "table", "seed": int(seed), "resolution": resolution, "limit": limit,
                "val_fraction": val_fraction, "columns": mapping, "sources": [table.name]}
    return _write(examples, out_dir, settings=settings, seed=seed, val_fraction=val_fraction, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# reading a dataset back (evaluation, training)


@dataclass(frozen=True)
class Pair:
    name: str
    input_path: Path
    instruction: str
    edited_path: Path
    task: str
    split: Optional[str] = None
    row: dict = field(default_factory=dict, compare=False)

    def images(self):
        """(input, edited) as PIL RGB images; refuses a pair whose sizes differ."""
        a = load_image(self.input_path, self.input_path.name, "input_image")
        b = load_image(self.edited_path, self.edited_path.name, "edited_image")
        if a.size != b.size:
            prepare_pair(a, b, (self.input_path.name, self.edited_path.name), 0)
        return a, b


def read(folder, *, columns="tunelab", split: Optional[str] = None) -> list[Pair]:
    """The pairs of a dataset folder (`metadata.jsonl`, columns mapped by a preset or a mapping). `split`
    keeps only rows whose `split` field equals it."""
    folder = Path(folder)
    meta = folder / METADATA
    if not meta.is_file():
        raise TuneLabError(f"'{folder}' is not an instruction dataset: {METADATA} is missing", input_name="dataset")
    mapping = resolve_columns(columns)
    rows, cols = read_table(meta)
    if not rows:
        raise TuneLabError(f"'{folder.name}/{METADATA}' has no rows", input_name="dataset")
    mapping = match_columns(mapping, cols, f"'{folder.name}/{METADATA}'")
    pairs = []
    for n, row in enumerate(rows, 1):
        for role in COLUMN_ROLES:
            if row.get(mapping[role]) in (None, ""):
                raise TuneLabError(f"'{folder.name}/{METADATA}' row {n} has no column '{mapping[role]}' ({role}); "
                                   f"its columns are: {', '.join(row)}", input_name="columns")
        a, _ = _cell_image(row[mapping["input"]], folder, mapping["input"], n, METADATA, "the dataset folder")
        b, _ = _cell_image(row[mapping["edited"]], folder, mapping["edited"], n, METADATA, "the dataset folder")
        if isinstance(a, bytes) or isinstance(b, bytes):
            raise TuneLabError(f"row {n}: embedded image bytes are not read here; import the table with from_table",
                               input_name="dataset")
        instruction = str(row[mapping["instruction"]]).strip()
        task = row.get("task") if isinstance(row.get("task"), str) and row.get("task") else task_of(instruction)
        pairs.append(Pair(name=_safe_stem(a.name, 60), input_path=a, instruction=instruction,
                          edited_path=b, task=task, split=row.get("split"), row=row))
    if len({p.name for p in pairs}) < len(pairs):  # names must be unique: they name the evaluation's folders
        pairs = [replace(p, name=f"{n:05d}_{p.name}") for n, p in enumerate(pairs)]
    if split is not None:
        pairs = [p for p in pairs if p.split == split]
    return pairs


def held_out(folder, *, columns="tunelab") -> list[Pair]:
    """The pairs to evaluate on: the 'validation' (or 'test') split when the dataset has one, else every pair."""
    pairs = read(folder, columns=columns)
    for split in ("test", "validation"):
        chosen = [p for p in pairs if p.split == split]
        if chosen:
            return chosen
    return pairs


def preview(result_or_folder, count: int = 4):
    """A grid of the first `count` pairs (input | edited per row) as a PIL image, for the node's preview."""
    from . import images as images_mod

    folder = result_or_folder["folder"] if isinstance(result_or_folder, dict) else result_or_folder
    pairs = read(folder)[:max(1, count)]
    panels, labels = [], []
    size = None
    for p in pairs:
        a, b = p.images()
        size = size or a.size
        panels += [a.resize(size), b.resize(size)]
        labels += [p.instruction, "edited"]
    return images_mod.labelled_grid(panels, labels, columns=2)
