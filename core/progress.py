"""Progress reporting and interrupt checks for long work.

Core functions take a `progress` factory `(total, desc) -> Progress`. The CLI uses the tqdm one below;
inside ComfyUI the host module supplies one backed by `comfy.utils.ProgressBar` and its interrupt flag.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

from .errors import Interrupted


class Progress:
    """A tqdm bar in the terminal. Subclasses route to other front ends."""

    def __init__(self, total: int, desc: str = ""):
        self.total = max(int(total), 1)
        self.value = 0
        self._bar = None
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, leave=False, disable=not sys.stderr.isatty())
        except ImportError:  # tqdm comes with diffusers; stay silent without it
            pass

    def update(self, n: int = 1, info: Optional[str] = None) -> None:
        self.value = min(self.value + n, self.total)
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix_str(info, refresh=False)

    def preview(self, image) -> None:
        """Show a PIL image while the work runs (ComfyUI's node preview); nothing in the terminal."""

    def interrupted(self) -> bool:
        return False

    def check(self) -> None:
        """Raise at a safe boundary if the user asked to stop."""
        if self.interrupted():
            raise Interrupted("interrupted by the user")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


ProgressFactory = Callable[[int, str], Progress]


def make(factory: Optional[ProgressFactory], total: int, desc: str = "") -> Progress:
    return (factory or Progress)(total, desc)
