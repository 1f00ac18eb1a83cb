"""Synthesis of the "wrong" dataset: a resumable, shardable generator of training images.

The seed (`wrong_image_generator.ipynb`) loops `for keyword: for cfg:` and boosts one keyword per prompt with
`", ".join(keywords).replace(keyword, f"({keyword})++++")`, no negative prompt, 13 keywords x 6 guidance values =
78 images. Here that loop becomes a *plan*: a list of entries (index, prompt, keyword, subject, guidance, seed), each
image with its own seed derived from the base seed and its index, so any image can be regenerated alone.

Dataset folder (the diffusers/datasets ImageFolder convention):

    plan.json        the plan's settings, entries and fingerprint; a different plan in this folder is refused
    00000.png ...    one PNG per entry, written to a temporary name and renamed into place
    metadata.jsonl   one line per image: file_name, text (the instance prompt), prompt, keyword, guidance, seed, ...

Concurrency and crashes. A metadata line is appended only after its PNG is complete, with one `os.write` on an
`O_APPEND` descriptor, so lines from several writers never interleave. Each shard `I/N` (N > 1) appends to its own
hidden file `.tunelab/metadata-I-of-N.jsonl`, so shards never rewrite a file another process appends to; an
unsharded run appends to `metadata.jsonl` itself. Every line is a pure function of the plan entry, so a lost or
duplicate line is harmless: a rerun repairs the missing line of a complete PNG and drops duplicates, and `merge`
(run automatically by whichever run completes the plan) writes a sorted, de-duplicated `metadata.jsonl` atomically.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from . import progress as progress_mod
from .checks import number_list
from .errors import TuneLabError
from .files import remove_temps, write_text_atomic

DEFAULT_KEYWORDS = ("low quality", "bad hands", "random text", "error", "missing or extra fingers", "cropped",
                    "jpeg artifacts", "signature", "watermark", "blurry", "ugly", "duplicate", "mutilated")
DEFAULT_BOOST = "++++"
# `{keywords}` is the seed's prompt: all keywords joined, the current one boosted (str.replace on the joined text).
DEFAULT_TEMPLATE = "{keywords}"
DEFAULT_GUIDANCE = (8.0, 9.0, 10.0, 11.0, 12.0, 13.0)
DEFAULT_INSTANCE_PROMPT = "wrong"

PLAN_FILE = "plan.json"
METADATA_FILE = "metadata.jsonl"
PARTS_DIR = ".tunelab"
FORMAT = "tunelab-synthesis/1"

MAX_ENTRIES = 100_000
MAX_PER_ENTRY = 1000
MAX_GUIDANCE = 50.0
SEED_RANGE = 1 << 32  # per-image seeds, small enough for every JSON reader (the notebooks used up to 10**8)

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDERS = ("keyword", "keywords", "subject")
_BOOST = re.compile(r"^(?:\++|-+|\d+(?:\.\d+)?)?$")


# ---------------------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Entry:
    index: int
    prompt: str
    keyword: str
    subject: str
    guidance: float
    seed: int
    repeat: int = 0  # 0..per_entry-1

    @property
    def file_name(self) -> str:
        return f"{self.index:05d}.png"


@dataclass(frozen=True)
class Plan:
    entries: tuple
    keywords: tuple
    boost: str
    template: str
    subjects: tuple
    guidance: tuple
    per_entry: int
    seed: int

    def __len__(self) -> int:
        return len(self.entries)

    def settings(self) -> dict:
        return {"keywords": list(self.keywords), "boost": self.boost, "template": self.template,
                "subjects": list(self.subjects), "guidance": list(self.guidance), "per_entry": self.per_entry,
                "seed": self.seed}


def seed_prompt(keywords: Sequence[str], keyword: str, boost: str = DEFAULT_BOOST) -> str:
    """The seed notebook's prompt, reproduced exactly (str.replace boosts every occurrence in the joined text)."""
    return ", ".join(keywords).replace(keyword, f"({keyword}){boost}")


def render(template: str, keywords: Sequence[str], keyword: str, boost: str, subject: str = "") -> str:
    """Fill a template: {keywords} -> the seed's prompt, {keyword} -> "(keyword)boost", {subject} -> subject.
    One pass, so text inserted for one placeholder is never read as another."""
    values = {"keywords": seed_prompt(keywords, keyword, boost), "keyword": f"({keyword}){boost}", "subject": subject}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def image_seed(base_seed: int, index: int) -> int:
    """Per-image seed: a hash of the base seed and the plan index (stable across runs, shards and machines)."""
    digest = hashlib.sha256(f"tunelab-synthesis:{int(base_seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_RANGE


def parse_lines(text) -> list:
    """Multiline node input (or a list) -> stripped non-empty items."""
    items = text.splitlines() if isinstance(text, str) else list(text or ())
    return [str(s).strip() for s in items if str(s).strip()]


def parse_guidance(value) -> list:
    """"8,9,10" / "8 9 10" / [8, 9, 10] -> [8.0, 9.0, 10.0]."""
    out = number_list(value, "guidance", 0.0, MAX_GUIDANCE, example="8,9,10,11,12,13")
    if not out:
        raise TuneLabError("no guidance values; give at least one, e.g. 8,9,10,11,12,13", input_name="guidance")
    return out


def parse_shard(value) -> tuple:
    """"I/N" (0-based I) -> (I, N); None or "" -> (0, 1)."""
    if value in (None, ""):
        return 0, 1
    if isinstance(value, (tuple, list)):
        i, n = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
        if not m:
            raise TuneLabError(f"'{value}' is not a shard; write I/N with 0 <= I < N, e.g. 0/4", input_name="shard")
        i, n = int(m.group(1)), int(m.group(2))
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise TuneLabError(f"'{value}' is not a shard; write I/N with 0 <= I < N, e.g. 0/4", input_name="shard")
    return i, n


def build_plan(keywords=DEFAULT_KEYWORDS, *, boost: str = DEFAULT_BOOST, template: str = DEFAULT_TEMPLATE,
               subjects=(), guidance=DEFAULT_GUIDANCE, per_entry: int = 1, seed: int = 0) -> Plan:
    """The seed's loop as a list: for keyword: for subject: for guidance: for repeat. Refuses a plan that could
    not run (empty keywords, template without {keyword}, bad prompt syntax) before anything is written."""
    from .prompt import check

    kws = parse_lines(keywords)
    if not kws:
        raise TuneLabError("the keyword list is empty; give at least one keyword (one per line)",
                           input_name="keywords")
    dup = sorted({k for k in kws if kws.count(k) > 1})
    if dup:
        raise TuneLabError(f"keyword(s) listed twice: {', '.join(dup)}; each keyword makes its own prompts",
                           input_name="keywords")
    boost = "" if boost is None else str(boost).strip()
    if not _BOOST.match(boost):
        raise TuneLabError(f"'{boost}' is not a compel weight; use pluses (++++), minuses (--) or a number (1.5)",
                           input_name="boost")
    template = DEFAULT_TEMPLATE if template is None or not str(template).strip() else str(template).strip()
    names = _PLACEHOLDER.findall(template)
    unknown = sorted({n for n in names if n not in _PLACEHOLDERS})
    if unknown:
        raise TuneLabError(f"unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; the template "
                           "knows {keyword}, {keywords} and {subject}", input_name="template")
    if "keyword" not in names and "keywords" not in names:
        raise TuneLabError("the template has no {keyword} (or {keywords}), so every prompt would be the same; "
                           "e.g. 'a photo of a cat, {keyword}'", input_name="template")
    subs = parse_lines(subjects)
    if "subject" in names and not subs:
        raise TuneLabError("the template uses {subject} but the subject list is empty; give subjects, one per "
                           "line", input_name="subjects")
    if subs and "subject" not in names:
        raise TuneLabError("subjects are given but the template has no {subject}; add it, e.g. "
                           "'a photo of {subject}, {keyword}', or clear the subjects", input_name="subjects")
    cfgs = parse_guidance(guidance)
    if isinstance(per_entry, bool) or not isinstance(per_entry, int) or not 1 <= per_entry <= MAX_PER_ENTRY:
        raise TuneLabError(f"{per_entry!r} is out of range; use 1..{MAX_PER_ENTRY}", input_name="per_entry")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 64):
        raise TuneLabError(f"{seed!r} is out of range; use 0..2^64-1", input_name="seed")
    count = len(kws) * max(1, len(subs)) * len(cfgs) * per_entry
    if count > MAX_ENTRIES:
        raise TuneLabError(f"the plan has {count} images, over the limit of {MAX_ENTRIES}; use fewer keywords, "
                           "subjects, guidance values or images per entry", input_name="per_entry")
    entries, checked = [], set()
    for kw in kws:
        for subject in subs or [""]:
            text = render(template, kws, kw, boost, subject)
            if text not in checked:  # refuse syntax compel would misread now, not at image 40
                check(text, input_name="template" if template != DEFAULT_TEMPLATE else "keywords")
                checked.add(text)
            for g in cfgs:
                for r in range(per_entry):
                    i = len(entries)
                    entries.append(Entry(i, text, kw, subject, g, image_seed(seed, i), r))
    return Plan(tuple(entries), tuple(kws), boost, template, tuple(subs), tuple(cfgs), per_entry, seed)


# ---------------------------------------------------------------------------------------------------------------
# the job: plan + model + sampling settings, and its fingerprint


def model_identity(handle) -> Optional[dict]:
    """What makes a model the same model on another machine: the file hash, else the preset/folder name."""
    if handle is None:
        return None
    vae = (getattr(handle, "info", None) or {}).get("vae")
    return {"family": handle.family,
            "model": handle.sha256 or Path(str(handle.source)).name,
            "vae": Path(vae).name if vae else None,
            "loras": [[r.sha256, r.weight] for r in handle.loras]}


def job_settings(plan: Plan, handle, *, refiner=None, steps: int, width: int, height: int,
                 high_noise_frac: float = 0.8, scheduler: str = "default",
                 instance_prompt: str = DEFAULT_INSTANCE_PROMPT) -> dict:
    return {**plan.settings(), "model": model_identity(handle), "refiner": model_identity(refiner),
            "high_noise_frac": high_noise_frac if refiner is not None else None, "steps": steps,
            "width": width, "height": height, "scheduler": scheduler, "instance_prompt": instance_prompt}


def metadata_line(entry: Entry, settings: dict) -> dict:
    """The metadata.jsonl line of one image (a pure function of the plan, so it can always be rebuilt)."""
    return {"file_name": entry.file_name, "text": settings["instance_prompt"], "prompt": entry.prompt,
            "negative": "", "keyword": entry.keyword, "subject": entry.subject, "boost": settings["boost"],
            "guidance": entry.guidance, "seed": entry.seed, "index": entry.index, "steps": settings["steps"],
            "width": settings["width"], "height": settings["height"]}


def plan_document(plan: Plan, settings: dict) -> dict:
    entries = [metadata_line(e, settings) for e in plan.entries]
    body = json.dumps({"format": FORMAT, "settings": settings, "entries": entries}, sort_keys=True,
                      separators=(",", ":"))
    return {"format": FORMAT, "fingerprint": hashlib.sha256(body.encode()).hexdigest(), "count": len(entries),
            "settings": settings, "entries": entries}


def _dumps_line(line: dict) -> str:
    return json.dumps(line, ensure_ascii=False, sort_keys=False) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# the dataset folder


def read_plan(folder, input_name: str = "out") -> Optional[dict]:
    p = Path(folder) / PLAN_FILE
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT or not isinstance(doc.get("entries"), list):
            raise ValueError(f"not a {FORMAT} plan")
        return doc
    except (OSError, ValueError, AttributeError) as e:
        raise TuneLabError(f"{p} is unreadable ({e}); it is not a TuneLab synthesis plan. Use another folder, or "
                           "delete the folder to start over", input_name=input_name) from None


def _visible_entries(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def check_folder(folder, input_name: str = "out") -> Optional[dict]:
    """A folder a synthesis run may write: new, empty, or a TuneLab dataset (its plan, returned). A file, a foreign
    folder or an unreadable plan.json is refused; this needs no model, so callers run it before loading one."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TuneLabError(f"{folder} is a file; give a folder for the dataset", input_name=input_name)
    old = read_plan(folder, input_name) if folder.is_dir() else None
    if old is None and folder.is_dir():
        foreign = _visible_entries(folder)
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise TuneLabError(f"{folder} is not empty ({shown}) and has no {PLAN_FILE}, so it is not a TuneLab "
                               "dataset; use an empty or new folder", input_name=input_name)
    return old


def _prepare(folder: Path, doc: dict, input_name: str) -> None:
    """Refuse a foreign folder or a different plan; write plan.json for a new dataset. Nothing is written before
    the checks pass."""
    old = check_folder(folder, input_name)
    if old is not None:
        if old.get("fingerprint") != doc["fingerprint"]:
            before, now = old.get("settings") or {}, doc["settings"]
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)) or ["plan entries"]
            raise TuneLabError(
                f"{folder} holds a dataset made with a different plan (changed: {', '.join(changed)}). A dataset "
                "is never mixed from two plans: use another folder, or rerun with the settings in its plan.json",
                input_name=input_name)
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TuneLabError(f"cannot create the dataset folder {folder}: {e}", input_name=input_name) from None
    # deterministic content: shards starting at once write identical bytes, and the rename is atomic
    write_text_atomic(folder / PLAN_FILE, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    if read_plan(folder, input_name).get("fingerprint") != doc["fingerprint"]:  # lost a race with another plan
        raise TuneLabError(f"{folder} was claimed by another plan while starting; use another folder",
                           input_name=input_name)


def part_path(folder, shard: tuple) -> Path:
    i, n = shard
    folder = Path(folder)
    return folder / METADATA_FILE if n == 1 else folder / PARTS_DIR / f"metadata-{i}-of-{n}.jsonl"


def _line_files(folder: Path) -> list:
    parts = sorted((folder / PARTS_DIR).glob("metadata-*.jsonl")) if (folder / PARTS_DIR).is_dir() else []
    top = folder / METADATA_FILE
    return ([top] if top.is_file() else []) + parts


def _read_lines(path: Path, expected: dict) -> tuple:
    """(valid indices in order, whether the file needs a rewrite: invalid, duplicate or unterminated lines)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], False
    found, dirty = [], bool(raw) and not raw.endswith(b"\n")
    for text in raw.decode("utf-8", errors="replace").splitlines():
        try:
            line = json.loads(text)
            idx = line["index"]
            ok = isinstance(idx, int) and expected.get(idx) == line
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok or idx in found:
            dirty = True
            continue
        found.append(idx)
    return found, dirty


def png_complete(path: Path, width: int, height: int) -> bool:
    """The PNG opens, its chunks check out to IEND, and it has the planned size."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _png_ok(str(path), st.st_size, st.st_mtime_ns, width, height)


@functools.lru_cache(maxsize=8192)
def _png_ok(path: str, size: int, mtime_ns: int, width: int, height: int) -> bool:
    # keyed by size and mtime: a rewritten file (always a new rename) is checked again
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.size != (width, height):
                return False
            im.verify()
        return True
    except Exception:  # any decoder complaint means "not complete"; it is regenerated
        return False


def _append_line(path: Path, line: dict) -> None:
    """One os.write on an O_APPEND descriptor: concurrent appends never interleave within a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _dumps_line(line).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner(shard: tuple):
    i, n = shard

    def owns(final_name: str) -> bool:
        m = re.fullmatch(r"(\d+)\.png", final_name)
        if m:
            return int(m.group(1)) % n == i
        if n == 1:  # the unsharded run owns everything
            return True
        return final_name == part_path(".", shard).name

    return owns


@dataclass
class Report:
    folder: Path
    count: int  # entries in the plan
    shard: tuple = (0, 1)
    generated: list = field(default_factory=list)  # indices generated by this call
    skipped: list = field(default_factory=list)  # indices of this shard already complete
    repaired_lines: list = field(default_factory=list)  # complete PNGs whose metadata line was missing
    removed: list = field(default_factory=list)  # temporary files of a killed run
    missing: list = field(default_factory=list)  # indices of the whole plan not complete yet
    merged: bool = False  # metadata.jsonl written for the complete plan
    kind: str = "run"  # "run" or "merge"

    @property
    def complete(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        if self.kind == "merge":
            return (f"verified {self.count} images" + (f", {len(self.repaired_lines)} metadata line(s) rebuilt"
                    if self.repaired_lines else "") + f"; {METADATA_FILE} is up to date in {self.folder}")
        i, n = self.shard
        who = "" if n == 1 else f"shard {i}/{n}: "
        text = (f"{who}{len(self.generated)} generated, {len(self.skipped)} already done"
                + (f", {len(self.repaired_lines)} metadata line(s) repaired" if self.repaired_lines else "")
                + (f", {len(self.removed)} temporary file(s) removed" if self.removed else ""))
        if self.merged:
            return text + f"; dataset complete: {self.count} images and {METADATA_FILE} in {self.folder}"
        return text + f"; {len(self.missing)} of {self.count} images still to make (other shards), then merge"


def _scan(folder: Path, doc: dict) -> tuple:
    """(indices with a complete PNG, indices with a valid line somewhere, files with bad lines)."""
    s = doc["settings"]
    expected = {e["index"]: e for e in doc["entries"]}
    lines, dirty_files = set(), []
    for f in _line_files(folder):
        found, dirty = _read_lines(f, expected)
        lines.update(found)
        if dirty:
            dirty_files.append(f)
    done = {idx for idx, e in expected.items()
            if png_complete(folder / e["file_name"], s["width"], s["height"])}
    return done, lines, dirty_files


def _rewrite_lines(path: Path, doc: dict, keep) -> None:
    """Rewrite one line file sorted, de-duplicated and with only the lines of complete PNGs, atomically."""
    expected = {e["index"]: e for e in doc["entries"]}
    found, _ = _read_lines(path, expected)
    write_text_atomic(path, "".join(_dumps_line(expected[i]) for i in sorted(set(found)) if i in keep))


def _write_metadata(folder: Path, doc: dict) -> None:
    text = "".join(_dumps_line(e) for e in doc["entries"])
    path = folder / METADATA_FILE
    if path.is_file() and path.read_bytes() == text.encode("utf-8"):
        return  # leave a finished dataset untouched (and its mtime, which ComfyUI and rsync watch)
    write_text_atomic(path, text)


def merge(folder, *, clean: bool = True, input_name: str = "out") -> Report:
    """Verify that the whole plan is complete and write the sorted, de-duplicated metadata.jsonl.

    A complete PNG whose line was lost is counted as repaired (its line is rebuilt from the plan). An incomplete
    plan is refused and nothing is written. `clean` removes temporaries of killed merges (only when no other run
    writes to the folder).
    """
    folder = Path(folder)
    doc = read_plan(folder, input_name)
    if doc is None:
        raise TuneLabError(f"{folder} has no {PLAN_FILE}; it is not a TuneLab synthesis dataset",
                           input_name=input_name)
    report = Report(folder=folder, count=doc["count"], kind="merge")
    if clean:
        report.removed = remove_temps((folder, folder / PARTS_DIR), lambda name: name in (METADATA_FILE, PLAN_FILE))
    done, lines, _ = _scan(folder, doc)
    report.missing = sorted(set(range(doc["count"])) - done)
    if report.missing:
        shown = ", ".join(f"{i:05d}.png" for i in report.missing[:8]) + (", ..." if len(report.missing) > 8 else "")
        raise TuneLabError(f"the dataset in {folder} is incomplete: {len(report.missing)} of {doc['count']} images "
                           f"are missing or damaged ({shown}). Rerun synthesis with the same settings (every shard) "
                           "and merge again; nothing was written", input_name=input_name)
    report.repaired_lines = sorted(done - lines)
    _write_metadata(folder, doc)
    report.merged = True
    return report


def run(folder, handle, plan: Plan, *, steps: int, width: int, height: int, refiner=None,
        high_noise_frac: float = 0.8, scheduler: str = "default", instance_prompt: str = DEFAULT_INSTANCE_PROMPT,
        shard=(0, 1), progress=None, input_name: str = "out") -> Report:
    """Generate this shard's missing images of `plan` into `folder`; resume, repair and merge as described in
    the module docstring. Every check that can fail runs before anything is written."""
    from . import images as images_mod
    from .prompt import encode
    from .sampling import check_high_noise_frac, check_scheduler, check_size, check_steps, generate, progress_total

    folder = Path(folder)
    check_size(width, height)
    check_steps(steps)
    check_scheduler(scheduler)
    shard = parse_shard(shard)
    if not isinstance(instance_prompt, str) or not instance_prompt.strip():
        raise TuneLabError("the instance prompt is empty; the trainer needs one (the seed uses 'wrong')",
                           input_name="instance_prompt")
    instance_prompt = instance_prompt.strip()
    if handle.family not in ("sdxl", "sd15", "sd2"):
        raise TuneLabError(f"synthesis needs a text-to-image model; this pipe is {handle.architecture}",
                           input_name="pipe")
    if refiner is not None and refiner.family != "sdxl-refiner":
        raise TuneLabError(f"the refiner must be an SDXL refiner; got {refiner.architecture}", input_name="refiner")
    if refiner is not None:
        check_high_noise_frac(high_noise_frac)
    settings = job_settings(plan, handle, refiner=refiner, steps=steps, width=width, height=height,
                            high_noise_frac=high_noise_frac, scheduler=scheduler, instance_prompt=instance_prompt)
    doc = plan_document(plan, settings)
    _prepare(folder, doc, input_name)

    i, n = shard
    report = Report(folder=folder, count=len(plan), shard=shard)
    report.removed = remove_temps((folder, folder / PARTS_DIR), _owner(shard))
    mine = [e for e in plan.entries if e.index % n == i]
    lines_by_index = {d["index"]: d for d in doc["entries"]}
    own = part_path(folder, shard)
    done, lines, dirty = _scan(folder, doc)
    if own in dirty or (own.is_file() and set(_read_lines(own, lines_by_index)[0]) - done):
        _rewrite_lines(own, doc, done)  # only our own file: other shards may be appending to theirs
        done, lines, _ = _scan(folder, doc)
    for e in mine:
        if e.index in done and e.index not in lines:
            _append_line(own, lines_by_index[e.index])
            report.repaired_lines.append(e.index)
    report.skipped = [e.index for e in mine if e.index in done]
    todo = [e for e in mine if e.index not in done]

    per_image = progress_total(steps, refiner is not None, high_noise_frac)
    with progress_mod.make(progress, len(todo) * per_image, "synthesis") as bar:
        for e in todo:
            bar.check()  # a stop between images leaves only whole files
            steps_bar = progress_mod.ItemSteps(bar, per_image)
            cond = encode(handle, e.prompt, "")  # no negative prompt, as in the seed
            image = generate(handle, cond, seed=e.seed, steps=steps, guidance=e.guidance, width=width,
                             height=height, refiner=refiner, high_noise_frac=high_noise_frac, scheduler=scheduler,
                             progress=steps_bar)
            line = lines_by_index[e.index]
            images_mod.save_png(images_mod.tensor_to_pil(image)[0], folder / e.file_name,
                                {"tunelab": json.dumps(line, ensure_ascii=False)})
            _append_line(own, line)  # only after the PNG is complete and in place
            report.generated.append(e.index)
            steps_bar.finish(e.file_name)

    done, _, _ = _scan(folder, doc)
    report.missing = sorted(set(range(len(plan))) - done)
    if not report.missing:  # whichever run completes the plan writes the final metadata.jsonl
        merged = merge(folder, clean=(n == 1), input_name=input_name)
        report.removed += merged.removed
        report.merged = True
    return report


def files_of(folder, shard=(0, 1)) -> list:
    """This shard's planned PNG paths, in plan order (for previews)."""
    doc = read_plan(folder)
    if doc is None:
        return []
    i, n = parse_shard(shard)
    return [Path(folder) / e["file_name"] for e in doc["entries"] if e["index"] % n == i]

