"""TuneLab Weighted Prompt (CLIP) vs ComfyUI's own CLIPTextEncode on the same unweighted prompts, in one run.

Both sides encode the same (positive, negative) pairs on one native ComfyUI CLIP: TuneLab's node in one call (it
returns both), CLIPTextEncode once per prompt. Calls alternate in order every round. The CLIP is ComfyUI's own SDXL
CLIP class built for the tiny-sdxl text encoders (tests/comfyui_tiny_models.py registers the tiny architecture; the
weights are the preset's, rounded to fp16 as ComfyUI stores them). Printed: median ms per call of each side and the
ratio of summed times, TuneLab / CLIPTextEncode, with the compel parse cache cold (emptied before every call, the
fair comparison) and warm (as a re-queued prompt finds it). The target (<= 1.10) applies to prompts of one chunk,
as real prompts mostly are (the tiny character-level tokenizer makes ~75 characters a chunk); a two-chunk pair is
reported beside it.

Needs ComfyUI: run it with ComfyUI's python, or give --comfyui and it re-runs itself there:

    python bench/bench_native_prompt.py --comfyui /path/to/ComfyUI [--rounds 20] [--threads 1] [--cuda]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
SUPPORT = None  # tests/comfyui_bench_support.py, imported once ComfyUI's environment is known
PAIRS = [
    ("a photo of a cat sitting on a windowsill in the morning light", "blurry, low quality"),
    ("a landscape of San Francisco by Salvador Dali, oil on canvas", "wrong"),
    # two chunks with the tiny presets' character-level tokenizer
    ("hyperrealistic death metal album cover featuring edgy moody realistic human Super Mario, edgy and moody", ""),
]


def _in_comfyui(args) -> None:
    if importlib.util.find_spec("comfy") is not None:
        return
    if not args.comfyui:
        sys.exit("this benchmark needs ComfyUI: run it with ComfyUI's python or pass --comfyui PATH")
    root = Path(args.comfyui).expanduser().resolve()
    python = root / ".venv" / "bin" / "python"
    cmd = [str(python if python.is_file() else sys.executable), str(Path(__file__).resolve()), *sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    sys.exit(subprocess.call(cmd, cwd=root, env=env))


def _load_pack():
    spec = importlib.util.spec_from_file_location("tunelab", PACK / "__init__.py",
                                                  submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tunelab"] = module
    spec.loader.exec_module(module)
    return module


def _tiny_sdxl_clip(tmp: Path):
    """A native CLIP (ComfyUI's SDXL CLIP classes) holding tiny-sdxl's text encoders."""
    from diffusers import StableDiffusionXLPipeline

    from tunelab.core import tiny

    tiny.write_tokenizer_files(tmp / "tokenizer")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny.ensure("tiny-sdxl")), local_files_only=True)
    return SUPPORT.tiny_sdxl_clip(tmp / "tokenizer", pipe)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", help="a ComfyUI checkout to run in (when this python has no ComfyUI)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds over all prompt pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cuda", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    args = parser.parse_args(argv)
    _in_comfyui(args)
    global SUPPORT
    sys.path.insert(0, str(PACK / "tests"))
    import comfyui_bench_support as SUPPORT

    SUPPORT.start(cpu=not args.cuda)
    import torch

    torch.set_num_threads(args.threads)
    _load_pack()
    from tunelab.core import prompt as tl_prompt
    from tunelab.nodes.native_prompt import WeightedPromptCLIP

    with tempfile.TemporaryDirectory() as tmp:
        clip = _tiny_sdxl_clip(Path(tmp))
    ours, native = WeightedPromptCLIP(), SUPPORT.clip_text_encode()

    def tunelab_cold(p, n):
        tl_prompt._parse.cache_clear()
        return ours.encode(clip, p, n)

    def tunelab_warm(p, n):
        return ours.encode(clip, p, n)

    def cliptextencode(p, n):
        return native.encode(clip, p)[0], native.encode(clip, n)[0]

    sides = {"tunelab cold": tunelab_cold, "tunelab warm": tunelab_warm, "CLIPTextEncode": cliptextencode}
    with torch.inference_mode():
        for p, n in PAIRS:  # warm-up, and a check: unweighted text in one chunk gives CLIPTextEncode's tensors
            (a,), (b,) = tunelab_cold(p, n)[0], cliptextencode(p, n)[0]
            if a[0].shape[1] == b[0].shape[1] == 77:  # longer: compel and ComfyUI choose other chunk boundaries
                assert torch.equal(a[0], b[0]) and torch.equal(a[1]["pooled_output"], b[1]["pooled_output"]), p
            tunelab_warm(p, n)
        groups = {"one chunk": PAIRS[:2], "two chunks": PAIRS[2:]}
        times = {g: {k: [] for k in sides} for g in groups}
        order = list(sides)
        for r in range(args.rounds):
            for g, pairs in groups.items():
                for p, n in pairs:
                    for name in (order if r % 2 == 0 else order[::-1]):
                        t0 = time.perf_counter()
                        sides[name](p, n)
                        times[g][name].append(time.perf_counter() - t0)

    device = "cuda" if args.cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"tiny SDXL CLIP in ComfyUI, {device}, torch {torch.__version__}; {args.rounds} interleaved rounds "
          f"(CLIPTextEncode: 2 node calls per pair)")
    ratios = {}
    for g, t in times.items():
        print(f" {g}: {len(t['CLIPTextEncode'])} pairs per side")
        for name in sides:
            print(f"  {name:15s} median {statistics.median(t[name]) * 1e3:7.2f} ms/pair   total "
                  f"{sum(t[name]):6.2f} s")
        base = sum(t["CLIPTextEncode"])
        ratios[g] = (sum(t["tunelab cold"]) / base, sum(t["tunelab warm"]) / base)
        print(f"  ratio TuneLab Weighted Prompt (CLIP) / CLIPTextEncode: cold {ratios[g][0]:.3f}   "
              f"warm {ratios[g][1]:.3f}")
    print("  (two chunks: compel's pooled vector is CLIP-G on the raw text cut at 75 tokens, while its first "
          "chunk ends at a phrase boundary, so compel needs one window more than CLIPTextEncode there)")
    cold = ratios["one chunk"][0]
    ok = cold <= 1.10
    print(f"target <= 1.10 on one-chunk prompts, cold: {cold:.3f} {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
