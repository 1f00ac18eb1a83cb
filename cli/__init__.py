"""`python -m tunelab COMMAND`: the same core functions the nodes call, from a terminal.

Each command lives in a module with `add_arguments(parser)` and `run(args) -> int`; imports are lazy so `--help`
is instant and a missing extra only breaks its own command. A command may declare `INPUT_FLAGS`, the core input
names its flags set under another name (`{"output": "out"}`); `run_command` spells every message with them.
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
            module = importlib.import_module(mod_name, __package__)
            module.add_arguments(p)
        except ImportError as e:  # a missing extra disables its own command only
            if (e.name or "").split(".")[0] in ("", __package__.split(".")[0]):
                raise  # one of our own modules is broken: that is a bug, not a missing extra
            p.set_defaults(_unavailable=f"'{name}' is unavailable: {e}")
            p.add_argument("rest", nargs=argparse.REMAINDER)
            continue
        attach_flags(p, getattr(module, "INPUT_FLAGS", {}))
    return parser


# core input names -> the flag (its dest) that sets them, where every command spells them the same way
INPUT_FLAGS = {"output": "out", "out_dir": "out", "output_dir": "out", "output_name": "out", "dataset_name": "out",
               "data_dir": "data", "dataset_path": "data", "width": "size", "height": "size", "lora_name": "lora",
               "pipe": "model"}


def _walk(parser):
    """The parser and every parser below it (subcommands such as instruct-data folders)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _walk(child)


def attach_flags(parser, aliases: dict) -> None:
    """Record how this command spells each input: {dest or core input name: "--flag" / "WORKFLOW"}."""
    flags = {}
    for p in _walk(parser):
        for action in p._actions:
            if action.dest in (argparse.SUPPRESS, "help") or isinstance(action, argparse._SubParsersAction):
                continue
            longs = [o for o in action.option_strings if o.startswith("--")]
            flags.setdefault(action.dest, longs[0] if longs else (action.metavar or action.dest.upper()))
    for name, dest in {**INPUT_FLAGS, **aliases}.items():
        if dest in flags and name not in flags:
            flags[name] = flags[dest]
    parser.set_defaults(_flags=flags)


def spell_for(args):
    """The function that names an input in messages: its flag when the command has one, else the input's name."""
    flags = getattr(args, "_flags", None) or {}
    return lambda name: flags.get(name, name)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "_unavailable", None):
        print(f"error: {args._unavailable}", file=sys.stderr)
        return 2
    return run_command(importlib.import_module(args._module, __package__).run, args)


def run_command(run, args) -> int:
    """Run a command's `run(args)`: a TuneLabError is a clear message and exit 2, an interrupt exit 130."""
    spell = spell_for(args)
    try:
        return int(run(args) or 0)
    except TuneLabError as e:  # one line, inputs named by their flags (--out, --resume latest)
        print(f"error: {e.render(spell)}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        text = e.render(spell) if isinstance(e, Interrupted) else str(e)
        print(f"interrupted: {text}" if text else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
