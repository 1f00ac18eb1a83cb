"""`python -m tunelab COMMAND`: the same core functions the nodes call, from a terminal.

Each command lives in a module with `add_arguments(parser)` and `run(args) -> int`; imports are lazy so `--help`
is instant and a missing extra only breaks its own command.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .core.errors import Interrupted, TuneLabError

# command -> (module under tunelab, help)
COMMANDS = {
    "info": (".cli_info", "print versions, the device and the models found"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tunelab", description="TuneLab command line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=mod_name)
        importlib.import_module(mod_name, __package__).add_arguments(p)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    mod = importlib.import_module(args._module, __package__)
    try:
        return int(mod.run(args) or 0)
    except TuneLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
