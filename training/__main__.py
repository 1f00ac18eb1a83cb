"""`python -m tunelab.training lora|ip2p ...` (the same flags as `python -m tunelab train-lora|train-ip2p`).

This entry exists for `accelerate launch -m tunelab.training lora ...`: accelerate starts one process per device and
each runs the trainer; the main process writes checkpoints, the LoRA and the images. The InstructPix2Pix trainer
runs in one process and refuses a multi-process launch with a message saying so.
"""
from __future__ import annotations

import argparse
import logging

from ..cli import attach_flags, run_command

TRAINERS = {"lora": ("..cli.train_lora", "Dreambooth LoRA for SDXL (optional pivotal tuning)"),
            "ip2p": ("..cli.train_ip2p", "InstructPix2Pix fine-tuning, full or LoRA (one process only)")}


def main(argv=None) -> int:
    import importlib

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m tunelab.training", description="TuneLab trainers")
    sub = parser.add_subparsers(dest="trainer", required=True)
    for name, (mod_name, help_text) in TRAINERS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=mod_name)
        module = importlib.import_module(mod_name, __package__)
        module.add_arguments(p)
        attach_flags(p, getattr(module, "INPUT_FLAGS", {}))
    args = parser.parse_args(argv)
    return run_command(importlib.import_module(args._module, __package__).run, args)


if __name__ == "__main__":
    raise SystemExit(main())
