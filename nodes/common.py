"""Shared names for the node files: pack-private types, categories and small input helpers."""
from __future__ import annotations

PIPE = "TUNELAB_PIPE"
COND = "TUNELAB_COND"
STATES = "TUNELAB_STATES"

CATEGORY = "TuneLab"


def category(sub: str) -> str:
    return f"{CATEGORY}/{sub}"


def seed_input(tooltip: str = "Random seed; the same seed gives the same pixels.", default: int = 42,
               maximum: int | None = None):
    """A seed widget over the range the generator takes as it is (core.checks.SEED_MAX; trainers TRAIN_SEED_MAX)."""
    from ..core.checks import SEED_MAX

    return ("INT", {"default": default, "min": 0, "max": SEED_MAX if maximum is None else maximum,
                    "tooltip": tooltip})


def size_input(name: str, default: int = 1024):
    return ("INT", {"default": default, "min": 64, "max": 4096, "step": 8,
                    "tooltip": f"Image {name} in pixels; must be a multiple of 8 (one latent cell is 8 pixels)."})


def steps_input(tooltip: str = "Denoising steps.", default: int = 50):
    from ..core import sampling

    return ("INT", {"default": default, "min": 1, "max": sampling.MAX_STEPS, "tooltip": tooltip})


def guidance_input(tooltip: str = "Classifier-free guidance (13 in the wrong-LoRA notebooks).", default: float = 13.0):
    return ("FLOAT", {"default": default, "min": 0.0, "max": 30.0, "step": 0.5, "tooltip": tooltip})


def scheduler_input(tooltip: str = "diffusers scheduler."):
    from ..core import sampling

    return (list(sampling.SCHEDULERS), {"default": "default", "tooltip": tooltip})


def high_noise_frac_input(tooltip: str = "With a refiner: fraction of denoising done by the base."):
    return ("FLOAT", {"default": 0.8, "min": 0.05, "max": 0.95, "step": 0.05, "tooltip": tooltip})


def dataset_folder(text: str, input_name: str, *, marker: str | None = None):
    """A dataset folder confined to ComfyUI's output or input directory: a name relative to either (output first)
    or an absolute path inside one of them (what dataset nodes output). With `marker`, only a folder holding that
    file counts. The string reaches the server through POST /prompt, so nothing else is accepted."""
    import os
    from pathlib import Path

    from .. import host
    from ..core.checks import check_text
    from ..core.errors import TuneLabError
    from ..core.files import confined_path

    if not isinstance(text, str) or not text.strip():
        raise TuneLabError("no dataset folder given; wire a dataset node's path here or type a folder name under "
                           "the output directory", input_name=input_name)
    text = check_text(text, input_name, what="dataset folder").strip()
    roots = [host.output_dir(), host.input_dir()]
    if os.path.isabs(text):
        real = Path(os.path.realpath(text))
        if not any(real == r or r in real.parents for r in (Path(os.path.realpath(root)) for root in roots)):
            raise TuneLabError(f"'{text}' is outside ComfyUI's output and input folders; datasets must live there",
                               input_name=input_name)
        candidates = [real]
    else:
        candidates = [confined_path(root, text, input_name, root_label=label)
                      for root, label in zip(roots, ("ComfyUI's output folder", "ComfyUI's input folder"))]
    for path in candidates:
        if path.is_dir() and (marker is None or (path / marker).is_file()):
            return path
    holding = f" with {marker}" if marker else ""
    raise TuneLabError(f"no folder '{text}'{holding} in the output ({roots[0]}) or input ({roots[1]}) directory",
                       input_name=input_name)


def run_folder(output_name: str):
    """A new timestamped folder `<output_name>/<YYYYmmdd_HHMMSS>` confined to ComfyUI's output directory."""
    from .. import host
    from ..core.compare import timestamp
    from ..core.files import confined_path

    name = (output_name or "").strip().rstrip("/")
    return confined_path(host.output_dir(), f"{name}/{timestamp()}" if name else "", "output_name",
                         root_label="ComfyUI's output folder")


def output_images(paths) -> list:
    """ComfyUI UI entries ({filename, subfolder, type: output}) for files inside the output directory (images, or
    any file a node reports under "files", which `/view` serves and `tunelab queue` downloads); files elsewhere
    are left out, since the UI could not fetch them."""
    import os
    from pathlib import Path

    from .. import host

    root = Path(os.path.realpath(host.output_dir()))
    shown = []
    for p in paths:
        real = Path(os.path.realpath(p))
        if root in real.parents:
            sub = real.parent.relative_to(root).as_posix()
            shown.append({"filename": real.name, "subfolder": "" if sub == "." else sub, "type": "output"})
    return shown

