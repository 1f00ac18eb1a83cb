"""Scoring overhead of a scored comparison, and the cost of the negative-only LoRA state (tiny-sdxl, CPU).

    python bench/bench_scoring.py [--steps 20] [--size 128] [--repeats 8]

Prints ratios measured side by side in one run:
  scoring one image (CLIP score + PickScore, tiny scorers) / generating it          (target <= 0.10)
  one evaluation cell (generate, save PNG, score, write record) / generate + score  (target <= 1.10)
  ordinary LoRA state through compare.generate_state / direct diffusers call       (target <= 1.02)
  negative-only LoRA state / ordinary LoRA state (two UNet calls at batch 1 vs one at batch 2; target <= 2.2)
On real models the first ratio is far smaller: CLIP ViT-L/14 and PickScore (ViT-H/14) embed one 224x224 image
while SDXL runs 2 x 50 UNet passes at 128x128 latents; the tiny presets shrink both sides, not alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _measure import interleaved, report  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()

    from tunelab.core import compare, evaluation, lora, models, scoring, tiny
    from tunelab.core.images import tensor_to_pil
    from tunelab.core.prompt import encode

    base = models.load("tiny-sdxl", device="cpu", dtype="fp32")
    lora_pipe = lora.load(base, tiny.wrong_lora(), 1.0)
    scorers = {"clip_score": scoring.load("tiny-clip", "clip", device="cpu"),
               "pickscore": scoring.load("tiny-pickscore", "pickscore", device="cpu")}
    prompt = compare.DEFAULT_PROMPT
    kw = dict(steps=args.steps, guidance=13.0, width=args.size, height=args.size)
    lora_neg, neg_only = compare.named_states(["lora_negative", "lora_negative_only"], base, lora_pipe, "wrong")
    image = tensor_to_pil(compare.generate_state(lora_neg, prompt, seed=1, **kw))[0]

    def generate():
        compare.generate_state(lora_neg, prompt, seed=1, **kw)

    def score():
        for s in scorers.values():
            s._texts.clear()  # the text embedding too, as for a prompt's first cell
            s.score(image, prompt)

    def generate_and_score():
        img = tensor_to_pil(compare.generate_state(lora_neg, prompt, seed=1, **kw))[0]
        for s in scorers.values():
            s._texts.clear()
            s.score(img, prompt)

    tmp = tempfile.mkdtemp(prefix="tunelab-bench-")
    runs = [0]

    def one_cell():  # a fresh folder each time: plan, one cell (PNG + record), report
        runs[0] += 1
        for s in scorers.values():
            s._texts.clear()
        evaluation.run(os.path.join(tmp, str(runs[0])), [lora_neg], [prompt], [1], scorers=scorers, resamples=100,
                       **kw)

    cond = encode(lora_pipe, prompt, "wrong")

    def direct():
        lora.activate(lora_pipe)
        with torch.no_grad():
            lora_pipe.pipe(**cond.diffusers_kwargs(), num_inference_steps=args.steps, guidance_scale=13.0,
                           height=args.size, width=args.size, generator=torch.Generator().manual_seed(1),
                           output_type="pt")

    def negative_only():
        compare.generate_state(neg_only, prompt, seed=1, **kw)

    print(f"tiny-sdxl, {args.steps} steps, {args.size}x{args.size}, tiny-clip + tiny-pickscore, torch threads "
          f"{torch.get_num_threads()}")
    t = interleaved({"generate": generate, "score": score}, repeats=args.repeats)
    print(f"generate {t['generate'] * 1000:.1f} ms, score (CLIP score + PickScore) {t['score'] * 1000:.1f} ms")
    ok = report("scoring / generation per image (time)", t["score"] / t["generate"], 0.10)
    t2 = interleaved({"cell": one_cell, "plain": generate_and_score}, repeats=max(3, args.repeats // 2), warmup=1)
    print(f"evaluation cell {t2['cell'] * 1000:.1f} ms, generate + score {t2['plain'] * 1000:.1f} ms")
    ok &= report("evaluation cell / generate + score (time)", t2["cell"] / t2["plain"], 1.10,
                 "(plan, atomic PNG and record, report of one cell)")
    t3 = interleaved({"ours": generate, "direct": direct, "neg_only": negative_only}, repeats=args.repeats)
    print(f"LoRA state {t3['ours'] * 1000:.1f} ms, direct diffusers {t3['direct'] * 1000:.1f} ms, "
          f"negative-only LoRA state {t3['neg_only'] * 1000:.1f} ms")
    ok &= report("ordinary LoRA state / direct diffusers (time)", t3["ours"] / t3["direct"], 1.02)
    ok &= report("negative-only LoRA state / ordinary LoRA state (time)", t3["neg_only"] / t3["ours"], 2.2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
