"""Progress reporting and interrupt checks for long work.

Core functions take a `progress` factory `(total, desc) -> Progress`. The CLI uses the one below: a tqdm bar when
stderr is a terminal, and when it is not (a log file, a pipe, a CI job) plain lines every few percent with the
count, the rate and the ETA, so a log shows how far a run got. Only the outermost open bar writes lines (a bar
opened inside another, such as one image's steps inside a synthesis, stays quiet). Inside ComfyUI the host module
supplies a subclass backed by `comfy.utils.ProgressBar` and its interrupt flag, which writes no lines.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from typing import Callable, Optional

from .errors import Interrupted

LOG_EVERY_PERCENT = 5


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else (f"{m}:{s:02d}" if m else f"{s}s")


def _fmt_rate(rate: float) -> str:
    if rate >= 1.0 or rate == 0.0:
        return f"{rate:.1f}/s" if rate < 100 else f"{rate:.0f}/s"
    return f"{1.0 / rate:.1f}s each"


class RateLog:
    """Lines like `synthesis: 60/120 (50%), 4.1/s, elapsed 14s, ETA 14s, 00011.png` each time the count crosses
    another `every` percent (and at the end), at most one line per `min_interval` seconds between the first and
    the last, so sub-second work writes two lines, not twenty. The rate is measured from the first update on, so a
    resumed run's initial jump (training from a checkpoint) does not inflate it."""

    def __init__(self, total: int, desc: str = "", *, write: Optional[Callable[[str], None]] = None,
                 every: int = LOG_EVERY_PERCENT, min_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc = max(int(total), 1), desc or "progress"
        self.write, self.every, self.clock = write or _to_stderr, max(1, int(every)), clock
        self.start = clock()
        self._base: Optional[tuple] = None  # (time, value) of the first update
        self.min_interval = float(min_interval)
        self._bucket = -1
        self._last = -math.inf  # when the last line was written
        self.lines = 0

    def update_to(self, value: int, info: Optional[str] = None) -> Optional[str]:
        """Record the new count; returns (and writes) a line when one is due."""
        now = self.clock()
        value = min(max(int(value), 0), self.total)
        if self._base is None:
            self._base = (now, value)
        bucket = value * 100 // (self.total * self.every)
        if bucket <= self._bucket and value < self.total:
            return None
        if value == self.total and self._bucket == 100 // self.every + 1:
            return None  # the final line was written already
        if value < self.total and now - self._last < self.min_interval:
            return None  # too soon after the last line; the next due update writes
        self._last = now
        self._bucket = bucket if value < self.total else 100 // self.every + 1
        t0, v0 = self._base
        done, spent = value - v0, now - t0
        parts = [f"{self.desc}: {value}/{self.total} ({value * 100 // self.total}%)"]
        if done > 0 and spent > 0:
            rate = done / spent
            parts.append(_fmt_rate(rate))
            parts.append(f"elapsed {_fmt_seconds(now - self.start)}")
            if value < self.total:
                parts.append(f"ETA {_fmt_seconds((self.total - value) / rate)}")
        else:
            parts.append(f"elapsed {_fmt_seconds(now - self.start)}")
        if info:
            parts.append(str(info))
        line = ", ".join(parts)
        self.write(line)
        self.lines += 1
        return line


def _to_stderr(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):  # a closed or missing log must not stop the work
        pass


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


_LOCK = threading.Lock()
_LOGGING = 0  # open bars that write lines; only the outermost one does


class Progress:
    """A tqdm bar in the terminal, lines every few percent otherwise. Subclasses route to other front ends."""

    log_lines = True  # write RateLog lines when stderr is not a terminal

    def __init__(self, total: int, desc: str = ""):
        global _LOGGING
        self.total = max(int(total), 1)
        self.value = 0
        self._bar = None
        self._log: Optional[RateLog] = None
        terminal = _stderr_is_terminal()
        if terminal:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=self.total, desc=desc, leave=False)
            except ImportError:  # tqdm comes with diffusers; stay silent without it
                pass
        elif self.log_lines:
            with _LOCK:
                if _LOGGING == 0:
                    self._log = RateLog(self.total, desc)
                    _LOGGING += 1

    def update(self, n: int = 1, info: Optional[str] = None) -> None:
        self.value = min(self.value + n, self.total)
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix_str(info, refresh=False)
        if self._log is not None:
            self._log.update_to(self.value, info)

    def preview(self, image) -> None:
        """Show a PIL image while the work runs (ComfyUI's node preview); nothing in the terminal."""

    def interrupted(self) -> bool:
        return False

    def check(self) -> None:
        """Raise at a safe boundary if the user asked to stop."""
        if self.interrupted():
            raise Interrupted("interrupted by the user")

    def close(self) -> None:
        global _LOGGING
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._log is not None:
            self._log = None
            with _LOCK:
                _LOGGING = max(0, _LOGGING - 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):  # a bar dropped without close() must not silence the next one
        try:
            if getattr(self, "_log", None) is not None:
                self.close()
        except Exception:
            pass


ProgressFactory = Callable[[int, str], Progress]



class ItemSteps(Progress):
    """The progress handed to `generate` for one item of a job (an image, an evaluation cell): its steps move the
    job's bar by exactly `units` units per item, whatever the scheduler's split, the last one given by `finish`
    once the item's files are in place; every step asks the job's bar about an interrupt. It is also its own
    factory (`progress(total, desc)` returns it)."""

    def __init__(self, outer, units: int):
        self.outer, self.units, self.used = outer, units, 0
        self.total, self.value = units, 0
        self._bar = self._log = None

    def __call__(self, total, desc):
        return self

    def update(self, n: int = 1, info: Optional[str] = None) -> None:
        n = min(n, self.units - 1 - self.used)
        if n > 0:
            self.used += n
            self.outer.update(n, info)

    def finish(self, info: str) -> None:
        self.outer.update(self.units - self.used, info)
        self.used = self.units

    def interrupted(self) -> bool:
        return self.outer.interrupted()

    def close(self) -> None:
        pass


def make(factory: Optional[ProgressFactory], total: int, desc: str = "") -> Progress:
    return (factory or Progress)(total, desc)
