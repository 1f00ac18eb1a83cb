"""`python -m tunelab info`"""
from __future__ import annotations


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    import platform
    from importlib import metadata

    import torch

    from .. import __version__, host
    from ..core import tiny

    print(f"TuneLab {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    for pkg in ("diffusers", "transformers", "peft", "compel", "accelerate", "safetensors"):
        try:
            print(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            print(f"{pkg} not installed")
    print(f"device: {host.device()} (default dtype {host.default_dtype()})")
    print(f"inside ComfyUI: {host.inside_comfyui()}; models folder: {host.model_dirs('checkpoints')[0].parent}")
    print(f"tiny presets: {', '.join(tiny.PRESETS)} (cache {tiny.cache_dir()})")
    for kind in ("checkpoints", "diffusers", "loras", "vae"):
        names = host.filename_list(kind)
        print(f"{kind}: {len(names)} found" + (": " + ", ".join(names[:20]) if names else ""))
    return 0
