"""The one place that talks to ComfyUI (`folder_paths`, `comfy.*`).

Inside ComfyUI it uses its folders, progress bar, interrupt flag, device and memory manager; outside it falls
back to plain local behaviour, so nodes, the CLI and tests run the same code. No other file imports ComfyUI.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .core.progress import Progress


def _comfy():
    """(folder_paths, comfy.model_management, comfy.utils) when running inside ComfyUI, else None."""
    try:
        import folder_paths  # type: ignore
        import comfy.model_management as mm  # type: ignore
        import comfy.utils as cu  # type: ignore
    except Exception:
        return None
    return folder_paths, mm, cu


def inside_comfyui() -> bool:
    return _comfy() is not None


def local_models_dir() -> Path:
    """Outside ComfyUI: $TUNELAB_MODELS, or ./models (laid out like ComfyUI's models/)."""
    return Path(os.environ.get("TUNELAB_MODELS", "models")).resolve()


def local_output_dir() -> Path:
    return Path(os.environ.get("TUNELAB_OUTPUT", "output")).resolve()


# folder kind -> file endings offered in lists. Pickle formats are listed so that picking one gets the
# clear "safetensors only" refusal instead of a silently missing file.
_EXTENSIONS = {
    "checkpoints": (".safetensors", ".sft", ".ckpt", ".pt", ".bin"),
    "loras": (".safetensors", ".sft", ".ckpt", ".pt", ".bin"),
    "vae": (".safetensors", ".sft", ".ckpt", ".pt", ".bin"),
}


def filename_list(kind: str) -> list[str]:
    """Files of a model folder kind ("checkpoints", "loras", "vae"), or model folders for "diffusers"."""
    c = _comfy()
    if c is not None:
        folder_paths = c[0]
        if kind == "diffusers":
            names = []
            for root in folder_paths.get_folder_paths("diffusers"):
                if os.path.isdir(root):
                    names += [d for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, "model_index.json"))]
            return names
        return list(folder_paths.get_filename_list(kind))
    root = local_models_dir() / kind
    if not root.is_dir():
        return []
    if kind == "diffusers":
        return [p.name for p in sorted(root.iterdir()) if (p / "model_index.json").is_file()]
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in _EXTENSIONS.get(kind, (".safetensors",)))


def full_path(kind: str, name: str) -> Optional[Path]:
    """The path of a listed model file or folder, or None if it is not there."""
    c = _comfy()
    if c is not None:
        folder_paths = c[0]
        if kind == "diffusers":
            for root in folder_paths.get_folder_paths("diffusers"):
                p = Path(root) / name
                if (p / "model_index.json").is_file():
                    return p
            return None
        p = folder_paths.get_full_path(kind, name)
        return Path(p) if p else None
    p = local_models_dir() / kind / name
    return p if p.exists() else None


def model_dirs(kind: str) -> list[Path]:
    c = _comfy()
    if c is not None:
        return [Path(p) for p in c[0].get_folder_paths(kind)]
    return [local_models_dir() / kind]


def output_dir() -> Path:
    c = _comfy()
    return Path(c[0].get_output_directory()) if c is not None else local_output_dir()


def input_dir() -> Path:
    c = _comfy()
    return Path(c[0].get_input_directory()) if c is not None else Path(os.environ.get("TUNELAB_INPUT", "input")).resolve()


def comfy_tokenizer_dir() -> Optional[Path]:
    """ComfyUI's bundled CLIP tokenizer (`comfy/sd1_tokenizer`), used when a single-file checkpoint has none."""
    try:
        import comfy  # type: ignore
    except Exception:
        return None
    # comfy is a namespace package in recent ComfyUI (no __file__)
    for root in getattr(comfy, "__path__", []):
        p = Path(root) / "sd1_tokenizer"
        if (p / "vocab.json").is_file():
            return p
    return None


def device():
    import torch

    c = _comfy()
    if c is not None:
        return c[1].get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(dev=None):
    """fp16/bf16 on an accelerator as ComfyUI would choose, fp32 on CPU."""
    import torch

    dev = dev or device()
    if getattr(dev, "type", str(dev)) == "cpu":
        return torch.float32
    c = _comfy()
    if c is not None:
        mm = c[1]
        if mm.should_use_bf16(dev):
            return torch.bfloat16
        if mm.should_use_fp16(dev):
            return torch.float16
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def free_comfy_models() -> None:
    """Ask ComfyUI to release the models it holds before diffusers work, so both don't sit in VRAM."""
    c = _comfy()
    if c is not None:
        c[1].unload_all_models()
        c[1].soft_empty_cache()


def interrupted() -> bool:
    c = _comfy()
    return bool(c is not None and c[1].processing_interrupted())


class ComfyProgress(Progress):
    """ComfyUI's progress bar; `check()` raises ComfyUI's own interrupt exception so the run ends as
    `execution_interrupted`, not as an error."""

    def __init__(self, total: int, desc: str = ""):
        super().__init__(total, desc)
        self._comfy = _comfy()
        self._pbar = self._comfy[2].ProgressBar(self.total) if self._comfy else None

    def update(self, n: int = 1, info: Optional[str] = None) -> None:
        super().update(n, info)
        if self._pbar is not None:
            self._pbar.update_absolute(self.value, self.total)
            if info:
                _progress_text(info)

    def interrupted(self) -> bool:
        return interrupted()

    def check(self) -> None:
        if self._comfy is not None:
            self._comfy[1].throw_exception_if_processing_interrupted()


def _progress_text(text: str) -> None:
    """Show a line (e.g. the training loss) under the running node in ComfyUI's UI; best effort."""
    try:
        from comfy_execution.utils import get_executing_context  # type: ignore
        from server import PromptServer  # type: ignore

        ctx = get_executing_context()
        if ctx is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id)
    except Exception:  # older ComfyUI without progress text: the bar still moves
        pass


def progress_factory():
    """The factory core functions take: ComfyUI's bar inside ComfyUI, tqdm outside."""
    return ComfyProgress if inside_comfyui() else Progress


def model_choices() -> list[str]:
    """Tiny presets, then ComfyUI's checkpoints, then its diffusers folders (prefixed 'diffusers/')."""
    from .core import tiny

    return list(tiny.PRESETS) + filename_list("checkpoints") + [f"diffusers/{n}" for n in filename_list("diffusers")]


def resolve_model(name: str) -> str:
    """A model choice -> what `core.models.load` takes (a preset name or a path). Unknown names pass through so
    the core can say what is wrong with them."""
    from .core import tiny

    if name in tiny.PRESETS:
        return name
    if name.startswith("diffusers/"):
        p = full_path("diffusers", name[len("diffusers/"):])
        return str(p) if p else name
    p = full_path("checkpoints", name)
    return str(p) if p else name


def resolve_file(kind: str, name: str) -> str:
    p = full_path(kind, name)
    return str(p) if p else name


def check_model(name, input_name: str = "model") -> str:
    """`resolve_model`, refusing a name that is neither a listed model (`model_choices`) nor an existing file or
    folder, with the closest listed names; loads nothing."""
    from .core.checks import unknown_name
    from .core.files import check_path_text

    check_path_text(name, input_name, "model")  # empty, NUL
    text = str(name).strip()
    from .core import tiny

    resolved = resolve_model(text)
    if text in tiny.PRESETS or resolved != text or Path(text).expanduser().exists():
        return resolved
    where = "models/checkpoints or models/diffusers" if inside_comfyui() else f"{local_models_dir()}"
    raise unknown_name(text, model_choices(), input_name, "model",
                       more=f"(a tiny preset, a name from {where}, a .safetensors file or a diffusers folder)")


def check_file(kind: str, name, input_name: str) -> str:
    """`resolve_file`, refusing a name that is neither listed in the `kind` folder nor an existing file."""
    from .core.checks import unknown_name
    from .core.files import check_path_text

    check_path_text(name, input_name, kind)  # empty, NUL
    text = str(name).strip()
    resolved = resolve_file(kind, text)
    p = Path(resolved).expanduser()
    if p.is_file():
        return resolved
    if p.is_dir():
        from .core.errors import TuneLabError

        raise TuneLabError(f"'{text}' is a folder; give a file", input_name=input_name)
    raise unknown_name(text, filename_list(kind), input_name, kind.rstrip("s") + " file",
                       more=f"(a name from {model_dirs(kind)[0]} or a path to a file)")


def runtime(device_choice: str = "auto", dtype_choice: str = "auto"):
    """(device, dtype) following ComfyUI's choice for "auto"."""
    import torch

    dev = torch.device(device()) if device_choice in (None, "auto") else torch.device(device_choice)
    dt = default_dtype(dev) if dtype_choice in (None, "auto") else dtype_choice
    return dev, dt
