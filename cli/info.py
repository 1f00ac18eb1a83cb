"""`python -m tunelab info`"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.description = ("print versions, the device and the models found, each listed as the name --model, "
                          "--lora and --vae accept")


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
    # each list in the spelling its flag accepts: --model diffusers/NAME, not NAME
    lists = (("models (--model, --refiner)", host.model_choices()[len(tiny.PRESETS):]),
             ("loras (--lora)", host.filename_list("loras")), ("vae (--vae)", host.filename_list("vae")))
    for what, names in lists:
        shown = ", ".join(names[:20]) + (f" ... ({len(names)} in all)" if len(names) > 20 else "")
        print(f"{what}: {len(names)} found" + (f": {shown}" if names else ""))
    return 0
