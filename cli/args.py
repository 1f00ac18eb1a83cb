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
