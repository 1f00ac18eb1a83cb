"""Shared benchmark helpers: interleaved timing and peak memory above a baseline, measured in one run."""
from __future__ import annotations

import statistics
import threading
import time


def interleaved(funcs: dict, repeats: int = 10, warmup: int = 2) -> dict:
    """Median seconds per call for each function, run in alternation (order reversed every round) so drift and
    cache effects hit every side alike."""
    for _ in range(warmup):
        for f in funcs.values():
            f()
    times = {k: [] for k in funcs}
    order = list(funcs.items())
    for i in range(repeats):
        for k, f in (order if i % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(func) -> int:
    """Peak bytes allocated above the state before `func` (CUDA allocator stats, else sampled process RSS)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        func()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import gc

    import psutil

    gc.collect()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        func()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return peak[0] - base


def report(name: str, ratio: float, target: float, detail: str = "") -> bool:
    ok = ratio <= target
    print(f"{name}: {ratio:.3f} (target <= {target}) {'OK' if ok else 'OVER TARGET'}{'  ' + detail if detail else ''}")
    return ok
