"""TuneLab Generate vs a direct diffusers call, and the three-way comparison vs one generation (tiny-sdxl).

    python bench/bench_generate.py [--steps 20] [--size 128] [--repeats 10]

Prints ratios measured side by side in one run:
  generate / direct diffusers (target <= 1.02), comparison / one generation (time <= 3.1, peak memory <= 1.1).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _measure import interleaved, peak_memory, report  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    from tunelab.core import compare, lora, models, sampling, tiny
    from tunelab.core.prompt import encode

    base = models.load("tiny-sdxl", device="cpu", dtype="fp32")
    lora_pipe = lora.load(base, tiny.wrong_lora(), 1.0)
    cond = encode(base, compare.DEFAULT_PROMPT, "wrong")
    kw = dict(steps=args.steps, guidance=13.0, width=args.size, height=args.size)

    def ours():
        sampling.generate(base, cond, seed=1, **kw)

    def direct():
        lora.activate(base)
        with torch.no_grad():
            base.pipe(**cond.diffusers_kwargs(), num_inference_steps=args.steps, guidance_scale=13.0,
                      height=args.size, width=args.size, generator=torch.Generator().manual_seed(1), output_type="pt")

    states = compare.default_states(base, lora_pipe)

    def comparison():
        compare.run(states, compare.DEFAULT_PROMPT, seed=1, **kw)

    def one_generation():  # one panel's full work: encode + generate + PIL conversion
        c = encode(lora_pipe, compare.DEFAULT_PROMPT, "wrong")
        from tunelab.core.images import tensor_to_pil

        tensor_to_pil(sampling.generate(lora_pipe, c, seed=1, **kw))

    t = interleaved({"ours": ours, "direct": direct}, repeats=args.repeats)
    print(f"tiny-sdxl, {args.steps} steps, {args.size}x{args.size}, torch threads {torch.get_num_threads()}")
    print(f"generate {t['ours'] * 1000:.1f} ms, direct diffusers {t['direct'] * 1000:.1f} ms")
    ok = report("TuneLab Generate / direct diffusers (time)", t["ours"] / t["direct"], 1.02)
    t2 = interleaved({"cmp": comparison, "one": one_generation}, repeats=max(3, args.repeats // 2), warmup=1)
    print(f"comparison {t2['cmp'] * 1000:.1f} ms, one generation {t2['one'] * 1000:.1f} ms")
    ok &= report("three-way comparison / one generation (time)", t2["cmp"] / t2["one"], 3.1)
    m_one = max(peak_memory(one_generation), 1)
    m_cmp = peak_memory(comparison)
    ok &= report("three-way comparison / one generation (peak memory)", m_cmp / m_one, 1.1,
                 f"{m_cmp / 2**20:.1f} MiB vs {m_one / 2**20:.1f} MiB above the loaded state")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
