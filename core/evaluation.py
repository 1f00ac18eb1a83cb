"""Scored comparisons: every (prompt, seed, state) image generated, scored with CLIP score and PickScore, and
summarized with paired statistics (`core.statistics`) in a report a user can paste into a post.

A job is a *plan* of cells in a fixed order (for prompt: for seed: for state), so any cell can be made alone, by
any process. Folder:

    plan.json              the job's settings and cells, with a fingerprint; a different job there is refused
    cells/00000.png ...    one image per cell, written to a temporary name and renamed into place
    cells/00000.json       that cell's record (prompt, seed, state, scores), written after its PNG
    report.json            settings, statistics and one row per image     } written by whichever run completes
    report.csv             one row per image                              } the plan (or `merge`), each
    report.md              the tables: mean per state [95% CI], win rates } atomically
    scores.png             per-state means with their intervals, one panel per score
    grids/prompt_000.png   one grid per prompt: a row per seed, a column per state

Resuming and crashes. A cell counts as done when its PNG is complete and its record matches the plan; a rerun
skips done cells, rescores a complete PNG whose record is missing (a kill between the two writes) and makes the
rest. Scores are computed on the saved 8-bit image, one image at a time, so a resumed run reports exactly what an
uninterrupted one does. Temporary files of a killed writer are removed by its shard's next run.

Scaling out. `shard=(i, n)` makes only the cells with `index % n == i`: several processes (`accelerate launch -m
tunelab evaluate ...`, which sets the shard from the process index) or several ComfyUI servers (the node's
`shard` input, swept with the queue client) share one folder, and whichever finishes last finds the plan complete
and writes the report. Folders filled on separate machines are copied together and finished with `merge`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from . import progress as progress_mod
from . import statistics
from .errors import TuneLabError
from .files import remove_temps, write_text_atomic

FORMAT = "tunelab-evaluation/1"
PLAN_FILE = "plan.json"
CELLS_DIR = "cells"
REPORT_FILES = ("report.json", "report.csv", "report.md", "scores.png")
MAX_PROMPTS = 1000
MAX_SEEDS = 1000
MAX_CELLS = 100_000
GRID_MIN_PANEL = 320  # pixels
SEED_LIMIT = 1 << 64

METRICS = {"clip_score": "CLIP score", "pickscore": "PickScore"}
SCORER_KINDS = {"clip_score": "clip", "pickscore": "pickscore"}

# The wrong-LoRA article's own prompts (Max Woolf, "I Made Stable Diffusion XL Smarter by Finetuning it on Bad
# AI-Generated Images", 2023). The stored copy of the article is a Japanese translation: the first prompt is the
# notebooks' verbatim, the others are rendered back into English from the translation (weights as printed), so
# their wording may differ slightly from the original post. Then prompts that probe the failures the "wrong" images were made of
# (hands, text, faces, anatomy, clutter) in the article's style.
WOOLF_PROMPTS = (
    "hyperrealistic death metal album cover featuring edgy moody realistic (human Super Mario)++, edgy and moody",
    "A wolf in Yosemite National Park, chilly nature documentary film photography",
    "An extreme close-up of a wolf in Yosemite National Park, chilly nature documentary film photography",
    "a landscape of San Francisco by Salvador Dali, (oil on canvas)+++",
    "a large delicious hamburger (in the shape of five-dimensional alien geometry)++++, professional food photography",
    "President Taylor Swift (signing papers)++++, photo taken by the Associated Press",
    "realistic human Shrek blogging at a computer workstation, hyperrealistic award-winning photo for vanity fair",
    "pepperoni pizza in the shape of a heart, hyperrealistic award-winning professional food photography",
    "an astronaut riding a horse",
)
PROBE_PROMPTS = (
    "portrait photo of an elderly fisherman mending a net with both hands, golden hour, 85mm",
    "a hand holding a glass of water against a window, studio photography, sharp focus",
    "a neon storefront sign that reads OPEN on a rainy night street, street photography",
    "two cats sitting side by side on a windowsill, soft morning light",
    "a violinist performing on stage, dramatic lighting, concert photography",
    "an isometric illustration of a cozy library with a fireplace",
    "a bowl of ramen with a soft-boiled egg, overhead food photography",
    "a red vintage car parked in a narrow Tokyo alley at dusk",
    "a watercolor painting of a lighthouse on a cliff during a storm",
    "a group of friends laughing around a campfire, candid photo",
    "a futuristic city skyline at sunset, highly detailed concept art",
)
PROMPT_SETS = {"woolf": WOOLF_PROMPTS, "woolf-20": WOOLF_PROMPTS + PROBE_PROMPTS}
DEFAULT_PROMPT_SET = "woolf"
DEFAULT_SEEDS = (0, 1, 2, 3)


# ---------------------------------------------------------------------------------------------------------------
# inputs


def read_prompt_file(path, input_name: str = "prompts") -> list:
    """A text file, one prompt per line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TuneLabError(f"cannot read the prompt file {p}: {e}", input_name=input_name) from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def parse_prompts(value, input_name: str = "prompts") -> list:
    """A built-in set name ('woolf', 'woolf-20'), a path to a .txt file, multi-line text or a list -> prompts,
    each checked for compel syntax now (not at cell 300)."""
    from .prompt import check

    if isinstance(value, (list, tuple)):
        prompts = [str(v).strip() for v in value if str(v).strip()]
    elif isinstance(value, str) and value.strip() in PROMPT_SETS:
        prompts = list(PROMPT_SETS[value.strip()])
    elif isinstance(value, str) and "\n" not in value.strip() and value.strip().lower().endswith(".txt"):
        prompts = read_prompt_file(value.strip(), input_name)
    else:
        prompts = [line.strip() for line in str(value or "").splitlines()
                   if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise TuneLabError(f"no prompts; give a built-in set ({', '.join(PROMPT_SETS)}), a .txt file with one "
                           "prompt per line, or prompts one per line", input_name=input_name)
    if len(prompts) > MAX_PROMPTS:
        raise TuneLabError(f"{len(prompts)} prompts is over the limit of {MAX_PROMPTS}", input_name=input_name)
    dup = sorted({p for p in prompts if prompts.count(p) > 1})
    if dup:
        raise TuneLabError(f"prompt listed twice: '{dup[0]}'; the seeds already repeat each prompt",
                           input_name=input_name)
    for p in prompts:
        check(p, input_name=input_name)
    return prompts


def parse_seeds(value, input_name: str = "seeds") -> list:
    """"0,1,2,3" / "0 1 2 3" / [0, 1] -> distinct seeds in order; "4x" or "x4" is not accepted, write them out."""
    parts = re.split(r"[,\s;]+", value.strip()) if isinstance(value, str) else list(value or ())
    seeds = []
    for p in parts:
        if p == "":
            continue
        try:
            s = int(p)
        except (TypeError, ValueError):
            raise TuneLabError(f"'{p}' is not a seed; give whole numbers like 0,1,2,3", input_name=input_name) from None
        if isinstance(p, bool) or not 0 <= s < SEED_LIMIT:
            raise TuneLabError(f"{p} is out of range; seeds are 0..2^64-1", input_name=input_name)
        seeds.append(s)
    if not seeds:
        raise TuneLabError("no seeds; give at least one, e.g. 0,1,2,3", input_name=input_name)
    if len(set(seeds)) < len(seeds):
        raise TuneLabError("a seed is listed twice; each (prompt, seed) is one paired unit", input_name=input_name)
    if len(seeds) > MAX_SEEDS:
        raise TuneLabError(f"{len(seeds)} seeds is over the limit of {MAX_SEEDS}", input_name=input_name)
    return seeds


def parse_shard(value) -> tuple:
    from .synthesis import parse_shard as parse

    return parse(value)


# ---------------------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Cell:
    index: int
    prompt_index: int
    seed_index: int
    state_index: int
    prompt: str
    seed: int
    state: str  # label

    @property
    def stem(self) -> str:
        return f"{self.index:05d}"


def build_cells(prompts: Sequence[str], seeds: Sequence[int], labels: Sequence[str]) -> list:
    cells = []
    for p, prompt in enumerate(prompts):
        for s, seed in enumerate(seeds):
            for k, label in enumerate(labels):
                cells.append(Cell(len(cells), p, s, k, prompt, int(seed), label))
    return cells


def state_identity(state) -> dict:
    from .synthesis import model_identity

    return {"label": state.label, "negative": state.negative, "lora_on": state.lora_on,
            **model_identity(state.handle)}


def job_settings(states, prompts, seeds, *, steps, guidance, width, height, refiner, high_noise_frac, scheduler,
                 refiner_mode, scorers: dict) -> dict:
    from .synthesis import model_identity

    return {"prompts": list(prompts), "seeds": [int(s) for s in seeds],
            "states": [state_identity(s) for s in states], "steps": int(steps), "guidance": float(guidance),
            "width": int(width), "height": int(height), "scheduler": scheduler,
            "refiner": model_identity(refiner), "high_noise_frac": float(high_noise_frac) if refiner else None,
            "refiner_mode": refiner_mode if refiner else None,
            "metrics": {m: scorers[m].identity for m in METRICS if m in scorers}}


def _cell_doc(c: Cell) -> dict:
    return {"index": c.index, "prompt_index": c.prompt_index, "seed": c.seed, "state": c.state}


def plan_document(settings: dict) -> dict:
    cells = build_cells(settings["prompts"], settings["seeds"], [s["label"] for s in settings["states"]])
    body = json.dumps({"format": FORMAT, "settings": settings}, sort_keys=True, separators=(",", ":"))
    return {"format": FORMAT, "fingerprint": hashlib.sha256(body.encode()).hexdigest(), "count": len(cells),
            "settings": settings}


def read_plan(folder, input_name: str = "out") -> Optional[dict]:
    p = Path(folder) / PLAN_FILE
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT or not isinstance(doc.get("settings"), dict):
            raise ValueError(f"not a {FORMAT} plan")
        return doc
    except (OSError, ValueError, AttributeError) as e:
        raise TuneLabError(f"{p} is unreadable ({e}); it is not a TuneLab evaluation. Use another folder, or "
                           "delete it to start over", input_name=input_name) from None


def cells_of(doc: dict) -> list:
    s = doc["settings"]
    return build_cells(s["prompts"], s["seeds"], [st["label"] for st in s["states"]])


def _prepare(folder: Path, doc: dict, input_name: str) -> None:
    """Refuse a foreign folder or a different job; write plan.json for a new one (nothing before the checks)."""
    if folder.exists() and not folder.is_dir():
        raise TuneLabError(f"{folder} is a file; give a folder for the evaluation", input_name=input_name)
    old = read_plan(folder, input_name) if folder.is_dir() else None
    if old is not None:
        if old.get("fingerprint") != doc["fingerprint"]:
            before, now = old.get("settings") or {}, doc["settings"]
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)) or ["settings"]
            raise TuneLabError(f"{folder} holds an evaluation with other settings (changed: {', '.join(changed)}); "
                               "an evaluation is never mixed from two jobs: use another folder, or rerun with the "
                               "settings in its plan.json", input_name=input_name)
        return
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        if foreign:
            raise TuneLabError(f"{folder} is not empty ({', '.join(foreign[:5])}) and has no {PLAN_FILE}, so it is "
                               "not a TuneLab evaluation; use an empty or new folder", input_name=input_name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TuneLabError(f"cannot create the folder {folder}: {e}", input_name=input_name) from None
    write_text_atomic(folder / PLAN_FILE, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    if read_plan(folder, input_name).get("fingerprint") != doc["fingerprint"]:  # lost a race with another job
        raise TuneLabError(f"{folder} was claimed by another evaluation while starting; use another folder",
                           input_name=input_name)


# ---------------------------------------------------------------------------------------------------------------
# cells on disk


def cell_paths(folder: Path, cell: Cell) -> tuple:
    return folder / CELLS_DIR / f"{cell.stem}.png", folder / CELLS_DIR / f"{cell.stem}.json"


def read_record(folder: Path, cell: Cell, metrics: Sequence[str], width: int, height: int) -> Optional[dict]:
    """The cell's record when the cell is complete (PNG whole and of the planned size, record matching the plan
    with every score finite), else None."""
    from .synthesis import png_complete

    png, rec = cell_paths(folder, cell)
    if not rec.is_file() or not png_complete(png, width, height):
        return None
    try:
        record = json.loads(rec.read_text(encoding="utf-8"))
        scores = record["scores"]
        ok = ({k: record.get(k) for k in ("index", "prompt_index", "seed", "state")} == _cell_doc(cell)
              and sorted(scores) == sorted(metrics)
              and all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record if ok else None


def _remove_temps(folder: Path, owns) -> list:
    return remove_temps((folder, folder / CELLS_DIR, folder / "grids"), owns)


def _owner(shard: tuple):
    i, n = shard

    def owns(final_name: str) -> bool:
        m = re.fullmatch(r"(\d+)\.(?:png|json)", final_name)
        if m:
            return int(m.group(1)) % n == i
        return n == 1  # reports and grids: only an unsharded run may clean them up

    return owns


# ---------------------------------------------------------------------------------------------------------------
# the job


@dataclass
class Report:
    folder: Path
    count: int
    shard: tuple = (0, 1)
    generated: list = field(default_factory=list)  # cells made by this call
    rescored: list = field(default_factory=list)  # complete PNGs whose record was missing
    skipped: list = field(default_factory=list)  # cells of this shard already done
    removed: list = field(default_factory=list)  # temporaries of a killed run
    missing: list = field(default_factory=list)  # cells of the whole plan not done yet
    result: Optional["Result"] = None  # the report, when the plan is complete

    @property
    def complete(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        i, n = self.shard
        who = "" if n == 1 else f"shard {i}/{n}: "
        text = (f"{who}{len(self.generated)} image(s) generated and scored, {len(self.skipped)} already done"
                + (f", {len(self.rescored)} rescored" if self.rescored else "")
                + (f", {len(self.removed)} temporary file(s) removed" if self.removed else ""))
        if self.complete:
            return text + f"; evaluation complete: {self.count} images, report in {self.folder}"
        return text + f"; {len(self.missing)} of {self.count} cells still to make (other shards), then the report"


def check_scorers(scorers: dict) -> dict:
    chosen = {m: s for m, s in (scorers or {}).items() if s is not None}
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise TuneLabError(f"give at least one scorer of {', '.join(METRICS)}" +
                           (f" (unknown: {', '.join(unknown)})" if unknown else ""), input_name="scorers")
    for m, s in chosen.items():
        if getattr(s, "kind", None) != SCORER_KINDS[m]:
            raise TuneLabError(f"the {METRICS[m]} needs a '{SCORER_KINDS[m]}' scorer, got "
                               f"'{getattr(s, 'kind', type(s).__name__)}'", input_name=f"{m}_model")
    return {m: chosen[m] for m in METRICS if m in chosen}


def run(folder, states, prompts, seeds, *, scorers: dict, steps: int, guidance: float, width: int, height: int,
        refiner=None, high_noise_frac: float = 0.8, scheduler: str = "default", refiner_mode: str = "plain",
        shard=(0, 1), resamples: int = statistics.DEFAULT_RESAMPLES, stats_seed: int = 0, progress=None,
        made_by: Optional[str] = None, input_name: str = "out") -> Report:
    """Make this shard's missing cells of the job in `folder` (see the module docstring), then, if the plan is
    complete, write the report. Every check that can fail runs before anything is written."""
    from . import compare, images as images_mod
    from .sampling import check_size, check_steps, progress_total

    folder = Path(folder)
    states = list(states)
    compare.check_states(states, refiner, refiner_mode)
    labels = [s.label for s in states]
    dup = sorted({l for l in labels if labels.count(l) > 1})
    if dup:
        raise TuneLabError(f"two states are labelled '{dup[0]}'; labels name the report's rows, give each its own",
                           input_name="states")
    prompts = parse_prompts(prompts)
    seeds = parse_seeds(seeds)
    check_size(width, height)
    check_steps(steps)
    statistics.check_resamples(resamples)
    shard = parse_shard(shard)
    scorers = check_scorers(scorers)
    if refiner is not None and not 0.0 < high_noise_frac < 1.0:
        raise TuneLabError(f"{high_noise_frac} must be between 0 and 1 (exclusive)", input_name="high_noise_frac")
    count = len(prompts) * len(seeds) * len(states)
    if count > MAX_CELLS:
        raise TuneLabError(f"{count} images is over the limit of {MAX_CELLS}; use fewer prompts, seeds or states",
                           input_name="prompts")
    settings = job_settings(states, prompts, seeds, steps=steps, guidance=guidance, width=width, height=height,
                            refiner=refiner, high_noise_frac=high_noise_frac, scheduler=scheduler,
                            refiner_mode=refiner_mode, scorers=scorers)
    doc = plan_document(settings)
    _prepare(folder, doc, input_name)
    (folder / CELLS_DIR).mkdir(exist_ok=True)

    i, n = shard
    report = Report(folder=folder, count=count, shard=shard)
    report.removed = _remove_temps(folder, _owner(shard))
    metrics = list(scorers)
    cells = cells_of(doc)
    mine = [c for c in cells if c.index % n == i]
    todo = []
    for c in mine:
        if read_record(folder, c, metrics, width, height) is not None:
            report.skipped.append(c.index)
        else:
            todo.append(c)
    per_cell = progress_total(steps, refiner is not None, high_noise_frac) + 1  # + scoring
    by_label = dict(zip(labels, states))
    made_by = made_by or f"{i}/{n}"
    with progress_mod.make(progress, max(1, len(todo) * per_cell), "evaluate") as bar:
        for c in todo:
            bar.check()  # a stop between cells leaves only whole files
            steps_bar = progress_mod.ItemSteps(bar, per_cell)
            png, rec = cell_paths(folder, c)
            from .synthesis import png_complete

            if png_complete(png, width, height):  # killed after the PNG, before its record: score it again
                from PIL import Image

                with Image.open(png) as im:
                    image = im.convert("RGB")
                report.rescored.append(c.index)
            else:
                tensor = compare.generate_state(by_label[c.state], c.prompt, seed=c.seed, steps=steps,
                                                guidance=guidance, width=width, height=height, refiner=refiner,
                                                high_noise_frac=high_noise_frac, scheduler=scheduler,
                                                refiner_mode=refiner_mode, progress=steps_bar)
                image = images_mod.tensor_to_pil(tensor)[0]
                images_mod.save_png(image, png, {"tunelab": json.dumps({**_cell_doc(c), "prompt": c.prompt})})
                report.generated.append(c.index)
            scores = {m: float(scorers[m].score(image, c.prompt)) for m in metrics}
            record = {**_cell_doc(c), "prompt": c.prompt, "file": f"{CELLS_DIR}/{png.name}", "scores": scores,
                      "made_by": made_by}
            write_text_atomic(rec, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
            steps_bar.finish(f"{c.stem}: " + ", ".join(f"{METRICS[m]} {v:.3f}" for m, v in scores.items()))

    report.missing = missing_cells(folder, doc)
    if not report.missing:
        report.result = write_report(folder, doc, resamples=resamples, stats_seed=stats_seed)
    return report


def missing_cells(folder: Path, doc: dict) -> list:
    s = doc["settings"]
    metrics = list(s["metrics"])
    return [c.index for c in cells_of(doc) if read_record(folder, c, metrics, s["width"], s["height"]) is None]


# ---------------------------------------------------------------------------------------------------------------
# the report


@dataclass
class Result:
    document: dict  # report.json's content
    table: str  # report.md
    plot: object  # PIL image (scores.png)
    grids: list  # (prompt index, PIL grid)
    paths: dict


def summarize(doc: dict, records: dict, *, resamples: int, stats_seed: int) -> dict:
    """report.json's content from the plan and every cell's record (index -> record)."""
    from .compare import versions

    s = doc["settings"]
    labels = [st["label"] for st in s["states"]]
    metrics = list(s["metrics"])
    cells = cells_of(doc)
    rows = [{"index": c.index, "prompt_index": c.prompt_index, "prompt": c.prompt, "seed": c.seed,
             "state": c.state, "file": records[c.index]["file"],
             **{m: records[c.index]["scores"][m] for m in metrics}} for c in cells]
    summary = {}
    for m in metrics:
        per_state = {label: [r[m] for r in rows if r["state"] == label] for label in labels}  # unit order
        summary[m] = statistics.summarize(per_state, resamples=resamples, seed=stats_seed)
    return {"format": FORMAT, "fingerprint": doc["fingerprint"], "settings": s,
            "statistics": {"unit": "(prompt, seed)", "resamples": int(resamples), "seed": int(stats_seed),
                           "level": statistics.DEFAULT_LEVEL, "interval": "percentile bootstrap over units",
                           "ties": "count one half"},
            "summary": summary, "rows": rows, "versions": versions()}


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def format_markdown(report: dict) -> str:
    s = report["settings"]
    metrics = list(s["metrics"])
    labels = [st["label"] for st in s["states"]]
    units = len(s["prompts"]) * len(s["seeds"])
    lines = [f"**{len(s['prompts'])} prompts × {len(s['seeds'])} seeds × {len(labels)} states = "
             f"{units * len(labels)} images**, {s['steps']} steps, guidance {s['guidance']:g}, "
             f"{s['width']}×{s['height']}" + (f", refiner from {s['high_noise_frac']:g} ({s['refiner_mode']})"
                                               if s.get("refiner") else "") +
             f"; mean per state with 95% bootstrap intervals over the {units} (prompt, seed) pairs "
             f"({report['statistics']['resamples']} resamples, seed {report['statistics']['seed']}).", ""]
    lines.append("| state | " + " | ".join(f"{METRICS[m]} [95% CI]" for m in metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    for label in labels:
        cells = []
        for m in metrics:
            st = report["summary"][m]["states"][label]
            cells.append(f"{st['mean']:.3f} [{st['low']:.3f}, {st['high']:.3f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Win rate of the first state over the second (ties count half), 95% interval, sign-test p:", ""]
    lines.append("| comparison | " + " | ".join(METRICS[m] for m in metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    pairs = report["summary"][metrics[0]]["pairs"]
    for k, pair in enumerate(pairs):
        cells = []
        for m in metrics:
            p = report["summary"][m]["pairs"][k]
            cells.append(f"{_pct(p['win_rate'])} [{_pct(p['low'])}, {_pct(p['high'])}] "
                         f"({p['wins']}-{p['ties']}-{p['losses']}, p={p['sign_test_p']:.3g})")
        lines.append(f"| {pair['a']} vs {pair['b']} | " + " | ".join(cells) + " |")
    models = sorted({str(st.get("model")) for st in s["states"]})
    scorer_names = ", ".join(f"{METRICS[m]}: {s['metrics'][m]['model']}" for m in metrics)
    lines += ["", f"Model: {', '.join(models)}. Scorers: {scorer_names}. W-T-L = wins-ties-losses.", ""]
    return "\n".join(lines)


def plot(report: dict):
    from .plots import interval_chart

    s = report["settings"]
    labels = [st["label"] for st in s["states"]]
    panels = []
    for m in s["metrics"]:
        st = report["summary"][m]["states"]
        panels.append({"title": f"{METRICS[m]} (mean, 95% CI)", "labels": labels,
                       "means": [st[l]["mean"] for l in labels], "lows": [st[l]["low"] for l in labels],
                       "highs": [st[l]["high"] for l in labels]})
    n_units = len(s["prompts"]) * len(s["seeds"])
    return interval_chart(panels, title=f"{len(s['prompts'])} prompts x {len(s['seeds'])} seeds ({n_units} paired "
                                        "units)")


def prompt_grids(folder: Path, report: dict) -> list:
    """(prompt index, grid): a row per seed, a column per state, each panel labelled with its scores."""
    from PIL import Image

    from .images import labelled_grid

    s = report["settings"]
    labels = [st["label"] for st in s["states"]]
    metrics = list(s["metrics"])
    short = {"clip_score": "CLIP", "pickscore": "Pick"}
    grids = []
    for p, prompt in enumerate(s["prompts"]):
        rows = [r for r in report["rows"] if r["prompt_index"] == p]
        panels, names = [], []
        for r in rows:
            with Image.open(folder / r["file"]) as im:
                panel = im.convert("RGB")
            if panel.width < GRID_MIN_PANEL:  # small (tiny-model) panels: enlarged so their labels can be read
                factor = -(-GRID_MIN_PANEL // panel.width)
                panel = panel.resize((panel.width * factor, panel.height * factor), Image.NEAREST)
            panels.append(panel)
            scores = " · ".join(f"{short[m]} {r[m]:.2f}" for m in metrics)
            names.append(f"{r['state']} · {scores} · seed {r['seed']}")
        grids.append((p, labelled_grid(panels, names, columns=len(labels), caption=prompt)))
    return grids


def write_report(folder, doc: Optional[dict] = None, *, resamples: int = statistics.DEFAULT_RESAMPLES,
                 stats_seed: int = 0, input_name: str = "out") -> Result:
    """Verify that every cell is done and write report.json, report.csv, report.md, scores.png and the grids
    (each atomically). Refuses an incomplete plan and writes nothing then."""
    from . import images as images_mod

    folder = Path(folder)
    doc = doc or read_plan(folder, input_name)
    if doc is None:
        raise TuneLabError(f"{folder} has no {PLAN_FILE}; it is not a TuneLab evaluation", input_name=input_name)
    statistics.check_resamples(resamples)
    s = doc["settings"]
    metrics = list(s["metrics"])
    records, missing = {}, []
    for c in cells_of(doc):
        r = read_record(folder, c, metrics, s["width"], s["height"])
        if r is None:
            missing.append(c.index)
        else:
            records[c.index] = r
    if missing:
        shown = ", ".join(f"{i:05d}" for i in missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise TuneLabError(f"the evaluation in {folder} is incomplete: {len(missing)} of {doc['count']} cells are "
                           f"missing or damaged ({shown}). Rerun it with the same settings (every shard) and merge "
                           "again; nothing was written", input_name=input_name)
    report = summarize(doc, records, resamples=resamples, stats_seed=stats_seed)
    table = format_markdown(report)
    chart = plot(report)
    grids = prompt_grids(folder, report)
    paths = {"json": folder / "report.json", "csv": folder / "report.csv", "markdown": folder / "report.md",
             "plot": folder / "scores.png", "grids": []}
    write_text_atomic(paths["json"], json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "prompt_index", "seed", "state", *metrics, "file", "prompt"])
    for r in report["rows"]:
        w.writerow([r["index"], r["prompt_index"], r["seed"], r["state"], *[repr(r[m]) for m in metrics], r["file"],
                    r["prompt"]])
    write_text_atomic(paths["csv"], buf.getvalue())
    write_text_atomic(paths["markdown"], table)
    images_mod.save_png(chart, paths["plot"])
    for p, grid in grids:
        paths["grids"].append(images_mod.save_png(grid, folder / "grids" / f"prompt_{p:03d}.png"))
    return Result(document=report, table=table, plot=chart, grids=grids, paths=paths)


def merge(folder, *, resamples: int = statistics.DEFAULT_RESAMPLES, stats_seed: int = 0,
          input_name: str = "out") -> Result:
    """Write the report of a complete evaluation folder (cells made by other processes, servers or machines)."""
    folder = Path(folder)
    doc = read_plan(folder, input_name)
    if doc is None:
        raise TuneLabError(f"{folder} has no {PLAN_FILE}; it is not a TuneLab evaluation", input_name=input_name)
    _remove_temps(folder, lambda name: not re.fullmatch(r"\d+\.(?:png|json)", name))
    return write_report(folder, doc, resamples=resamples, stats_seed=stats_seed, input_name=input_name)


def shard_images(folder, shard=(0, 1)) -> list:
    """This shard's finished cell PNGs, in plan order (a node's preview while other shards are still running)."""
    doc = read_plan(folder)
    if doc is None:
        return []
    i, n = parse_shard(shard)
    s = doc["settings"]
    return [cell_paths(Path(folder), c)[0] for c in cells_of(doc)
            if c.index % n == i and read_record(Path(folder), c, list(s["metrics"]), s["width"], s["height"])]
