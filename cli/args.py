"""Arguments several commands share, declared once so their spelling, choices and help agree."""
from __future__ import annotations

DTYPES = ("auto", "fp32", "fp16", "bf16")


def add_device(p, *, accelerate: bool = False) -> None:
    """--dtype and --device."""
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weight dtype: auto (fp32 on the CPU, bf16/fp16 on a GPU), fp32, fp16 or bf16")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:1 ..." + (" (under accelerate: its device)" if accelerate else ""))


def add_model(p, default: str, what: str) -> None:
    """--model: a checkpoint name, a .safetensors path, a diffusers folder or a tiny preset."""
    p.add_argument("--model", default=default,
                   help=f"{what}: a checkpoint name, .safetensors path, diffusers folder or tiny preset "
                        f"(default {default}, a toy model that produces noise)")


def add_vae(p) -> None:
    p.add_argument("--vae", default=None, help="optional VAE override (.safetensors), e.g. the SDXL fp16-fix VAE")


def split_list(text: str) -> tuple:
    """'a, b,,c' -> ('a', 'b', 'c')"""
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


def add_config_flags(p, config_cls, *, skip=(), help_text=None, choices=None, origin=None, recipe_keys=(),
                     optional_types=None) -> None:
    """One flag per field of a trainer's config dataclass (`learning_rate` -> `--learning-rate`), typed from its
    default: booleans that default to True or None get `--x/--no-x`, others `--x`; `optional_types` gives the
    type of fields whose default is None. The help says the default and whose it is (`origin(name)`). Fields in
    `recipe_keys` get no argparse default (absent unless given), so a recipe can fill them."""
    import argparse
    import dataclasses

    help_text, choices, optional_types = help_text or {}, choices or {}, optional_types or {}
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = help_text.get(f.name, f.name.replace("_", " "))
        where = f"; {origin(f.name)}" if origin else ""
        shown = "auto" if default is None and optional_types.get(f.name) is bool else default
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
