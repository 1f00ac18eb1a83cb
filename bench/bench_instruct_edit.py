"""TuneLab Instruct Edit vs a direct diffusers StableDiffusionInstructPix2PixPipeline call (tiny-ip2p), in one run.

    python bench/bench_instruct_edit.py [--steps 20] [--size 64] [--repeats 30] [--threads N]

Both sides edit the same image with the same instruction at the seed's settings (image guidance 1.5, guidance 7.0)
and encode the instruction on every call: TuneLab through `core.prompt.encode` (compel), diffusers from the prompt
string with its own tokenizer. Calls are interleaved, the order reversed every round, so drift in machine load and
order effects hit both alike. Printed: the median
time per call of each side and the ratio TuneLab / diffusers (target <= 1.02); a second line shows diffusers fed
TuneLab's precomputed embeddings, i.e. the sampling alone. On a shared, busy CPU, `--threads 1` keeps torch's
thread pool from fighting other processes (multi-threaded timings there swing by tens of percent).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _measure import report  # noqa: E402

INSTRUCTION = "Generate a cartoonized version of the natural image"


def alternating(funcs: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call, the order of the sides reversed every round (ABC CBA ...), so neither side always
    runs right after the same neighbour (cache and frequency effects)."""
    import statistics
    import time

    items = list(funcs.items())
    for _ in range(warmup):
        for _, f in items:
            f()
    times = {k: [] for k in funcs}
    for r in range(repeats):
        for k, f in (items if r % 2 == 0 else items[::-1]):
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import numpy as np
    from PIL import Image

    from tunelab.core import instruct, models
    from tunelab.core.images import pil_to_tensor
    from tunelab.core.prompt import encode

    handle = models.load("tiny-ip2p", device="cpu", dtype="fp32")
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    image = pil_to_tensor([pil])
    kw = dict(num_inference_steps=args.steps, image_guidance_scale=1.5, guidance_scale=7.0, output_type="pt")

    def ours():
        instruct.edit(handle, image, INSTRUCTION, steps=args.steps, seed=1)

    def direct():
        with torch.no_grad():
            handle.pipe(prompt=INSTRUCTION, image=pil, generator=torch.Generator().manual_seed(1), **kw)

    cond = encode(handle, INSTRUCTION, "")

    def direct_embeds():
        with torch.no_grad():
            handle.pipe(prompt_embeds=cond.embeds, negative_prompt_embeds=cond.negative_embeds, image=pil,
                        generator=torch.Generator().manual_seed(1), **kw)

    t = alternating({"ours": ours, "direct": direct, "embeds": direct_embeds}, repeats=args.repeats)
    print(f"tiny-ip2p, {args.steps} steps, {args.size}x{args.size}, torch threads {torch.get_num_threads()}")
    print(f"instruct edit {t['ours'] * 1000:.1f} ms, direct diffusers {t['direct'] * 1000:.1f} ms, "
          f"direct diffusers with precomputed embeddings {t['embeds'] * 1000:.1f} ms")
    ok = report("TuneLab Instruct Edit / direct diffusers (time)", t["ours"] / t["direct"], 1.02)
    print(f"(TuneLab Instruct Edit / direct diffusers with precomputed embeddings: {t['ours'] / t['embeds']:.3f})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
