"""Checks of plain input values, shared by the command line, the nodes and the core entry points, so all three
refuse the same values with the same one-line message (the input, the value, the fix) before any model loads.

Paths are checked in `files` (`check_input_file`, `check_output_dir`, `confined_path` ...), prompts in `prompt`,
sizes, steps, guidance and schedulers in `sampling`.
"""
from __future__ import annotations

import difflib
import math
from typing import Iterable, Optional

from .errors import TuneLabError

# torch.Generator.manual_seed takes 0..2^64-1; a negative seed aliases a positive one (-1 is 2^64-1) and a larger
# one overflows, so outside this range a recorded seed would not be the seed that ran. ComfyUI's seed widgets
# span the same range.
SEED_MAX = (1 << 64) - 1
# the trainers derive several generators from one seed modulo 2^63; below it every seed is its own
TRAIN_SEED_MAX = (1 << 63) - 1


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value, name: str, lo: int, hi: Optional[int] = None, *, hint: str = "") -> int:
    """A whole number in lo..hi (hi None: no upper bound)."""
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)  # 4.0 from a JSON client is 4
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
        raise TuneLabError(f"{value!r} is out of range; use a whole number {span}" + (f" ({hint})" if hint else ""),
                           input_name=name)
    return value


def check_number(value, name: str, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                 hi_open: bool = False, hint: str = "") -> float:
    """A finite number in [lo, hi] (open ends with lo_open/hi_open). NaN and infinity are always refused: they
    poison sampling and cannot be written to JSON."""
    ok = is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise TuneLabError(f"{value!r} is out of range; use a number {_span(lo, hi, lo_open, hi_open)}"
                           + (f" ({hint})" if hint else ""), input_name=name)
    return float(value)


def number_list(value, name: str, lo: float, hi: float, *, example: str, distinct: bool = False) -> list:
    """"8,9,10" / "8 9 10" / [8, 9, 10] -> [8.0, 9.0, 10.0], each finite and in [lo, hi]; with `distinct`, repeats
    are dropped (order kept). An empty value gives []: the caller says whether that is allowed."""
    import re

    parts = re.split(r"[,\s;]+", value.strip()) if isinstance(value, str) else list(value or ())
    out = []
    for p in parts:
        if p == "":
            continue
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise TuneLabError(f"'{p}' is not a number; give values like {example}", input_name=name) from None
        if not math.isfinite(v) or not lo <= v <= hi:
            raise TuneLabError(f"{p} is out of range; use {lo:g}..{hi:g}", input_name=name)
        if not (distinct and v in out):
            out.append(v)
    return out


def _span(lo, hi, lo_open, hi_open) -> str:
    if math.isinf(lo) and math.isinf(hi):
        return "(not NaN or infinity)"
    low = f"{'above' if lo_open else 'of at least'} {lo:g}"
    high = f"{'below' if hi_open else 'up to'} {hi:g}"
    if math.isinf(hi):
        return low
    if math.isinf(lo):
        return high
    if not lo_open and not hi_open:
        return f"from {lo:g} to {hi:g}"
    return f"{low} and {high}"


def check_seed(value, name: str = "seed", *, hi: int = SEED_MAX) -> int:
    """A seed the generator takes as it is: a whole number from 0 to 2^64-1 (trainers: 2^63-1)."""
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)
    if not is_int(value) or not 0 <= value <= hi:
        top = "2^64-1" if hi == SEED_MAX else ("2^63-1" if hi == TRAIN_SEED_MAX else str(hi))
        raise TuneLabError(f"{value!r} is out of range; use a whole number from 0 to {top} ({hi})", input_name=name)
    return value


def closest(value, choices: Iterable[str], n: int = 3) -> list:
    """The valid names nearest to a mistyped one: by spelling, and by the part after a folder prefix
    (`ip2p-lowlevel` -> `diffusers/ip2p-lowlevel`)."""
    choices = [str(c) for c in choices]
    text = str(value)
    found = [c for c in choices if c.rsplit("/", 1)[-1] == text or c.lower() == text.lower()]
    found += difflib.get_close_matches(text, choices, n=n, cutoff=0.6)
    tails = {c.rsplit("/", 1)[-1]: c for c in choices}
    found += [tails[t] for t in difflib.get_close_matches(text, list(tails), n=n, cutoff=0.6)]
    return list(dict.fromkeys(found))[:n]


def unknown_name(value, choices: Iterable[str], name: str, what: str, *, more: str = "") -> TuneLabError:
    """The error for a name that is not one of `choices`: the closest valid names, else the whole list."""
    choices = list(choices)
    near = closest(value, choices)
    if near:
        tip = "did you mean " + " or ".join(f"'{c}'" for c in near) + "?"
    elif choices:
        shown = ", ".join(choices[:12]) + (f" ... ({len(choices)} in all)" if len(choices) > 12 else "")
        tip = f"choose one of {shown}"
    else:
        tip = ""
    text = f"unknown {what} '{value}'" + (f"; {tip}" if tip else "") + (f" {more}" if more else "")
    return TuneLabError(text, input_name=name)


def check_choice(value, choices: Iterable[str], name: str, what: str = "value") -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise unknown_name(value, choices, name, what)
    return value


def check_text(value, name: str, *, required: bool = True, what: str = "text") -> str:
    """A free-text input: a string without NUL bytes; empty only when not `required`."""
    text = "" if value is None else value
    if not isinstance(text, str):
        raise TuneLabError(f"expected {what}, got {type(text).__name__}", input_name=name)
    if "\x00" in text:
        raise TuneLabError(f"{text!r} contains a NUL byte (\\x00); remove it", input_name=name)
    if required and not text.strip():
        raise TuneLabError(f"the {what} is empty; give one", input_name=name)
    return text
