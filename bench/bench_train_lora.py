"""TuneLab's LoRA trainer vs a loop that does per step what diffusers' train_dreambooth_lora_sdxl.py does, on
tiny-sdxl, in one run.

Both sides train the same LoRA (rank 4 on to_k/to_q/to_v/to_out.0, AdamW, constant LR, by default batch 2 at 128 px as
the side-by-side run against the real script, frozen text encoders unless --train-text-encoder) on the same 4-image
dataset, with accelerate (accumulate, backward,
clip_grad_norm_) as the script uses it.

Per step, the script-faithful loop does what the script does:
- the instance prompt's embeddings are computed once before training (the script precomputes them when the text
  encoders are frozen and there are no custom captions) and repeated for the batch;
- the batch is VAE-encoded (`latent_dist.sample()`; the script has no latent cache);
- noise, timesteps, the per-image time ids, UNet forward and backward, grad-norm clipping, torch's AdamW with its
  default implementation, the LR scheduler step.
With --train-text-encoder both text encoders carry LoRA and the loop encodes the batch's four prompts every step.

TuneLab with its defaults: the same prompt embeddings cached once; each image's latent distribution cached once
(its pixels are prepared once, as in the script, so they never change), a latent sampled from it per step; AdamW
as torch's fused kernel (same math); with --train-text-encoder each distinct caption of a batch is encoded once.

Printed: median seconds per optimizer step of each side (steps after the first, so setup and caching are excluded;
rounds alternate the two sides so machine-load drift hits both), the time ratio TuneLab / script-faithful (target
<= 0.8), and the peak memory of one whole run of each side above the state before it (CUDA allocator stats on a GPU,
else sampled process RSS).

Run: python bench/bench_train_lora.py [--resolution PX] [--batch B] [--steps N] [--rounds R] [--threads T]
     [--train-text-encoder]
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


def tunelab_run(handle, data: Path, out: Path, steps: int, train_text_encoder: bool = False, size: int = 64,
                batch: int = 4) -> list:
    from tunelab.training.lora_sdxl import LoraTrainConfig, train

    train(LoraTrainConfig(data_dir=str(data), output=str(out), model=handle, resolution=size, max_train_steps=steps,
                          train_batch_size=batch, gradient_accumulation_steps=1, learning_rate=1e-4, rank=4, seed=0,
                          checkpointing_steps=0, train_text_encoder=train_text_encoder), progress=StepClock)
    s = StepClock.stamps
    return [b - a for a, b in zip(s, s[1:])]


def script_run(handle, data: Path, steps: int, train_text_encoder: bool = False, size: int = 64,
               batch: int = 4) -> list:
    """train_dreambooth_lora_sdxl.py's loop, written out (its dataset class preprocesses the images once)."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image

    from tunelab.training import common

    pipe = handle.pipe
    unet, vae = pipe.unet, pipe.vae
    tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    pixels = []
    for p in sorted(data.glob("*.png")):
        a = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        pixels.append(torch.from_numpy(a).permute(2, 0, 1))
    pixels = torch.stack(pixels)
    modules = (unet, vae, *encoders)
    grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for m in modules:
        m.requires_grad_(False)

    def encode(prompts):  # the script's encode_prompt: penultimate hidden states of both, pooled of the second
        embeds, pooled = [], None
        for tok, te in zip(tokenizers, encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = te(ids, output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled

    torch.manual_seed(0)
    lora = dict(r=4, lora_alpha=4, init_lora_weights="gaussian")
    unet.add_adapter(LoraConfig(target_modules=["to_k", "to_q", "to_v", "to_out.0"], **lora), adapter_name="bench")
    trained = [unet]
    if train_text_encoder:
        from tunelab.core import adapters

        for te in encoders:
            adapters.add(te, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], **lora), "bench")
            adapters.set_active(te, ["bench"])
            te.train()
        trained += encoders
    params = [p for m in trained for n, p in m.named_parameters() if ".bench." in n]
    for p in params:
        p.requires_grad_(True)
    accelerator = common.make_accelerator("no", 1, handle.device)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if not train_text_encoder:
        with torch.no_grad():
            instance_embeds, instance_pooled = encode(["wrong"])  # once, before training
    unet.train()
    times = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            with accelerator.accumulate(unet):
                rows = torch.randperm(len(pixels))[:batch]  # the dataloader's shuffled batch
                with torch.no_grad():
                    latents = vae.encode(pixels[rows]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
                noisy = noise_scheduler.add_noise(latents, noise, t)
                time_ids = torch.cat([torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
                                      for _ in range(batch)])  # compute_time_ids per image
                if train_text_encoder:
                    embeds, pooled = encode(["wrong"] * batch)
                else:
                    embeds, pooled = instance_embeds.repeat(batch, 1, 1), instance_pooled.repeat(batch, 1)
                pred = unet(noisy, t, embeds, added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled},
                            return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            loss.detach().item()
            times.append(time.perf_counter() - t0)
    finally:
        unet.delete_adapters("bench")
        unet.eval()
        if train_text_encoder:
            from tunelab.core import adapters

            for te in encoders:
                adapters.delete(te, "bench")
                te.eval()
        for p, g in grads:
            p.requires_grad_(g)
    return times[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a small shared CPU more threads spin)")
    parser.add_argument("--resolution", type=int, default=128,
                        help="image size; the dataset is made at it (default 128, as the side-by-side run against "
                             "the real script in issue 14)")
    parser.add_argument("--batch", type=int, default=2, help="images per step, of the 4-image dataset (default 2)")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="LoRA on both text encoders too (the script then encodes every step)")
    args = parser.parse_args(argv)

    import torch

    from tunelab.core import models

    if args.threads:
        torch.set_num_threads(args.threads)
    handle = models.load("tiny-sdxl", device="cpu" if not torch.cuda.is_available() else "cuda")
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-bench-train-"))
    data = make_dataset(tmp / "data", size=args.resolution)
    te, size, batch = args.train_text_encoder, args.resolution, args.batch
    kw = dict(size=size, batch=batch)
    ours, script = [], []
    tunelab_run(handle, data, tmp / "warm.safetensors", 2, te, **kw)  # warm-up: both code paths paged in
    script_run(handle, data, 2, te, **kw)
    for r in range(args.rounds):
        sides = [lambda: ours.append(statistics.median(tunelab_run(handle, data, tmp / f"r{r}.safetensors",
                                                                   args.steps, te, **kw))),
                 lambda: script.append(statistics.median(script_run(handle, data, args.steps, te, **kw)))]
        for f in (sides if r % 2 == 0 else sides[::-1]):
            f()
    t_ours, t_script = statistics.median(ours), statistics.median(script)
    print(f"tiny-sdxl, {size} px, batch {batch}, rank 4, {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} "
          f"thread(s), device {handle.device}, text encoders {'trained' if te else 'frozen'}")
    print("per step, script-faithful loop: " + (f"encodes the batch's {batch} prompts with both text encoders, "
                                                 if te else "instance prompt embeddings computed once (repeated), ")
          + "VAE-encodes the batch, UNet forward/backward, clip, torch AdamW (default implementation)")
    print("per step, TuneLab (defaults): " + (f"encodes each distinct caption once (1 of {batch}), " if te else
                                               "the same cached prompt embeddings, ")
          + "samples latents from the cached VAE distributions, UNet forward/backward, clip, fused AdamW")
    print(f"median step: tunelab {t_ours * 1000:.1f} ms, script-faithful {t_script * 1000:.1f} ms")
    ok = report("step time ratio tunelab/script-faithful", t_ours / t_script, 0.8)
    m_ours = peak_memory(lambda: tunelab_run(handle, data, tmp / "mem.safetensors", args.steps, te, **kw))
    m_script = peak_memory(lambda: script_run(handle, data, args.steps, te, **kw))
    print(f"peak memory above baseline: tunelab {m_ours / 2**20:.1f} MiB, script-faithful {m_script / 2**20:.1f} MiB"
          f", ratio {m_ours / max(m_script, 1):.2f}"
          + ("" if torch.cuda.is_available() else " (CPU RSS: memory freed by earlier runs is reused, so at this size "
             "both sides stay near 0; the peak that matters is on a GPU)"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
