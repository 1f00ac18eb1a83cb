"""Paired statistics for scored comparisons: means with bootstrap intervals, win rates, sign tests.

The unit is a (prompt, seed) pair: every state is generated for every unit, so the states' scores are paired and
compared unit by unit. One seeded set of bootstrap resamples of the units (numpy's PCG64, percentile intervals) is
shared by every state and every pair, so the intervals are paired too and a rerun gives the same numbers.

- Mean per state: the mean over units, with the 2.5/97.5 % percentiles of the resampled means (95 % by default).
- Win rate of A over B: the fraction of units where A scores higher, a tie (exactly equal scores, e.g. identical
  images) counting one half; its interval from the same resamples. With no variation (all wins, all ties) the
  interval is a point: the bootstrap cannot show uncertainty the sample does not have. The exact two-sided sign
  test on wins vs losses (ties left out) gives the p-value for "A and B are equally good", which does account for
  the number of units (10 wins of 10: p = 0.002).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from .errors import TuneLabError

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
MAX_RESAMPLES = 100_000


def check_resamples(resamples: int) -> int:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or not 100 <= resamples <= MAX_RESAMPLES:
        raise TuneLabError(f"{resamples!r} is out of range; use 100..{MAX_RESAMPLES} bootstrap resamples",
                           input_name="resamples")
    return resamples


def resample_indices(units: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
    """[resamples, units] indices of units drawn with replacement (seeded, the same on every machine)."""
    import numpy as np

    if units < 1:
        raise TuneLabError("no scored units to summarize", input_name="prompts")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    return rng.integers(0, units, size=(int(resamples), int(units)))


def _interval(samples, level: float) -> tuple:
    import numpy as np

    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def mean_interval(values: Sequence[float], indices, level: float = DEFAULT_LEVEL) -> dict:
    """{"mean", "low", "high", "std"} of per-unit values with the bootstrap interval over `indices`."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    lo, hi = _interval(v[indices].mean(axis=1), level)
    return {"mean": float(v.mean()), "low": lo, "high": hi, "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def outcomes(a: Sequence[float], b: Sequence[float]):
    """Per unit: 1 when a > b, 0.5 when equal, 0 when a < b."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test of wins vs losses (p = 0.5); 1.0 without any."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = math.fsum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def win_rate(a: Sequence[float], b: Sequence[float], indices, level: float = DEFAULT_LEVEL) -> dict:
    """{"wins", "ties", "losses", "win_rate", "low", "high", "sign_test_p"} of A over B, paired by unit."""
    import numpy as np

    o = outcomes(a, b)
    wins, ties = int((o == 1.0).sum()), int((o == 0.5).sum())
    losses = len(o) - wins - ties
    lo, hi = _interval(o[indices].mean(axis=1), level)
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": float(np.mean(o)), "low": lo, "high": hi,
            "sign_test_p": sign_test_p(wins, losses)}


def summarize(scores: Mapping[str, Sequence[float]], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
              level: float = DEFAULT_LEVEL) -> dict:
    """`scores`: state label -> one score per unit, every list in the same unit order. Returns the means with
    intervals per state and, for every ordered pair (A before B in the given order), A's win rate over B."""
    labels = list(scores)
    if not labels:
        raise TuneLabError("no states to summarize", input_name="states")
    units = {len(scores[k]) for k in labels}
    if len(units) != 1:
        raise TuneLabError("every state needs one score per (prompt, seed) unit", input_name="states")
    n = units.pop()
    idx = resample_indices(n, resamples, seed)
    out = {"units": n, "resamples": int(resamples), "seed": int(seed), "level": float(level),
           "states": {k: mean_interval(scores[k], idx, level) for k in labels}, "pairs": []}
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            out["pairs"].append({"a": a, "b": b, **win_rate(scores[a], scores[b], idx, level)})
    return out
