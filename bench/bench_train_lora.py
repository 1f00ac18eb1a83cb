"""TuneLab's LoRA trainer vs a plain loop that mirrors diffusers' train_dreambooth_lora_sdxl.py, on tiny-sdxl, in one
run.

Both sides train the same LoRA (rank 4 on to_k/to_q/to_v/to_out.0, AdamW, constant LR, batch 4, 64 px) on the same
4-image dataset. The plain loop does what the script does per step when nothing is cached: tokenize and run both
text encoders, VAE-encode the batch, then noise, UNet forward/backward, clip, AdamW step (torch's default
implementation). TuneLab encodes the instance prompt once (frozen text encoders), with `cache_latents` each image's
latent distribution once, and steps AdamW with torch's fused kernel (same math, one kernel for the LoRA's many small
tensors).

Printed: median seconds per optimizer step of each side (steps after the first, so setup and caching are excluded;
rounds alternate the two sides so machine-load drift hits both), the time ratio TuneLab / plain (target <= 0.8),
and the peak memory of one whole run of each side above the state before it (CUDA allocator stats on a GPU, else
sampled process RSS), as a ratio.

Run: python bench/bench_train_lora.py [--steps N] [--rounds R] [--threads T]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import peak_memory, report  # noqa: E402


def make_dataset(folder: Path, n: int = 4, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[..., i % 3] = 200
        a[:: 4 + i] = 255
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i:02d}.png", "text": "wrong"}) + "\n"
                                                   for i in range(n)))
    return folder


class StepClock:
    """A progress object that records when each optimizer step finished."""

    stamps: list = []

    def __init__(self, total, desc=""):
        StepClock.stamps = []

    def update(self, n=1, info=None):
        StepClock.stamps.append(time.perf_counter())

    def interrupted(self):
        return False

    def check(self):
        pass

    def close(self):
        pass


def tunelab_run(handle, data: Path, out: Path, steps: int) -> list:
    from tunelab.training.lora_sdxl import LoraTrainConfig, train

    train(LoraTrainConfig(data_dir=str(data), output=str(out), model=handle, resolution=64, max_train_steps=steps,
                          train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-4, rank=4, seed=0,
                          cache_latents=True, checkpointing_steps=0), progress=StepClock)
    s = StepClock.stamps
    return [b - a for a, b in zip(s, s[1:])]


def plain_run(handle, data: Path, steps: int) -> list:
    """The script's loop, written out plainly (its dataset class preprocesses once; everything else every step)."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image

    pipe = handle.pipe
    unet, vae = pipe.unet, pipe.vae
    tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    pixels = []
    for p in sorted(data.glob("*.png")):
        a = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        pixels.append(torch.from_numpy(a).permute(2, 0, 1))
    pixels = torch.stack(pixels)
    grads = [(p, p.requires_grad) for m in (unet, vae, *encoders) for p in m.parameters()]
    for m in (unet, vae, *encoders):
        m.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]), adapter_name="bench_plain")
    params = [p for n, p in unet.named_parameters() if "bench_plain" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 4, dtype=torch.float32)
    unet.train()
    times = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            with torch.no_grad():
                embeds, pooled = [], None
                for tok, te in zip(tokenizers, encoders):
                    ids = tok(["wrong"] * 4, padding="max_length", max_length=tok.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
                    out = te(ids, output_hidden_states=True)
                    pooled = out[0]
                    embeds.append(out.hidden_states[-2])
                embeds = torch.cat(embeds, dim=-1)
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (4,))
            noisy = noise_scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, embeds, added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled}).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            loss.item()
            times.append(time.perf_counter() - t0)
    finally:
        unet.delete_adapters("bench_plain")
        unet.eval()
        for p, g in grads:
            p.requires_grad_(g)
    return times[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a small shared CPU more threads spin)")
    args = parser.parse_args(argv)

    import torch

    from tunelab.core import models

    if args.threads:
        torch.set_num_threads(args.threads)
    handle = models.load("tiny-sdxl", device="cpu" if not torch.cuda.is_available() else "cuda")
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-bench-train-"))
    data = make_dataset(tmp / "data")
    ours, plain = [], []
    tunelab_run(handle, data, tmp / "warm.safetensors", 2)  # warm-up: both code paths paged in
    plain_run(handle, data, 2)
    for r in range(args.rounds):
        sides = [("t", lambda: ours.append(statistics.median(tunelab_run(handle, data, tmp / f"r{r}.safetensors",
                                                                         args.steps)))),
                 ("p", lambda: plain.append(statistics.median(plain_run(handle, data, args.steps))))]
        for _, f in (sides if r % 2 == 0 else sides[::-1]):
            f()
    t_ours, t_plain = statistics.median(ours), statistics.median(plain)
    print(f"tiny-sdxl, 64 px, batch 4, rank 4, {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} "
          f"thread(s), device {handle.device}")
    print(f"median step: tunelab {t_ours * 1000:.1f} ms (cached text + latents), plain loop {t_plain * 1000:.1f} ms "
          "(encodes text and VAE every step)")
    ok = report("step time ratio tunelab/plain", t_ours / t_plain, 0.8)
    m_ours = peak_memory(lambda: tunelab_run(handle, data, tmp / "mem.safetensors", args.steps))
    m_plain = peak_memory(lambda: plain_run(handle, data, args.steps))
    print(f"peak memory above baseline: tunelab {m_ours / 2**20:.1f} MiB, plain {m_plain / 2**20:.1f} MiB, "
          f"ratio {m_ours / max(m_plain, 1):.2f}"
          + ("" if torch.cuda.is_available() else " (CPU RSS: memory freed by earlier runs is reused, so at this size "
             "both sides stay near 0; the peak that matters is on a GPU)"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
