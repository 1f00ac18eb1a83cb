"""Shared names for the node files: pack-private types, categories and small input helpers."""
from __future__ import annotations

PIPE = "TUNELAB_PIPE"
COND = "TUNELAB_COND"
STATES = "TUNELAB_STATES"

CATEGORY = "TuneLab"


def category(sub: str) -> str:
    return f"{CATEGORY}/{sub}"


def seed_input(tooltip: str = "Random seed; the same seed gives the same pixels.", default: int = 42):
    return ("INT", {"default": default, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": tooltip})


def size_input(name: str, default: int = 1024):
    return ("INT", {"default": default, "min": 64, "max": 4096, "step": 8,
                    "tooltip": f"Image {name} in pixels; must be a multiple of 8 (one latent cell is 8 pixels)."})
