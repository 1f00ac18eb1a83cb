"""Errors a user can act on: each names the input at fault and the fix.

A message may mention another input with `ref(name)`. Nodes show input names as they are; the command line
(`cli.run_command`) spells both the input at fault and every `ref` as its flag (`output` -> `--out`), in one place.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

_REF = re.compile("\u27e8([A-Za-z0-9_]+)\u27e9")


def ref(name: str) -> str:
    """A mention of another input inside a message; rendered as the input's name, or on the CLI as its flag."""
    return f"\u27e8{name}\u27e9"


def render_refs(text: str, spell: Optional[Callable[[str], str]] = None) -> str:
    return _REF.sub(lambda m: (spell or (lambda name: name))(m.group(1)), str(text))


class TuneLabError(ValueError):
    """Bad input or an unusable file. The message names the input and what to do.

    `value` (optional) is shown after the input's name, e.g. `resume latest: ...` in a node and `--resume latest:
    ...` on the command line, so the message itself never repeats either."""

    def __init__(self, message: str, *, input_name: Optional[str] = None, value=None):
        self.input_name = input_name
        self.message = message
        self.value = value
        super().__init__(self.render())

    def render(self, spell: Optional[Callable[[str], str]] = None) -> str:
        """The one-line message; `spell` maps an input name to how the caller names it (default: unchanged)."""
        spell = spell or (lambda name: name)
        text = render_refs(self.message, spell)
        if not self.input_name:
            return text
        head, _, rest = self.input_name.partition(" ")
        who = spell(head) + (f" {rest}" if rest else "")
        if self.value is not None:
            who += f" {self.value}"
        return f"{who}: {text}"


class Interrupted(RuntimeError):
    """Raised at a safe boundary when the user asked to stop (Ctrl-C, SIGTERM, ComfyUI's interrupt)."""

    def __init__(self, message: str = ""):
        self.message = message
        super().__init__(render_refs(message))

    def render(self, spell: Optional[Callable[[str], str]] = None) -> str:
        return render_refs(self.message, spell)
