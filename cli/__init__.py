"""`python -m tunelab COMMAND`: the same core functions the nodes call, from a terminal.

Each command lives in a module with `add_arguments(parser)` and `run(args) -> int`; imports are lazy so `--help`
is instant and a missing extra only breaks its own command.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..core.errors import Interrupted, TuneLabError

# command -> (module under tunelab.cli, help)
COMMANDS = {
    "info": (".info", "print versions, the device and the models found"),
    "workflows": (".workflows", "validate workflows/*.json and write their API twins (--check: verify only)"),
    "queue": (".queue", "run an API-format workflow on a ComfyUI server and download its images"),
    "compare": (".compare", "three-way comparison: base, base + negative 'wrong', LoRA + negative 'wrong'"),
    "evaluate": (".evaluate", "scored comparison over prompts x seeds x states: CLIP score, PickScore, paired "
                              "statistics (resumable; accelerate launch shards it)"),
    "synth": (".synth", "synthesize the 'wrong' dataset (resumable, --shard I/N; --merge to finish shards)"),
    "train-lora": (".train_lora", "train a Dreambooth LoRA for SDXL (optional pivotal tuning); resumable"),
    "edit": (".edit", "InstructPix2Pix: edit an image with an instruction (output keeps the input's size)"),
    "instruct-data": (".instruct_data", "build an instruction dataset: folders, table import or synthesized pairs"),
    "train-ip2p": (".train_ip2p", "fine-tune InstructPix2Pix on an instruction dataset (full or LoRA); resumable"),
    "eval-ip2p": (".eval_ip2p", "evaluate InstructPix2Pix models on held-out pairs: PSNR/SSIM, grids, reports"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tunelab", description="TuneLab command line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=mod_name)
        try:
            importlib.import_module(mod_name, __package__).add_arguments(p)
        except ImportError as e:  # a missing extra disables its own command only
            if (e.name or "").split(".")[0] in ("", __package__.split(".")[0]):
                raise  # one of our own modules is broken: that is a bug, not a missing extra
            p.set_defaults(_unavailable=f"'{name}' is unavailable: {e}")
            p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "_unavailable", None):
        print(f"error: {args._unavailable}", file=sys.stderr)
        return 2
    return run_command(importlib.import_module(args._module, __package__).run, args)


def run_command(run, args) -> int:
    """Run a command's `run(args)`: a TuneLabError is a clear message and exit 2, an interrupt exit 130."""
    try:
        return int(run(args) or 0)
    except TuneLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
