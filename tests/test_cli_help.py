"""Every command's --help says the truth: each flag explained (not empty, not just its own name), a default stated
once, the default model named, the scheduler's accepted values listed."""
import argparse
import re

import pytest

from tunelab.cli import build_parser


def _parsers():
    """(command path, parser) for every command and subcommand, and the trainers' own entry."""
    from tunelab.training.__main__ import TRAINERS

    def walk(prefix, parser):
        yield prefix, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(f"{prefix} {name}".strip(), child)

    yield from walk("", build_parser())
    training = argparse.ArgumentParser(prog="python -m tunelab.training")
    sub = training.add_subparsers(dest="trainer")
    import importlib

    for name, (mod, _) in TRAINERS.items():
        p = sub.add_parser(name)
        importlib.import_module(mod, "tunelab.training").add_arguments(p)
        yield f"training {name}", p


PARSERS = list(_parsers())


def _help(parser, action) -> str:
    text = action.help or ""
    return text % {**vars(action), "prog": parser.prog, "default": action.default} if "%" in text else text


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n or "tunelab" for n, _ in PARSERS])
def test_help_rules(name, parser):
    parser.format_help()  # renders (a stray % would raise here)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        flag = max(action.option_strings, key=len) if action.option_strings else action.dest
        text = _help(parser, action).strip()
        bare = flag.lstrip("-").replace("-", " ").replace("_", " ").lower()
        assert text and text.lower().strip(" .") != bare, f"{name} {flag}: help is empty or just its name"
        assert not re.fullmatch(r"\(?default:? [^)]*\)?", text), f"{name} {flag}: help is only its default"
        # "(default X)" at most once ("default" alone may be a value, e.g. the scheduler named default)
        assert len(re.findall(r"\(default\b|[;,] default\b", text)) <= 1, f"{name} {flag}: default twice: {text}"
        if flag == "--model":
            assert "tiny" in text and "default" in text, f"{name} --model: the default (tiny) model is not named"
        if flag == "--scheduler":
            from tunelab.core.sampling import SCHEDULERS

            assert list(action.choices) == list(SCHEDULERS), f"{name} --scheduler does not refuse bad values"
            assert all(s in text for s in SCHEDULERS), f"{name} --scheduler: accepted values not listed"


def test_every_command_has_a_help_line():
    from tunelab.cli import COMMANDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for choice in sub._choices_actions:
        assert choice.help and choice.help.strip() != choice.dest
