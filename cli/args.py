"""Arguments several commands share, declared once so their spelling, choices and help agree, and the checks
every command runs on them before any model loads (the same core checks the nodes and core functions use).

Help texts state a default once: either argparse's `%(default)s` or a written-out one, never both.
"""
from __future__ import annotations

DTYPES = ("auto", "fp32", "fp16", "bf16")


def add_device(p, *, accelerate: bool = False) -> None:
    """--dtype and --device."""
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weight dtype: auto (fp32 on the CPU, bf16/fp16 on a GPU), fp32, fp16 or bf16 (default auto)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:1 ... (default auto: a GPU when there is one)"
                        + ("; under accelerate launch, accelerate's device" if accelerate else ""))


def add_model(p, default: str, what: str) -> None:
    """--model: a tiny preset, a listed checkpoint / diffusers name, a .safetensors path or a diffusers folder."""
    p.add_argument("--model", default=default,
                   help=f"{what}: a tiny preset, a name `python -m tunelab info` lists (checkpoints, "
                        f"diffusers/NAME), a .safetensors path or a diffusers folder (default {default}, a built-in "
                        "tiny model that produces noise)")


def add_vae(p) -> None:
    p.add_argument("--vae", default=None,
                   help="optional VAE override: a name from models/vae or a .safetensors path, e.g. the SDXL "
                        "fp16-fix VAE")


def add_scheduler(p) -> None:
    from ..core.sampling import SCHEDULERS

    p.add_argument("--scheduler", default="default", choices=list(SCHEDULERS), metavar="NAME",
                   help=f"diffusers scheduler, one of: {', '.join(SCHEDULERS)} (default: the model's own)")


def split_list(text: str) -> tuple:
    """'a, b,,c' -> ('a', 'b', 'c')"""
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


def add_config_flags(p, config_cls, *, skip=(), help_text=None, choices=None, origin=None, recipe_keys=(),
                     optional_types=None, shown_defaults=None) -> None:
    """One flag per field of a trainer's config dataclass (`learning_rate` -> `--learning-rate`), typed from its
    default: booleans that default to True or None get `--x/--no-x`, others `--x`; `optional_types` gives the
    type of fields whose default is None. The help says the default and whose it is (`origin(name)`). Fields in
    `recipe_keys` get no argparse default (absent unless given), so a recipe can fill them. `shown_defaults`: the
    default in words where the value alone would mislead (e.g. alpha None = "the rank")."""
    import argparse
    import dataclasses

    help_text, choices, optional_types = help_text or {}, choices or {}, optional_types or {}
    shown_defaults = shown_defaults or {}
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = help_text.get(f.name, f.name.replace("_", " "))
        where = f"; {origin(f.name)}" if origin else ""
        shown = "auto" if default is None and optional_types.get(f.name) is bool else default
        shown = shown_defaults.get(f.name, shown)
        kw = {"default": argparse.SUPPRESS} if f.name in recipe_keys else {"default": default}
        if f.name in recipe_keys:
            where = f"; {origin(f.name)}; see --recipe" if origin else "; see --recipe"
        if isinstance(default, bool) or optional_types.get(f.name) is bool:
            if default is False and f.name not in recipe_keys:
                p.add_argument(flag, action="store_true", help=f"{text} (default: off{where})")
            else:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{text} (default: {shown}{where})",
                               **kw)
            continue
        kind = optional_types.get(f.name) or (type(default) if default is not None else str)
        if f.name in choices:
            p.add_argument(flag, choices=choices[f.name], help=f"{text} (default: {shown}{where})", **kw)
        else:
            p.add_argument(flag, type=kind, help=f"{text} (default: {shown}{where})", **kw)
# ---------------------------------------------------------------------------------------------------------------
# checks before any model loads


def model_source(name, input_name: str = "model") -> str:
    """The path or preset `core.models.load` takes for --model, refusing an unknown name (closest names listed)."""
    from .. import host

    return host.check_model(name, input_name)


def file_source(kind: str, name, input_name: str):
    """A LoRA or VAE given by its listed name or path: the existing safetensors file, or None when not given."""
    if name is None:
        return None
    from .. import host
    from ..core.files import check_safetensors

    return str(check_safetensors(host.check_file(kind, name, input_name), input_name))


def runtime(args) -> None:
    """--device and --dtype: the device exists here and the dtype runs on it."""
    from ..core.models import check_runtime

    check_runtime(args.device, args.dtype)
